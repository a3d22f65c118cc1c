"""Export -> Predictor: round trip, integrity checks, bad input, and the three entry points."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dicom_files import dicom_file
from medfusion.config import DataConfig, SynthConfig
from medfusion.data import synth
from medfusion.data.batches import collate
from medfusion.data.tokenizer import Tokenizer
from medfusion.export import CHECKSUMS_FILE, EXPORT_FILES, ExportError, export_model, load_export
from medfusion.models import create_model, to_tensors
from medfusion.predictor import PredictError, Predictor, concat_batches

DATA = DataConfig(image_size=64, max_report_tokens=24, max_findings_tokens=40)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = SynthConfig(num_samples=24, image_size=64)
    samples = list(synth.generate(cfg))
    classes = synth.class_names(cfg)
    tokenizer = Tokenizer.build(s.report + " " + s.findings for s in samples)
    torch.manual_seed(0)
    model = create_model("medfusion_tiny", len(tokenizer), len(classes), fusion="cross_attention").eval()
    uri = str(tmp_path_factory.mktemp("export") / "model")
    export_model(
        model,
        uri,
        tokenizer=tokenizer,
        classes=classes,
        data_settings=DATA,
        metrics={"accuracy": 0.5, "auroc_macro": float("nan")},
        lineage={"dataset_version": "abc", "trial_id": None},
    )
    return {"samples": samples, "classes": classes, "tokenizer": tokenizer, "model": model, "uri": uri}


def _collated(setup, samples):
    rows = {
        key: [getattr(s, key) for s in samples] for key in ("image", "report", "findings", "labels", "box", "sample_id")
    }
    return collate(
        rows,
        tokenizer=setup["tokenizer"],
        num_classes=len(setup["classes"]),
        image_size=DATA.image_size,
        max_report_tokens=DATA.max_report_tokens,
        max_findings_tokens=DATA.max_findings_tokens,
    )


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a stub): size checks come first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_export_folder_has_every_file(setup):
    files = sorted(p.name for p in Path(setup["uri"]).iterdir())
    assert files == sorted([*EXPORT_FILES, CHECKSUMS_FILE])
    config = json.loads((Path(setup["uri"]) / "config.json").read_text())
    assert config["data"] == {"image_size": 64, "max_report_tokens": 24, "max_findings_tokens": 40}
    assert config["vocab_size"] == len(setup["tokenizer"]) and config["num_classes"] == len(setup["classes"])
    assert config["model"]["fusion"] == "cross_attention"
    assert json.loads((Path(setup["uri"]) / "metrics.json").read_text())["auroc_macro"] is None  # strict JSON


def test_round_trip_gives_the_in_memory_outputs(setup):
    batch = _collated(setup, setup["samples"][:8])
    in_memory = Predictor.from_model(
        setup["model"], tokenizer=setup["tokenizer"], classes=setup["classes"], data_settings=vars(DATA), beam_size=2
    )
    loaded = Predictor.from_export(setup["uri"], beam_size=2)
    a, b = in_memory.predict_batch(batch), loaded.predict_batch(batch)
    assert set(a) == set(b)
    for key in ("probs", "pred_box", "objectness", "image_attention", "note_attention"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(a["generated_ids"], b["generated_ids"])
    with torch.no_grad():
        logits = setup["model"](to_tensors(batch))["logits"]
    np.testing.assert_allclose(b["probs"], logits.softmax(-1).numpy(), atol=1e-6)
    # targets and ids pass through for evaluation
    assert {"labels", "box", "has_box", "findings", "sample_id"} <= set(b) and "image" not in b
    items = [{"image": s.image, "report": s.report} for s in setup["samples"][:3]]
    assert in_memory.predict(items) == loaded.predict(items)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("model.safetensors", _flip_byte, r"model\.safetensors: sha256 mismatch"),
        ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]), r"model\.safetensors: sha256 mismatch"),
        ("config.json", lambda p: p.write_bytes(p.read_bytes()[:-10]), r"config\.json: sha256 mismatch"),
        ("tokenizer.json", lambda p: p.unlink(), r"tokenizer\.json: missing"),
        ("checksums.json", lambda p: p.unlink(), r"checksums\.json: missing"),
        ("checksums.json", lambda p: p.write_text("{"), r"checksums\.json: not a valid checksums file"),
    ],
)
def test_damaged_export_fails_naming_the_file(setup, tmp_path, name, damage, message):
    copy = tmp_path / "model"
    copy.mkdir()
    for f in Path(setup["uri"]).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    damage(copy / name)
    with pytest.raises(ExportError, match=message):
        Predictor.from_export(str(copy))


def test_export_refuses_mismatched_metadata(setup, tmp_path):
    with pytest.raises(ExportError, match="class names"):
        export_model(
            setup["model"], str(tmp_path / "x"), tokenizer=setup["tokenizer"], classes=["a"], data_settings=DATA
        )
    with pytest.raises(ExportError, match="max_findings_tokens"):
        export_model(
            setup["model"],
            str(tmp_path / "x"),
            tokenizer=setup["tokenizer"],
            classes=setup["classes"],
            data_settings={"image_size": 64, "max_report_tokens": 8},
        )


@pytest.mark.parametrize(
    "image, report, message",
    [
        (b"this is not an image at all", None, "not a PNG, JPEG or DICOM"),
        (b"", None, "empty image"),
        (_png(64, 64)[:60], None, "cannot decode PNG"),
        (dicom_file(shape=(40, 50)), None, "no pixel data"),
        (_png_header(8000, 6000), None, "exceeds the limit of 40000000 pixels"),
        (_png_header(0, 0), None, "cannot decode PNG"),
        ("aGVsbG8=", None, "must be encoded bytes"),
        (_png(64, 64), 12345, "report must be a string"),
    ],
    ids=[
        "garbage",
        "empty",
        "truncated-png",
        "dicom-without-pixels",
        "huge-png",
        "zero-size-png",
        "base64-string",
        "non-string-report",
    ],
)
def test_bad_input_raises_predict_error_with_index(setup, image, report, message):
    predictor = Predictor.from_export(setup["uri"])
    good = {"image": setup["samples"][0].image, "report": "cough"}
    with pytest.raises(PredictError, match=f"item 1: .*{message}") as info:
        predictor.predict([good, {"image": image, "report": report}])
    assert info.value.index == 1 and isinstance(info.value, ValueError)


def test_huge_image_is_refused(setup):
    predictor = Predictor.from_export(setup["uri"], max_pixels=100 * 100)
    with pytest.raises(PredictError, match="exceeds the limit"):
        predictor.predict([{"image": _png(200, 120)}])


def test_errors_return_keeps_the_good_items(setup):
    predictor = Predictor.from_export(setup["uri"])
    out = predictor.predict([{"image": b"junk"}, {"image": setup["samples"][0].image}], errors="return")
    assert out[0] == {"error": "image: not a PNG, JPEG or DICOM image (unrecognized leading bytes)", "index": 0}
    assert "top_label" in out[1]


@pytest.mark.parametrize(
    "report, expected_words",
    [
        (None, 0),
        ("", 0),
        ("   ", 0),
        ("fever and productive cough.", 5),
        ("cough " * 20_000, 24),  # a 120k-character note: truncated to max_report_tokens
    ],
)
def test_notes_of_any_length(setup, report, expected_words):
    predictor = Predictor.from_export(setup["uri"])
    (result,) = predictor.predict([{"image": setup["samples"][0].image, "report": report}])
    assert len(result["note_attention"]) == expected_words
    weights = [w for _, w in result["note_attention"]]
    assert all(np.isfinite(weights)) and (not weights or sum(weights) == pytest.approx(1.0, abs=1e-5))


def test_prediction_fields_in_input_pixels(setup):
    predictor = Predictor.from_export(setup["uri"])
    items = [{"image": _png(160, 100), "report": "smoker, haemoptysis"}, {"image": dicom_file(np.full((40, 50), 900))}]
    for item, (width, height) in zip(predictor.predict(items), [(160, 100), (50, 40)]):
        probs = [label["probability"] for label in item["labels"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert item["top_label"] == item["labels"][0]["name"] == item["predicted"][0]
        x0, y0, x1, y1 = item["box"]["xyxy"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        assert item["box"]["xyxy"][2] == pytest.approx(item["box"]["normalized_xyxy"][2] * width)
        assert isinstance(item["findings"], str)
        assert np.asarray(item["image_attention"]).shape == (8, 8)
        assert item["image_size"] == {"width": width, "height": height}
        json.dumps(item)  # JSON-ready


def test_ray_data_call_on_raw_rows(setup):
    predictor = Predictor(setup["uri"])
    samples = setup["samples"][:5]
    rows = {
        "image": np.array([s.image for s in samples], dtype=object),
        "report": np.array([s.report for s in samples], dtype=object),
        "sample_id": np.array([s.sample_id for s in samples]),
    }
    out = predictor(rows)
    assert "image" not in out and list(out["sample_id"]) == [s.sample_id for s in samples]
    assert out["probs"].shape == (5, len(setup["classes"])) and out["pred_box_pixels"].shape == (5, 4)
    np.testing.assert_allclose(out["pred_box_pixels"], out["pred_box"] * 64, rtol=1e-6)
    # same answers as predict_batch on the collated batch, and as predict (the online path) item by item
    np.testing.assert_allclose(out["probs"], predictor.predict_batch(_collated(setup, samples))["probs"], atol=1e-6)
    online = predictor.predict([{"image": s.image, "report": s.report} for s in samples])
    np.testing.assert_allclose([item["box"]["score"] for item in online], out["objectness"], atol=1e-6)
    np.testing.assert_allclose([item["top_probability"] for item in online], out["probs"].max(1), atol=1e-6)
    rows["image"][3] = b"junk"
    with pytest.raises(PredictError, match=f"item 3: .*sample_id {samples[3].sample_id}"):
        predictor(rows)


def test_evaluate_is_a_short_composition(setup):
    from medfusion.metrics import metrics_from_predictions

    predictor = Predictor.from_export(setup["uri"])
    batches = [_collated(setup, setup["samples"][i : i + 8]) for i in range(0, 24, 8)]
    predictions = concat_batches(predictor.predict_batch(b) for b in batches)
    metrics = metrics_from_predictions(predictions, parse=synth.parse_findings)
    hits = predictions["probs"].argmax(1) == np.array([s.labels[0] for s in setup["samples"]])
    assert metrics["num_samples"] == 24.0 and metrics["accuracy"] == pytest.approx(hits.mean())
    assert {"mean_iou", "bleu4", "rouge_l", "clinical_f1", "confusion_matrix"} <= set(metrics)


def test_model_info(setup):
    info = Predictor.from_export(setup["uri"]).info
    loaded = load_export(setup["uri"])
    assert info["version"] == loaded.version and len(info["version"]) == 12
    assert info["classes"] == setup["classes"] and info["lineage"]["dataset_version"] == "abc"
    assert info["model_name"] == "medfusion_tiny"
