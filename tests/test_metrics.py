"""medfusion.metrics: known answers for each task, undefined cases, and the one entry point."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medfusion.metrics import (
    IOU_THRESHOLDS,
    bootstrap_ci,
    box_iou,
    box_iou_metrics,
    class_box_predictions,
    class_box_targets,
    classification_metrics,
    clinical_correctness,
    compute_metrics,
    correct_predictions,
    localization_metrics,
    mean_box_baselines,
    metrics_from_predictions,
    scalar_metrics,
    text_metrics,
    weighted_auroc,
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


# ---------------------------------------------------------------------------------------------
# the field's localization protocol: per (image, class) box
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, true, expected",
    [
        ([0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5], 1.0),
        ([0.25, 0.0, 0.75, 0.5], [0.0, 0.0, 0.5, 0.5], 1 / 3),
        ([0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 1.0], 0.5),  # exactly 0.5: no epsilon pulls it below
        ([0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 1.0, 1.0], 0.0),
        ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], 0.0),  # both empty
    ],
)
def test_box_iou(pred, true, expected):
    assert box_iou(np.array(pred), np.array(true)) == pytest.approx(expected, abs=1e-12)
    assert (box_iou(np.array(pred), np.array(true)) >= 0.5) == (expected >= 0.5)


def test_class_targets_from_one_box_per_image():
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.float32)
    box = np.array([[0.1, 0.1, 0.4, 0.4], [0, 0, 0, 0], [0.2, 0.2, 0.6, 0.6]])
    boxes, mask = class_box_targets(labels, box, has_box=np.array([1, 0, 1]))
    assert boxes.shape == (3, 3, 4)
    assert mask.tolist() == [[True, False, True], [False, False, False], [True, False, False]]
    np.testing.assert_allclose(boxes[0, 2], box[0])
    own = np.zeros((3, 3, 4))
    own[0, 2] = [0.5, 0.5, 0.9, 0.9]
    boxes, mask = class_box_targets(labels, box, np.array([1, 0, 1]), own, (own.sum(-1) > 0).astype(np.float32))
    assert mask.sum() == 1 and boxes[0, 2].tolist() == [0.5, 0.5, 0.9, 0.9]


def test_class_predictions_broadcast_the_one_box():
    boxes, scores = class_box_predictions(np.array([[0.1, 0.2, 0.3, 0.4]]), np.array([0.7]), num_classes=3)
    assert boxes.shape == (1, 3, 4) and (boxes[0] == [0.1, 0.2, 0.3, 0.4]).all()
    assert scores.tolist() == [[0.7, 0.7, 0.7]]
    assert class_box_predictions(np.zeros((1, 4)), None, 3)[1] is None


# (N=4, C=2) IoU of each (image, class), which pairs have a true box, and each class's objectness.
IOU = np.array([[0.8, 0.0], [0.45, 0.15], [0.05, 0.0], [0.0, 0.65]])
HAS = np.array([[1, 0], [1, 1], [1, 0], [0, 1]])
OBJ = np.array([[0.9, 0.1], [0.3, 0.6], [0.7, 0.2], [0.1, 0.8]])


@pytest.mark.parametrize(
    "key, expected",
    [
        ("num_boxes", 5),
        ("box_mean_iou", (0.8 + 0.45 + 0.05 + 0.15 + 0.65) / 5),
        ("box_iou50", 2 / 5),
        ("detection_iou", (0.8 + 0.0 + 0.05 + 0.15 + 0.65) / 5),  # image 1's class 0 (0.3) is not claimed
        (
            "iou_share",
            {"0.1": 4 / 5, "0.2": 3 / 5, "0.3": 3 / 5, "0.4": 3 / 5, "0.5": 2 / 5, "0.6": 2 / 5, "0.7": 1 / 5},
        ),
        ("per_class_boxes", [3, 2]),
        ("per_class_iou", [(0.8 + 0.45 + 0.05) / 3, (0.15 + 0.65) / 2]),
        ("per_class_detection_iou", [(0.8 + 0.05) / 3, (0.15 + 0.65) / 2]),
        (
            "per_class_iou_share",
            [
                {"0.1": 2 / 3, "0.2": 2 / 3, "0.3": 2 / 3, "0.4": 2 / 3, "0.5": 1 / 3, "0.6": 1 / 3, "0.7": 1 / 3},
                {"0.1": 1.0, "0.2": 0.5, "0.3": 0.5, "0.4": 0.5, "0.5": 0.5, "0.6": 0.5, "0.7": 0.0},
            ],
        ),
    ],
)
def test_box_iou_metrics_known_answers(key, expected):
    got = box_iou_metrics(IOU, HAS, OBJ)[key]
    if isinstance(expected, list) and isinstance(expected[0], dict):
        assert len(got) == len(expected) and all(g == pytest.approx(e) for g, e in zip(got, expected))
    else:
        assert got == pytest.approx(expected)


def test_box_iou_metrics_thresholds_and_a_class_without_boxes():
    out = box_iou_metrics(np.zeros((2, 3)), np.array([[1, 0, 0], [0, 0, 0]]))
    assert (
        list(out["iou_share"])
        == [f"{t:g}" for t in IOU_THRESHOLDS]
        == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"]
    )
    assert out["per_class_iou"][1] is None and out["per_class_iou_share"][2] is None
    assert "detection_iou" not in out  # no objectness, no claim
    empty = box_iou_metrics(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 3)))
    assert empty["num_boxes"] == 0 and math.isnan(empty["box_mean_iou"]) and math.isnan(empty["detection_iou"])
    assert all(math.isnan(v) for v in empty["iou_share"].values())


def test_compute_metrics_uses_per_class_boxes_when_given():
    """Image 0 has a class-0 box (found exactly) and a class-2 box (predicted a third off, not claimed)."""
    a, b = [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]
    true = np.zeros((2, 3, 4))
    true[0, 0], true[0, 2] = a, b
    pred = np.zeros((2, 3, 4))
    pred[0, 0], pred[0, 2] = a, [0.75, 0.5, 1.25, 1.0]  # IoU 1/3 with b
    predictions = {
        "probs": np.array([[0.9, 0.1, 0.8], [0.2, 0.7, 0.1]]),
        "labels": np.array([[1, 0, 1], [0, 1, 0]], dtype=np.float32),
        "box": np.array([a, [0, 0, 0, 0]]),
        "has_box": np.array([1.0, 0.0]),
        "pred_box": np.array([a, a]),
        "objectness": np.array([0.9, 0.1]),
        "class_boxes": true,
        "class_has_box": (true.sum(-1) > 0).astype(np.float32),
        "pred_class_boxes": pred,
        "class_objectness": np.array([[0.9, 0.5, 0.4], [0.1, 0.1, 0.1]]),
    }
    out = metrics_from_predictions(predictions, multi_label=True, resamples=0)
    assert out["num_boxes"] == 2 and out["per_class_boxes"] == [1, 0, 1]
    assert out["box_mean_iou"] == pytest.approx((1 + 1 / 3) / 2)
    assert out["per_class_iou"] == pytest.approx([1.0, None, 1 / 3])
    assert out["detection_iou"] == pytest.approx(0.5) and out["per_class_detection_iou"] == pytest.approx(
        [1.0, None, 0.0]
    )
    assert out["mean_iou"] == pytest.approx(1.0)  # the one box per image, as before
    # Without per-class columns, the image's one box belongs to both its classes and the one
    # predicted box answers for both.
    per_class = ("class_boxes", "class_has_box", "pred_class_boxes", "class_objectness")
    single = {k: v for k, v in predictions.items() if k not in per_class}
    out = metrics_from_predictions(single, multi_label=True, resamples=0)
    assert out["per_class_boxes"] == [1, 0, 1] and out["box_mean_iou"] == pytest.approx(1.0)
    assert out["detection_iou"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# the trivial baselines
# ---------------------------------------------------------------------------------------------

TRAIN_BOXES = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
TRAIN_CLASSES = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]])  # the last box is of two classes


def test_mean_box_baselines_on_a_hand_made_set():
    true = np.zeros((2, 4, 4))
    true[0, 0] = [0.0, 0.0, 0.5, 0.5]
    true[1, 2] = [0.5, 0.5, 0.75, 0.75]  # class 2 has no train box: the global mean box answers
    has = (true.sum(-1) > 0).astype(np.float32)
    out = mean_box_baselines(TRAIN_BOXES, TRAIN_CLASSES, true, has)
    global_box = [1 / 6, 1 / 6, 5 / 6, 5 / 6]  # each train box once
    assert out["global_mean_box"]["box"] == pytest.approx(global_box)
    boxes = out["class_mean_box"]["boxes"]
    assert boxes[0] == pytest.approx([0.0, 0.0, 0.75, 0.75]) and boxes[1] == pytest.approx([0.25, 0.25, 1.0, 1.0])
    assert boxes[2] is None and boxes[3] is None and out["class_mean_box"]["fallback_classes"] == [2, 3]
    # [0, 0, .5, .5] inside the class-0 mean box [0, 0, .75, .75]: .25 / .5625
    iou_class0 = 4 / 9
    # [0, 0, .5, .5] and the global box: overlap [1/6, 1/6, .5, .5] = 1/9, union 4/9 + 1/4 - 1/9 = 7/12
    iou_global0 = (1 / 9) / (7 / 12)
    # [.5, .5, .75, .75] (1/16) inside the global box (4/9)
    iou_global1 = (1 / 16) / (4 / 9)
    assert out["class_mean_box"]["box_mean_iou"] == pytest.approx((iou_class0 + iou_global1) / 2)
    assert out["class_mean_box"]["per_class_iou"] == pytest.approx([iou_class0, None, iou_global1, None])
    assert out["global_mean_box"]["box_mean_iou"] == pytest.approx((iou_global0 + iou_global1) / 2)
    assert out["global_mean_box"]["box_iou50"] == pytest.approx(0.0) and out["class_mean_box"]["box_iou50"] == 0.0
    assert "detection_iou" not in out["class_mean_box"]  # a fixed box claims every image


def test_mean_box_baselines_without_train_boxes_is_none():
    assert mean_box_baselines(np.zeros((0, 4)), np.zeros((0, 3)), np.zeros((1, 3, 4)), np.zeros((1, 3))) is None


# ---------------------------------------------------------------------------------------------
# bootstrap confidence intervals
# ---------------------------------------------------------------------------------------------


def test_weighted_auroc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(200), 1)  # many ties
    positive = rng.random(200) < 0.3
    weights = np.vstack([np.ones(200), rng.integers(0, 4, 200)])
    out = weighted_auroc(scores, positive, weights)
    assert out[0] == pytest.approx(roc_auc_score(positive, scores))
    assert out[1] == pytest.approx(roc_auc_score(positive, scores, sample_weight=weights[1]))
    assert np.isnan(weighted_auroc(scores, np.zeros(200), weights)).all()


@pytest.mark.parametrize("multi_label", [False, True])
def test_correct_predictions_agree_with_accuracy(multi_label):
    rng = np.random.default_rng(1)
    labels = (rng.random((60, 4)) < 0.4).astype(np.float32) if multi_label else np.eye(4)[rng.integers(0, 4, 60)]
    probs = np.clip(labels * 0.4 + rng.random((60, 4)) * 0.6, 0, 1)
    probs[0, 0] = 0.5  # the threshold itself: torchmetrics counts it negative
    expected = classification_metrics(probs, labels, multi_label)["accuracy"]
    assert correct_predictions(probs, labels, multi_label).mean() == pytest.approx(expected, abs=1e-6)


def _sample(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 3, n)
    labels = np.eye(3)[target]
    probs = labels * 0.25 + rng.dirichlet(np.ones(3), n) * 0.75
    true = np.tile([0.2, 0.2, 0.6, 0.6], (n, 1))
    pred = true + rng.normal(0, 0.08, (n, 4))
    return {
        "probs": probs,
        "labels": labels,
        "pred_box": pred,
        "true_box": true,
        "has_box": rng.random(n) < 0.7,
        "objectness": rng.random(n),
    }


HEADLINE_CI = ("accuracy", "auroc_macro", "mean_iou", "iou50", "box_mean_iou", "box_iou50", "detection_iou")


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_more_images():
    small, large = compute_metrics(**_sample(60)), compute_metrics(**_sample(2400))
    for name in HEADLINE_CI:
        for out in (small, large):
            low, high = out["ci"][name]
            assert low <= out[name] + 1e-9 and out[name] - 1e-9 <= high, name
        widths = [out["ci"][name][1] - out["ci"][name][0] for out in (small, large)]
        assert widths[1] < widths[0] / 3, name  # about 1/sqrt(40)
    assert compute_metrics(**_sample(60))["ci"] == small["ci"]  # a fixed seed


def test_bootstrap_ci_of_ratios_and_undefined_metrics():
    ones = np.ones(5)
    assert bootstrap_ci({"constant": (ones, ones)}) == {"constant": [1.0, 1.0]}
    assert bootstrap_ci({"no boxes": (np.zeros(5), np.zeros(5))}) == {"no boxes": None}
    assert bootstrap_ci({"x": (ones, ones)}, resamples=0) == {}
    one_class = bootstrap_ci({}, (np.full((4, 2), 0.5), np.tile([1.0, 0.0], (4, 1))))
    assert one_class == {"auroc_macro": None}
    no_box = compute_metrics(**{**_sample(30), "has_box": np.zeros(30)})
    assert no_box["ci"]["box_mean_iou"] is None and no_box["ci"]["accuracy"] is not None


# ---------------------------------------------------------------------------------------------
# text metrics of a dataset without findings text
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "clinical_precision", "clinical_recall", "clinical_f1"]
)
def test_text_metrics_without_any_reference_text_are_undefined_not_zero(key):
    out = compute_metrics(
        probs=EYE3, labels=EYE3, generated=["nodule rul", "", "lungs clear"], references=["", " ", ""], parse=_parse
    )
    assert math.isnan(out[key]) and key not in scalar_metrics(out)
