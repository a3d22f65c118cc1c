"""Evaluation metrics of the three tasks, computed with torchmetrics (no hand-written BLEU/ROUGE/AUROC).

    classification  accuracy, macro-F1, AUROC (one-vs-rest per class + macro), confusion matrix
    localization    mean IoU and IoU>=0.5 hit rate on images with a lesion, objectness accuracy
    generation      BLEU-1..4 (corpus), ROUGE-L F1 (mean), clinical correctness (finding, zone) P/R/F1

`compute_metrics` is the one entry point; every input is a numpy array (or a list of strings), so it
works on whatever the predictor produced, in one process or gathered from Ray Data.
`metrics_from_predictions` maps the columns of `Predictor.predict_batch` outputs onto it.

Conventions: `labels` are multi-hot (N, C) (one 1 per row for single-label data); boxes are
normalized xyxy; `objectness` is a probability. A metric that is undefined for the data (no lesion
in the set, a class with no positives) is NaN (per-class AUROC: None) rather than a made-up number.
Text is compared after `split_words` normalization (lower case, punctuation split off), the same
tokenization as the model's.
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
from medfusion.models.boxes import paired_iou

NAN = float("nan")
IOU_HIT = 0.5

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
        iou, _ = paired_iou(
            torch.as_tensor(np.asarray(pred_box, dtype=np.float32)[mask]),
            torch.as_tensor(np.asarray(true_box, dtype=np.float32)[mask]),
        )
        out["mean_iou"] = float(iou.mean())
        out["iou50"] = float((iou >= IOU_HIT).float().mean())
    if objectness is not None and len(mask):
        out["objectness_accuracy"] = float(np.mean((np.asarray(objectness) >= 0.5) == mask))
    return out


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
    generated: Sequence[str] | None = None,
    references: Sequence[str] | None = None,
    parse: FindingsParser | None = None,
) -> dict[str, Any]:
    """All metrics of one evaluation as a flat dict.

    Scalars are floats (NaN where undefined); `per_class_auroc` (list, None where undefined) and
    `confusion_matrix` (nested list) are there for plots and KFP ClassificationMetrics. Localization
    needs `pred_box`, `true_box` and `has_box`; text metrics need `generated` and `references`;
    clinical correctness additionally needs `parse`.
    """
    out: dict[str, Any] = {"num_samples": float(len(probs))}
    out.update(classification_metrics(probs, labels, multi_label))
    if pred_box is not None and true_box is not None and has_box is not None:
        out.update(localization_metrics(pred_box, true_box, has_box, objectness))
    if generated is not None and references is not None:
        out.update(text_metrics(list(generated), list(references)))
        if parse is not None:
            out.update(clinical_correctness(list(generated), list(references), parse))
    return out


def metrics_from_predictions(
    predictions: Mapping[str, Any], multi_label: bool = False, parse: FindingsParser | None = None
) -> dict[str, Any]:
    """`compute_metrics` on the concatenated output of `Predictor.predict_batch` over collated batches
    (prediction columns plus the passed-through targets `labels`, `box`, `has_box`, `findings`)."""
    refs = predictions.get("findings")
    return compute_metrics(
        probs=predictions["probs"],
        labels=predictions["labels"],
        multi_label=multi_label,
        pred_box=predictions.get("pred_box"),
        true_box=predictions.get("box"),
        has_box=predictions.get("has_box"),
        objectness=predictions.get("objectness"),
        generated=None if refs is None else [str(t) for t in predictions["generated"]],
        references=None if refs is None else [str(t) for t in refs],
        parse=parse,
    )


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Only the finite scalar entries (what KFP `Metrics.log_metric` and a quality gate accept)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


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
