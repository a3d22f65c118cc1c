"""The run folder ``<storage_uri>/<name>``: its file names, where it is, and what a finished run wrote.

A fresh run must not reuse a folder; a resumed one (``resume=<run folder>``) must match the run it
continues in every field its checkpoints depend on (`RESUME_FIXED`).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import yaml

from medfusion import storage
from medfusion.config import ConfigError, TrainConfig
from medfusion.loader import to_dict

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CURVES_FILE = "learning_curves.png"
RESULT_FILE = "result.json"
EVAL_DIR = "eval-test"
# Fields a resumed run must share with the run it continues (the checkpoint depends on them).
RESUME_FIXED = ("dataset_uri", "model", "data", "strategy", "zero_stage", "num_workers")


@dataclass
class TrainResult:
    """Where a training run's outputs are, and its headline numbers."""

    run_uri: str
    model_uri: str
    """Export folder of the best epoch's model."""
    metrics_uri: str
    curves_uri: str
    checkpoint_uri: str
    """The newest checkpoint (what --resume continues from)."""
    best_epoch: int
    select_metric: str
    best_value: float | None
    epochs_run: int
    global_step: int
    stopped_early: bool
    test_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_uri: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    worker_nodes: list[str] = field(default_factory=list)
    """Ray node id of each rank in the last (re)start of the workers."""

    def summary(self) -> str:
        """What `medfusion train` prints."""
        lines = [
            f"run {self.run_uri}: {self.epochs_run} epochs, {self.global_step} optimizer steps"
            + (" (early stop)" if self.stopped_early else "")
        ]
        lines.append(f"best epoch {self.best_epoch} by {self.select_metric} = {self.best_value}")
        if self.test_metrics:
            lines.append("test: " + ", ".join(f"{k} {v:.4f}" for k, v in self.test_metrics.items()))
        lines.append(f"model: {self.model_uri}")
        lines.append(f"metrics: {self.metrics_uri}  curves: {self.curves_uri}")
        if self.evaluate_uri:
            lines.append(f"evaluation: {self.evaluate_uri}")
        return "\n".join(lines)


def split_run_uri(run_uri: str) -> tuple[str, str]:
    """``s3://b/runs/r1`` -> (``s3://b/runs``, ``r1``); local paths are made absolute.

    Raises:
        ConfigError: an S3 URI with no folder below its bucket.
    """
    if storage.is_s3(run_uri):
        parent, _, name = run_uri.rstrip("/").rpartition("/")
        if parent.count("/") < 2 or not name:
            raise ConfigError(f"resume: {run_uri!r} is not a run folder (expected s3://bucket/.../<name>)")
        return parent, name
    path = os.path.abspath(run_uri)
    return os.path.dirname(path), os.path.basename(path)


def resolve_run(cfg: TrainConfig) -> TrainConfig:
    """Fix storage_uri and name: from `resume`, or the given folder and a fresh generated name.

    Raises:
        ConfigError: neither `resume` nor `storage_uri` is set.
    """
    if cfg.resume:
        storage_uri, name = split_run_uri(cfg.resume)
        return dataclasses.replace(cfg, storage_uri=storage_uri, name=name)
    if not cfg.storage_uri:
        raise ConfigError("storage_uri: required (a local folder or s3://bucket/prefix for run folders)")
    storage_uri = cfg.storage_uri if storage.is_s3(cfg.storage_uri) else os.path.abspath(cfg.storage_uri)
    name = cfg.name or f"train-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"
    return dataclasses.replace(cfg, storage_uri=storage_uri, name=name)


def run_uri_of(cfg: TrainConfig) -> str:
    """The run folder <storage_uri>/<name> of a resolved config."""
    return storage.join(cfg.storage_uri, cfg.name)


def saved_config(saved_uri: str, resume: bool, exists_error: str, missing_error: str) -> dict[str, Any] | None:
    """The config a run or sweep folder saved, for a resume; None for a fresh start.

    Raises:
        ConfigError: `exists_error` when a fresh start finds one (the folder is taken),
            `missing_error` when a resume finds none.
    """
    if not resume:
        if storage.exists(saved_uri):
            raise ConfigError(exists_error)
        return None
    try:
        return yaml.safe_load(storage.read_text(saved_uri)) or {}
    except FileNotFoundError:
        raise ConfigError(missing_error) from None


def check_run_folder(cfg: TrainConfig, run_uri: str) -> None:
    """A fresh run must not reuse a folder; a resumed one must match the run it continues.

    Raises:
        ConfigError: naming the field (or the folder) that is in the way.
    """
    saved = saved_config(
        storage.join(run_uri, CONFIG_FILE),
        bool(cfg.resume),
        f"name: a run named {cfg.name!r} already exists at {run_uri}; "
        f"continue it with --resume {run_uri} or choose another name",
        f"resume: {run_uri} is not a training run ({CONFIG_FILE} not found)",
    )
    if saved is None:
        return
    current = to_dict(cfg)
    for key in RESUME_FIXED:
        # A ZeRO-0 checkpoint is not partitioned by rank, so it loads on any number of workers.
        if key == "num_workers" and cfg.strategy == "deepspeed" and cfg.zero_stage == 0:
            continue
        if key in saved and saved[key] != current[key]:
            raise ConfigError(
                f"{key}: differs from the run being resumed ({run_uri}); its checkpoints need the same value"
            )
