"""Tune's side of a sweep: each trial a Ray Train + DeepSpeed run, the experiment around them, and
what the trials reported.

`train_trial` is the Tune function trainable (Ray 2.60 / Train V2, as Ray's "Hyperparameter Tuning
with Ray Tune" guide does it): it builds the run's TorchTrainer with the code `medfusion train` runs
(medfusion.training.run.train_here) and passes ``ray.tune.integration.ray_train.TuneReportCallback()`` to
it, so each epoch's ``ray.train.report`` (validation metrics, ``val_objective``) reaches Tune and ASHA
can stop the trial. The run is named after the trial id, so a retried or resumed trial continues
its own run from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from datetime import datetime, timezone
from typing import Any

from medfusion import storage
from medfusion.config import TrainConfig
from medfusion.loader import to_dict
from medfusion.training.runtime import WORKER_MEMORY_PLACEHOLDER
from medfusion.tuning import results as R
from medfusion.tuning.config import TuneConfig
from medfusion.tuning.space import Dimension, assignment_of, param_space, trial_config

TRIALS_DIR = "trials"
ATTEMPTS_DIR = "attempts"
METRIC, MODE = "val_objective", "max"


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished (Ctrl-C, SIGUSR1); `--resume` continues it."""


def train_trial(
    config: dict[str, Any],
    dims: list[Dimension] | None = None,
    base: dict[str, Any] | None = None,
    runs_uri: str = "",
    objective: dict[str, Any] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
) -> None:
    """The Tune function trainable: train the trial's config into <runs_uri>/<run name>.

    The run is named after the trial id, so a retried or resumed trial finds its run folder and Ray
    Train continues it from its newest checkpoint. With `variants` (the ablation) the config holds
    a variant name and a seed: the run is <variant>-seed<k>, with the variant's settings.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from medfusion.training.run import train_here
    from medfusion.training.rundir import CONFIG_FILE

    trial_id = ray.tune.get_context().get_trial_id()
    assignment = assignment_of(dims or [], config)
    name = trial_id
    if variants is not None:
        variant = assignment.pop("variant")
        name = f"{variant}-seed{assignment['seed']}"
        assignment = {**variants[variant], **assignment}
    run_uri = storage.join(runs_uri, name)
    resume = run_uri if storage.exists(storage.join(run_uri, CONFIG_FILE)) else ""
    cfg = trial_config(base or {}, {**assignment, "storage_uri": runs_uri, "name": name, "resume": resume})
    started = datetime.now(timezone.utc)
    attempt = {"trial_id": trial_id, "started": started.isoformat(), "resumed_from_checkpoint": bool(resume)}
    storage.write_text(
        storage.join(run_uri, ATTEMPTS_DIR, f"{started:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:6]}.json"),
        json.dumps({**attempt, "assignment": assignment}, default=str),
    )
    print(f"[medfusion] trial {trial_id} ({name}): " + ", ".join(f"{k}={v}" for k, v in assignment.items()), flush=True)
    train_here(cfg, callbacks=[TuneReportCallback()], objective=objective)


def trial_dirname(trial: Any) -> str:
    """Tune's folder for a trial, named by the trial id alone, as its run folder under trials/ is."""
    return trial.trial_id


def interrupt_callback(after: int) -> Any:
    """Testing aid: interrupt the sweep the way Ctrl-C does once `after` trials have finished.

    Fires only when the count of finished trials *equals* `after`, so a restored sweep (whose
    RunConfig, callbacks included, Tune reloads) is not interrupted again.
    """
    from ray import tune

    class InterruptAfter(tune.Callback):
        def _check(self, trials: list[Any], trial: Any) -> None:
            # Tune calls back before it sets the finishing trial's status.
            done = sum(t is trial or t.status in ("TERMINATED", "ERROR") for t in trials)
            if done == after:
                print(f"[medfusion] interrupt_after_trials={after}: interrupting the sweep", flush=True)
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own handler: stop, save state, return

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._check(trials, trial)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._check(trials, trial)

    return InterruptAfter()


def trial_resources(cfg: TuneConfig, trial: TrainConfig) -> dict[str, float]:
    """What one trial holds while it runs: its driver and its Train workers."""
    needs = {"CPU": cfg.trial_cpus + trial.num_workers * trial.cpus_per_worker}
    if trial.use_gpu:
        needs["GPU"] = float(trial.num_workers)
    return needs


