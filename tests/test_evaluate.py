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
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from medfusion import storage
from medfusion.config import ConfigError, DataConfig, EvaluateConfig, PrepareConfig, SplitConfig, SynthConfig
from medfusion.data.dataset import DatasetError, DatasetInfo, open_dataset
from medfusion.data.prepare import run_prepare
from medfusion.evaluate import (
    METRICS_FILE,
    PLOT_FILES,
    REPORT_FILE,
    EvaluateError,
    _baselines,
    _confusion_for_plot,
    _row_boxes,
    _targets,
    _train_boxes,
    default_output_uri,
    predict_batches,
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


def _train_split_boxes(info) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic train split's boxes and their (single) class, read straight from the shards."""
    table = pa.concat_tables(pq.read_table(uri, columns=["labels", "box"]) for uri in info.shard_uris("train"))
    rows = [(labels[0], box) for labels, box in zip(*table.to_pydict().values()) if box is not None]
    return np.array([box for _, box in rows]), np.array([c for c, _ in rows])


def test_metrics_json_has_the_field_protocol(setup, evaluated):
    """Per-class AUROC/IoU/shares keyed by class name, CIs around the estimates, the train baselines."""
    record = json.loads(Path(evaluated.metrics_uri).read_text())
    classes, metrics = setup["info"].classes, record["metrics"]
    for name in ("accuracy", "auroc_macro", "mean_iou", "box_mean_iou", "box_iou50", "detection_iou"):
        low, high = record["ci"][name]
        assert low - 1e-6 <= metrics[name] <= high + 1e-6, name
    assert record["bootstrap"] == {"resamples": 1000, "level": 0.95, "seed": 0, "over": "images"}
    assert list(record["iou_share"]) == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"]
    for key in ("per_class_auroc", "per_class_iou", "per_class_iou_share", "per_class_detection_iou", "box_support"):
        assert list(record[key]) == classes, key
    assert sum(record["box_support"].values()) == record["num_boxes"] > 0
    assert record["iou_share"]["0.5"] == pytest.approx(metrics["box_iou50"])
    # An untrained model finds no box exactly: 1.0 would be the true boxes scored against themselves.
    assert metrics["box_mean_iou"] < 0.99
    boxes, box_classes = _train_split_boxes(setup["info"])
    baselines = record["baselines"]
    assert baselines["global_mean_box"]["box"] == pytest.approx(boxes.mean(axis=0).tolist(), abs=1e-6)
    for c, name in enumerate(classes):
        own = boxes[box_classes == c]
        expected = own.mean(axis=0).tolist() if len(own) else None
        assert baselines["class_mean_box"]["boxes"][name] == (pytest.approx(expected, abs=1e-6) if len(own) else None)
    assert baselines["class_mean_box"]["fallback_classes"] == [n for c, n in enumerate(classes) if c not in box_classes]
    for baseline in ("global_mean_box", "class_mean_box"):
        assert (
            0.0 <= baselines[baseline]["box_mean_iou"] <= 1.0 and list(baselines[baseline]["per_class_iou"]) == classes
        )
    assert evaluated.baselines["class_mean_box"]["box_mean_iou"] == pytest.approx(
        baselines["class_mean_box"]["box_mean_iou"]
    )
    assert evaluated.ci["auroc_macro"] == pytest.approx(record["ci"]["auroc_macro"])


def test_summary_and_report_show_intervals_and_baselines(evaluated):
    summary = evaluated.summary()
    assert "95% CI" in summary and "class mean box" in summary and "global mean box" in summary
    line = next(row for row in summary.splitlines() if row.startswith("box_mean_iou"))
    low, high = evaluated.ci["box_mean_iou"]
    baseline = evaluated.baselines["class_mean_box"]["box_mean_iou"]
    assert f"[{low:.4f}, {high:.4f}]" in line and f"{baseline:.4f}" in line
    assert f"{evaluated.metrics['auroc_macro']:.4f}  [" in summary  # macro AUROC with its interval
    page = Path(evaluated.report_uri).read_text()
    for text in ("95% CI", "Localization against the baselines", "class mean box", "global mean box", "IoU &ge; 0.7"):
        assert text in page, text


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


@pytest.mark.parametrize("parse", [None, str.split])
def test_text_metrics_of_a_dataset_without_findings_are_null_with_the_reason(parse):
    labels = np.eye(3, dtype=np.float32)
    findings = ["", "  ", ""]
    metrics = compute_metrics(
        probs=labels * 0.8 + 0.1, labels=labels, generated=["a b", "", "c"], references=findings, parse=parse
    )
    reasons = undefined_metrics(metrics, ["a", "b", "c"], labels, "manifest", findings=findings)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "clinical_precision", "clinical_recall", "clinical_f1"):
        assert "the dataset has no findings text" in reasons[key], key
        assert key not in metrics or math.isnan(metrics[key]), key  # null in metrics.json, never 0.0
    with_text = undefined_metrics(metrics, ["a", "b", "c"], labels, "manifest", findings=["", "one finding", ""])
    assert "no findings text" not in with_text.get("bleu4", "")  # the reason names the references, not a guess


