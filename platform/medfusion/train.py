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
submits the same run to a cluster as a Ray job (medfusion.training.jobs); a crashed worker group
restarts from the newest checkpoint (`max_failures`); ``resume=<run folder>`` continues a stopped run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from medfusion import storage
from medfusion.config import ConfigError, TrainConfig, dump_yaml, load_config, preset_values, to_dict

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CURVES_FILE = "learning_curves.png"
RESULT_FILE = "result.json"
EVAL_DIR = "eval-test"
WORKER_MEMORY_PLACEHOLDER = 64 * 2**20  # bytes
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

    def summary(self) -> str:
        """What `medfusion train` prints."""
        lines = [f"run {self.run_uri}: {self.epochs_run} epochs, {self.global_step} optimizer steps"
                 + (" (early stop)" if self.stopped_early else "")]
        lines.append(f"best epoch {self.best_epoch} by {self.select_metric} = {self.best_value}")
        if self.test_metrics:
            lines.append("test: " + ", ".join(f"{k} {v:.4f}" for k, v in self.test_metrics.items()))
        lines.append(f"model: {self.model_uri}")
        lines.append(f"metrics: {self.metrics_uri}  curves: {self.curves_uri}")
        if self.evaluate_uri:
            lines.append(f"evaluation: {self.evaluate_uri}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------


def split_run_uri(run_uri: str) -> tuple[str, str]:
    """``s3://b/runs/r1`` -> (``s3://b/runs``, ``r1``); local paths are made absolute."""
    if storage.is_s3(run_uri):
        parent, _, name = run_uri.rstrip("/").rpartition("/")
        if parent.count("/") < 2 or not name:
            raise ConfigError(f"resume: {run_uri!r} is not a run folder (expected s3://bucket/.../<name>)")
        return parent, name
    path = os.path.abspath(run_uri)
    return os.path.dirname(path), os.path.basename(path)


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
    elif preset:
        for section in ("model", "data"):
            base[section] = preset_values(preset, section)
    return load_config(TrainConfig, path, overrides, base=base)


def _resolve_run(cfg: TrainConfig) -> TrainConfig:
    """Fix storage_uri and name (from `resume`, or a fresh generated name)."""
    if cfg.resume:
        storage_uri, name = split_run_uri(cfg.resume)
        return dataclasses.replace(cfg, storage_uri=storage_uri, name=name)
    if not cfg.storage_uri:
        raise ConfigError("storage_uri: required (a local folder or s3://bucket/prefix for run folders)")
    storage_uri = cfg.storage_uri if storage.is_s3(cfg.storage_uri) else os.path.abspath(cfg.storage_uri)
    name = cfg.name or f"train-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"
    return dataclasses.replace(cfg, storage_uri=storage_uri, name=name)


def run_uri_of(cfg: TrainConfig) -> str:
    return storage.join(cfg.storage_uri, cfg.name)


@dataclass
class _Plan:
    """What the driver works out before any worker starts."""

    info: Any
    steps_per_epoch: int
    micro_batches_per_epoch: int


def _plan(cfg: TrainConfig) -> tuple[TrainConfig, _Plan]:
    """Check everything the config points at (raise ConfigError naming the field otherwise) and
    complete the config from the dataset (model.multi_label comes from the manifest)."""
    from medfusion.data.dataset import DatasetError, open_dataset

    if not cfg.dataset_uri:
        raise ConfigError("dataset_uri: required (a dataset root written by `medfusion data synth` or `data ingest`)")
    try:
        info = open_dataset(cfg.dataset_uri)
    except (DatasetError, OSError) as err:
        raise ConfigError(f"dataset_uri: {err}") from None
    for split in ("train", "val"):
        rows = info.rows(split) if split in info.manifest["splits"] else 0
        if rows < cfg.num_workers:
            raise ConfigError(
                f"dataset_uri: split {split!r} of {cfg.dataset_uri} has {rows} rows, fewer than num_workers ({cfg.num_workers})"
            )
    # Ray Train splits each dataset into equal row counts per worker, so every rank runs the same
    # number of steps (a collective with a missing rank would hang).
    rows_per_worker = info.rows("train") // cfg.num_workers
    steps = math.ceil(rows_per_worker / cfg.data.batch_size) // cfg.grad_accum
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps < 1:
        raise ConfigError(
            f"grad_accum: {cfg.grad_accum} micro-batches of {cfg.data.batch_size} per optimizer step, but each of the "
            f"{cfg.num_workers} workers gets only {rows_per_worker} training rows per epoch"
        )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, multi_label=info.multi_label))
    return cfg, _Plan(info=info, steps_per_epoch=steps, micro_batches_per_epoch=steps * cfg.grad_accum)


