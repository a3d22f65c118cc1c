"""The ablation of a finished sweep (the best fused configuration vs the best image_only and
text_only ones, several seeds each, on the test split) and the registration of the best model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from medfusion import storage
from medfusion.config import TrainConfig
from medfusion.loader import to_dict
from medfusion.tuning import results as R
from medfusion.tuning.config import TuneConfig
from medfusion.tuning.space import Dimension, assign, trial_config, trial_values
from medfusion.tuning.trials import SweepInterrupted, interrupted_message, run_experiment, trainable_for, tune_trials

ABLATION_TUNE_DIR = "tune-ablation"
ABLATION_DIR = "ablation"
ABLATION_FILE = "ablation.json"
ABLATION_PLOT = "ablation.png"
ABLATIONS = ("image_only", "text_only")
CONFIDENCE = 0.95


def run_ablation(
    cfg: TuneConfig,
    records: list[R.TrialRecord],
    dims: list[Dimension],
    base: dict[str, Any],
    trial: TrainConfig,
    sweep_uri: str,
    concurrency: int,
) -> dict[str, Any] | None:
    """Train the best configuration of each variant (the best fused trial's; image_only's and
    text_only's own best trials', or the fused configuration with the fusion swapped when the sweep
    has none) with seeds 0..seeds-1, as a FIFO grid through Tune, and compare them on the test split."""
    from medfusion.metrics import objective_value, task_metric_keys
    from medfusion.training.rundir import RESULT_FILE as RUN_RESULT

    fused = next((r for r in records if r.usable and r.fusion not in ABLATIONS), None)
    if fused is None:
        print(
            "[medfusion] ablation skipped: no fused trial (every successful trial is image_only or text_only)",
            flush=True,
        )
        return None
    variants = {fused.fusion: {**fused.params, "model.fusion": fused.fusion}}
    sources = {fused.fusion: fused.trial_id}
    for name in ABLATIONS:
        own = next((r for r in records if r.usable and r.fusion == name), None)
        variants[name] = {**(own or fused).params, "model.fusion": name}
        sources[name] = own.trial_id if own else f"{fused.trial_id} with model.fusion={name}"
    epochs = cfg.ablation_epochs or trial.epochs
    ablation_base = assign(base, {"epochs": epochs, "evaluate": True})
    seeds = tuple(range(cfg.seeds))
    ablation_dims = [Dimension("variant", "choice", tuple(variants)), Dimension("seed", "choice", seeds)]
    runs_uri = storage.join(sweep_uri, ABLATION_DIR)
    configurations = "; ".join(f"{k} from {v}" for k, v in sources.items())
    print(
        f"\n[medfusion] ablation: {len(variants)} variants x {cfg.seeds} seeds, {epochs} epochs each, evaluated on "
        f"the test split; configurations: {configurations}",
        flush=True,
    )
    grid = run_experiment(
        cfg,
        sweep_uri=sweep_uri,
        tune_dir=ABLATION_TUNE_DIR,
        trainable=trainable_for(ablation_dims, ablation_base, runs_uri, cfg, variants=variants),
        dims=ablation_dims,
        search="grid",
        scheduler="fifo",
        num_samples=1,
        concurrency=concurrency,
        trial=trial_config(ablation_base),
    )
    finished = [t for t in tune_trials(grid) if t.status in ("TERMINATED", "ERROR")]
    expected = len(variants) * cfg.seeds
    if len(finished) < expected:
        left = f"ablation: {len(finished)} of {expected} runs finished"
        raise SweepInterrupted(interrupted_message(cfg, sweep_uri, left))
    keys = list(task_metric_keys(cfg.objective.classification_metric).values())
    metrics = [*keys, "objective"]
    summary: dict[str, Any] = {}
    for fusion in variants:  # variant names are their fusion strategies
        runs = []
        for seed in range(cfg.seeds):
            run_uri = storage.join(runs_uri, f"{fusion}-seed{seed}")
            try:
                test = json.loads(storage.read_text(storage.join(run_uri, RUN_RESULT))).get("test_metrics") or {}
            except FileNotFoundError:
                test = {}
            scores = {k: test.get(k) for k in keys}
            if test:
                scores["objective"] = objective_value(test, cfg.objective.weights, cfg.objective.classification_metric)
            runs.append({"seed": seed, "run_uri": run_uri, "ok": bool(test), "metrics": scores})
        ok = [run for run in runs if run["ok"]]
        summary["fused" if fusion == fused.fusion else fusion] = {
            "fusion": fusion,
            "config": variants[fusion],
            "from": sources[fusion],
            "runs": runs,
            "runs_ok": len(ok),
            "summary": R.summarize_runs(ok, metrics),
        }
    from medfusion import plots

    uri = storage.join(sweep_uri, ABLATION_FILE)
    by_fusion = {v["fusion"]: v for v in summary.values()}
    plot_uri = plots.plot_ablation(by_fusion, metrics, storage.join(sweep_uri, ABLATION_PLOT))
    record = {
        "split": "test",
        "seeds": cfg.seeds,
        "epochs": epochs,
        "confidence": CONFIDENCE,
        "trial_id": fused.trial_id,
        "metrics": metrics,
        "variants": summary,
    }
    storage.write_json(uri, record)
    legend = f"(test split, mean ± half-width of the {CONFIDENCE:.0%} CI, Student t over {cfg.seeds} seeds)"
    print("\n" + R.ablation_table(by_fusion, metrics) + "\n" + legend, flush=True)
    return {**record, "uri": uri, "plot_uri": plot_uri}


def register_best(
    cfg: TuneConfig,
    sweep_uri: str,
    best: R.TrialRecord,
    best_metrics: Mapping[str, float],
    ablation: dict[str, Any] | None,
) -> str:
    """Register the best trial's export with its validation metrics and the fused ablation's test CIs.

    Args:
        cfg: the sweep's config (registry, model name, objective weights).
        sweep_uri: the sweep's folder, recorded in the version's lineage.
        best: the best trial's record; its export is what gets registered.
        best_metrics: its validation metrics at its best epoch.
        ablation: the ablation's record, whose fused variant gives test metrics with CIs.
    """
    from medfusion import registry

    metrics = dict(best_metrics)
    metrics_ci: dict[str, list[float]] = {}
    if ablation:
        for name, stat in ablation["variants"]["fused"]["summary"].items():
            if stat.get("mean") is not None:
                metrics[f"test_{name}"] = float(stat["mean"])
            if stat.get("ci"):
                metrics_ci[f"test_{name}"] = [float(stat["ci"][0]), float(stat["ci"][1])]
    config = to_dict(trial_config(trial_values(cfg), best.params))
    lineage = {
        "sweep_uri": sweep_uri,
        "trial_id": best.trial_id,
        "checkpoint_uri": best.checkpoint_uri,
        "objective": float(best.objective),
        "objective_weights": to_dict(cfg.objective),
    }
    version = registry.register(
        best.model_uri,
        cfg.registry_uri,
        cfg.model_name,
        metrics=metrics,
        metrics_ci=metrics_ci or None,
        lineage=lineage,
        config=config,
    )
    registered = f"{version.name}:{version.version}"
    print(f"[medfusion] registered {registered} ({version.uri})", flush=True)
    return registered
