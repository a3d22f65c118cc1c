"""The tune stage: `run_tune(TuneConfig) -> TuneResult`, a Ray Tune sweep of Ray Train + DeepSpeed runs.

How Tune drives Train (Ray 2.60, Train V2, as its "Hyperparameter Tuning with Ray Tune" guide does):
every trial is a Tune function trainable (medfusion.tuning.trials.train_trial) that builds the run's
TorchTrainer with the code `medfusion train` runs (medfusion.training.run.train_here -> build_trainer) and passes
``ray.tune.integration.ray_train.TuneReportCallback()`` in its RunConfig, so each epoch's
``ray.train.report`` (validation metrics and ``val_objective``) reaches Tune, and ASHA stops trials
whose objective trails. The trial function only waits on its Train run, so it reserves
`trial_cpus` (default 0); its workers reserve ``train.cpus_per_worker`` CPUs (and a GPU each with
``train.use_gpu``); `max_concurrent_trials` (0: what the cluster holds) bounds the Train runs in flight.

The sweep folder <storage_uri>/<name> (local or s3://):

    config.yaml              the resolved TuneConfig, search space included (what --resume reloads)
    tune/, tune-ablation/    Ray Tune's experiment states (Tuner.restore continues from them)
    trials/<trial_id>/       each trial's training run: checkpoints, model/ (best epoch), metrics.json,
                             attempts/ (one file per start of the trial)
    leaderboard.json         every trial, best first; the Pareto front; the objective
    pareto.png               the trials over the three task metrics, Pareto front ringed
    fusion_boxplots.png      objective and task metrics per fusion strategy
    ablation/<fusion>-seed<k>/   the best configuration of fused, image_only and text_only, `seeds` runs each
    ablation.json, ablation.png   their test metrics: mean and 95% CI
    result.json              this TuneResult

Ray: unless this process is already connected to one, an embedded Ray is started *with the
dashboard*: a trial that ASHA stops frees its Train workers' placement group through Ray Train's
placement-group cleaner, which needs the State API that the dashboard serves; without it the next
trial waits for resources forever. Its workers pin RAY_ADDRESS to their own cluster
(medfusion.training.runtime.pin_ray_address), so the cleaner finds it on a machine that runs several Rays.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import yaml

from medfusion import storage
from medfusion.config import ConfigError
from medfusion.loader import apply_preset, dump_yaml, load_config, to_dict
from medfusion.tuning import results as R
from medfusion.tuning.ablation import register_best, run_ablation
from medfusion.tuning.config import TuneConfig
from medfusion.tuning.space import Dimension, parse_search_space, read_search_space, trial_config, trial_values
from medfusion.tuning.trials import (
    METRIC,
    MODE,
    TRIALS_DIR,
    SweepInterrupted,
    concurrency_of,
    interrupted_message,
    run_experiment,
    start_ray,
    task_keys,
    trainable_for,
    trial_records,
)

SWEEP_CONFIG = "config.yaml"

TUNE_DIR = "tune"

LEADERBOARD_FILE = "leaderboard.json"

PARETO_FILE = "pareto.png"

BOXPLOT_FILE = "fusion_boxplots.png"

RESULT_FILE = "result.json"

DEFAULT_SAMPLES = 8


@dataclass
class TuneResult:
    """Where a sweep's outputs are, and its headline numbers."""

    sweep_uri: str
    leaderboard_uri: str
    model_uri: str
    """Export of the best trial's best epoch."""
    best_trial_id: str
    best_config: dict[str, Any]
    """The best trial's searched settings (dotted keys)."""
    best_metrics: dict[str, float]
    """The best trial's validation metrics at its best epoch (val_accuracy, val_mean_iou, ...)."""
    objective: float
    """The best trial's val_objective."""
    pareto: list[str]
    """Trial ids on the Pareto front over the three task metrics."""
    pareto_uri: str
    boxplot_uri: str
    trials: int
    trials_finished: int
    trials_stopped_early: int
    trials_errored: int
    ablation_uri: str = ""
    ablation_plot_uri: str = ""
    registered: str = ""
    """NAME:VERSION in the model registry (empty when register=false)."""
    registry_uri: str = ""

    def summary(self) -> str:
        """What `medfusion tune` prints last."""
        lines = [
            f"sweep {self.sweep_uri}: {self.trials} trials, {self.trials_finished} finished, "
            f"{self.trials_stopped_early} stopped early, {self.trials_errored} errored",
            f"best trial {self.best_trial_id}: objective {self.objective:.4f} "
            + " ".join(f"{k} {v:.4f}" for k, v in self.best_metrics.items() if k != METRIC),
            "best config: " + ", ".join(f"{k}={v}" for k, v in self.best_config.items()),
            f"model: {self.model_uri}",
            f"leaderboard: {self.leaderboard_uri}",
            f"plots: {self.pareto_uri}  {self.boxplot_uri}",
        ]
        if self.ablation_uri:
            lines.append(f"ablation: {self.ablation_uri}  {self.ablation_plot_uri}")
        if self.registered:
            lines.append(f"registered: {self.registered} in {self.registry_uri}")
        return "\n".join(lines)


