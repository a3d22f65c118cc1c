"""The evaluate stage: an exported model on one dataset split -> metrics.json, PNG plots, report.html.

    result = run_evaluate(EvaluateConfig(model_uri="runs/r1/model", data_uri="s3://b/data"))

Two engines, one `Predictor` (the class that also serves online):

- ``local``: the split's shards are read with pyarrow in this process (`iter_local_batches`),
  collated with the **model's** tokenizer and data settings, and scored with `predict_batch`.
- ``ray``: Ray Data ``read_parquet`` -> ``map_batches(Predictor)`` on the raw shard rows, an actor
  pool in which each actor loads the export once.

Both yield the same prediction columns, so `metrics_from_predictions` scores them the same way. The
figures show the split's first `num_images` samples (shard order), looked up by ``sample_id``, so
both engines draw the same ones. Clinical correctness needs the synthetic generator's vocabulary and
is computed only for a dataset whose source is ``synthetic``; every metric left undefined is listed
with its reason in metrics.json and report.html.

The field's protocol: macro AUROC as the multi-label headline, per-class mean IoU and the share of
boxes found at IoU >= 0.1 ... 0.7 per class (Wang et al., CVPR 2017, Table 4), a detection IoU that
counts an unclaimed box as 0, 95% bootstrap intervals over images, and beside the model the trivial
baselines that the train split gives: its global mean box, and its mean box of each true class.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from medfusion import storage
from medfusion.config import DataConfig, EvaluateConfig
from medfusion.data.batches import finding_box_arrays, valid_box
from medfusion.data.dataset import (
    FINDING_BOX_COLUMNS,
    DatasetError,
    DatasetInfo,
    iter_local_batches,
    open_dataset,
    read_shard,
)
from medfusion.data.tokenizer import split_words

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
PLOT_FILES = {
    "confusion_matrix": "confusion_matrix.png",
    "roc_curves": "roc_curves.png",
    "predictions": "predictions.png",
    "image_attention": "image_attention.png",
    "note_attention": "note_attention.png",
    "iou_thresholds": "iou_thresholds.png",
}
PLOT_CAPTIONS = {
    "confusion_matrix": "Confusion matrix (rows: true class, columns: predicted; colour: fraction of the row).",
    "roc_curves": "One-vs-rest ROC curve per class with its AUROC.",
    "predictions": "First samples of the split: true box (green), predicted box (red, dashed, drawn when "
    "objectness >= 0.5) and the generated findings.",
    "image_attention": "Where the image encoder's pooling attention looks.",
    "note_attention": "Note tokens shaded by the text encoder's attention weight.",
    "iou_thresholds": "Share of the true boxes found at IoU >= t, all boxes and per class (as Wang et al., "
    "CVPR 2017, Table 4): the model (solid) against the train split's mean box of the true class (dashed).",
}
# What a shard row carries into the ray engine (the local engine collates the same columns).
RAW_COLUMNS = ("sample_id", "image", "report", "findings", "labels", "box")
# Prediction columns kept for metrics and figures (generated_ids etc. vary in width across batches).
KEPT_COLUMNS = (
    "sample_id",
    "report",
    "findings",
    "labels",
    "box",
    "has_box",
    "class_boxes",
    "class_has_box",
    "probs",
    "pred_box",
    "objectness",
    "pred_class_boxes",
    "class_objectness",
    "generated",
    "image_attention",
    "note_attention",
)
METRIC_DOCS = {
    "accuracy": "top class is the true class (multi-label: predicted label set equals the true set)",
    "macro_f1": "F1 score averaged over classes",
    "auroc_macro": "one-vs-rest AUROC averaged over the classes where it is defined",
    "mean_iou": "IoU of predicted and true box, over images with a lesion",
    "iou50": "fraction of images with a lesion whose box IoU is >= 0.5",
    "objectness_accuracy": "lesion present / absent predicted correctly (score >= 0.5)",
    "box_mean_iou": "IoU of the box predicted for a class with the true box of that class, over every "
    "(image, class) with a true box",
    "box_iou50": "share of the (image, class) true boxes found at IoU >= 0.5",
    "detection_iou": "box_mean_iou where a box whose class objectness is < 0.5 (not claimed) counts IoU 0",
    "bleu1": "corpus BLEU-1 of generated vs reference findings",
    "bleu2": "corpus BLEU-2 of generated vs reference findings",
    "bleu3": "corpus BLEU-3 of generated vs reference findings",
    "bleu4": "corpus BLEU-4 of generated vs reference findings",
    "rouge_l": "mean ROUGE-L F1 of generated vs reference findings",
    "clinical_precision": "generated (finding, zone) facts that the reference states (1.0 if none generated)",
    "clinical_recall": "reference (finding, zone) facts that were generated",
    "clinical_f1": "harmonic mean of clinical precision and recall",
}
HEADLINE = (
    "accuracy",
    "macro_f1",
    "auroc_macro",
    "mean_iou",
    "iou50",
    "box_mean_iou",
    "box_iou50",
    "detection_iou",
    "bleu4",
    "rouge_l",
    "clinical_f1",
)
TEXT = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l")
CLINICAL = ("clinical_precision", "clinical_recall", "clinical_f1")
BOX = ("box_mean_iou", "box_iou50", "detection_iou")
# The trivial baselines beside the model (medfusion.metrics.mean_box_baselines), as the report names them.
BASELINES = {"class_mean_box": "class mean box", "global_mean_box": "global mean box"}


class EvaluateError(ValueError):
    """The model and the dataset cannot be evaluated together (the message names both)."""


@dataclass
class EvaluateResult:
    """Where `run_evaluate` wrote its outputs, and the headline metrics."""

    output_uri: str
    metrics_uri: str
    report_uri: str
    plot_uris: dict[str, str]
    """Figure name (PLOT_FILES keys) -> URI of its PNG."""
    metrics: dict[str, float]
    """Headline metrics that are defined for this evaluation (HEADLINE order)."""
    undefined: dict[str, str]
    """Metric -> why it is undefined (or not computed) for this evaluation."""
    num_samples: int
    split: str
    ci: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """Headline metric -> its 95% bootstrap interval over images [low, high], where it has one."""
    baselines: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    """Baseline (BASELINES keys) -> its defined box metrics (box_mean_iou, box_iou50); empty without one."""

    def summary(self) -> str:
        """A metrics table (value, 95% CI, the mean-box baselines) and where the outputs are (what
        `medfusion evaluate` prints)."""
        width = max(len(k) for k in HEADLINE)
        header = f"{'metric':<{width}}  {'value':<6}  {'95% CI':<16}"
        lines = [header + "".join(f"  {label:<15}" for label in BASELINES.values()).rstrip()]
        for name in HEADLINE:
            if name in self.metrics:
                interval = f"[{self.ci[name][0]:.4f}, {self.ci[name][1]:.4f}]" if name in self.ci else ""
                row = f"{name:<{width}}  {self.metrics[name]:.4f}  {interval:<16}"
                for baseline in BASELINES:
                    value = self.baselines.get(baseline, {}).get(name)
                    row += f"  {value:<15.4f}" if value is not None else f"  {'':<15}"
                lines.append(row.rstrip())
            elif name in self.undefined:
                lines.append(f"{name:<{width}}  undefined: {self.undefined[name]}")
        lines.append(f"{self.num_samples} samples of split {self.split!r}; all metrics in {self.metrics_uri}")
        lines.append(f"report: {self.report_uri}")
        lines.append(f"plots:  {', '.join(self.plot_uris.values())}")
        return "\n".join(lines)


def default_output_uri(model_uri: str, split: str) -> str:
    """``eval-<split>`` next to the export folder: ``runs/r1/model`` -> ``runs/r1/eval-test``."""
    if storage.is_s3(model_uri):
        root = model_uri.rstrip("/")
        return f"{storage.parent(root)}/eval-{split}"
    return str(Path(model_uri).absolute().parent / f"eval-{split}")


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------


def run_evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Evaluate the export at `cfg.model_uri` on one split of `cfg.data_uri`; write the outputs.

    Raises:
        ExportError: `model_uri` holds no (complete, intact) export.
        DatasetError: no dataset at `data_uri`, or its split `cfg.split` has no rows.
        EvaluateError: the model's classes (or label mode) differ from the dataset's.
    """
    from medfusion.export import CHECKSUMS_FILE, ExportError
    from medfusion.predictor import Predictor

    if not cfg.model_uri or not cfg.data_uri:
        raise ValueError("model_uri and data_uri: both required (local paths or s3:// URIs)")
    if not storage.exists(storage.join(cfg.model_uri, CHECKSUMS_FILE)):
        raise ExportError(
            f"{cfg.model_uri}: no exported model here ({CHECKSUMS_FILE}, which an export writes last, is missing); "
            "pass the export folder that train or tune wrote"
        )
    predictor = Predictor.from_export(
        cfg.model_uri, device=cfg.device, beam_size=cfg.beam_size or None, batch_size=cfg.batch_size
    )
    info = open_dataset(cfg.data_uri)
    _check_compatible(cfg, predictor, info)
    source = str(info.manifest.get("source", {}).get("type", "unknown"))
    # Notes are tokenized as the model was trained: its own tokenizer and data settings.
    model_view = dataclasses.replace(info, tokenizer=predictor.tokenizer)
    data_cfg = DataConfig(**predictor.export.data, batch_size=cfg.batch_size)

    if cfg.engine == "ray":
        predictions = _predict_ray(cfg, info)
    else:
        predictions = _predict_local(cfg, model_view, data_cfg, predictor)

    from medfusion.metrics import metrics_from_predictions

    parse = None
    if source == "synthetic":
        from medfusion.data.synth import parse_findings as parse
    metrics = metrics_from_predictions(predictions, predictor.multi_label, parse)
    undefined = undefined_metrics(
        metrics, info.classes, predictions["labels"], source, findings=predictions.get("findings")
    )
    baselines, why_not = _baselines(info, predictions)
    if why_not:
        undefined["baselines"] = why_not

    output_uri = cfg.output_uri or default_output_uri(cfg.model_uri, cfg.split)
    storage.ensure_bucket(output_uri)
    grid = _first_samples(model_view, cfg.split, data_cfg, min(cfg.num_images, len(predictions["probs"])))
    plot_uris = _write_plots(output_uri, predictions, metrics, baselines, info.classes, predictor, grid)

    record = _record(cfg, info, predictor, metrics, baselines, predictions["labels"], undefined, source)
    metrics_uri = storage.join(output_uri, METRICS_FILE)
    storage.write_json(metrics_uri, record)
    report_uri = storage.join(output_uri, REPORT_FILE)
    figures = {name: storage.read_bytes(uri) for name, uri in plot_uris.items()}
    storage.write_text(report_uri, render_report(record, figures))
    return EvaluateResult(
        output_uri=output_uri,
        metrics_uri=metrics_uri,
        report_uri=report_uri,
        plot_uris=plot_uris,
        metrics={k: float(metrics[k]) for k in HEADLINE if _defined(metrics.get(k))},
        undefined=undefined,
        num_samples=int(metrics["num_samples"]),
        split=cfg.split,
        ci={k: v for k, v in metrics["ci"].items() if k in HEADLINE and _defined(metrics.get(k)) and v},
        baselines={
            name: {k: float(v[k]) for k in ("box_mean_iou", "box_iou50") if _defined(v.get(k))}
            for name, v in (baselines or {}).items()
        },
    )


