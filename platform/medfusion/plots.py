"""Evaluation figures (PNG): confusion matrix, ROC curves, predicted boxes with generated findings,
image attention heatmaps, highlighted note tokens and the share of boxes found per IoU threshold.

Each ``plot_*(..., path) -> path`` draws on its own matplotlib Figure with the Agg canvas (no pyplot,
no global backend switch, safe in worker threads) and writes through medfusion.storage, so `path`
may be local or ``s3://``. Images are either uint8 (H, W) or the model's normalized float input
((1, S, S) or (S, S)); boxes are normalized xyxy.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medfusion import storage
from medfusion.data.images import MEAN, STD

TRUE_COLOR = "#2ca02c"
PRED_COLOR = "#d62728"
BASELINE_COLOR = "#1f77b4"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    storage.write_bytes(path, buf.getvalue())
    return path


def _display(image: np.ndarray) -> np.ndarray:
    """A (H, W) float image in [0, 1] from uint8 pixels or the model's normalized input."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[0]
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32) * STD + MEAN, 0.0, 1.0)


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return (n + ncols - 1) // ncols, ncols


def plot_confusion_matrix(matrix: Sequence[Sequence[float]], class_names: Sequence[str], path: str) -> str:
    """Rows are true classes, columns predicted, cells annotated with counts (row-normalized colour)."""
    counts = np.asarray(matrix, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"plot_confusion_matrix: expected a square (C, C) matrix, got shape {counts.shape}")
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    n = len(class_names)
    fig = _figure(1.2 + 0.7 * n, 1.0 + 0.6 * n)
    ax = fig.add_subplot()
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(
                j, i, f"{int(counts[i, j])}", ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black"
            )
    ax.set_title("Confusion matrix")
    return _save(fig, path)


def plot_roc_curves(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str) -> str:
    """One-vs-rest ROC curve per class (classes without positives and negatives are skipped)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    probs_t = torch.as_tensor(np.asarray(probs, dtype=np.float32))
    labels_t = torch.as_tensor(np.asarray(labels)).round().long()
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    for c, name in enumerate(class_names):
        if int(labels_t[:, c].sum()) in (0, len(labels_t)):
            continue
        fpr, tpr, _ = binary_roc(probs_t[:, c], labels_t[:, c])
        auc = float(binary_auroc(probs_t[:, c], labels_t[:, c]))
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (one vs rest)")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def _draw_box(
    ax: Any, box: Sequence[float], size: tuple[int, int], color: str, style: str = "-", label: str = ""
) -> None:
    from matplotlib.patches import Rectangle

    height, width = size
    x0, y0, x1, y1 = (float(v) for v in box)
    if label:
        ax.text(x0 * width, y0 * height - 1, label, color=color, fontsize=6, va="bottom")
    ax.add_patch(
        Rectangle(
            (x0 * width - 0.5, y0 * height - 0.5),
            (x1 - x0) * width,
            (y1 - y0) * height,
            fill=False,
            edgecolor=color,
            linewidth=1.5,
            linestyle=style,
        )
    )


Boxes = Sequence[float] | Sequence[tuple[str, Sequence[float]]] | None


def _labelled(boxes: Boxes) -> list[tuple[str, Sequence[float]]]:
    """One image's boxes as (label, box) pairs: None is none, a bare box is one without a label."""
    if boxes is None or len(boxes) == 0:
        return []
    if isinstance(boxes[0], tuple):
        return list(boxes)
    return [("", boxes)]


def plot_predictions(
    images: Sequence[np.ndarray],
    path: str,
    *,
    true_boxes: Sequence[Boxes] | None = None,
    pred_boxes: Sequence[Boxes] | None = None,
    findings: Sequence[str] | None = None,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
) -> str:
    """A grid of images with the true boxes (green), the predicted boxes (red, dashed) and the text under each.

    Each image's boxes are None (none drawn: pass None where no box is claimed), one box, or a list
    of (label, box) pairs, one per finding, each drawn with its label.
    """
    n = len(images)
    rows, cols = _grid(n, ncols)
    fig = _figure(3.2 * cols, 4.2 * rows)
    for i, image in enumerate(images):
        ax = fig.add_subplot(rows, cols, i + 1)
        pixels = _display(image)
        ax.imshow(pixels, cmap="gray", vmin=0.0, vmax=1.0)
        for boxes, color, style in ((true_boxes, TRUE_COLOR, "-"), (pred_boxes, PRED_COLOR, "--")):
            for label, box in _labelled(None if boxes is None else boxes[i]):
                _draw_box(ax, box, pixels.shape, color, style, label)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
        if findings is not None:
            ax.set_xlabel("\n".join(textwrap.wrap(findings[i] or "(empty)", 38)[:5]), fontsize=7)
    return _save(fig, path)