def sweep_uri_of(cfg: TuneConfig) -> str:
    return storage.join(cfg.storage_uri, cfg.name)


def load_tune_config(
    path: str | None = None, overrides: list[str] | None = None, preset: str | None = None, resume: bool = False
) -> TuneConfig:
    """Build a TuneConfig: defaults <- preset (model and data) <- YAML <- overrides.

    With `resume`, the sweep's own config.yaml (found from storage_uri and name) replaces the
    defaults and the preset, so only what the overrides change differs from the interrupted sweep.
    """
    cfg = load_config(TuneConfig, path, overrides, base=apply_preset(preset or "", {"resume": resume}))
    if not resume:
        return cfg
    saved_uri = storage.join(_storage_root(cfg.storage_uri), cfg.name, SWEEP_CONFIG)
    try:
        saved = yaml.safe_load(storage.read_text(saved_uri)) or {}
    except FileNotFoundError:
        where = storage.parent(saved_uri)
        raise ConfigError(f"name: no sweep to resume at {where} ({SWEEP_CONFIG} not found)") from None
    return load_config(TuneConfig, path, overrides, base={**saved, "resume": True})


def _storage_root(uri: str) -> str:
    return uri if storage.is_s3(uri) else os.path.abspath(uri)


def _resolve_sweep(cfg: TuneConfig) -> TuneConfig:
    if not cfg.storage_uri:
        raise ConfigError("storage_uri: required (a local folder or s3://bucket/prefix for sweep folders)")
    if not cfg.dataset_uri:
        raise ConfigError("dataset_uri: required (a dataset root written by `medfusion data synth` or `data ingest`)")
    name = cfg.name or f"tune-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"
    return dataclasses.replace(cfg, storage_uri=_storage_root(cfg.storage_uri), name=name)


def _check_sweep_folder(cfg: TuneConfig, sweep_uri: str, space: Mapping[str, Any]) -> None:
    """A fresh sweep must not reuse a folder; a resumed one must be the same sweep."""
    from medfusion.training.rundir import saved_config

    taken = (
        f"name: a sweep named {cfg.name!r} already exists at {sweep_uri}; "
        "continue it with --resume (resume=true) or choose another name"
    )
    missing = f"resume: no sweep at {sweep_uri} ({SWEEP_CONFIG} not found)"
    saved = saved_config(storage.join(sweep_uri, SWEEP_CONFIG), cfg.resume, taken, missing)
    if saved is None:
        return
    current = to_dict(cfg)
    current["search_space"] = dict(space)
    for key in ("dataset_uri", "search_space", "search", "scheduler", "model", "data", "train", "objective"):
        if key in saved and saved[key] != current[key]:
            raise ConfigError(f"{key}: differs from the sweep being resumed ({sweep_uri}); a resumed sweep keeps it")