def saved_config(saved_uri: str, resume: bool, exists_error: str, missing_error: str) -> dict[str, Any] | None:
    """The config a run or sweep folder saved, for a resume; None for a fresh start.

    Raises ConfigError(`exists_error`) when a fresh start finds one (the folder is taken) and
    ConfigError(`missing_error`) when a resume finds none.
    """
    if not resume:
        if storage.exists(saved_uri):
            raise ConfigError(exists_error)
        return None
    try:
        return yaml.safe_load(storage.read_text(saved_uri)) or {}
    except FileNotFoundError:
        raise ConfigError(missing_error) from None


def _check_run_folder(cfg: TrainConfig, run_uri: str) -> None:
    """A fresh run must not reuse a folder; a resumed one must match the run it continues."""
    saved = saved_config(
        storage.join(run_uri, CONFIG_FILE), cfg.resume,
        f"name: a run named {cfg.name!r} already exists at {run_uri}; continue it with --resume {run_uri} or choose another name",
        f"resume: {run_uri} is not a training run ({CONFIG_FILE} not found)",
    )  # fmt: skip
    if saved is None:
        return
    current = to_dict(cfg)
    for key in RESUME_FIXED:
        if key == "num_workers" and cfg.strategy == "deepspeed" and cfg.zero_stage == 0:
            continue
        if key in saved and saved[key] != current[key]:
            raise ConfigError(f"{key}: differs from the run being resumed ({run_uri}); its checkpoints need the same value")


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------


def run_train(cfg: TrainConfig) -> TrainResult:
    """Train on `cfg.dataset_uri` into the run folder <storage_uri>/<name>; return where the outputs are.

    Raises:
        ConfigError: a value or a URI of the config is wrong (before any worker starts).
        RuntimeError: training failed after `max_failures` restarts, or the submitted Ray job failed.
    """
    cfg = _resolve_run(cfg)
    run_uri = run_uri_of(cfg)
    if cfg.ray_address:
        from medfusion.training.jobs import submit_and_follow

        submit_and_follow(cfg)
        return read_result(run_uri)
    return train_here(cfg)


def train_here(
    cfg: TrainConfig, *, callbacks: Sequence[Any] = (), objective: Mapping[str, Any] | None = None
) -> TrainResult:
    """Train into <storage_uri>/<name> on the Ray this process is connected to (embedded when none).

    What run_train does once the run folder is fixed; a tune trial calls it with Tune's report callback
    and the sweep's objective weights.

    Args:
        cfg: a config whose storage_uri and name are set.
        callbacks: Ray Train callbacks of the run (e.g. ray.tune.integration.ray_train.TuneReportCallback).
        objective: ObjectiveConfig fields, the weights of the per-epoch val_objective (default weights otherwise).
    """
    run_uri = run_uri_of(cfg)
    cfg, plan = _plan(cfg)
    _check_run_folder(cfg, run_uri)
    storage.ensure_bucket(run_uri)
    if not cfg.resume:
        storage.write_text(storage.join(run_uri, CONFIG_FILE), dump_yaml(cfg))
    from medfusion.lineage import build_lineage

    lineage = build_lineage(
        dataset_uri=cfg.dataset_uri,
        dataset_version=plan.info.version,
        config=to_dict(cfg),
        seed=cfg.seed,
        run_id=cfg.name,
        run_uri=run_uri,
    )
    job = {
        "train": to_dict(cfg),
        "run_uri": run_uri,
        "lineage": lineage,
        "steps_per_epoch": plan.steps_per_epoch,
        "micro_batches_per_epoch": plan.micro_batches_per_epoch,
        "objective": dict(objective or {}),
    }
    out = fit(cfg, plan.info, job, callbacks=callbacks)
    test_rows = plan.info.rows("test") if "test" in plan.info.manifest["splits"] else 0
    return _write_outputs(cfg, run_uri, out, test_rows)