def start_ray(cfg: TuneConfig, trial: TrainConfig) -> bool:
    """Connect to Ray (embedded with the dashboard unless a cluster is given); return whether this
    call started it."""
    import ray

    from medfusion.data.dataset import quiet_ray_data
    from medfusion.training.runtime import ensure_ray

    concurrency = cfg.max_concurrent_trials or 1
    started = ensure_ray(trial, dashboard=True, cpus=concurrency * trial_resources(cfg, trial)["CPU"])
    if not started:
        try:
            dashboard = ray._private.worker.get_dashboard_url()
        except Exception:  # noqa: BLE001 - only a warning depends on it
            dashboard = "unknown"
        if not dashboard:
            print(
                "[medfusion] warning: this Ray has no dashboard; a trial that ASHA stops may never free its Train "
                "workers (Ray Train's placement-group cleaner needs the State API). Start Ray with the dashboard.",
                file=sys.stderr,
            )
    quiet_ray_data()
    return started


def concurrency_of(cfg: TuneConfig, trial: TrainConfig) -> int:
    """max_concurrent_trials, or (0) as many trials as the cluster's CPUs (one kept for Ray Data) and GPUs hold."""
    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    import ray

    total = ray.cluster_resources()
    needs = trial_resources(cfg, trial)
    limits = []
    if needs["CPU"] > 0:
        limits.append(int((total.get("CPU", 1) - 1) // needs["CPU"]))
    if needs.get("GPU"):
        limits.append(int(total.get("GPU", 0) // needs["GPU"]))
    return max(1, min(limits) if limits else int(total.get("CPU", 2)) - 1)


def run_experiment(
    cfg: TuneConfig,
    *,
    sweep_uri: str,
    tune_dir: str,
    trainable: Any,
    dims: list[Dimension],
    search: str,
    scheduler: str,
    num_samples: int,
    concurrency: int,
    trial: TrainConfig,
    interrupt_after: int = 0,
) -> Any:
    """Run (or, with cfg.resume and saved state, restore and continue) one Tune experiment; return its ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    fs, root = storage.filesystem(sweep_uri) if storage.is_s3(sweep_uri) else (None, sweep_uri)
    path = f"{root}/{tune_dir}" if fs is not None else os.path.join(root, tune_dir)
    # A trial's resources cannot be empty: with no CPU reserved, a little memory stands in.
    resources = {"cpu": cfg.trial_cpus} if cfg.trial_cpus else {"cpu": 0, "memory": WORKER_MEMORY_PLACEHOLDER}
    resources.update({name: float(amount) for name, amount in cfg.trial_resources.items()})
    trainable = tune.with_resources(trainable, resources)
    if cfg.resume and tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"[medfusion] resuming {storage.join(sweep_uri, tune_dir)}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
        return tuner.fit()
    if scheduler == "asha":
        # Rungs only before the last epoch, and no stop at max_t: a trial that reaches its last epoch
        # finishes and writes its run outputs (metrics.json, curves) instead of being cut off.
        schedule = ASHAScheduler(
            time_attr="training_iteration",
            max_t=max(cfg.grace_period, trial.epochs - 1),
            grace_period=cfg.grace_period,
            reduction_factor=cfg.reduction_factor,
            stop_last_trials=False,
        )
    else:
        schedule = FIFOScheduler()
    searcher = searcher_for(search, cfg.search_seed)
    if search in ("random", "grid") or searcher is None:
        from ray.tune.search import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a generator that is not a Searcher: it bounds itself.
        searcher = BasicVariantGenerator(random_state=cfg.search_seed, max_concurrent=concurrency)
        limit = {}
    else:
        limit = {"max_concurrent_trials": concurrency}
    tune_config = tune.TuneConfig(
        metric=METRIC,
        mode=MODE,
        scheduler=schedule,
        search_alg=searcher,
        num_samples=num_samples,
        trial_dirname_creator=trial_dirname,
        **limit,
    )
    run_config = tune.RunConfig(
        name=tune_dir,
        storage_path=root,
        storage_filesystem=fs,
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        callbacks=[interrupt_callback(interrupt_after)] if interrupt_after else None,
    )
    grid = search == "grid"
    space = param_space(dims, grid=grid)
    tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
    return tuner.fit()


def searcher_for(search: str, seed: int) -> Any:
    """OptunaSearch (TPE) for search=optuna; None for random/grid, or when optuna is missing."""
    if search != "optuna":
        return None
    try:
        import optuna  # noqa: F401
    except ImportError:
        print(
            "[medfusion] warning: search=optuna but optuna is not installed; falling back to random search",
            file=sys.stderr,
        )
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=METRIC, mode=MODE, seed=seed)


def trainable_for(
    dims: list[Dimension],
    base: dict[str, Any],
    runs_uri: str,
    cfg: TuneConfig,
    variants: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """`train_trial` with everything but the searched values bound (put in Ray's object store once)."""
    from ray import tune

    return tune.with_parameters(
        train_trial, dims=dims, base=base, runs_uri=runs_uri, objective=to_dict(cfg.objective), variants=variants
    )


def interrupted_message(cfg: TuneConfig, sweep_uri: str, what: str) -> str:
    """What SweepInterrupted says: what was left undone and the command that continues the sweep."""
    resume = f"medfusion tune --resume --name {cfg.name} storage_uri={cfg.storage_uri}"
    return f"sweep {sweep_uri} interrupted ({what}); continue it with `{resume}`"


def task_keys(cfg: TuneConfig) -> list[str]:
    """The validation names of the objective's three task metrics (the Pareto front's axes)."""
    from medfusion.metrics import task_metric_keys

    return list(task_metric_keys(cfg.objective.classification_metric, prefix="val_").values())


def tune_trials(grid: Any) -> list[Any]:
    # ResultGrid keeps Tune's Trial objects (status, id) next to the Results, in the same order.
    return list(grid._experiment_analysis.trials)


def _short_error(error: Any) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def trial_records(
    grid: Any, dims: list[Dimension], base: dict[str, Any], trial: TrainConfig, sweep_uri: str
) -> list[R.TrialRecord]:
    """One leaderboard record per trial: its searched values and its best epoch's validation metrics."""
    from medfusion.export import CHECKSUMS_FILE

    records: list[R.TrialRecord] = []
    runs_uri = storage.join(sweep_uri, TRIALS_DIR)
    for tune_trial, result in zip(tune_trials(grid), grid):
        params = assignment_of(dims, tune_trial.config)
        frame = result.metrics_dataframe
        rows = frame.to_dict("records") if frame is not None and len(frame) else []
        best = R.best_epoch(rows, METRIC)
        epochs = {int(row["epoch"]) for row in rows if R.is_number(row.get("epoch"))}
        if tune_trial.status == "ERROR":
            status = R.ERRORED
        elif tune_trial.status == "TERMINATED":
            status = R.STOPPED if len(epochs) < trial.epochs else R.FINISHED
        else:
            status = R.UNFINISHED
        run_uri = storage.join(runs_uri, tune_trial.trial_id)
        model_uri = storage.join(run_uri, "model")
        checkpoints = [row["checkpoint_path"] for row in rows if isinstance(row.get("checkpoint_path"), str)]
        checkpoint = checkpoints[-1] if checkpoints else ""
        if checkpoint and storage.is_s3(sweep_uri) and not checkpoint.startswith("s3://"):
            checkpoint = "s3://" + checkpoint
        record = R.TrialRecord(
            trial_id=tune_trial.trial_id,
            status=status,
            fusion=params.get("model.fusion", base["model"]["fusion"]),
            params=params,
            **{key: _number(best.get(key)) if best else None for key in R.VAL_KEYS},
            objective=_number(best.get(METRIC)) if best else None,
            best_epoch=int(best["epoch"]) if best and R.is_number(best.get("epoch")) else None,
            epochs_run=len(epochs),
            attempts=len(storage.list_files(storage.join(run_uri, ATTEMPTS_DIR))),
            run_uri=run_uri,
            model_uri=model_uri if storage.exists(storage.join(model_uri, CHECKSUMS_FILE)) else "",
            checkpoint_uri=checkpoint,
            error=_short_error(result.error) if result.error is not None else "",
        )
        records.append(record)
    return records


def _number(value: Any) -> float | None:
    return float(value) if R.is_number(value) else None