def _check_compatible(cfg: EvaluateConfig, predictor: Any, info: DatasetInfo) -> None:
    splits = info.manifest.get("splits", {})
    if not splits.get(cfg.split, {}).get("rows"):
        have = ", ".join(f"{name} ({v.get('rows', 0)} rows)" for name, v in splits.items()) or "none"
        raise DatasetError(f"{cfg.data_uri}: split {cfg.split!r} has no rows (splits: {have})")
    if list(predictor.classes) != info.classes:
        raise EvaluateError(
            f"classes differ: model {cfg.model_uri} predicts {list(predictor.classes)}, "
            f"dataset {cfg.data_uri} has {info.classes}"
        )
    if predictor.multi_label != info.multi_label:
        raise EvaluateError(
            f"label mode differs: model {cfg.model_uri} is {'multi' if predictor.multi_label else 'single'}-label, "
            f"dataset {cfg.data_uri} is {'multi' if info.multi_label else 'single'}-label"
        )


# ----------------------------------------------------------------------------------------------
# engines
# ----------------------------------------------------------------------------------------------


def _kept(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The prediction and target columns for metrics and figures."""
    return {k: np.asarray(batch[k]) for k in KEPT_COLUMNS if k in batch}


def predict_batches(predictor: Any, batches: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """`predictor.predict_batch` over collated model batches -> the kept prediction and target columns,
    concatenated (the true per-class boxes are `class_boxes`, the predicted `pred_class_boxes`)."""
    from medfusion.predictor import concat_batches

    return concat_batches(_kept(predictor.predict_batch(batch)) for batch in batches)


def _predict_local(cfg: EvaluateConfig, info: DatasetInfo, data_cfg: DataConfig, predictor: Any) -> dict:
    batches = iter_local_batches(info, cfg.split, data_cfg, extra_columns=("sample_id",), limit=cfg.limit or None)
    return predict_batches(predictor, batches)


def _row_boxes(
    num_classes: int, labels: Any, box: Any, box_labels: Any = None, boxes: Any = None, per_finding: bool = False
) -> list[tuple[np.ndarray, list[int]]]:
    """A shard row's true boxes, each once with the classes it belongs to, by the rules of
    medfusion.data.batches.collate: with per-finding columns (`per_finding`), each of `boxes` for its
    class in `box_labels` (a class's first box only); without, the one `box` for each of `labels`."""
    if not per_finding:
        single = valid_box(box)
        return [] if single is None else [(single, [int(c) for c in labels])]
    rows = {"box_labels": [box_labels], "boxes": [boxes]}
    none = np.zeros((1, num_classes), dtype=np.float32)
    class_boxes, class_has_box = finding_box_arrays(rows, none, np.zeros((1, 4), np.float32), np.zeros(1, np.float32))
    return [(class_boxes[0, c], [int(c)]) for c in np.flatnonzero(class_has_box[0])]


def _targets(batch: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """Raw shard `labels` (class indices) and `box` (xyxy or null) -> multi-hot labels, box, has_box,
    by the rules of medfusion.data.batches.collate; shards with per-class boxes (FINDING_BOX_COLUMNS)
    also give the true per-class boxes (N, C, 4) (class_boxes) and class_has_box (N, C)."""
    n = len(batch["labels"])
    labels = np.zeros((n, num_classes), dtype=np.float32)
    box = np.zeros((n, 4), dtype=np.float32)
    has_box = np.zeros((n,), dtype=np.float32)
    for i, (indices, b) in enumerate(zip(batch["labels"], batch["box"])):
        labels[i, np.asarray(list(indices), dtype=np.int64)] = 1.0
        values = valid_box(b)
        if values is not None:
            box[i], has_box[i] = values, 1.0
    out = {**batch, "labels": labels, "box": box, "has_box": has_box}
    if "boxes" not in batch or "box_labels" not in batch:
        return out
    class_boxes, class_has_box = finding_box_arrays(batch, labels, box, has_box)
    # The ragged raw columns go: blocks of lists of lists do not concatenate.
    kept = {k: v for k, v in out.items() if k not in FINDING_BOX_COLUMNS}
    return {**kept, "class_boxes": class_boxes, "class_has_box": class_has_box}


def _predict_ray(cfg: EvaluateConfig, info: DatasetInfo) -> dict:
    """Ray Data: read_parquet -> map_batches(Predictor) (actors) -> rows back to the driver, in order."""
    import ray
    import ray.data

    from medfusion.predictor import Predictor, concat_batches

    started = not ray.is_initialized()
    if started:  # RAY_ADDRESS, when set, points this at an existing cluster
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    # In order, so that `limit` takes the split's first rows exactly as the local engine does.
    context.execution_options.preserve_order = True
    try:
        uris = info.shard_uris(cfg.split)
        fs, _ = storage.filesystem(uris[0])
        columns = list(RAW_COLUMNS) + [c for c in info.model_columns if c not in RAW_COLUMNS and c != "image"]
        ds = ray.data.read_parquet(
            [storage.filesystem(u)[1] for u in uris], filesystem=fs, columns=columns, shuffle=None
        )
        if cfg.limit:
            ds = ds.limit(cfg.limit)
        # Fixed-shape targets before anything else: a raw `box` column is a tensor in a block where
        # every image has a lesion and an object column elsewhere, and such blocks do not concatenate.
        ds = ds.map_batches(
            _targets, fn_kwargs={"num_classes": len(info.classes)}, batch_size=None, batch_format="numpy"
        )
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={
                "uri": cfg.model_uri if storage.is_s3(cfg.model_uri) else str(Path(cfg.model_uri).absolute()),
                "device": cfg.device,
                "beam_size": cfg.beam_size or None,
                "batch_size": cfg.batch_size,
            },
            batch_size=cfg.batch_size,
            batch_format="numpy",
            # A pool that starts at one actor and grows: a fixed pool as large as the cluster's
            # CPUs would leave none for the read tasks that feed it, and hang.
            concurrency=(1, cfg.concurrency),
            num_gpus=1 if cfg.device == "cuda" else 0,
        )
        return concat_batches(_kept(batch) for batch in ds.iter_batches(batch_size=None, batch_format="numpy"))
    finally:
        context.execution_options.preserve_order = preserve_order
        if started:
            ray.shutdown()


def _first_samples(info: DatasetInfo, split: str, data_cfg: DataConfig, n: int) -> dict[str, np.ndarray]:
    """The split's first `n` rows as a model batch (the images the figures show)."""
    from medfusion.predictor import concat_batches

    one_batch = dataclasses.replace(data_cfg, batch_size=max(n, 1))
    return concat_batches(iter_local_batches(info, split, one_batch, extra_columns=("sample_id",), limit=n))


# ----------------------------------------------------------------------------------------------
# the trivial baselines
# ----------------------------------------------------------------------------------------------


def _train_boxes(info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Every true box of the train split once, (K, 4) xyxy, with the classes it belongs to (K, C).

    Reads only the small label and box columns of the train shards.
    """
    boxes, members = [], []
    num_classes = len(info.classes)
    wanted = ("labels", "box", *FINDING_BOX_COLUMNS)
    per_finding = set(FINDING_BOX_COLUMNS) <= set(info.model_columns)
    for uri in info.shard_uris("train"):
        rows = read_shard(uri, [c for c in wanted if c in info.model_columns]).to_pydict()
        for i in range(len(rows["labels"])):
            row = [rows[c][i] if c in rows else None for c in wanted]
            for values, classes in _row_boxes(num_classes, *row, per_finding=per_finding):
                boxes.append(values)
                members.append(np.isin(np.arange(num_classes), classes))
    return (
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(members, dtype=np.float64).reshape(-1, len(info.classes)),
    )


def _baselines(info: DatasetInfo, predictions: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The train split's mean-box baselines scored on the evaluated boxes, or None and the reason."""
    from medfusion.metrics import class_box_targets, mean_box_baselines

    if not info.manifest.get("splits", {}).get("train", {}).get("rows"):
        return None, "the dataset's train split has no rows, so there is no mean train box"
    train_boxes, train_classes = _train_boxes(info)
    if not len(train_boxes):
        return None, f"none of the {info.rows('train')} train images has a lesion box, so there is no mean train box"
    true_boxes, has_box = class_box_targets(
        predictions["labels"],
        predictions["box"],
        predictions["has_box"],
        predictions.get("class_boxes"),
        predictions.get("class_has_box"),
    )
    return mean_box_baselines(train_boxes, train_classes, true_boxes, has_box), ""


# ----------------------------------------------------------------------------------------------
# metrics.json
# ----------------------------------------------------------------------------------------------


def _defined(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def undefined_metrics(
    metrics: Mapping[str, Any],
    classes: list[str],
    labels: np.ndarray,
    source: str,
    findings: Any = None,
) -> dict[str, str]:
    """Each metric that is undefined (NaN / None) or not computed, with the reason a reader needs.

    Args:
        findings: the evaluated reference texts, if any (all empty: the text metrics have no reference).
    """
    n = len(labels)
    positives = np.asarray(labels).sum(axis=0)
    reasons: dict[str, str] = {}
    if not _defined(metrics.get("auroc_macro")):
        reasons["auroc_macro"] = f"no class has both positive and negative samples among the {n} evaluated"
    if "mean_iou" in metrics and not _defined(metrics.get("mean_iou")):
        why = f"none of the {n} evaluated images has a lesion box, so there is no true box to overlap"
        reasons.update({name: why for name in ("mean_iou", "iou50")})
    if "box_mean_iou" in metrics and not metrics.get("num_boxes"):
        why = f"none of the {n} evaluated images has a lesion box of any class, so there is no true box to overlap"
        reasons.update({name: why for name in BOX if name in metrics})
    elif metrics.get("num_boxes"):
        for name, iou in zip(classes, metrics.get("per_class_iou", [])):
            if iou is None:
                reasons[f"iou[{name}]"] = f"no true box of class {name!r} among the {n} evaluated images"
    if "clinical_f1" not in metrics:
        for name in CLINICAL:
            reasons[name] = (
                "not computed: findings are parsed into (finding, zone) facts only with the synthetic "
                f"generator's vocabulary, and this dataset's source is {source!r}"
            )
    if findings is not None and not any(split_words(str(text)) for text in findings):
        why = f"the dataset has no findings text: all {n} evaluated references are empty, nothing to compare with"
        reasons.update({name: why for name in TEXT + CLINICAL})
    for name, auroc in zip(classes, metrics.get("per_class_auroc", [])):
        if auroc is None:
            count = int(positives[classes.index(name)])
            reasons[f"auroc[{name}]"] = (
                f"no sample of class {name!r} among the {n} evaluated"
                if count == 0
                else f"all {n} evaluated samples are {name!r} (no negatives)"
            )
    for name in METRIC_DOCS:
        if name in metrics and name not in reasons and not _defined(metrics[name]):
            reasons[name] = f"undefined for these {n} samples"
    return reasons


def _by_class(values: Any, classes: list[str]) -> dict[str, Any]:
    return dict(zip(classes, values or []))


def _localization_record(metrics: Mapping[str, Any], classes: list[str]) -> dict[str, Any]:
    """`box_iou_metrics`' output with its per-class lists keyed by class name."""
    out: dict[str, Any] = {
        k: metrics[k] for k in ("num_boxes", "box_mean_iou", "box_iou50", "iou_share") if k in metrics
    }
    for key in ("per_class_iou", "per_class_iou_share", "per_class_detection_iou"):
        if key in metrics:
            out[key] = _by_class(metrics[key], classes)
    return out


def _baselines_record(baselines: Mapping[str, Any] | None, classes: list[str]) -> dict[str, Any] | None:
    if baselines is None:
        return None
    global_box, class_box = baselines["global_mean_box"], baselines["class_mean_box"]
    return {
        "global_mean_box": {"box": global_box["box"], **_localization_record(global_box, classes)},
        "class_mean_box": {
            "boxes": _by_class(class_box["boxes"], classes),
            "fallback_classes": [classes[c] for c in class_box["fallback_classes"]],
            **_localization_record(class_box, classes),
        },
    }


def _record(
    cfg: EvaluateConfig,
    info: DatasetInfo,
    predictor: Any,
    metrics: Mapping[str, Any],
    baselines: Mapping[str, Any] | None,
    labels: np.ndarray,
    undefined: Mapping[str, str],
    source: str,
) -> dict[str, Any]:
    from medfusion.metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CI_LEVEL

    lineage = predictor.export.lineage
    support = np.asarray(labels).sum(axis=0)
    localization = _localization_record(metrics, info.classes)
    return {
        "split": cfg.split,
        "num_samples": int(metrics["num_samples"]),
        "dataset_version": info.version,
        "model_version": predictor.export.version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "engine": cfg.engine,
        "limit": cfg.limit,
        "classes": info.classes,
        "multi_label": info.multi_label,
        "metrics": {k: metrics[k] for k in METRIC_DOCS if k in metrics},
        "ci": {k: v for k, v in metrics.get("ci", {}).items() if k in METRIC_DOCS},
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "level": CI_LEVEL, "seed": BOOTSTRAP_SEED, "over": "images"},
        "per_class_auroc": dict(zip(info.classes, metrics["per_class_auroc"])),
        "class_support": {name: int(count) for name, count in zip(info.classes, support)},
        "num_boxes": metrics.get("num_boxes"),
        "box_support": _by_class(metrics.get("per_class_boxes"), info.classes),
        "iou_share": localization.get("iou_share"),
        "per_class_iou": localization.get("per_class_iou"),
        "per_class_iou_share": localization.get("per_class_iou_share"),
        "per_class_detection_iou": localization.get("per_class_detection_iou"),
        "baselines": _baselines_record(baselines, info.classes),
        "confusion_matrix": metrics["confusion_matrix"],
        "undefined": dict(undefined),
        "plots": dict(PLOT_FILES),
        "dataset": {
            "uri": cfg.data_uri,
            "version": info.version,
            "source": source,
            "created_at": info.manifest.get("created_at"),
            "rows_in_split": info.rows(cfg.split),
        },
        "model": {
            "uri": cfg.model_uri,
            "name": predictor.export.config.get("model_name"),
            "version": predictor.export.version,
            "fusion": predictor.export.config.get("model", {}).get("fusion"),
            "beam_size": predictor.beam_size,
            "trained_on_dataset_version": lineage.get("dataset_version"),
            "lineage": lineage,
        },
    }


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------


def _label_names(row: np.ndarray, classes: list[str]) -> str:
    return "|".join(classes[i] for i in np.flatnonzero(row >= 0.5)) or "-"


def _confusion_for_plot(metrics: Mapping[str, Any], probs: np.ndarray, labels: np.ndarray, multi_label: bool):
    """(C, C) counts of (true class, predicted class); multi-label counts every pair of a sample."""
    if not multi_label:
        return metrics["confusion_matrix"]
    return (np.asarray(labels, dtype=np.float64).T @ (np.asarray(probs) >= 0.5).astype(np.float64)).tolist()


def _threshold_curves(
    metrics: Mapping[str, Any], classes: list[str]
) -> tuple[list[float], dict[str, list[float]], dict[str, int]]:
    """IoU thresholds, and the share of boxes found at each: all boxes, then each class with a box."""
    shares = metrics.get("iou_share") or {}
    curves: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    if metrics.get("num_boxes"):
        curves["all boxes"], counts["all boxes"] = list(shares.values()), int(metrics["num_boxes"])
        for name, per_class, n in zip(classes, metrics["per_class_iou_share"], metrics["per_class_boxes"]):
            if per_class is not None:
                curves[name], counts[name] = list(per_class.values()), int(n)
    return [float(t) for t in shares], curves, counts


def _true_boxes_of(predictions: Mapping[str, np.ndarray], i: int, classes: list[str]) -> list | None:
    """Image i's true boxes, one per boxed finding with its class name (or its one box)."""
    if "class_boxes" in predictions and "class_has_box" in predictions:
        has = np.flatnonzero(np.asarray(predictions["class_has_box"][i]) > 0.5)
        return [(classes[c], predictions["class_boxes"][i][c]) for c in has]
    return predictions["box"][i] if predictions["has_box"][i] else None


def _claimed_boxes_of(predictions: Mapping[str, np.ndarray], i: int, classes: list[str]) -> list | None:
    """Image i's predicted boxes whose score is at least CLAIMED: per class with its name, or its one box."""
    from medfusion.metrics import CLAIMED

    if "pred_class_boxes" in predictions and "class_objectness" in predictions:
        claimed = np.flatnonzero(np.asarray(predictions["class_objectness"][i]) >= CLAIMED)
        return [(classes[c], predictions["pred_class_boxes"][i][c]) for c in claimed]
    return predictions["pred_box"][i] if predictions["objectness"][i] >= CLAIMED else None


def _write_plots(
    output_uri: str,
    predictions: Mapping[str, np.ndarray],
    metrics: Mapping[str, Any],
    baselines: Mapping[str, Any] | None,
    classes: list[str],
    predictor: Any,
    grid: Mapping[str, np.ndarray],
) -> dict[str, str]:
    from medfusion import plots

    uris = {name: storage.join(output_uri, file) for name, file in PLOT_FILES.items()}
    probs, labels = predictions["probs"], predictions["labels"]
    plots.plot_confusion_matrix(
        _confusion_for_plot(metrics, probs, labels, predictor.multi_label), classes, uris["confusion_matrix"]
    )
    plots.plot_roc_curves(probs, labels, classes, uris["roc_curves"])

    position = {str(sid): i for i, sid in enumerate(predictions["sample_id"])}
    rows = [position[str(sid)] for sid in grid["sample_id"]]
    titles = []
    for i in rows:
        predicted = _label_names(probs[i], classes) if predictor.multi_label else classes[int(np.argmax(probs[i]))]
        titles.append(
            f"{predictions['sample_id'][i]}\ntrue: {_label_names(labels[i], classes)}\n"
            f"pred: {predicted} ({float(np.max(probs[i])):.2f})"
        )
    plots.plot_predictions(
        list(grid["image"]),
        uris["predictions"],
        true_boxes=[_true_boxes_of(predictions, i, classes) for i in rows],
        pred_boxes=[_claimed_boxes_of(predictions, i, classes) for i in rows],
        findings=[str(predictions["generated"][i]) for i in rows],
        titles=titles,
    )
    plots.plot_attention(
        list(grid["image"]), [predictions["image_attention"][i] for i in rows], uris["image_attention"], titles=titles
    )
    notes = []
    for i in rows:
        words = split_words(str(predictions["report"][i]))[: predictor.max_report_tokens]
        weights = predictions["note_attention"][i]
        notes.append([(word, float(weights[j])) for j, word in enumerate(words) if j < len(weights)])
    note_titles = [title.replace("\n", "   ") for title in titles]
    plots.plot_note_attention(notes, uris["note_attention"], titles=note_titles)

    thresholds, curves, counts = _threshold_curves(metrics, classes)
    baseline = _threshold_curves(baselines["class_mean_box"], classes)[1] if baselines else None
    plots.plot_iou_thresholds(
        thresholds,
        curves,
        uris["iou_thresholds"],
        baseline=baseline,
        counts=counts,
        labels=("model", "train mean box of the true class"),
    )
    return uris


# ----------------------------------------------------------------------------------------------
# report.html
# ----------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .7em;text-align:left}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.undef{color:#a33}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
code{font-size:.9em}
"""


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in pairs)


def _cell(value: Any, digits: int = 4, missing: str = "") -> str:
    """A number's table cell; an undefined one reads "undefined", or `missing` where it does not apply."""
    if _defined(value):
        return f'<td class="num">{float(value):.{digits}f}</td>'
    return f'<td class="num">{missing}</td>' if missing else '<td class="num undef">undefined</td>'


def _interval(ci: Any) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def _localization_html(record: Mapping[str, Any]) -> str:
    """The model's box metrics beside the mean-box baselines (all (image, class) boxes pooled)."""
    esc = html.escape
    shares, metrics, baselines = record.get("iou_share"), record["metrics"], record.get("baselines")
    if shares is None:
        return "<p>No localization metrics: the predictions carry no boxes.</p>"
    head = "".join(f"<th>IoU &ge; {esc(t)}</th>" for t in shares)
    # (name, mean IoU, detection IoU cell, shares); a baseline claims every box, so has no detection IoU.
    rows = [("model", metrics.get("box_mean_iou"), _cell(metrics.get("detection_iou")), shares)]
    for key, label in BASELINES.items():
        if baselines:
            rows.append(
                (label, baselines[key]["box_mean_iou"], '<td class="num">&ndash;</td>', baselines[key]["iou_share"])
            )
    body = "".join(
        f"<tr><td>{esc(label)}</td>{_cell(mean_iou)}{detection}"
        + "".join(_cell(row_shares.get(t), 3) for t in shares)
        + "</tr>"
        for label, mean_iou, detection, row_shares in rows
    )
    if baselines:
        box = ", ".join(f"{v:.3f}" for v in baselines["global_mean_box"]["box"])
        fallback = baselines["class_mean_box"]["fallback_classes"]
        note = (
            "Baselines predict one fixed box for every image: the train split's mean box over all its boxes "
            f"(global mean box, x0 y0 x1 y1 = {box}), and the train split's mean box of the true class "
            "(class mean box)"
            + (f"; classes without a train box use the global one ({esc(', '.join(fallback))})" if fallback else "")
            + "."
        )
    else:
        note = f"No baselines: {esc(record['undefined'].get('baselines', 'not computed'))}."
    return (
        f"<p>Over the {record.get('num_boxes')} (image, class) pairs with a true box; "
        "detection IoU counts a box whose class objectness is below 0.5 as 0.</p>"
        f"<table><tr><th></th><th>mean IoU</th><th>detection IoU</th>{head}</tr>{body}</table><p>{note}</p>"
    )


def _class_rows(record: Mapping[str, Any]) -> tuple[str, str]:
    """The per-class table's header and rows: support, AUROC, boxes, IoU, baseline IoU, shares."""
    shares = list(record.get("iou_share") or {})
    baseline = (record.get("baselines") or {}).get("class_mean_box", {}).get("per_class_iou", {})
    head = (
        "<tr><th>class</th><th>samples</th><th>AUROC (one vs rest)</th><th>boxes</th><th>mean IoU</th>"
        "<th>mean IoU, class mean box</th><th>detection IoU</th>"
        + "".join(f"<th>IoU &ge; {html.escape(t)}</th>" for t in shares)
        + "</tr>"
    )
    rows = []
    for name, auroc in record["per_class_auroc"].items():
        class_shares = (record.get("per_class_iou_share") or {}).get(name) or {}
        boxes = (record.get("box_support") or {}).get(name, 0)
        no_box = "&ndash;" if not boxes else ""  # the box count says why
        rows.append(
            f'<tr><td>{html.escape(name)}</td><td class="num">{record["class_support"][name]}</td>'
            + _cell(auroc)
            + f'<td class="num">{boxes}</td>'
            + _cell((record.get("per_class_iou") or {}).get(name), missing=no_box)
            + _cell(baseline.get(name), missing=no_box)
            + _cell((record.get("per_class_detection_iou") or {}).get(name), missing=no_box)
            + "".join(_cell(class_shares.get(t), 3, missing=no_box) for t in shares)
            + "</tr>"
        )
    return head, "".join(rows)


def _bootstrap_note(record: Mapping[str, Any]) -> str:
    bootstrap = record.get("bootstrap") or {}
    return f"{bootstrap.get('resamples', '?')} resamples, seed {bootstrap.get('seed', '?')}"


def render_report(record: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    """One self-contained HTML page: metrics with their 95% CIs, the model's boxes against the mean-box
    baselines, per-class table (AUROC, IoU, share found per IoU threshold), undefined metrics, figures
    (embedded as base64 PNG, each linking to its file next to the report), lineage."""
    esc = html.escape
    metrics, undefined = record["metrics"], record["undefined"]
    model, dataset = record["model"], record["dataset"]
    notes = []
    if record["split"] == "train":
        notes.append("This is the training split: the scores are optimistic.")
    trained_on = model.get("trained_on_dataset_version")
    if trained_on and trained_on != dataset["version"]:
        notes.append(
            f"The model was trained on dataset version <code>{esc(str(trained_on))}</code>; this evaluation "
            f"uses version <code>{esc(dataset['version'])}</code>."
        )
    if record["num_samples"] < dataset["rows_in_split"]:
        notes.append(f"Only the first {record['num_samples']} of {dataset['rows_in_split']} samples were evaluated.")

    ci = record.get("ci", {})
    metric_rows = "".join(
        f"<tr><td>{esc(name)}</td>"
        + _cell(metrics.get(name))
        + f'<td class="num">{_interval(ci.get(name))}</td>'
        + f"<td>{esc(doc)}</td></tr>"
        for name, doc in METRIC_DOCS.items()
        if name in metrics or name in undefined
    )
    class_head, class_rows = _class_rows(record)
    if undefined:
        undefined_html = (
            "<ul>"
            + "".join(f"<li><b>{esc(name)}</b>: {esc(reason)}</li>" for name, reason in undefined.items())
            + "</ul>"
        )
    else:
        undefined_html = "<p>Every metric is defined for this evaluation.</p>"
    figure_html = "".join(
        f'<figure><a href="{esc(PLOT_FILES[name])}"><img alt="{esc(name)}" '
        f'src="data:image/png;base64,{base64.b64encode(data).decode()}"></a>'
        f'<figcaption>{esc(PLOT_CAPTIONS[name])} (<a href="{esc(PLOT_FILES[name])}">{esc(PLOT_FILES[name])}</a>)'
        "</figcaption></figure>"
        for name, data in figures.items()
    )
    lineage_html = "<pre>" + esc(storage.json_bytes(model.get("lineage", {}), sort_keys=True).decode()) + "</pre>"
    lineage_rows = _rows(
        [
            ("dataset", f"<code>{esc(dataset['uri'])}</code>"),
            ("dataset version", f"<code>{esc(dataset['version'])}</code> (sha256 of manifest.json)"),
            ("dataset source", esc(dataset["source"])),
            ("dataset created", esc(str(dataset.get("created_at")))),
            ("model", f"<code>{esc(model['uri'])}</code>"),
            ("model name", esc(str(model.get("name")))),
            ("model version", f"<code>{esc(model['version'])}</code> (sha256 of the weights)"),
            ("fusion", esc(str(model.get("fusion")))),
            ("trained on dataset version", f"<code>{esc(str(trained_on))}</code>"),
        ]
    )
    title = f"{model.get('name') or 'model'} {model['version']} on split {record['split']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>medfusion evaluation: {esc(title)}</title>
<style>{_CSS}</style></head><body>
<h1>Evaluation: {esc(title)}</h1>
<p>{record["num_samples"]} samples of split <b>{esc(record["split"])}</b>, {len(record["classes"])} classes
({"multi-label" if record["multi_label"] else "single-label"}), engine {esc(record["engine"])},
{esc(record["created_at"])}. All numbers are in <a href="{METRICS_FILE}">{METRICS_FILE}</a>.</p>
{"".join(f'<p class="note">{n}</p>' for n in notes)}
<h2>Metrics</h2>
<table><tr><th>metric</th><th>value</th><th>95% CI</th><th>meaning</th></tr>{metric_rows}</table>
<p>95% CI: percentile bootstrap over the evaluated images ({_bootstrap_note(record)}).</p>
<h2>Localization against the baselines</h2>
{_localization_html(record)}
<h2>Per class</h2>
<table>{class_head}{class_rows}</table>
<h2>Undefined metrics</h2>
{undefined_html}
<h2>Figures</h2>
{figure_html}
<h2>Lineage</h2>
<table>{lineage_rows}</table>
<p>The model's lineage.json:</p>{lineage_html}
</body></html>
"""
