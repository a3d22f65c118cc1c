"""What a finished run leaves next to its checkpoints: learning curves and the test evaluation."""

from __future__ import annotations

import io
import math

from medfusion import storage
from medfusion.config import TrainConfig


def plot_learning_curves(history: list[dict[str, float]], uri: str) -> str:
    """Train/val loss and val accuracy / mean IoU per epoch, one PNG at `uri` (local or s3://).

    Drawn on its own Agg canvas (no pyplot, no global backend switch), like medfusion.plots.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    losses, scores = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        losses.plot(epochs, [h.get(key, math.nan) for h in history], marker="o", label=label)
    losses.set(xlabel="epoch", ylabel="loss", title="loss")
    losses.legend()
    for key, label in (("val_accuracy", "val accuracy"), ("val_mean_iou", "val mean IoU")):
        scores.plot(epochs, [h.get(key, math.nan) for h in history], marker="o", label=label)
    scores.set(xlabel="epoch", ylim=(0, 1), title="validation")
    scores.legend()
    for axes in (losses, scores):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def evaluate_on_test(cfg: TrainConfig, model_uri: str, output_uri: str) -> tuple[dict[str, float], str]:
    """The evaluate stage on the test split for the exported model: (headline metrics, output folder)."""
    from medfusion.config import EvaluateConfig
    from medfusion.evaluate import run_evaluate

    result = run_evaluate(
        EvaluateConfig(
            model_uri=model_uri,
            data_uri=cfg.dataset_uri,
            split="test",
            output_uri=output_uri,
            batch_size=cfg.data.batch_size,
        )
    )
    return dict(result.metrics), result.output_uri
