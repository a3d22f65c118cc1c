"""medfusion.plots: every figure is written as a PNG that PIL can open."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medfusion import plots

CLASSES = ["normal", "pneumonia", "nodule"]
RNG = np.random.default_rng(0)
IMAGES_U8 = [RNG.integers(0, 255, (64, 64), dtype=np.uint8) for _ in range(3)]
IMAGES_MODEL = [RNG.normal(size=(1, 64, 64)).astype(np.float32) for _ in range(3)]  # normalized model input
TARGET = np.array([0, 1, 2, 1, 0, 2])
PROBS = np.eye(3)[TARGET] * 0.6 + 0.4 * RNG.dirichlet(np.ones(3), 6)
THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]

CASES = {
    "confusion": lambda path: plots.plot_confusion_matrix([[3, 1, 0], [0, 2, 1], [1, 0, 4]], CLASSES, path),
    "roc": lambda path: plots.plot_roc_curves(PROBS, np.eye(3)[TARGET], CLASSES, path),
    "predictions": lambda path: plots.plot_predictions(
        IMAGES_U8,
        path,
        true_boxes=[[0.1, 0.1, 0.4, 0.5], None, [0.5, 0.5, 0.9, 0.8]],
        pred_boxes=[[0.12, 0.1, 0.45, 0.5], [0.2, 0.2, 0.3, 0.3], None],
        findings=["nodule in the right upper zone. " * 4, "", "the lungs are clear."],
        titles=["true: nodule / pred: nodule", "true: normal / pred: normal", "true: x / pred: y"],
    ),
    "predictions-labelled-boxes": lambda path: plots.plot_predictions(
        IMAGES_U8,
        path,
        true_boxes=[[("nodule", [0.1, 0.1, 0.3, 0.3]), ("mass", [0.5, 0.5, 0.9, 0.8])], [], None],
        pred_boxes=[[("nodule", [0.12, 0.1, 0.35, 0.3])], None, [("mass", [0.2, 0.2, 0.4, 0.4])]],
    ),
    "predictions-model-input": lambda path: plots.plot_predictions(IMAGES_MODEL, path, ncols=2),
    "attention": lambda path: plots.plot_attention(IMAGES_MODEL, [RNG.dirichlet(np.ones(64)).reshape(8, 8)] * 3, path),
    "note-attention": lambda path: plots.plot_note_attention(
        [[("fever", 0.5), ("and", 0.05), ("productive", 0.2), ("cough", 0.25)] * 8, []], path, titles=["a", "b"]
    ),
    "iou-thresholds": lambda path: plots.plot_iou_thresholds(
        THRESHOLDS,
        {"all boxes": [0.9, 0.8, 0.7, 0.5, 0.4, 0.2, 0.1], "nodule": [1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0]},
        path,
        baseline={"all boxes": [0.6, 0.4, 0.2, 0.1, 0.0, 0.0, 0.0], "nodule": [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]},
        counts={"all boxes": 12, "nodule": 2},
    ),
    "iou-thresholds-one-class-no-baseline": lambda path: plots.plot_iou_thresholds(
        THRESHOLDS, {"nodule": [1.0, None, 0.5, 0.5, 0.0, 0.0, 0.0]}, path
    ),
    "iou-thresholds-no-boxes": lambda path: plots.plot_iou_thresholds(THRESHOLDS, {}, path),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_plot_writes_a_png(tmp_path, name):
    path = str(tmp_path / "sub" / f"{name}.png")
    assert CASES[name](path) == path
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_importing_plots_does_not_import_matplotlib():
    """The backend is chosen per figure (an Agg canvas) inside each function, never at import."""
    code = "import sys, medfusion.plots; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_confusion_matrix_must_be_square(tmp_path):
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion_matrix([[1, 2, 3]], CLASSES, str(tmp_path / "x.png"))


def _green_pixels(path: str) -> int:
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    return int(((abs(rgb[..., 0] - 0x2C) < 30) & (abs(rgb[..., 1] - 0xA0) < 30) & (abs(rgb[..., 2] - 0x2C) < 30)).sum())


def test_every_finding_box_of_an_image_is_drawn(tmp_path):
    """A film with two boxed findings shows both (each with its class name), not one."""
    black = [np.zeros((64, 64), dtype=np.uint8)]
    one, two = str(tmp_path / "one.png"), str(tmp_path / "two.png")
    nodule, mass = ("nodule", [0.1, 0.1, 0.3, 0.3]), ("mass", [0.5, 0.5, 0.9, 0.8])
    plots.plot_predictions(black, one, true_boxes=[[nodule]])
    plots.plot_predictions(black, two, true_boxes=[[nodule, mass]])
    assert _green_pixels(two) > 1.5 * _green_pixels(one) > 0