def run_tune(cfg: TuneConfig) -> TuneResult:
    """Sweep cfg.search_space on cfg.dataset_uri into <storage_uri>/<name>; return where the outputs are.

    Raises:
        ConfigError: a value, a search-space key or range, or a URI is wrong (before Ray starts).
        SweepInterrupted: the sweep was interrupted; ``resume=true`` continues it.
        RuntimeError: no trial succeeded.
    """
    from medfusion.training.run import plan_run

    cfg = _resolve_sweep(cfg)
    sweep_uri = sweep_uri_of(cfg)
    space = read_search_space(cfg)
    base = trial_values(cfg)
    dims = parse_search_space(space, base, grid=cfg.search == "grid")
    trial = trial_config(base)
    plan_run(dataclasses.replace(trial, storage_uri=sweep_uri, name="probe"))  # the dataset is there and big enough
    _check_sweep_folder(cfg, sweep_uri, space)
    storage.ensure_bucket(sweep_uri)
    if not cfg.resume:
        resolved = dataclasses.replace(cfg, search_space=space, search_space_file="")
        storage.write_text(storage.join(sweep_uri, SWEEP_CONFIG), dump_yaml(resolved))
    num_samples = cfg.num_samples or (1 if cfg.search == "grid" else DEFAULT_SAMPLES)
    samples = f"{'grid x ' if cfg.search == 'grid' else ''}{num_samples} samples"
    print(
        f"[medfusion] sweep {sweep_uri}: search={cfg.search}, scheduler={cfg.scheduler}, {samples}, "
        f"up to {trial.epochs} epochs per trial",
        flush=True,
    )
    for dim in dims:
        print(f"[medfusion]   {dim.key}: {dim.describe()}", flush=True)

    started = start_ray(cfg, trial)
    try:
        concurrency = concurrency_of(cfg, trial)
        trainable = trainable_for(dims, base, storage.join(sweep_uri, TRIALS_DIR), cfg)
        grid = run_experiment(
            cfg,
            sweep_uri=sweep_uri,
            tune_dir=TUNE_DIR,
            trainable=trainable,
            dims=dims,
            search=cfg.search,
            scheduler=cfg.scheduler,
            num_samples=num_samples,
            concurrency=concurrency,
            trial=trial,
            interrupt_after=cfg.interrupt_after_trials,
        )
        records = R.rank(trial_records(grid, dims, base, trial, sweep_uri))
        # leaderboard.json's entries; the table and the plots take this JSON shape, which the KFP
        # artifact and the demo read back from the file.
        trials = [record.to_dict() for record in records]
        keys = task_keys(cfg)
        front = R.pareto_front(records, keys)
        leaderboard_uri = storage.join(sweep_uri, LEADERBOARD_FILE)
        expected = num_samples * (math.prod(len(d.values) for d in dims) if cfg.search == "grid" else 1)
        # An interrupted sweep leaves trials unfinished, or never creates the rest (searchers create
        # trials one by one), so both count.
        unfinished = [r for r in records if r.status == R.UNFINISHED] + [None] * max(0, expected - len(records))
        best = next((r for r in records if r.usable), None)
        _write_leaderboard(cfg, leaderboard_uri, trials, front, dims, best, interrupted=bool(unfinished))
        print("\n" + R.leaderboard_table(trials, [d.key for d in dims], keys), flush=True)
        if unfinished:
            left = f"{len(unfinished)} of {expected} trials not finished"
            raise SweepInterrupted(interrupted_message(cfg, sweep_uri, left))
        if best is None:
            errors = "; ".join(f"{r.trial_id}: {r.error}" for r in records if r.error)
            raise RuntimeError(f"sweep {sweep_uri}: no trial succeeded ({errors or 'no trial reported a result'})")
        from medfusion import plots

        pareto_uri = plots.plot_pareto(trials, keys, front, storage.join(sweep_uri, PARETO_FILE), best=best.trial_id)
        boxplot_uri = plots.plot_fusion_boxplots(trials, [R.OBJECTIVE, *keys], storage.join(sweep_uri, BOXPLOT_FILE))
        headline = f"best trial {best.trial_id} ({best.fusion}): objective {best.objective:.4f}"
        print(f"\n[medfusion] {headline}; Pareto front: {', '.join(front)}", flush=True)

        ablation = run_ablation(cfg, records, dims, base, trial, sweep_uri, concurrency) if cfg.seeds else None
        result = TuneResult(
            sweep_uri=sweep_uri,
            leaderboard_uri=leaderboard_uri,
            model_uri=best.model_uri,
            best_trial_id=best.trial_id,
            best_config=dict(best.params),
            best_metrics={**best.val_metrics, METRIC: float(best.objective)},
            objective=float(best.objective),
            pareto=front,
            pareto_uri=pareto_uri,
            boxplot_uri=boxplot_uri,
            trials=len(records),
            trials_finished=sum(r.status == R.FINISHED for r in records),
            trials_stopped_early=sum(r.stopped_early for r in records),
            trials_errored=sum(r.status == R.ERRORED for r in records),
            ablation_uri=ablation["uri"] if ablation else "",
            ablation_plot_uri=ablation["plot_uri"] if ablation else "",
        )
        if cfg.register:
            result.registered = register_best(cfg, sweep_uri, best, result.best_metrics, ablation)
            result.registry_uri = cfg.registry_uri
        result_json = json.dumps(dataclasses.asdict(result), indent=2, default=str)
        storage.write_text(storage.join(sweep_uri, RESULT_FILE), result_json)
        return result
    finally:
        if started:
            import ray

            ray.shutdown()


def _write_leaderboard(
    cfg: TuneConfig,
    uri: str,
    trials: list[dict[str, Any]],
    front: list[str],
    dims: list[Dimension],
    best: R.TrialRecord | None,
    interrupted: bool,
) -> None:
    data = {
        "sweep_uri": storage.parent(uri),
        "metric": METRIC,
        "mode": MODE,
        "objective": to_dict(cfg.objective),
        "search_space": {dim.key: dim.describe() for dim in dims},
        "best": best.trial_id if best else None,
        "pareto": front,
        "pareto_metrics": task_keys(cfg),
        "interrupted": interrupted,
        "trials": trials,
    }
    storage.write_json(uri, data)


def read_result(sweep_uri: str) -> TuneResult:
    """The TuneResult a finished sweep wrote."""
    return TuneResult(**json.loads(storage.read_text(storage.join(sweep_uri, RESULT_FILE))))
