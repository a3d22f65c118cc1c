"""Evaluation metrics of the three tasks, computed with torchmetrics (no hand-written BLEU/ROUGE/AUROC).

    classification  accuracy, macro-F1, AUROC (one-vs-rest per class + macro), confusion matrix
    localization    mean IoU and IoU>=0.5 hit rate on images with a lesion, objectness accuracy;
                    per (image, class) box: mean IoU, the share of boxes found at IoU >= 0.1 ... 0.7
                    per class (Wang et al., "ChestX-ray8", CVPR 2017, Table 4), a detection IoU that
                    counts a box the model does not claim as 0, and the train split's mean-box baselines
    generation      BLEU-1..4 (corpus), ROUGE-L F1 (mean), clinical correctness (finding, zone) P/R/F1
    uncertainty     95% percentile bootstrap intervals over images of the headline metrics (the
                    resamples' AUROC is a weighted rank count, `weighted_auroc`: torchmetrics would
                    take one call per resample and class)

`compute_metrics` is the one entry point; every input is a numpy array (or a list of strings), so it
works on whatever the predictor produced, in one process or gathered from Ray Data.
`metrics_from_predictions` maps the columns of `Predictor.predict_batch` outputs onto it.

Conventions: `labels` are multi-hot (N, C) (one 1 per row for single-label data); boxes are
normalized xyxy; `objectness` is a probability. Per-class boxes are (N, C, 4) with a mask (N, C);
data with one box per image gives that box to each of the image's classes, and a model with one
box per image predicts it for every class. A metric that is undefined for the data (no lesion in
the set, a class with no positives, no findings text at all) is NaN (per-class values: None) rather
than a made-up number. Text is compared after `split_words` normalization (lower case, punctuation
split off), the same tokenization as the model's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multilabel_confusion_matrix,
    multilabel_exact_match,
    multilabel_f1_score,
)
from torchmetrics.functional.text import bleu_score
from torchmetrics.functional.text.rouge import rouge_score

from medfusion.data.tokenizer import split_words

NAN = float("nan")
IOU_HIT = 0.5
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
"""The share-of-boxes-found table's thresholds (Wang et al., CVPR 2017, Table 4, and later papers)."""
CLAIMED = 0.5
"""Objectness from which the model claims a box (detection IoU counts an unclaimed box as 0)."""
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
# Resamples x images held in memory at once by `bootstrap_ci` (float64 weights: 32 MB).
_BOOTSTRAP_CELLS = 4_000_000
TEXT_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l")
CLINICAL_KEYS = ("clinical_precision", "clinical_recall", "clinical_f1")

FindingsParser = Callable[[str], Iterable[Hashable]]


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, multi_label: bool = False, threshold: float = 0.5
) -> dict[str, Any]:
    """accuracy (multi-label: exact match), macro_f1, auroc_macro, per_class_auroc, confusion_matrix.

    Args:
        probs: (N, C) softmax or sigmoid probabilities.
        labels: (N, C) multi-hot targets.
        multi_label: threshold each class at `threshold` instead of taking the argmax.
    """
    probs_t = torch.as_tensor(np.asarray(probs, dtype=np.float32))
    labels_t = torch.as_tensor(np.asarray(labels)).round().long()
    num_classes = probs_t.shape[1]
    if multi_label:
        out = {
            "accuracy": float(multilabel_exact_match(probs_t, labels_t, num_labels=num_classes, threshold=threshold)),
            "macro_f1": float(multilabel_f1_score(probs_t, labels_t, num_labels=num_classes, threshold=threshold)),
            # (C, 2, 2): [[tn, fp], [fn, tp]] per class
            "confusion_matrix": multilabel_confusion_matrix(
                probs_t, labels_t, num_labels=num_classes, threshold=threshold
            ).tolist(),
        }
    else:
        target = labels_t.argmax(dim=1)
        out = {
            "accuracy": float(multiclass_accuracy(probs_t, target, num_classes=num_classes, average="micro")),
            "macro_f1": float(multiclass_f1_score(probs_t, target, num_classes=num_classes, average="macro")),
            # (C, C): rows are true classes, columns predicted
            "confusion_matrix": multiclass_confusion_matrix(probs_t, target, num_classes=num_classes).tolist(),
        }
    # One-vs-rest AUROC per class: the multi-class macro AUROC is their mean. A class with no
    # positive (or no negative) in the set has no AUROC; it is None and left out of the mean.
    per_class: list[float | None] = []
    for c in range(num_classes):
        column = labels_t[:, c]
        if int(column.sum()) in (0, len(column)):
            per_class.append(None)
            continue
        per_class.append(float(binary_auroc(probs_t[:, c], column)))
    defined = [v for v in per_class if v is not None]
    out["auroc_macro"] = float(np.mean(defined)) if defined else NAN
    out["per_class_auroc"] = per_class
    return out


