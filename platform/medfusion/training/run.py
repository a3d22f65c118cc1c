"""One training run on the Ray this process is connected to (embedded when none), from a config
whose run folder is fixed (medfusion.training.rundir.resolve_run) to its TrainResult.

`plan_run` checks everything the config points at before any worker starts; `train_here` writes the
config, hands a `TrainJob` to a Ray Train `TorchTrainer` (`build_trainer`, `fit`), then writes the
run's outputs: metrics.json, the learning curves, the test evaluation and result.json.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medfusion import storage
from medfusion.config import MAX_POS_WEIGHT, ConfigError, TrainConfig
from medfusion.loader import dump_yaml, to_dict
from medfusion.training.rundir import (
    CONFIG_FILE,
    CURVES_FILE,
    EVAL_DIR,
    METRICS_FILE,
    RESULT_FILE,
    TrainResult,
    check_run_folder,
    run_uri_of,
)
from medfusion.training.runtime import WORKER_WAIT_ENV, ensure_ray, worker_env, worker_resources

if TYPE_CHECKING:
    from medfusion.data.dataset import DatasetInfo
    from medfusion.training.loop import TrainJob


@dataclass
class RunPlan:
    """What the driver works out before any worker starts."""

    info: DatasetInfo
    """The opened dataset."""
    steps_per_epoch: int
    """Optimizer steps per epoch (every worker runs the same number)."""
    micro_batches_per_epoch: int
    """Micro-batches per worker and epoch: steps_per_epoch times grad_accum."""


def plan_run(cfg: TrainConfig) -> tuple[TrainConfig, RunPlan]:
    """Check everything the config points at and complete it from the dataset.

    Returns:
        The config with model.multi_label and model.describes (findings text to learn from) from the
        dataset's manifest, and the run's plan.

    Raises:
        ConfigError: naming the field whose dataset or sizes do not work.
    """
    from medfusion.data.dataset import DatasetError, open_dataset
    from medfusion.data.tokenizer import SPECIALS

    if not cfg.dataset_uri:
        raise ConfigError("dataset_uri: required (a dataset root written by `medfusion data synth` or `data ingest`)")
    try:
        info = open_dataset(cfg.dataset_uri)
    except (DatasetError, OSError) as err:
        raise ConfigError(f"dataset_uri: {err}") from None
    train = info.manifest["splits"].get("train", {})
    no_words = len(info.tokenizer) <= len(SPECIALS)
    notes, findings = train.get("with_report"), train.get("with_findings")
    if notes is None:  # a manifest from before the text counts: words or not is all it tells
        notes = findings = 0 if no_words else None
    if notes == 0 and cfg.model.fusion != "image_only":
        raise ConfigError(
            f"model.fusion: {cfg.model.fusion!r} reads the clinical note, but the training split of "
            f"{cfg.dataset_uri} has no notes (its report column is empty in every row); set model.fusion=image_only"
        )
    describes = findings != 0
    for split in ("train", "val"):
        rows = info.rows(split) if split in info.manifest["splits"] else 0
        if rows < cfg.num_workers:
            raise ConfigError(
                f"dataset_uri: split {split!r} of {cfg.dataset_uri} has {rows} rows, "
                f"fewer than num_workers ({cfg.num_workers})"
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
    pos_weight = class_pos_weight(info) if cfg.model.balance_classes and info.multi_label else []
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, multi_label=info.multi_label, describes=describes, pos_weight=pos_weight),
    )
    return cfg, RunPlan(info=info, steps_per_epoch=steps, micro_batches_per_epoch=steps * cfg.grad_accum)


def class_pos_weight(info: DatasetInfo) -> list[float]:
    """Per class, the training split's negatives over positives (BCE pos_weight), within [1, MAX_POS_WEIGHT]."""
    train = info.manifest["splits"]["train"]
    rows, counts = train["rows"], train.get("class_counts", {})
    return [
        min(MAX_POS_WEIGHT, max(1.0, (rows - counts.get(name, 0)) / max(counts.get(name, 0), 1)))
        for name in info.classes
    ]


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

    Raises:
        ConfigError: the dataset or the run folder does not fit the config (before any worker starts).
        RuntimeError: training failed after `max_failures` restarts.
    """
    from medfusion.lineage import build_lineage
    from medfusion.training.loop import TrainJob

    run_uri = run_uri_of(cfg)
    cfg, plan = plan_run(cfg)
    check_run_folder(cfg, run_uri)
    storage.ensure_bucket(run_uri)
    if not cfg.resume:
        storage.write_text(storage.join(run_uri, CONFIG_FILE), dump_yaml(cfg))
    lineage = build_lineage(
        dataset_uri=cfg.dataset_uri,
        dataset_version=plan.info.version,
        config=to_dict(cfg),
        seed=cfg.seed,
        run_id=cfg.name,
        run_uri=run_uri,
    )
    job = TrainJob(
        train=to_dict(cfg),
        run_uri=run_uri,
        lineage=lineage,
        steps_per_epoch=plan.steps_per_epoch,
        micro_batches_per_epoch=plan.micro_batches_per_epoch,
        objective=dict(objective or {}),
    )
    out = fit(cfg, plan.info, job, callbacks=callbacks)
    test_rows = plan.info.rows("test") if "test" in plan.info.manifest["splits"] else 0
    return _write_outputs(cfg, run_uri, out, test_rows)


def build_trainer(cfg: TrainConfig, info: DatasetInfo, job: TrainJob, callbacks: Sequence[Any] = ()) -> Any:
    """The TorchTrainer of one run: `train_loop_per_worker` on cfg.num_workers workers, streaming the
    train (and val) split, checkpointing into <storage_uri>/<name>. Call `ensure_ray` first."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from medfusion.data.dataset import stream_split
    from medfusion.training.loop import train_loop_per_worker

    datasets = {"train": stream_split(info, "train", cfg.data, training=True, seed=cfg.seed)}
    if not job.bench:
        # The findings text rides along: validation scores the greedy findings with BLEU-4.
        datasets["val"] = stream_split(info, "val", cfg.data, extra_columns=("findings",), concurrency=1)
    if storage.is_s3(cfg.storage_uri):
        fs, storage_path = storage.filesystem(cfg.storage_uri)
    else:
        fs, storage_path = None, cfg.storage_uri
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=worker_resources(cfg),
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            # A worker lost with its node is a worker-group failure (max_failures restarts). Waiting
            # for the workers' resources is bounded by worker_wait_s (WORKER_WAIT_ENV), and a start
            # that times out ends the run instead of waiting again forever (Ray's default, -1).
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(cfg)},
            callbacks=list(callbacks),
        ),
        datasets=datasets,
    )