def plot_attention(
    images: Sequence[np.ndarray],
    attention: Sequence[np.ndarray],
    path: str,
    *,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
) -> str:
    """Each image with its (h, w) spatial attention stretched over it as a translucent heatmap."""
    n = len(images)
    rows, cols = _grid(n, ncols)
    fig = _figure(3.0 * cols, 3.2 * rows)
    for i, image in enumerate(images):
        ax = fig.add_subplot(rows, cols, i + 1)
        pixels = _display(image)
        height, width = pixels.shape
        weights = np.asarray(attention[i], dtype=np.float32)
        ax.imshow(pixels, cmap="gray", vmin=0.0, vmax=1.0, extent=(0, width, height, 0))
        ax.imshow(
            weights / max(float(weights.max()), 1e-12),
            cmap="jet",
            alpha=0.45,
            vmin=0.0,
            vmax=1.0,
            extent=(0, width, height, 0),
            interpolation="bilinear",
        )
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    return _save(fig, path)


def plot_note_attention(
    notes: Sequence[Sequence[tuple[str, float]]],
    path: str,
    *,
    titles: Sequence[str] | None = None,
    line_chars: int = 70,
) -> str:
    """Note tokens laid out as text, each highlighted in proportion to its attention weight."""
    from matplotlib import colormaps

    cmap = colormaps["Oranges"]
    layouts = []  # per note: list of (line, column, token, weight)
    for tokens in notes:
        line, column, placed = 0, 0, []
        for token, weight in tokens:
            if column and column + len(token) > line_chars:
                line, column = line + 1, 0
            placed.append((line, column, token, float(weight)))
            column += len(token) + 1
        layouts.append((placed, line + 1))
    total_lines = sum(lines + 2 for _, lines in layouts) or 1
    fig = _figure(0.11 * line_chars + 0.5, 0.28 * total_lines + 0.3)
    ax = fig.add_subplot()
    ax.set_xlim(0, line_chars)
    ax.set_ylim(total_lines, 0)
    ax.axis("off")
    y = 0.0
    for k, (placed, lines) in enumerate(layouts):
        title = titles[k] if titles is not None else f"note {k + 1}"
        ax.text(0, y + 0.5, title, fontsize=9, fontweight="bold", va="center")
        peak = max((w for *_, w in placed), default=0.0) or 1.0
        if not placed:
            ax.text(0, y + 1.5, "(no note)", fontsize=9, family="monospace", va="center", color="grey")
        for line, column, token, weight in placed:
            shade = 0.85 * weight / peak
            ax.text(
                column,
                y + 1.5 + line,
                token,
                fontsize=9,
                family="monospace",
                va="center",
                color="white" if shade > 0.55 else "black",
                bbox={"facecolor": cmap(shade), "edgecolor": "none", "pad": 1.0},
            )
        y += lines + 2
    return _save(fig, path)