def test_undefined_reasons_per_class_box():
    labels = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    metrics = compute_metrics(
        probs=labels * 0.8 + 0.1,
        labels=labels,
        pred_box=np.tile([0.1, 0.1, 0.5, 0.5], (2, 1)),
        true_box=np.tile([0.1, 0.1, 0.5, 0.5], (2, 1)),
        has_box=np.array([1.0, 0.0]),
        objectness=np.array([0.9, 0.1]),
    )
    reasons = undefined_metrics(metrics, ["a", "b", "c"], labels, "manifest")
    assert "box_mean_iou" not in reasons and "mean_iou" not in reasons
    assert "no true box of class 'b'" in reasons["iou[b]"] and "iou[c]" in reasons and "iou[a]" not in reasons


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


# ----------------------------------------------------------------------------------------------
# per-class boxes in the shards, and the train split's baselines
# ----------------------------------------------------------------------------------------------

A, B = [0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.8]


@pytest.mark.parametrize(
    "row, per_finding, expected",
    [
        # schema 1, one box per image: it belongs to each of the image's classes
        (([0, 2], A), False, [(A, [0, 2])]),
        (([1], None), False, []),
        (([1], [0.1, float("nan"), 0.2, 0.3]), False, []),
        # schema 2, boxes per finding, each for its own class (`box` is only the first of them)
        (([0, 2], A, [0, 2], [A, B]), True, [(A, [0]), (B, [2])]),
        (([0], A, [0, 0], [A, B]), True, [(A, [0])]),  # a finding boxed twice: its first box
        (([0], A, [0, 7], [A, B]), True, [(A, [0])]),  # a class index past the classes
        (([0, 2], None, [], []), True, []),
        (([0], None, None, None), True, []),
    ],
)
def test_row_boxes(row, per_finding, expected):
    got = _row_boxes(3, *row, per_finding=per_finding)
    assert [(np.asarray(b).tolist(), c) for b, c in got] == [(pytest.approx(b), c) for b, c in expected]


def test_ray_targets_build_per_class_boxes_from_shard_columns():
    raw = {
        "labels": np.array([[0, 2], [1]], dtype=object),
        "box": np.array([A, None], dtype=object),
        "box_labels": np.array([[0, 2], []], dtype=object),
        "boxes": np.array([[A, B], []], dtype=object),
    }
    out = _targets(raw, num_classes=3)
    assert "boxes" not in out and "box_labels" not in out
    assert out["class_has_box"].tolist() == [[1, 0, 1], [0, 0, 0]]
    np.testing.assert_allclose(out["class_boxes"][0, 2], B, rtol=1e-6)
    assert "class_boxes" not in _targets({"labels": raw["labels"], "box": raw["box"]}, num_classes=3)


