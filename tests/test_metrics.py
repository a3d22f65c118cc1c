"""medfusion.metrics: known answers for each task, undefined cases, and the one entry point."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medfusion.metrics import (
    classification_metrics,
    clinical_correctness,
    compute_metrics,
    localization_metrics,
    metrics_from_predictions,
    scalar_metrics,
    text_metrics,
)

EYE3 = np.eye(3, dtype=np.float32)


@pytest.mark.parametrize(
    "probs, labels, expected",
    [
        # perfect
        (EYE3 * 0.8 + 0.1 / 1, EYE3, {"accuracy": 1.0, "macro_f1": 1.0, "auroc_macro": 1.0}),
        # everything predicted as class 0
        (np.tile([[0.9, 0.05, 0.05]], (3, 1)), EYE3, {"accuracy": 1 / 3, "macro_f1": (0.5 + 0 + 0) / 3}),
    ],
)
def test_classification_known_answers(probs, labels, expected):
    out = classification_metrics(probs, labels)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key


def test_auroc_matches_sklearn_and_confusion_matrix_counts():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 1.5 * np.eye(4)[target]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = classification_metrics(probs, np.eye(4)[target])
    expected = [roc_auc_score(target == c, probs[:, c]) for c in range(4)]
    assert out["per_class_auroc"] == pytest.approx(expected, abs=1e-6)
    assert out["auroc_macro"] == pytest.approx(np.mean(expected), abs=1e-6)
    matrix = np.asarray(out["confusion_matrix"])
    assert matrix.shape == (4, 4) and matrix.sum() == 200
    assert np.trace(matrix) / 200 == pytest.approx(out["accuracy"])


def test_auroc_of_a_class_without_positives_is_none():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    labels = np.eye(3)[[0, 1, 0]]
    out = classification_metrics(probs, labels)
    assert out["per_class_auroc"][2] is None
    assert out["auroc_macro"] == pytest.approx(1.0)


def test_multi_label():
    labels = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=np.float32)
    probs = np.where(labels > 0, 0.9, 0.1)
    probs[1, 2] = 0.6  # one false positive: row 1 is no longer an exact match
    out = classification_metrics(probs, labels, multi_label=True)
    assert out["accuracy"] == pytest.approx(0.75)
    assert np.asarray(out["confusion_matrix"]).shape == (3, 2, 2)
    assert out["per_class_auroc"] == pytest.approx([1.0, 1.0, 1.0])


def test_localization():
    true = np.array([[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0, 0, 0, 0]], dtype=np.float32)
    pred = np.array([[0.1, 0.1, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5], [0.3, 0.3, 0.4, 0.4]], dtype=np.float32)
    has_box = np.array([1, 1, 0])
    out = localization_metrics(pred, true, has_box, objectness=np.array([0.9, 0.2, 0.1]))
    assert out["mean_iou"] == pytest.approx((1 + 1 / 3) / 2, abs=1e-5)
    assert out["iou50"] == pytest.approx(0.5)
    assert out["objectness_accuracy"] == pytest.approx(2 / 3)
    empty = localization_metrics(pred, true, np.zeros(3))
    assert math.isnan(empty["mean_iou"]) and math.isnan(empty["iou50"])


def test_text_metrics():
    same = text_metrics(["No effusion. Heart normal."], ["no effusion . heart normal ."])
    assert same["bleu4"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0)
    diff = text_metrics(["the lungs are clear"], ["large right pleural effusion"])
    assert diff["bleu1"] == 0.0 and diff["rouge_l"] == 0.0
    partial = text_metrics(["nodule in the left upper zone"], ["nodule in the right upper zone"])
    assert 0.0 < partial["bleu1"] < 1.0 and 0.0 < partial["rouge_l"] < 1.0
    with pytest.raises(ValueError, match="references"):
        text_metrics(["a"], [])


def _parse(text: str) -> set[tuple[str, str]]:
    facts = set()
    for clause in text.split(";"):
        words = clause.split()
        if len(words) == 2:
            facts.add((words[0], words[1]))
    return facts


@pytest.mark.parametrize(
    "generated, reference, precision, recall",
    [
        (["nodule rul"], ["nodule rul"], 1.0, 1.0),
        (["nodule rul; effusion lb"], ["nodule rul"], 0.5, 1.0),
        (["nodule lul"], ["nodule rul"], 0.0, 0.0),
        (["", "nodule rul"], ["effusion lb", "nodule rul"], 1.0, 0.5),
        ([""], [""], 1.0, 1.0),  # a normal film described as normal
    ],
)
def test_clinical_correctness_is_micro_averaged(generated, reference, precision, recall):
    out = clinical_correctness(generated, reference, _parse)
    assert out["clinical_precision"] == pytest.approx(precision)
    assert out["clinical_recall"] == pytest.approx(recall)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    assert out["clinical_f1"] == pytest.approx(f1)


def test_compute_metrics_and_predictions_columns():
    predictions = {
        "probs": EYE3 * 0.8 + 0.1,
        "labels": EYE3,
        "pred_box": np.tile([[0.1, 0.1, 0.5, 0.5]], (3, 1)).astype(np.float32),
        "box": np.tile([[0.1, 0.1, 0.5, 0.5]], (3, 1)).astype(np.float32),
        "has_box": np.array([1.0, 1.0, 0.0]),
        "objectness": np.array([0.9, 0.8, 0.1]),
        "generated": np.array(["nodule rul; size two cm", "lungs are clear .", "no acute disease ."], dtype=object),
        "findings": np.array(["nodule rul; size two cm", "lungs are clear .", "no acute disease ."], dtype=object),
    }
    out = metrics_from_predictions(predictions, parse=_parse)
    for key in (
        "accuracy",
        "macro_f1",
        "auroc_macro",
        "mean_iou",
        "iou50",
        "objectness_accuracy",
        "bleu1",
        "bleu4",
        "rouge_l",
        "clinical_f1",
    ):
        assert out[key] == pytest.approx(1.0), key
    assert isinstance(out["per_class_auroc"], list) and isinstance(out["confusion_matrix"], list)
    scalars = scalar_metrics(out)
    assert "confusion_matrix" not in scalars and scalars["num_samples"] == 3.0
    only_cls = compute_metrics(probs=predictions["probs"], labels=predictions["labels"])
    assert "mean_iou" not in only_cls and "bleu1" not in only_cls