def plot_iou_thresholds(
    thresholds: Sequence[float],
    shares: Mapping[str, Sequence[float | None]],
    path: str,
    *,
    baseline: Mapping[str, Sequence[float | None]] | None = None,
    counts: Mapping[str, int] | None = None,
    labels: tuple[str, str] = ("model", "baseline"),
    ncols: int = 4,
) -> str:
    """Share of true boxes found at IoU >= t against t (Wang et al., CVPR 2017, Table 4 as curves).

    One panel per entry of `shares` (e.g. all boxes, then each class with a box), the model solid and
    its `baseline` (same keys) dashed, `counts` boxes in each title. An empty `shares` draws one panel
    saying there is no box to find.
    """
    names = list(shares)
    rows, cols = _grid(max(len(names), 1), ncols)
    fig = _figure(3.2 * cols, 2.8 * rows)
    fig.subplots_adjust(hspace=0.55, wspace=0.3)
    if not names:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no true box in the evaluated split", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    x = np.asarray(thresholds, dtype=np.float64)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        series = [(shares[name], PRED_COLOR, "-", labels[0])]
        if baseline is not None and name in baseline:
            series.append((baseline[name], BASELINE_COLOR, "--", labels[1]))
        for values, color, style, label in series:
            y = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
            ax.plot(x, y, color=color, linestyle=style, marker="o", markersize=3, label=label)
        ax.set_xlim(float(x.min()) - 0.02, float(x.max()) + 0.02)
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        if counts is not None and name in counts:
            name = f"{name} ({counts[name]} box{'' if counts[name] == 1 else 'es'})"
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("IoU threshold", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("share found", fontsize=8)
    handles, names = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", bbox_to_anchor=(0.5, 0.98), ncol=len(names), fontsize="small")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# sweeps (medfusion.tune)
# ---------------------------------------------------------------------------------------------


def _fusion_colors(fusions: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {name: palette(i % 10) for i, name in enumerate(sorted(set(fusions)))}


def _value(record: Mapping[str, Any], key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else 0.0


def plot_pareto(
    records: Sequence[Mapping[str, Any]], metrics: Sequence[str], front: Sequence[str], path: str, best: str = ""
) -> str:
    """Each pair of the task metrics as a scatter of the trials, coloured by fusion; trials on the
    Pareto front ringed and joined, the best trial (objective) starred."""
    pairs = [(metrics[i], metrics[j]) for i in range(len(metrics)) for j in range(i + 1, len(metrics))]
    colors = _fusion_colors([r["fusion"] for r in records])
    fig = _figure(5.0 * len(pairs), 4.4)
    fig.subplots_adjust(wspace=0.35)
    for n, (x_key, y_key) in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs), n + 1)
        for fusion, color in colors.items():
            group = [r for r in records if r["fusion"] == fusion]
            ax.scatter(
                [_value(r, x_key) for r in group],
                [_value(r, y_key) for r in group],
                color=color,
                label=fusion,
                s=36,
                alpha=0.85,
            )
        on_front = sorted((r for r in records if r["trial_id"] in front), key=lambda r: _value(r, x_key))
        ax.scatter(
            [_value(r, x_key) for r in on_front],
            [_value(r, y_key) for r in on_front],
            s=140,
            facecolors="none",
            edgecolors="black",
            linewidths=1.2,
            label="Pareto front",
        )
        for r in records:
            if r["trial_id"] == best:
                ax.scatter(
                    [_value(r, x_key)],
                    [_value(r, y_key)],
                    marker="*",
                    s=260,
                    color="gold",
                    edgecolors="black",
                    zorder=5,
                    label="best objective",
                )
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_key)
        ax.grid(alpha=0.3)
        if n == 0:
            ax.legend(fontsize="small")
    fig.suptitle("Trials over the task metrics (validation); ringed: Pareto front")
    return _save(fig, path)


def plot_fusion_boxplots(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: str) -> str:
    """One panel per metric: a box per fusion strategy over its trials, every trial drawn as a dot."""
    fusions = sorted({r["fusion"] for r in records})
    colors = _fusion_colors(fusions)
    fig = _figure(max(3.4 * len(metrics), 6.0), 4.4)
    fig.subplots_adjust(wspace=0.4)
    for n, key in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), n + 1)
        data = [[_value(r, key) for r in records if r["fusion"] == fusion] for fusion in fusions]
        ax.boxplot(data, showfliers=False)
        for i, (fusion, values) in enumerate(zip(fusions, data), start=1):
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(len(values))
            ax.scatter(i + jitter, values, color=colors[fusion], s=22, zorder=3)
        ax.set_xticks(range(1, len(fusions) + 1), fusions, rotation=35, ha="right")
        ax.set_title(key)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Per fusion strategy (validation, best epoch of each trial)")
    return _save(fig, path)


def plot_ablation(variants: Mapping[str, Mapping[str, Any]], metrics: Sequence[str], path: str) -> str:
    """Grouped bars: mean of each metric per fusion variant with its 95% confidence interval."""
    names = list(variants)
    colors = _fusion_colors(names)
    fig = _figure(max(2.2 * len(metrics) * len(names) / 2, 6.0), 4.4)
    ax = fig.add_subplot()
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        stats = variants[name]["summary"]
        means = [stats[m]["mean"] if stats[m]["mean"] is not None else 0.0 for m in metrics]
        errors = [
            [0.0 if not stats[m]["ci"] else means[k] - stats[m]["ci"][0] for k, m in enumerate(metrics)],
            [0.0 if not stats[m]["ci"] else stats[m]["ci"][1] - means[k] for k, m in enumerate(metrics)],
        ]
        positions = np.arange(len(metrics)) + (i - (len(names) - 1) / 2) * width
        ax.bar(positions, means, width, yerr=errors, capsize=4, color=colors[name], label=name)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("test split (mean, 95% CI)")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Ablation: fused vs image only vs text only")
    return _save(fig, path)