class _BoxPredictor:
    """Answers like Predictor.predict_batch: its columns (here per-class boxes `pred_class_boxes`,
    all at `box`) replace the batch's columns of the same name; the others pass through."""

    def __init__(self, box: list[float], per_class: bool = True) -> None:
        self.box, self.per_class = box, per_class

    def predict_batch(self, batch):
        n, num_classes = batch["labels"].shape
        result = {
            "probs": np.full((n, num_classes), 1.0 / num_classes),
            "pred_box": np.tile(self.box, (n, 1)),
            "objectness": np.full(n, 0.9),
        }
        if self.per_class:
            result["pred_class_boxes"] = np.tile(self.box, (n, num_classes, 1))
            result["class_objectness"] = np.full((n, num_classes), 0.9)
        return {**{k: v for k, v in batch.items() if k != "image" and k not in result}, **result}


@pytest.mark.parametrize("per_class", [True, False])
def test_predicted_class_boxes_do_not_replace_the_true_ones(per_class):
    from medfusion.metrics import metrics_from_predictions

    true = np.zeros((2, 3, 4), dtype=np.float32)
    true[0, 0], true[1, 2] = A, B
    batch = {
        "image": np.zeros((2, 1, 4, 4)),
        "labels": np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32),
        "box": np.array([A, B], dtype=np.float32),
        "has_box": np.ones(2, dtype=np.float32),
        "class_boxes": true,
        "class_has_box": (true.sum(-1) > 0).astype(np.float32),
    }
    predictions = predict_batches(_BoxPredictor(A, per_class), [batch])
    np.testing.assert_array_equal(predictions["class_boxes"], true)
    assert ("pred_class_boxes" in predictions) == per_class
    metrics = metrics_from_predictions(predictions, resamples=0)
    assert metrics["per_class_iou"] == pytest.approx([1.0, None, 0.0])  # A found, B missed


def _hand_made_dataset(root: Path, columns: dict) -> DatasetInfo:
    (root / "train").mkdir(parents=True)
    pq.write_table(pa.table(columns), root / "train" / "part-00000.parquet")
    rows = len(columns["labels"])
    manifest = {
        "schema_version": 2 if "boxes" in columns else 1,
        "classes": ["a", "b", "c"],
        "splits": {"train": {"rows": rows, "shards": [{"path": "train/part-00000.parquet"}]}},
    }
    return DatasetInfo(uri=str(root), version="hand", manifest=manifest, tokenizer=None)


def test_train_boxes_read_per_class_box_columns(tmp_path):
    """Shards with `box_labels`/`boxes` (schema 2): each box once, for its own class only."""
    info = _hand_made_dataset(
        tmp_path,
        {
            "labels": pa.array([[0, 2], [1, 2], [2]], type=pa.list_(pa.int32())),
            "box": pa.array([A, A, None], type=pa.list_(pa.float32())),
            "box_labels": pa.array([[0, 2], [2], None], type=pa.list_(pa.int32())),
            "boxes": pa.array([[A, B], [A], None], type=pa.list_(pa.list_(pa.float32()))),
        },
    )
    boxes, classes = _train_boxes(info)
    np.testing.assert_allclose(boxes, [A, B, A], rtol=1e-6)
    assert classes.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    predictions = {"labels": np.array([[1.0, 0, 0]]), "box": np.array([A]), "has_box": np.array([1.0])}
    baselines, why_not = _baselines(info, predictions)
    assert not why_not and baselines["class_mean_box"]["boxes"][0] == pytest.approx(A)
    assert baselines["class_mean_box"]["box_mean_iou"] == pytest.approx(1.0)


def test_baselines_without_train_boxes_are_null_with_the_reason(tmp_path):
    info = _hand_made_dataset(
        tmp_path,
        {
            "labels": pa.array([[0], [1]], type=pa.list_(pa.int32())),
            "box": pa.array([None, None], type=pa.list_(pa.float32())),
        },
    )
    predictions = {"labels": np.array([[1.0, 0, 0]]), "box": np.array([A]), "has_box": np.array([1.0])}
    baselines, why_not = _baselines(info, predictions)
    assert baselines is None and "none of the 2 train images has a lesion box" in why_not
    info.manifest["splits"]["train"]["rows"] = 0
    assert "train split has no rows" in _baselines(info, predictions)[1]
