"""The evaluate stage: the files it writes, both engines agree, S3 in and out, errors a user can act on."""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfusion import storage
from medfusion.config import ConfigError, DataConfig, EvaluateConfig, PrepareConfig, SplitConfig, SynthConfig
from medfusion.data.dataset import DatasetError, open_dataset
from medfusion.data.prepare import run_prepare
from medfusion.evaluate import (
    METRICS_FILE,
    PLOT_FILES,
    REPORT_FILE,
    EvaluateError,
    _confusion_for_plot,
    default_output_uri,
    run_evaluate,
    undefined_metrics,
)
from medfusion.export import ExportError, export_model
from medfusion.metrics import compute_metrics
from medfusion.models import create_model

DATA = DataConfig(image_size=32, max_report_tokens=48, max_findings_tokens=40)


def _export(info, uri: str, classes: list[str] | None = None) -> str:
    torch.manual_seed(0)
    model = create_model("medfusion_tiny", len(info.tokenizer), len(info.classes)).eval()
    return export_model(
        model,
        uri,
        tokenizer=info.tokenizer,
        classes=classes or info.classes,
        data_settings=DATA,
        lineage={"dataset_version": info.version, "trial_id": None},
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = run_prepare(
        PrepareConfig(
            source="synthetic", output_uri=str(root / "data"), synth=SynthConfig(num_samples=120, image_size=32)
        )
    )
    info = open_dataset(data.dataset_uri)
    return {"root": root, "data": data.dataset_uri, "info": info, "model": _export(info, str(root / "model"))}


@pytest.fixture(scope="module")
def evaluated(setup):
    """One full local evaluation of the test split (shared by the file/content checks)."""
    return run_evaluate(EvaluateConfig(model_uri=setup["model"], data_uri=setup["data"]))


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"engine": "spark"}, "engine: must be one of local, ray"),
        ({"split": "holdout"}, "split: must be one of train, val, test"),
        ({"limit": -1}, "limit: must be >= 0"),
        ({"batch_size": 0}, "batch_size: must be >= 1"),
        ({"num_images": 0}, r"num_images: must be in \[1, 64\]"),
        ({"device": "tpu"}, "device: must be one of cpu, cuda, auto"),
        ({"concurrency": 0}, "concurrency: must be >= 1"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EvaluateConfig(**kwargs)


def test_import_is_light(tmp_path):
    code = "import sys, medfusion.evaluate; print([m for m in ('torch', 'ray', 'matplotlib') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "model_uri, expected",
    [
        ("s3://bucket/runs/r1/model", "s3://bucket/runs/r1/eval-test"),
        ("s3://bucket/runs/r1/model/", "s3://bucket/runs/r1/eval-test"),
        ("s3://bucket/model", "s3://bucket/eval-test"),
        ("/runs/r1/model", "/runs/r1/eval-test"),
    ],
)
def test_default_output_is_next_to_the_model(model_uri, expected):
    assert default_output_uri(model_uri, "test") == expected


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------


def test_writes_every_named_file_and_the_pngs_open(setup, evaluated):
    out = Path(evaluated.output_uri)
    assert out == setup["root"] / "eval-test"  # default: next to the model folder
    assert sorted(p.name for p in out.iterdir()) == sorted([METRICS_FILE, REPORT_FILE, *PLOT_FILES.values()])
    assert set(evaluated.plot_uris) == set(PLOT_FILES)
    for uri in evaluated.plot_uris.values():
        with Image.open(uri) as image:
            image.verify()
            assert image.format == "PNG"
    with Image.open(evaluated.plot_uris["predictions"]) as grid:
        assert grid.width > 600  # 8 images, 4 per row


def test_metrics_json_has_metrics_and_lineage(setup, evaluated):
    record = json.loads(Path(evaluated.metrics_uri).read_text())  # strict JSON: undefined is null
    info = setup["info"]
    assert record["split"] == "test" and record["num_samples"] == info.rows("test") == evaluated.num_samples
    assert record["dataset_version"] == info.version and len(record["model_version"]) == 12
    assert record["model"]["trained_on_dataset_version"] == info.version
    expected = {"accuracy", "macro_f1", "auroc_macro", "mean_iou", "iou50", "objectness_accuracy", "bleu4", "rouge_l"}
    assert expected | {"clinical_precision", "clinical_recall", "clinical_f1"} <= set(record["metrics"])
    assert list(record["per_class_auroc"]) == info.classes
    assert np.asarray(record["confusion_matrix"]).shape == (len(info.classes),) * 2
    assert np.asarray(record["confusion_matrix"]).sum() == record["num_samples"]
    assert sum(record["class_support"].values()) == record["num_samples"]
    for name, value in evaluated.metrics.items():
        assert record["metrics"][name] == pytest.approx(value)


def test_report_is_one_self_contained_page(evaluated):
    page = Path(evaluated.report_uri).read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<html") == 1
    for name, file in PLOT_FILES.items():
        assert f'href="{file}"' in page, file
        embedded = base64.b64encode(Path(evaluated.plot_uris[name]).read_bytes()).decode()
        assert f"data:image/png;base64,{embedded}" in page, name
    for text in ("Metrics", "Per class", "Undefined metrics", "Lineage", "accuracy", "dataset version"):
        assert text in page
    summary = evaluated.summary()
    assert evaluated.report_uri in summary and "accuracy" in summary


