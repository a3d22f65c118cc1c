"""What a finished sweep reports: one record per trial, the ranking, the Pareto front over the three
task metrics, the ablation's mean and 95% confidence interval, and plain-text tables.

`TrialRecord` is a trial in memory; leaderboard.json holds its `to_dict()`. Pure functions over
records and plain data (no Ray), so they are unit-tested without a sweep.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Trial statuses of the leaderboard.
FINISHED, STOPPED, ERRORED, UNFINISHED = "finished", "stopped", "errored", "unfinished"
SUCCESSFUL = (FINISHED, STOPPED)
# The validation metrics a trial's best epoch reports, as leaderboard.json names them.
VAL_KEYS = ("val_accuracy", "val_auroc_macro", "val_mean_iou", "val_bleu4", "val_loss")
OBJECTIVE = "objective"


@dataclass
class TrialRecord:
    """One trial of a sweep, as the leaderboard lists it: its searched values, how it ended, and the
    validation metrics of its best epoch (the epoch with the highest val_objective).

    `to_dict()` is the trial's entry in leaderboard.json and `from_dict()` reads one back.
    """

    trial_id: str
    """Tune's trial id; also the name of the trial's run folder."""
    status: str
    """FINISHED, STOPPED (by ASHA), ERRORED, or UNFINISHED (the sweep was interrupted first)."""
    fusion: str = ""
    """The trial's fusion strategy: searched, or the sweep's model.fusion."""
    params: dict[str, Any] = field(default_factory=dict)
    """The searched settings by dotted key (``model.fusion``, ``lr``)."""
    val_accuracy: float | None = None
    """Validation accuracy at the best epoch (None when no epoch scored)."""
    val_auroc_macro: float | None = None
    """Validation macro AUROC at the best epoch (None when no epoch scored or it is undefined)."""
    val_mean_iou: float | None = None
    """Validation mean IoU of the boxes at the best epoch."""
    val_bleu4: float | None = None
    """Validation BLEU-4 of the generated findings at the best epoch."""
    val_loss: float | None = None
    """Validation loss at the best epoch."""
    objective: float | None = None
    """val_objective at the best epoch: what the sweep maximizes."""
    best_epoch: int | None = None
    """The epoch these metrics come from (None when no epoch scored)."""
    epochs_run: int = 0
    """Distinct epochs the trial reported."""
    attempts: int = 0
    """Starts of the trial: more than one when Tune retried it or a resumed sweep continued it."""
    run_uri: str = ""
    """The trial's training run folder."""
    model_uri: str = ""
    """The export of the best epoch; empty when the trial exported none."""
    checkpoint_uri: str = ""
    """The newest checkpoint the trial reported; empty when none."""
    error: str = ""
    """The last line of the trial's error; empty unless it errored."""
    rank: int | None = None
    """Position on the leaderboard, 1 the best (set by `rank`)."""

    @property
    def stopped_early(self) -> bool:
        """ASHA stopped the trial before its last epoch."""
        return self.status == STOPPED

    @property
    def usable(self) -> bool:
        """The trial can be the best: it succeeded, scored, and exported its best epoch."""
        return self.status in SUCCESSFUL and self.objective is not None and bool(self.model_uri)

    @property
    def val_metrics(self) -> dict[str, float]:
        """The validation metrics (VAL_KEYS) that the best epoch reported as numbers."""
        return {key: float(value) for key in VAL_KEYS if is_number(value := getattr(self, key))}

    def metric(self, key: str) -> float | None:
        """A validation metric or the objective, by its leaderboard name (``val_mean_iou``, ``objective``).

        Raises:
            KeyError: `key` is not one of VAL_KEYS or ``objective``.
        """
        if key not in (*VAL_KEYS, OBJECTIVE):
            raise KeyError(f"{key}: not a trial metric (one of {', '.join(VAL_KEYS)}, {OBJECTIVE})")
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The trial's leaderboard.json entry: every field, and stopped_early."""
        entry: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            entry[key] = value
            # In leaderboard.json stopped_early sits next to the epoch count it explains.
            if key == "epochs_run":
                entry["stopped_early"] = self.stopped_early
        return entry

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> TrialRecord:
        """A leaderboard.json entry back as a record.

        Keys that are not fields are left out: stopped_early follows from `status`, and a key that
        a newer leaderboard adds should not stop an older reader.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in entry.items() if key in names}
        values["params"] = dict(values.get("params") or {})
        return cls(**values)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def best_epoch(rows: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any] | None:
    """The reported epoch with the highest finite `metric` (None when there is none)."""
    scored = [row for row in rows if is_number(row.get(metric))]
    return max(scored, key=lambda row: float(row[metric])) if scored else None


def rank(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Best first, each with its `rank`: successful trials by objective (highest first), then
    unfinished, then errored."""

    def key(record: TrialRecord) -> tuple[int, float]:
        if record.status in SUCCESSFUL and is_number(record.objective):
            return (0, -float(record.objective))
        return (1 if record.status == UNFINISHED else 2, 0.0)

    ranked = sorted(records, key=key)
    return [dataclasses.replace(record, rank=position) for position, record in enumerate(ranked, start=1)]


def pareto_front(records: Sequence[TrialRecord], keys: Sequence[str]) -> list[str]:
    """Trial ids of the successful trials that no other successful trial beats on every metric in
    `keys` (all maximized; an undefined metric counts 0, as in the objective)."""
    candidates = [r for r in records if r.status in SUCCESSFUL]
    scores = [[float(value) if is_number(value := r.metric(k)) else 0.0 for k in keys] for r in candidates]
    points = np.array(scores).reshape(len(candidates), len(keys))  # (trials, metrics), also when empty
    front = []
    for i, record in enumerate(candidates):
        others = np.delete(points, i, axis=0)
        beaten = np.all(others >= points[i], axis=1) & np.any(others > points[i], axis=1)  # (trials - 1,)
        if not np.any(beaten):
            front.append(record.trial_id)
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
    """A table cell: yes/no for bools, `digits` decimals (significant digits when tiny), "-" for none."""
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


def leaderboard_table(trials: Sequence[Mapping[str, Any]], params: Sequence[str], metrics: Sequence[str]) -> str:
    """The table `medfusion tune` prints: one row per trial, best first.

    Args:
        trials: leaderboard.json's trial entries (`TrialRecord.to_dict()`), best first; the KFP
            artifact and the demo print the table from the JSON file, without the records.
        params: the searched settings (dotted keys), one column each except model.fusion.
        metrics: the validation metrics to show (``val_`` is dropped from their headers).
    """
    shown = [p for p in params if p != "model.fusion"]
    metric_headers = [m.removeprefix("val_") for m in metrics]
    outcome_headers = [OBJECTIVE, "epochs", "early", "status"]
    headers = ["#", "trial", "fusion", *map(short_key, shown), *metric_headers, *outcome_headers]

    def row(trial: Mapping[str, Any]) -> list[Any]:
        searched = [trial["params"].get(p) for p in shown]
        scores = [trial.get(m) for m in (*metrics, OBJECTIVE)]
        outcome = [trial.get("epochs_run"), trial.get("stopped_early"), trial["status"]]
        return [trial.get("rank"), trial["trial_id"], trial.get("fusion"), *searched, *scores, *outcome]

    return format_table(headers, [row(trial) for trial in trials])


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