def ensure_ray(cfg: TrainConfig, *, dashboard: bool = False, cpus: float = 0.0) -> bool:
    """Start an embedded Ray unless one is running (or this process runs inside a Ray job, whose
    RAY_ADDRESS names the cluster). Returns whether this call started it.

    Args:
        dashboard: start the dashboard too; Ray Tune needs it (see medfusion.tune).
        cpus: CPUs the work needs beyond one run of `cfg` (the embedded Ray gets at least that many).
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS", "local") != "local":
        ray.init(log_to_driver=True, configure_logging=False)
        return False
    # address="local": a new embedded Ray, even when a `ray start` cluster on this machine would
    # otherwise capture a plain ray.init().
    needed = math.ceil(max(cpus, cfg.num_workers * cfg.cpus_per_worker)) + 1  # + 1 for Ray Data's read/preprocess tasks
    # Every worker pins RAY_ADDRESS to its own cluster (pin_ray_address); without the dashboard,
    # Ray Train's placement-group cleaner is muted as well (quiet_placement_group_cleaner).
    hook = "pin_ray_address" if dashboard else "quiet_placement_group_cleaner"
    runtime_env = {"worker_process_setup_hook": f"medfusion.train.{hook}"}
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=dashboard,
             configure_logging=False, runtime_env=runtime_env)  # fmt: skip
    return True


def pin_ray_address() -> None:
    """Worker setup hook: RAY_ADDRESS = this worker's own cluster.

    Ray Train's placement-group cleaner (which frees a run's workers when its controller dies, e.g.
    a Tune trial stopped by ASHA) finds its cluster through the State API, whose address lookup
    takes "the latest" Ray on a machine running several (another user's, a test session's) unless
    RAY_ADDRESS names one.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def quiet_placement_group_cleaner() -> None:
    """Worker setup hook of an embedded Ray without the dashboard: mute Ray Train's placement-group
    cleaner.

    The cleaner asks the State API, which the dashboard serves, whether the run's controller is
    still alive, and warns every time nothing answers: about one line a second, thousands over an
    hour's run. An embedded Ray ends with the process that started it, and its placement groups
    with it, so the cleaner has nothing to do here. RAY_ADDRESS is pinned as well: without it the
    cleaner's look-up fails outright on a machine running another Ray.
    """
    pin_ray_address()
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    """Environment of the training workers: storage credentials and, on CPU, DeepSpeed's CPU accelerator."""
    from medfusion.storage import _AWS_ENV

    env = {k: os.environ[k] for k in _AWS_ENV if os.environ.get(k)}
    # Explicit both ways: a driver started with DS_ACCELERATOR=cpu must not pin GPU workers to CPU.
    env["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"
    # Ray Train's print patch sends a worker's print both to the root logger and, as Ray workers'
    # stdout is wrapped, to stdout too: every progress line reached the console twice.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return env


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """Ray resources of one training worker."""
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    if not any(resources.values()):
        # A placement-group bundle cannot be empty: with no CPU reserved, a little memory stands in.
        resources["memory"] = WORKER_MEMORY_PLACEHOLDER
    return resources


def build_trainer(cfg: TrainConfig, info: Any, job: dict[str, Any], callbacks: Sequence[Any] = ()) -> Any:
    """The TorchTrainer of one run: `train_loop_per_worker` on cfg.num_workers workers, streaming the
    train (and val) split, checkpointing into <storage_uri>/<name>. Call `ensure_ray` first."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from medfusion.data.dataset import stream_split
    from medfusion.training.loop import train_loop_per_worker

    datasets = {"train": stream_split(info, "train", cfg.data, training=True, seed=cfg.seed)}
    if not job.get("bench"):
        # The findings text rides along: validation scores the greedy findings with BLEU-4.
        datasets["val"] = stream_split(info, "val", cfg.data, extra_columns=("findings",), concurrency=1)
    if storage.is_s3(cfg.storage_uri):
        fs, storage_path = storage.filesystem(cfg.storage_uri)
    else:
        fs, storage_path = None, cfg.storage_uri
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=worker_resources(cfg)
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(cfg)},
            callbacks=list(callbacks),
        ),
        datasets=datasets,
    )


def fit(cfg: TrainConfig, info: Any, job: dict[str, Any], callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run the TorchTrainer; return rank 0's return value of the loop."""
    import ray.train

    from medfusion.data.dataset import quiet_ray_data

    started = ensure_ray(cfg)
    quiet_ray_data()
    try:
        trainer = build_trainer(cfg, info, job, callbacks)
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise RuntimeError(f"training run {job['run_uri']} failed: {err}") from err
        out = dict(result.return_value or {})
        out["checkpoint_uri"] = _checkpoint_uri(cfg, result)
        return out
    finally:
        if started:
            ray.shutdown()


def _checkpoint_uri(cfg: TrainConfig, result: Any) -> str:
    if result.checkpoint is None:
        return ""
    path = result.checkpoint.path
    return f"s3://{path}" if storage.is_s3(cfg.storage_uri) else path


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------


def _write_outputs(cfg: TrainConfig, run_uri: str, out: dict[str, Any], test_rows: int) -> TrainResult:
    from medfusion.export import _finite
    from medfusion.training.outputs import evaluate_on_test, plot_learning_curves

    history = list(out.get("history", []))
    model_uri = storage.join(run_uri, "model")
    test_metrics: dict[str, float] = {}
    evaluate_uri = ""
    if cfg.evaluate and test_rows and storage.exists(model_uri):
        test_metrics, evaluate_uri = evaluate_on_test(cfg, model_uri, storage.join(run_uri, EVAL_DIR))
    curves_uri = plot_learning_curves(history, storage.join(run_uri, CURVES_FILE)) if history else ""
    result = TrainResult(
        run_uri=run_uri,
        model_uri=model_uri,
        metrics_uri=storage.join(run_uri, METRICS_FILE),
        curves_uri=curves_uri,
        checkpoint_uri=out.get("checkpoint_uri", ""),
        best_epoch=int(out.get("best_epoch", -1)),
        select_metric=cfg.select_metric,
        best_value=out.get("best"),
        epochs_run=int(out.get("epochs_run", 0)),
        global_step=int(out.get("global_step", 0)),
        stopped_early=bool(out.get("stopped_early", False)),
        test_metrics=test_metrics,
        evaluate_uri=evaluate_uri,
        history=history,
    )
    metrics = {
        "run_uri": run_uri,
        "select_metric": cfg.select_metric,
        "select_mode": cfg.mode,
        "best_epoch": result.best_epoch,
        "best": result.best_value,
        "epochs_run": result.epochs_run,
        "global_step": result.global_step,
        "stopped_early": result.stopped_early,
        "history": history,
        "test": test_metrics,
        "evaluate_uri": evaluate_uri,
    }
    storage.write_text(result.metrics_uri, json.dumps(_finite(metrics), indent=2, allow_nan=False))
    storage.write_text(storage.join(run_uri, RESULT_FILE), json.dumps(_finite(dataclasses.asdict(result)), indent=2))
    return result


def read_result(run_uri: str) -> TrainResult:
    """The TrainResult a finished run wrote (e.g. by a Ray job on a cluster)."""
    data = json.loads(storage.read_text(storage.join(run_uri, RESULT_FILE)))
    return TrainResult(**data)


def main(argv: list[str] | None = None) -> int:
    """``python -m medfusion.train KEY=VALUE ...``: what a submitted Ray job runs."""
    try:
        result = run_train(load_config(TrainConfig, overrides=list(sys.argv[1:] if argv is None else argv)))
    except (ConfigError, RuntimeError, OSError, ValueError) as err:
        print(f"medfusion: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