def fit(cfg: TrainConfig, info: DatasetInfo, job: TrainJob, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run the TorchTrainer of `job` (starting an embedded Ray for it when none is running).

    Returns:
        Rank 0's return value of the loop, plus ``checkpoint_uri``: the newest checkpoint.

    Raises:
        RuntimeError: training failed after `cfg.max_failures` restarts.
    """
    import ray.train

    from medfusion.data.dataset import quiet_ray_data

    started = ensure_ray(cfg)
    quiet_ray_data()
    nodes_at_start = alive_nodes()
    try:
        trainer = build_trainer(cfg, info, job, callbacks)
        try:
            # Read by Ray Train's controller, which gets the driver's RAY_TRAIN_* variables.
            with _environ({WORKER_WAIT_ENV: str(cfg.worker_wait_s)}):
                result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise RuntimeError(
                f"training run {job.run_uri} failed: {_failure_message(err, cfg, nodes_at_start)}"
            ) from err
        out = dict(result.return_value or {})
        out["checkpoint_uri"] = _checkpoint_uri(cfg, result)
        return out
    finally:
        if started:
            ray.shutdown()


@contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def alive_nodes() -> dict[str, dict[str, Any]]:
    """The cluster's alive nodes by id: address, resources and labels (ray.nodes())."""
    import ray

    return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}


def describe_node(node: Mapping[str, Any]) -> str:
    """`<id> (<address>, <labels>, resources <CPU/GPU/custom>)` of one ray.nodes() entry."""
    labels = {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}
    resources = {
        k: v
        for k, v in (node.get("Resources") or {}).items()
        if not k.startswith("node:") and k not in ("memory", "object_store_memory")
    }
    parts = [node.get("NodeManagerAddress", "?")]
    if labels:
        parts.append(", ".join(f"{k}={v}" for k, v in sorted(labels.items())))
    parts.append(f"resources {resources}")
    return f"{node['NodeID']} ({'; '.join(parts)})"


def _failure_message(err: Exception, cfg: TrainConfig, nodes_at_start: Mapping[str, Mapping[str, Any]]) -> str:
    """The error, and when the workers could not be (re)started in time: the nodes lost since the run
    started, the resources the workers waited for and what the cluster has now."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    cause = getattr(err, "controller_failure", None)
    if not isinstance(cause, WorkerGroupStartupTimeoutError):
        return str(err)
    now = alive_nodes()
    lost = [node for node_id, node in nodes_at_start.items() if node_id not in now]
    wanted = worker_resources(cfg)
    lines = [
        f"the workers' resources did not become available within worker_wait_s={cfg.worker_wait_s:g} s: "
        f"{cfg.num_workers} workers x {wanted} with placement_strategy={cfg.placement_strategy}."
    ]
    lines += [f"  lost node: {describe_node(node)}" for node in lost] or ["  no node was lost since the run started"]
    lines += [f"  alive node: {describe_node(node)}" for node in now.values()]
    lines.append(
        "Add nodes (or wait for the lost one's replacement) and resume with `medfusion train "
        f"resume={storage.join(cfg.storage_uri, cfg.name)}`, or lower num_workers/cpus_per_worker."
    )
    return "\n".join(lines)


def _checkpoint_uri(cfg: TrainConfig, result: Any) -> str:
    if result.checkpoint is None:
        return ""
    path = result.checkpoint.path
    # Ray reports an S3 checkpoint by its path inside the bucket filesystem, without the scheme.
    return f"s3://{path}" if storage.is_s3(cfg.storage_uri) else path


def _write_outputs(cfg: TrainConfig, run_uri: str, out: dict[str, Any], test_rows: int) -> TrainResult:
    """Evaluate the best model on the test split, plot the curves, write metrics.json and result.json."""
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
        worker_nodes=list(out.get("worker_nodes", [])),
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
        "worker_nodes": result.worker_nodes,
    }
    storage.write_json(result.metrics_uri, metrics)
    storage.write_json(storage.join(run_uri, RESULT_FILE), dataclasses.asdict(result))
    return result