def box_iou(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """IoU of matching normalized xyxy boxes: (..., 4), (..., 4) -> (...) float64; 0 where both are empty.

    Exact, unlike the training loss's `paired_iou` (whose epsilon in the union keeps gradients finite
    but would put a box at exactly IoU 0.5 below the 0.5 threshold).
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    overlap = np.clip(np.minimum(pred[..., 2:], true[..., 2:]) - np.maximum(pred[..., :2], true[..., :2]), 0.0, None)
    inter = overlap.prod(axis=-1)
    union = _area(pred) + _area(true) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _area(box: np.ndarray) -> np.ndarray:
    return np.clip(box[..., 2] - box[..., 0], 0.0, None) * np.clip(box[..., 3] - box[..., 1], 0.0, None)


def localization_metrics(
    pred_box: np.ndarray, true_box: np.ndarray, has_box: np.ndarray, objectness: np.ndarray | None = None
) -> dict[str, float]:
    """mean_iou and iou50 (hit rate of IoU >= 0.5) over images with a lesion; objectness_accuracy over all.

    Args:
        pred_box, true_box: (N, 4) normalized xyxy.
        has_box: (N,) 1 where the image has a lesion box.
        objectness: (N,) predicted probability that there is a lesion.
    """
    mask = np.asarray(has_box, dtype=np.float32) > 0.5
    out = {"mean_iou": NAN, "iou50": NAN, "objectness_accuracy": NAN}
    if mask.any():
        iou = box_iou(pred_box, true_box)[mask]
        out["mean_iou"] = float(iou.mean())
        out["iou50"] = float(np.mean(iou >= IOU_HIT))
    if objectness is not None and len(mask):
        out["objectness_accuracy"] = float(np.mean((np.asarray(objectness) >= 0.5) == mask))
    return out


def class_box_targets(
    labels: np.ndarray,
    box: np.ndarray,
    has_box: np.ndarray,
    class_boxes: np.ndarray | None = None,
    class_has_box: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The true box of each (image, class): (N, C, 4) xyxy and its mask (N, C) bool.

    The batch's own `class_boxes` / `class_has_box` when it carries them; otherwise (one box per
    image) the image's `box` belongs to each of its positive classes.
    """
    if class_boxes is None or class_has_box is None:
        from medfusion.data.batches import finding_box_arrays

        class_boxes, class_has_box = finding_box_arrays(
            {}, np.asarray(labels, dtype=np.float32), np.asarray(box), np.asarray(has_box, dtype=np.float32)
        )
    return np.asarray(class_boxes, dtype=np.float64), np.asarray(class_has_box) > 0.5


def class_box_predictions(
    pred_box: np.ndarray,
    objectness: np.ndarray | None,
    num_classes: int,
    pred_class_boxes: np.ndarray | None = None,
    class_objectness: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The predicted box of each (image, class) (N, C, 4) and its objectness (N, C) (None without one):
    the model's per-class outputs when it has them, else its one box and objectness for every class."""
    if pred_class_boxes is None:
        pred_class_boxes = np.repeat(np.asarray(pred_box, dtype=np.float64)[:, None, :], num_classes, axis=1)
    if class_objectness is None and objectness is not None:
        class_objectness = np.repeat(np.asarray(objectness, dtype=np.float64)[:, None], num_classes, axis=1)
    scores = None if class_objectness is None else np.asarray(class_objectness, dtype=np.float64)
    return np.asarray(pred_class_boxes, dtype=np.float64), scores


def threshold_key(threshold: float) -> str:
    """The JSON key of an IoU threshold: 0.1 -> "0.1"."""
    return f"{threshold:g}"


def _shares(iou: np.ndarray) -> dict[str, float]:
    return {threshold_key(t): float(np.mean(iou >= t)) if len(iou) else NAN for t in IOU_THRESHOLDS}


def box_iou_metrics(iou: np.ndarray, has_box: np.ndarray, objectness: np.ndarray | None = None) -> dict[str, Any]:
    """The field's localization protocol on the (image, class) pairs that have a true box.

    Pooled over all pairs: num_boxes, box_mean_iou, box_iou50, iou_share (threshold -> share of boxes
    found at IoU >= threshold, IOU_THRESHOLDS) and, with `objectness`, detection_iou (a box whose class
    objectness is < CLAIMED counts IoU 0). Per class (lists, None for a class without a box):
    per_class_boxes, per_class_iou, per_class_iou_share and per_class_detection_iou.

    Args:
        iou: (N, C) IoU of the predicted box of each (image, class) with its true box.
        has_box: (N, C) 1 where the image has a true box of that class.
        objectness: (N, C) the model's probability that each class's box is there.
    """
    iou = np.asarray(iou, dtype=np.float64)
    mask = np.asarray(has_box) > 0.5
    pooled = iou[mask]
    out: dict[str, Any] = {
        "num_boxes": int(mask.sum()),
        "box_mean_iou": float(pooled.mean()) if len(pooled) else NAN,
        "box_iou50": float(np.mean(pooled >= IOU_HIT)) if len(pooled) else NAN,
        "iou_share": _shares(pooled),
        "per_class_boxes": [int(v) for v in mask.sum(axis=0)],
        "per_class_iou": [float(iou[mask[:, c], c].mean()) if mask[:, c].any() else None for c in range(iou.shape[1])],
        "per_class_iou_share": [_shares(iou[mask[:, c], c]) if mask[:, c].any() else None for c in range(iou.shape[1])],
    }
    if objectness is not None:
        detected = np.where(np.asarray(objectness) >= CLAIMED, iou, 0.0)
        out["detection_iou"] = float(detected[mask].mean()) if len(pooled) else NAN
        out["per_class_detection_iou"] = [
            float(detected[mask[:, c], c].mean()) if mask[:, c].any() else None for c in range(iou.shape[1])
        ]
    return out


def box_ratios(
    iou: np.ndarray, has_box: np.ndarray, objectness: np.ndarray | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`box_iou_metrics`' pooled scalars as per-image (numerator, denominator) pairs, for `bootstrap_ci`."""
    iou = np.asarray(iou, dtype=np.float64)
    mask = np.asarray(has_box) > 0.5
    boxes = mask.sum(axis=1).astype(np.float64)
    out = {
        "box_mean_iou": (np.where(mask, iou, 0.0).sum(axis=1), boxes),
        "box_iou50": ((mask & (iou >= IOU_HIT)).sum(axis=1).astype(np.float64), boxes),
    }
    if objectness is not None:
        claimed = mask & (np.asarray(objectness) >= CLAIMED)
        out["detection_iou"] = (np.where(claimed, iou, 0.0).sum(axis=1), boxes)
    return out


def mean_box_baselines(
    train_boxes: np.ndarray, train_box_classes: np.ndarray, true_boxes: np.ndarray, has_box: np.ndarray
) -> dict[str, dict[str, Any]] | None:
    """The trivial baselines: one fixed box for every image, scored by `box_iou_metrics`.

    ``global_mean_box``: the mean of the train split's boxes (xyxy), whatever the class.
    ``class_mean_box``: given the true class, the mean of that class's train boxes; a class without
    a train box falls back to the global mean box (listed in ``fallback_classes``).

    Args:
        train_boxes: (K, 4) every true box of the train split, once each.
        train_box_classes: (K, C) multi-hot: the classes each train box belongs to.
        true_boxes, has_box: (N, C, 4) and (N, C), the evaluated split's (`class_box_targets`).

    Returns:
        {baseline: {"box" or "boxes", **box_iou_metrics}}, or None when the train split has no box.
    """
    train_boxes = np.asarray(train_boxes, dtype=np.float64).reshape(-1, 4)
    if not len(train_boxes):
        return None
    members = np.asarray(train_box_classes).reshape(len(train_boxes), -1) > 0.5  # (K, C)
    global_box = train_boxes.mean(axis=0)
    counts = members.sum(axis=0)  # (C,)
    class_boxes = (members.T.astype(np.float64) @ train_boxes) / np.maximum(counts, 1)[:, None]  # (C, 4)
    class_boxes[counts == 0] = global_box
    true_boxes = np.asarray(true_boxes, dtype=np.float64)
    return {
        "global_mean_box": {
            "box": global_box.tolist(),
            **box_iou_metrics(box_iou(np.broadcast_to(global_box, true_boxes.shape), true_boxes), has_box),
        },
        "class_mean_box": {
            "boxes": [box.tolist() if n else None for box, n in zip(class_boxes, counts)],
            "fallback_classes": [int(c) for c in np.flatnonzero(counts == 0)],
            **box_iou_metrics(box_iou(np.broadcast_to(class_boxes, true_boxes.shape), true_boxes), has_box),
        },
    }


def _normalize(text: str) -> str:
    return " ".join(split_words(text or ""))


def corpus_bleu(generated: Sequence[str], references: Sequence[str], n_gram: int = 4) -> float:
    """Corpus BLEU-n of generated texts against one reference each (text_metrics' normalization);
    NaN for no texts."""
    if len(generated) != len(references):
        raise ValueError(f"corpus_bleu: {len(generated)} generated texts but {len(references)} references")
    if not generated:
        return NAN
    preds = [_normalize(t) for t in generated]
    return float(bleu_score(preds, [[_normalize(r)] for r in references], n_gram=n_gram))


def text_metrics(generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 and mean ROUGE-L F1 of generated findings against one reference each."""
    if len(generated) != len(references):
        raise ValueError(f"text_metrics: {len(generated)} generated texts but {len(references)} references")
    if not generated:
        return {f"bleu{n}": NAN for n in range(1, 5)} | {"rouge_l": NAN}
    preds = [_normalize(t) for t in generated]
    refs = [_normalize(t) for t in references]
    out = {f"bleu{n}": float(bleu_score(preds, [[r] for r in refs], n_gram=n)) for n in range(1, 5)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["rouge_l"] = float(rouge_score(preds, refs, rouge_keys="rougeL")["rougeL_fmeasure"])
    return out


def clinical_correctness(generated: Sequence[str], reference: Sequence[str], parse: FindingsParser) -> dict[str, float]:
    """Micro precision/recall/F1 of the clinical facts `parse` extracts (e.g. (finding, zone) pairs).

    Counts every fact of every text together: precision = correct facts / generated facts, recall =
    correct facts / reference facts. With no facts on either side a score is 1.0 (nothing claimed,
    nothing missed); F1 is their harmonic mean.
    """
    if len(generated) != len(reference):
        raise ValueError(f"clinical_correctness: {len(generated)} generated texts but {len(reference)} references")
    true_pos = n_generated = n_reference = 0
    for gen, ref in zip(generated, reference):
        gen_facts, ref_facts = set(parse(gen or "")), set(parse(ref or ""))
        true_pos += len(gen_facts & ref_facts)
        n_generated += len(gen_facts)
        n_reference += len(ref_facts)
    precision = true_pos / n_generated if n_generated else 1.0
    recall = true_pos / n_reference if n_reference else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"clinical_precision": precision, "clinical_recall": recall, "clinical_f1": f1}


def compute_metrics(
    *,
    probs: np.ndarray,
    labels: np.ndarray,
    multi_label: bool = False,
    pred_box: np.ndarray | None = None,
    true_box: np.ndarray | None = None,
    has_box: np.ndarray | None = None,
    objectness: np.ndarray | None = None,
    true_class_boxes: np.ndarray | None = None,
    class_has_box: np.ndarray | None = None,
    pred_class_boxes: np.ndarray | None = None,
    class_objectness: np.ndarray | None = None,
    generated: Sequence[str] | None = None,
    references: Sequence[str] | None = None,
    parse: FindingsParser | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Any]:
    """All metrics of one evaluation as a flat dict.

    Scalars are floats (NaN where undefined); `per_class_auroc` (list, None where undefined) and
    `confusion_matrix` (nested list) are there for plots and KFP ClassificationMetrics. Localization
    needs `pred_box`, `true_box` and `has_box` and adds `box_iou_metrics` per (image, class), from
    the per-class boxes (`class_box_targets`, `class_box_predictions`) or, without them, the one box
    per image. Text metrics need `generated` and `references`; clinical correctness additionally
    needs `parse`; when no reference has any text, they are NaN. ``ci`` holds the 95% bootstrap
    interval of the headline metrics over `resamples` resamples of the images (0: none).
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    out: dict[str, Any] = {"num_samples": float(len(probs))}
    out.update(classification_metrics(probs, labels, multi_label))
    ratios = {"accuracy": (correct_predictions(probs, labels, multi_label), np.ones(len(probs)))}
    if pred_box is not None and true_box is not None and has_box is not None:
        out.update(localization_metrics(pred_box, true_box, has_box, objectness))
        mask = np.asarray(has_box, dtype=np.float64) > 0.5
        image_iou = box_iou(pred_box, true_box)
        ratios["mean_iou"] = (np.where(mask, image_iou, 0.0), mask.astype(np.float64))
        ratios["iou50"] = ((mask & (image_iou >= IOU_HIT)).astype(np.float64), mask.astype(np.float64))
        true_boxes, box_mask = class_box_targets(labels, true_box, has_box, true_class_boxes, class_has_box)
        boxes, scores = class_box_predictions(pred_box, objectness, labels.shape[1], pred_class_boxes, class_objectness)
        pair_iou = box_iou(boxes, true_boxes)  # (N, C)
        out.update(box_iou_metrics(pair_iou, box_mask, scores))
        ratios.update(box_ratios(pair_iou, box_mask, scores))
    if generated is not None and references is not None:
        generated, references = list(generated), list(references)
        if any(_normalize(r) for r in references):
            out.update(text_metrics(generated, references))
            if parse is not None:
                out.update(clinical_correctness(generated, references, parse))
        else:
            # BLEU and ROUGE-L would be 0.0 and clinical F1 1.0: scores of nothing, not of the model.
            out.update({k: NAN for k in TEXT_KEYS + (CLINICAL_KEYS if parse is not None else ())})
    out["ci"] = bootstrap_ci(ratios, (probs, labels), resamples=resamples)
    return out


def metrics_from_predictions(
    predictions: Mapping[str, Any],
    multi_label: bool = False,
    parse: FindingsParser | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Any]:
    """`compute_metrics` on the concatenated output of `Predictor.predict_batch` over collated batches:
    prediction columns (probs, pred_box, objectness, generated; optional pred_class_boxes (N, C, 4),
    class_objectness (N, C)) plus the passed-through targets (labels, box, has_box, findings; optional
    class_boxes (N, C, 4), class_has_box (N, C)).

    A column named ``class_boxes`` is not read: collate gives the true boxes that name and the
    predictor its predicted ones, and the predictor's replaces the batch's; the evaluate stage keeps
    them apart (medfusion.evaluate.predict_batches). Without the per-class columns, the one box per
    image is scored for each of its classes.
    """
    refs = predictions.get("findings")
    return compute_metrics(
        probs=predictions["probs"],
        labels=predictions["labels"],
        multi_label=multi_label,
        pred_box=predictions.get("pred_box"),
        true_box=predictions.get("box"),
        has_box=predictions.get("has_box"),
        objectness=predictions.get("objectness"),
        true_class_boxes=predictions.get("class_boxes"),
        class_has_box=predictions.get("class_has_box"),
        pred_class_boxes=predictions.get("pred_class_boxes"),
        class_objectness=predictions.get("class_objectness"),
        generated=None if refs is None else [str(t) for t in predictions["generated"]],
        references=None if refs is None else [str(t) for t in refs],
        parse=parse,
        resamples=resamples,
    )


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Only the finite scalar entries (what KFP `Metrics.log_metric` and a quality gate accept)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


# ---------------------------------------------------------------------------------------------
# bootstrap confidence intervals
# ---------------------------------------------------------------------------------------------


def correct_predictions(probs: np.ndarray, labels: np.ndarray, multi_label: bool, threshold: float = 0.5) -> np.ndarray:
    """(N,) 1.0 where `classification_metrics`' accuracy counts the image as right (multi-label: every
    class on the right side of `threshold`, strictly above as torchmetrics thresholds)."""
    probs, labels = np.asarray(probs), np.asarray(labels) > 0.5
    if multi_label:
        return np.all((probs > threshold) == labels, axis=1).astype(np.float64)
    return (probs.argmax(axis=1) == labels.argmax(axis=1)).astype(np.float64)


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Binary AUROC of `scores` (N,) against `positive` (N,) under each row of `weights` (B, N) (how
    many times each image was drawn): P(positive scores above negative) + half P(tie); NaN for a row
    without positives or without negatives."""
    scores, pos = np.asarray(scores), np.asarray(positive) > 0.5
    weights = np.asarray(weights, dtype=np.float32)  # counts: exact in float32, half the memory traffic
    negatives = np.flatnonzero(~pos)
    negatives = negatives[np.argsort(scores[negatives], kind="stable")]
    ranked = scores[negatives]
    # Drawn negative weight among the k lowest-scored negatives: (B, N_neg + 1).
    cumulative = np.zeros((len(weights), len(negatives) + 1), dtype=np.float32)
    np.cumsum(weights[:, negatives], axis=1, out=cumulative[:, 1:])
    below = np.searchsorted(ranked, scores[pos], side="left")  # negatives scored lower than each positive
    at_or_below = np.searchsorted(ranked, scores[pos], side="right")
    # A positive wins against the negatives below it and half-wins against the tied ones.
    credit = 0.5 * (cumulative[:, below] + cumulative[:, at_or_below])  # (B, N_pos)
    drawn_positive = weights[:, pos]
    wins = (drawn_positive * credit).sum(axis=1, dtype=np.float64)
    pairs = drawn_positive.sum(axis=1, dtype=np.float64) * cumulative[:, -1].astype(np.float64)
    return np.divide(wins, pairs, out=np.full(len(weights), NAN), where=pairs > 0)


def _macro_auroc(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) mean over the classes where each weighted resample defines an AUROC (NaN where none does)."""
    positives = labels.sum(axis=0)
    # A class without positives (or negatives) in the set has none in any resample either.
    classes = [c for c in range(probs.shape[1]) if 0 < positives[c] < len(labels)]
    if not classes:
        return np.full(len(weights), NAN)
    per_class = np.stack([weighted_auroc(probs[:, c], labels[:, c], weights) for c in classes])
    defined = np.isfinite(per_class)
    count = defined.sum(axis=0)
    return np.divide(
        np.where(defined, per_class, 0.0).sum(axis=0), count, out=np.full(len(weights), NAN), where=count > 0
    )


def bootstrap_ci(
    ratios: Mapping[str, tuple[np.ndarray, np.ndarray]],
    auroc: tuple[np.ndarray, np.ndarray] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = CI_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals over images.

    Each resample draws the N images with replacement; a metric of a resample is a weighted sum by how
    many times each image was drawn, so a batch of resamples is one matrix product (seconds for
    thousands of images and 1000 resamples).

    Args:
        ratios: metric -> (numerator, denominator), each (N,) per image; the metric is
            sum(numerator) / sum(denominator) (accuracy: (correct, 1); mean IoU: (IoU summed over the
            image's boxes, its number of boxes)).
        auroc: (probs, labels) (N, C): adds ``auroc_macro``, the mean of the one-vs-rest AUROCs defined
            in each resample.
        resamples, level, seed: how many resamples, the interval's coverage, the random stream.

    Returns:
        metric -> [low, high]; None where no resample defines the metric (e.g. no box at all).
    """
    names = list(ratios)
    # (N, 2R): every metric's numerator, then every denominator, for one product per batch of resamples.
    sums = (
        np.stack(
            [np.asarray(ratios[k][0], dtype=np.float64) for k in names]
            + [np.asarray(ratios[k][1], dtype=np.float64) for k in names],
            axis=1,
        )
        if names
        else None
    )
    n = len(auroc[0]) if auroc is not None else (len(sums) if sums is not None else 0)
    if n == 0 or resamples <= 0:
        return {}
    rng = np.random.default_rng(seed)
    drawn: dict[str, list[np.ndarray]] = {name: [] for name in names}
    if auroc is not None:
        probs, labels = np.asarray(auroc[0]), np.asarray(auroc[1]) > 0.5
        drawn["auroc_macro"] = []
    chunk = max(1, _BOOTSTRAP_CELLS // n)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        picks = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
        weights = np.bincount(picks.ravel(), minlength=size * n).reshape(size, n)  # (B, N) times drawn
        if sums is not None:
            totals = weights.astype(np.float64) @ sums  # (B, 2R)
            for k, name in enumerate(names):
                numerator, denominator = totals[:, k], totals[:, len(names) + k]
                drawn[name].append(np.divide(numerator, denominator, out=np.full(size, NAN), where=denominator > 0))
        if auroc is not None:
            drawn["auroc_macro"].append(_macro_auroc(probs, labels, weights))
    tail = 100.0 * (1.0 - level) / 2.0
    out: dict[str, list[float] | None] = {}
    for name, parts in drawn.items():
        values = np.concatenate(parts)
        values = values[np.isfinite(values)]
        out[name] = (
            [float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))] if len(values) else None
        )
    return out


# ---------------------------------------------------------------------------------------------
# the objective of a sweep (medfusion.config.ObjectiveConfig)
# ---------------------------------------------------------------------------------------------

CLASSIFICATION_KEYS = {"accuracy": "accuracy", "auroc": "auroc_macro"}


def task_metric_keys(classification_metric: str, prefix: str = "") -> dict[str, str]:
    """The metric key of each objective term: evaluate's names, or the validation names with
    ``prefix="val_"`` (e.g. classification -> ``val_auroc_macro`` for classification_metric=auroc)."""
    return {
        "classification": prefix + CLASSIFICATION_KEYS[classification_metric],
        "mean_iou": prefix + "mean_iou",
        "bleu4": prefix + "bleu4",
    }


def objective_value(
    metrics: Mapping[str, Any], weights: Mapping[str, float], classification_metric: str = "accuracy", prefix: str = ""
) -> float:
    """The weighted sum of the three task metrics in `metrics` (an undefined or missing one counts 0,
    so a split without lesions does not make every trial's score NaN)."""
    total = 0.0
    for term, key in task_metric_keys(classification_metric, prefix).items():
        value = metrics.get(key)
        if weights.get(term, 0.0) and isinstance(value, (int, float)) and math.isfinite(float(value)):
            total += float(weights[term]) * float(value)
    return total
