"""The train stage: `run_train(TrainConfig) -> TrainResult`, URIs in and out.

A Ray Train `TorchTrainer` runs `medfusion.training.loop.train_loop_per_worker` on
`num_workers` workers; each streams its shard of the dataset (Ray Data from local disk or S3) and
trains through DeepSpeed (ZeRO stage from config; CPU: gloo + ``DS_ACCELERATOR=cpu``) or DDP.
The run folder ``<storage_uri>/<name>`` (local or ``s3://``) receives:

    config.yaml                  the resolved TrainConfig
    checkpoint_epochNNNN/        the newest `keep_checkpoints` checkpoints (every rank's DeepSpeed files)
    model/                       export of the best epoch (medfusion.export; lineage.json inside)
    metrics.json                 per-epoch history, best epoch, final test metrics
    learning_curves.png          losses, val accuracy and IoU per epoch
    eval-test/                   the evaluate stage on the best model (metrics.json, plots, report.html)
    result.json                  this TrainResult

Everything a config can get wrong is checked before a worker starts. ``ray_address=http://HEAD:8265``
(a Ray job) or ``kuberay`` (a RayJob) runs the same stage on a cluster (medfusion.orchestration.stages);
a crashed worker group restarts from the newest checkpoint (`max_failures`); ``resume=<run folder>``
continues a stopped run.

This module is the stage only: the run itself is medfusion.training.run, the run folder's names and
checks medfusion.training.rundir, the Ray runtime medfusion.training.runtime.
"""

from __future__ import annotations

from typing import Any

import yaml

from medfusion import storage
from medfusion.config import ConfigError, TrainConfig
from medfusion.loader import apply_preset, load_config, to_dict
from medfusion.training.run import train_here
from medfusion.training.rundir import CONFIG_FILE, TrainResult, resolve_run

__all__ = ["TrainResult", "load_train_config", "run_train"]


def load_train_config(
    path: str | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
    resume: str | None = None,
) -> TrainConfig:
    """Build a TrainConfig: defaults <- preset (model and data sections) <- YAML <- overrides.

    With `resume` (a run folder) the run's own config.yaml replaces the defaults and the preset,
    so only what the overrides change differs from the stopped run.
    """
    base: dict[str, Any] = {}
    if resume:
        saved_uri = storage.join(resume, CONFIG_FILE)
        try:
            base = yaml.safe_load(storage.read_text(saved_uri)) or {}
        except FileNotFoundError:
            raise ConfigError(f"resume: {resume} is not a training run ({CONFIG_FILE} not found)") from None
        base["resume"] = resume
    else:
        base = apply_preset(preset or "", base)
    return load_config(TrainConfig, path, overrides, base=base)


def run_train(cfg: TrainConfig) -> TrainResult:
    """Train on `cfg.dataset_uri` into the run folder <storage_uri>/<name>; return where the outputs are.

    Raises:
        ConfigError: a value or a URI of the config is wrong (before any worker starts).
        RuntimeError: training failed after `max_failures` restarts, or the submitted Ray job failed.
    """
    cfg = resolve_run(cfg)
    if cfg.ray_address:
        # The same run on the cluster it names, dispatched as every pipeline step is; inside the job
        # ray_address is empty, so the run trains on the cluster it landed on.
        from medfusion.orchestration.stages import run_stage

        return TrainResult(**run_stage("train", {**to_dict(cfg), "ray_address": ""}, cfg.ray_address))
    return train_here(cfg)
