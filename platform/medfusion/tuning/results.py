"""What a finished sweep reports: one record per trial, the ranking, the Pareto front over the three
task metrics, the ablation's mean and 95% confidence interval, and plain-text tables.

Pure functions over plain data (no Ray), so they are unit-tested without a sweep.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Trial statuses of the leaderboard.
FINISHED, STOPPED, ERRORED, UNFINISHED = "finished", "stopped", "errored", "unfinished"
SUCCESSFUL = (FINISHED, STOPPED)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def best_epoch(rows: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any] | None:
    """The reported epoch with the highest finite `metric` (None when there is none)."""
    scored = [row for row in rows if is_number(row.get(metric))]
    return max(scored, key=lambda row: float(row[metric])) if scored else None


def rank(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: successful trials by objective (highest first), then unfinished, then errored."""

    def key(record: dict[str, Any]) -> tuple[int, float]:
        if record["status"] in SUCCESSFUL and is_number(record.get("objective")):
            return (0, -float(record["objective"]))
        return (1 if record["status"] == UNFINISHED else 2, 0.0)

    ranked = sorted(records, key=key)
    for position, record in enumerate(ranked, start=1):
        record["rank"] = position
    return ranked


def pareto_front(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    """Trial ids of the successful trials that no other successful trial beats on every metric in
    `keys` (all maximized; an undefined metric counts 0, as in the objective)."""
    candidates = [r for r in records if r["status"] in SUCCESSFUL]
    points = np.array([[float(r[k]) if is_number(r.get(k)) else 0.0 for k in keys] for r in candidates]).reshape(len(candidates), len(keys))
    front = []
    for i, record in enumerate(candidates):
        others = np.delete(points, i, axis=0)
        dominated = np.any(np.all(others >= points[i], axis=1) & np.any(others > points[i], axis=1)) if len(others) else False
        if not dominated:
            front.append(record["trial_id"])
    return front


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student t quantile (scipy)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, dof))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and its Student-t confidence interval (n - 1 degrees of freedom) over finite `values`."""
    data = np.array([float(v) for v in values if is_number(v)])
    if len(data) == 0:
        return {"n": 0, "mean": None, "std": None, "ci": None}
    mean = float(data.mean())
    if len(data) < 2:
        return {"n": 1, "mean": mean, "std": None, "ci": None}
    std = float(data.std(ddof=1))
    half = t_quantile(confidence, len(data) - 1) * std / math.sqrt(len(data))
    return {"n": int(len(data)), "mean": mean, "std": std, "ci": [mean - half, mean + half]}


def summarize_runs(runs: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """metric -> mean_ci over the runs' `metrics` values."""
    return {name: mean_ci([run["metrics"].get(name) for run in runs]) for name in metrics}


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, columns aligned (numbers right, text left)."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    numeric = [all(is_number(row[i]) or row[i] is None for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def short_key(key: str) -> str:
    """``model.fusion`` -> ``fusion`` for table headers."""
    return key.rsplit(".", 1)[-1]


def leaderboard_table(records: Sequence[Mapping[str, Any]], params: Sequence[str], metrics: Sequence[str]) -> str:
    """The table `medfusion tune` prints: one row per trial, best first."""
    shown = [p for p in params if p != "model.fusion"]
    headers = ["#", "trial", "fusion", *(short_key(p) for p in shown), *(m.removeprefix("val_") for m in metrics),
               "objective", "epochs", "early", "status"]  # fmt: skip
    rows = [
        [r.get("rank"), r["trial_id"], r.get("fusion"), *(r["params"].get(p) for p in shown),
         *(r.get(m) for m in metrics), r.get("objective"), r.get("epochs_run"), r.get("stopped_early"), r["status"]]
        for r in records
    ]  # fmt: skip
    return format_table(headers, rows)


def ablation_table(variants: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """variant -> `mean ± half-width [low, high]` per metric."""

    def cell(stat: Mapping[str, Any]) -> str:
        if stat.get("mean") is None:
            return "-"
        if not stat.get("ci"):
            return f"{stat['mean']:.4f}"
        low, high = stat["ci"]
        return f"{stat['mean']:.4f} ± {(high - low) / 2:.4f}"

    headers = ["fusion", "runs", *metrics]
    rows = [[name, v["runs_ok"], *(cell(v["summary"][m]) for m in metrics)] for name, v in variants.items()]
    return format_table(headers, rows)