def test_undefined_metrics_are_null_and_explained(setup, tmp_path):
    """One sample: one class present, so no class has both positives and negatives."""
    result = run_evaluate(
        EvaluateConfig(model_uri=setup["model"], data_uri=setup["data"], limit=1, output_uri=str(tmp_path / "one"))
    )
    record = json.loads(Path(result.metrics_uri).read_text())
    assert record["num_samples"] == 1 and record["metrics"]["auroc_macro"] is None
    assert "auroc_macro" not in result.metrics
    assert "no class has both positive and negative" in result.undefined["auroc_macro"]
    absent = [c for c, n in record["class_support"].items() if n == 0]
    assert all(record["per_class_auroc"][c] is None and f"auroc[{c}]" in record["undefined"] for c in absent)
    page = Path(result.report_uri).read_text()
    assert "no class has both positive and negative" in page and "Only the first 1 of" in page


def test_undefined_reasons_without_boxes_or_synthetic_source():
    labels = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]], dtype=np.float32)
    metrics = compute_metrics(
        probs=probs, labels=labels, pred_box=np.zeros((2, 4)), true_box=np.zeros((2, 4)), has_box=np.zeros(2)
    )
    reasons = undefined_metrics(metrics, ["a", "b", "c"], labels, "manifest")
    assert math.isnan(metrics["mean_iou"]) and "no true box" in reasons["mean_iou"] and "iou50" in reasons
    assert "no sample of class 'c'" in reasons["auroc[c]"] and "auroc_macro" not in reasons
    assert all("'manifest'" in reasons[k] for k in ("clinical_precision", "clinical_recall", "clinical_f1"))


def test_multi_label_confusion_counts_every_pair():
    labels = np.array([[1, 1, 0], [0, 0, 1]], dtype=np.float32)
    probs = np.array([[0.9, 0.2, 0.6], [0.1, 0.1, 0.8]], dtype=np.float32)
    matrix = np.asarray(_confusion_for_plot({}, probs, labels, multi_label=True))
    assert matrix.tolist() == [[1, 0, 1], [1, 0, 1], [0, 0, 1]]


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def test_model_uri_without_an_export(setup, tmp_path):
    with pytest.raises(ExportError, match=f"{setup['data']}: no exported model here"):
        run_evaluate(EvaluateConfig(model_uri=setup["data"], data_uri=setup["data"], output_uri=str(tmp_path)))


def test_dataset_uri_without_a_dataset(setup, tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path}: no dataset here"):
        run_evaluate(EvaluateConfig(model_uri=setup["model"], data_uri=str(tmp_path), output_uri=str(tmp_path)))


def test_dataset_without_the_split(setup, tmp_path):
    data = run_prepare(
        PrepareConfig(
            source="synthetic",
            output_uri=str(tmp_path / "data"),
            synth=SynthConfig(num_samples=24, image_size=32),
            split=SplitConfig(val=0.2, test=0.0),
        )
    )
    with pytest.raises(
        DatasetError, match=r"data: split 'test' has no rows \(splits: test \(0 rows\), train \(\d+ rows\), val"
    ):
        run_evaluate(EvaluateConfig(model_uri=setup["model"], data_uri=data.dataset_uri, output_uri=str(tmp_path)))


def test_classes_of_model_and_dataset_differ(setup, tmp_path):
    info = setup["info"]
    renamed = [c.upper() for c in info.classes]
    model = _export(info, str(tmp_path / "model"), classes=renamed)
    with pytest.raises(EvaluateError, match="classes differ") as error:
        run_evaluate(EvaluateConfig(model_uri=model, data_uri=setup["data"], output_uri=str(tmp_path / "out")))
    assert str(renamed) in str(error.value) and str(info.classes) in str(error.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Ray Data and S3
# ----------------------------------------------------------------------------------------------


def _record(result) -> dict:
    return json.loads(storage.read_text(result.metrics_uri))


def _assert_same_metrics(a: dict, b: dict) -> None:
    assert a["num_samples"] == b["num_samples"]
    assert a["confusion_matrix"] == b["confusion_matrix"]
    for section in ("metrics", "per_class_auroc"):
        assert set(a[section]) == set(b[section])
        for name, value in a[section].items():
            assert b[section][name] == pytest.approx(value, abs=1e-5), f"{section}.{name}"


@pytest.mark.integration
def test_local_and_ray_engines_agree(setup, ray_local, tmp_path):
    """Several batches of a limited split: Ray Data (Predictor actors) and pyarrow in-process."""
    common = {"model_uri": setup["model"], "data_uri": setup["data"], "split": "train", "limit": 20, "batch_size": 4}
    local = run_evaluate(EvaluateConfig(**common, output_uri=str(tmp_path / "local")))
    ray_result = run_evaluate(EvaluateConfig(**common, engine="ray", output_uri=str(tmp_path / "ray")))
    assert local.num_samples == ray_result.num_samples == 20
    _assert_same_metrics(_record(local), _record(ray_result))
    # the figures show the same (first) samples
    assert _record(ray_result)["engine"] == "ray"
    assert (tmp_path / "ray" / PLOT_FILES["predictions"]).stat().st_size > 0


@pytest.mark.integration
def test_evaluate_from_and_to_s3(setup, evaluated, s3_prefix):
    for name, root in (("data", setup["data"]), ("model", setup["model"])):
        for path in storage.list_files(root):
            storage.write_bytes(f"{s3_prefix}/{name}/{Path(path).relative_to(root)}", Path(path).read_bytes())
    result = run_evaluate(EvaluateConfig(model_uri=f"{s3_prefix}/model", data_uri=f"{s3_prefix}/data"))
    assert result.output_uri == f"{s3_prefix}/eval-test"
    names = {uri.rsplit("/", 1)[1] for uri in storage.list_files(result.output_uri)}
    assert names == {METRICS_FILE, REPORT_FILE, *PLOT_FILES.values()}
    for uri in result.plot_uris.values():
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
            image.verify()
    record = _record(result)
    assert record["dataset_version"] == setup["info"].version and record["dataset"]["uri"] == f"{s3_prefix}/data"
    _assert_same_metrics(_record(evaluated), record)
