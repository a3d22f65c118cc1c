"""`medfusion bench tune`: what ASHA buys over plain search, and what Ray Tune's scheduling costs.

One run measures:

(1) Search efficiency on the synthetic `tiny` setup. A grid over the search space runs every
    configuration for `epochs` (the reference: its best objective is "the best there is").
    ASHA then starts every configuration of the same grid and stops the weak ones at its rungs;
    random search (FIFO, every trial to `epochs`) draws configurations at random until it has spent
    as many trial-epochs as ASHA did. For each: the best
    objective reached, and the trial-epochs spent, in completion order, until a trial came within
    `tolerance` (1%) of the grid's best. Target: ASHA gets there on at most 1/3 of the grid's
    trial-epochs.

    One draw says little (run-to-run noise is larger than the tolerance), so the comparison runs
    `repetitions` times; repetition i uses seed + i for the dataset, the trials' training (init,
    shuffling) and random search's sampler. Each repetition's figures and ratios carry its prefix
    (``rep0_grid_best_objective``, ``rep0_asha_epochs_to_target_vs_grid_epochs``), so every entry of
    ``ratios`` is the quotient of the two figures its ``ratio_of`` names. The record's
    ``ratio_spread`` gives, for each search ratio, its per-repetition values and their median, min
    and max; a repetition whose ratio has no value (the target was never reached) is listed as None
    and left out of median, min and max, and ``measured`` says how many had one.
(2) Scheduling overhead: `overhead_trials` no-op trials (each only sleeps `trial_seconds`, reporting
    `iterations` times) through Ray Tune, and the same sleeps through a `multiprocessing.Pool` with
    as many processes as Tune runs trials at once. Overhead = Tune's wall time over the pool's, minus
    one (target <= 15%). Ray's own start-up is not counted: a sweep pays it once, not per trial.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from medfusion.bench.record import ratio_terms, ratios_of
from medfusion.config import check


@dataclass
class TuneBenchConfig:
    """`medfusion bench tune`: ASHA vs random search vs the full grid, and Tune's scheduling overhead."""

    parts: list[str] = field(default_factory=lambda: ["search", "overhead"])
    """What to measure: search (grid, ASHA, random on the tiny setup) and/or overhead (no-op trials)."""
    samples: int = 400
    """Synthetic images of the benchmark dataset (tiny preset, 64 px)."""
    epochs: int = 9
    """Most epochs a trial runs (ASHA's max_t; with grace_period 1 and reduction_factor 3 its rungs are
    at 1, 3 and 9)."""
    steps_per_epoch: int = 6
    """Optimizer steps per epoch of every trial (train.max_steps_per_epoch)."""
    search_space: dict[str, Any] = field(
        default_factory=lambda: {
            "model.fusion": ["concat", "gated", "cross_attention", "image_only", "text_only"],
            "train.lr": [3.0e-4, 3.0e-3],
        }
    )
    """The grid (choices only): every combination is one trial of the grid sweep."""
    reduction_factor: float = 3.0
    """ASHA: the best 1/reduction_factor of the trials at a rung go on."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before its first rung (rungs at grace_period x reduction_factor^k)."""
    tolerance: float = 0.01
    """"Within 1% of the grid's best": objective >= (1 - tolerance) x the grid's best."""
    seed: int = 0
    """Seed of the first repetition (data, trials' training, random search's sampler); repetition i uses seed + i."""
    repetitions: int = 3
    """Times the search comparison runs, each with its own seed; ratios are reported per repetition
    with their median and range."""
    overhead_trials: int = 16
    """No-op trials of the overhead measurement."""
    trial_seconds: float = 5.0
    """How long each no-op trial sleeps: the shortest trial worth scheduling (a tiny training trial
    takes 20 s or more); the per-trial overhead in ms is printed too, for any other trial length."""
    iterations: int = 4
    """Reports per no-op trial."""
    data_uri: str = ""
    """Dataset root for the benchmark shards (default: s3://medfusion/bench/tune on the local store)."""

    def __post_init__(self) -> None:
        check(
            bool(self.parts) and set(self.parts) <= {"search", "overhead"},
            "parts",
            f"must be a list of search and/or overhead, got {self.parts}",
        )
        check(self.samples >= 64, "samples", f"must be >= 64, got {self.samples}")
        check(self.epochs >= 2, "epochs", f"must be >= 2 (ASHA needs a rung to stop at), got {self.epochs}")
        check(self.steps_per_epoch >= 1, "steps_per_epoch", f"must be >= 1, got {self.steps_per_epoch}")
        check(
            bool(self.search_space) and all(isinstance(v, list) and v for v in self.search_space.values()),
            "search_space",
            "must map each key to a non-empty list of choices (a grid)",
        )
        check(self.reduction_factor > 1, "reduction_factor", f"must be > 1, got {self.reduction_factor}")
        check(
            1 <= self.grace_period < self.epochs,
            "grace_period",
            f"must be >= 1 and below epochs ({self.epochs}), got {self.grace_period}",
        )
        check(0 <= self.tolerance < 1, "tolerance", f"must be in [0, 1), got {self.tolerance}")
        check(self.repetitions >= 1, "repetitions", f"must be >= 1, got {self.repetitions}")
        check(self.overhead_trials >= 1, "overhead_trials", f"must be >= 1, got {self.overhead_trials}")
        check(self.trial_seconds > 0, "trial_seconds", f"must be > 0, got {self.trial_seconds}")
        check(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")


# ----------------------------------------------------------------------------------------------
# (2) scheduling overhead
# ----------------------------------------------------------------------------------------------


def _sleep_work(args: tuple[float, int]) -> int:
    """The pool's unit of work: the same sleeps a no-op trial does."""
    seconds, iterations = args
    for _ in range(iterations):
        time.sleep(seconds / iterations)
    return iterations


def _noop_trial(config: dict[str, Any]) -> None:
    """A Tune function trainable that only sleeps, reporting after each slice."""
    from ray import tune

    for i in range(config["iterations"]):
        time.sleep(config["seconds"] / config["iterations"])
        tune.report({"step": i})


def measure_overhead(trials: int, trial_seconds: float, iterations: int, concurrency: int) -> dict[str, float]:
    """Wall time of `trials` no-op trials through Ray Tune and through a process pool.

    Ray must already be initialized (its start-up is not scheduling overhead). Tune runs its trials
    with 1 CPU each, `concurrency` at a time, its default loggers on: what a sweep would pay.
    """
    from ray import tune

    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(concurrency) as pool:
        pooled = pool.map(_sleep_work, [(trial_seconds, iterations)] * trials, chunksize=1)
    pool_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="medfusion-bench-tune-") as storage:
        tuner = tune.Tuner(
            tune.with_resources(_noop_trial, {"cpu": 1}),
            param_space={
                "seconds": trial_seconds,
                "iterations": iterations,
                "trial": tune.grid_search(list(range(trials))),
            },
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=storage, name="overhead", verbose=0),
        )
        start = time.perf_counter()
        results = tuner.fit()
        tune_s = time.perf_counter() - start
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"no-op trials failed: {errors[0]}")
    ideal_s = trial_seconds * -(-trials // concurrency)
    return {
        "trials": trials,
        "tune_trials": len(results),
        "pool_trials": len(pooled),
        "tune_s": tune_s,
        "pool_s": pool_s,
        "ideal_s": ideal_s,
        "overhead": tune_s / pool_s - 1.0,
        "tune_per_trial_ms": 1000 * (tune_s - ideal_s) * concurrency / trials,
        "pool_per_trial_ms": 1000 * (pool_s - ideal_s) * concurrency / trials,
    }


def overhead_cpus() -> int:
    """Trials Tune and the pool run at once: the machine's cores (at least 1)."""
    return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------
# (1) search efficiency: grid vs ASHA vs random at ASHA's budget
# ----------------------------------------------------------------------------------------------


def _trial_order(trial_id: str) -> int:
    """Tune numbers trials in the order it creates them (``<experiment>_00007``); one trial at a time,
    that is also the order they finish in."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def budget_to_reach(trials: list[dict[str, Any]], target: float) -> tuple[float | None, int | None]:
    """Best objective of a sweep's leaderboard, and the trial-epochs it had spent (trials in run
    order, each counted with the epochs it ran) when a trial first reached `target`."""
    spent = 0
    reached = None
    best = None
    for record in sorted(trials, key=lambda r: _trial_order(r["trial_id"])):
        spent += int(record.get("epochs_run") or 0)
        value = record.get("objective")
        if value is None:
            continue
        best = value if best is None else max(best, value)
        if reached is None and value >= target:
            reached = spent
    return best, reached


def trial_epochs(trials: list[dict[str, Any]]) -> int:
    """Every epoch every trial of a sweep ran."""
    return sum(int(r.get("epochs_run") or 0) for r in trials)


def _sweep(
    cfg: TuneBenchConfig, data_uri: str, storage_uri: str, name: str, seed: int, **values: Any
) -> list[dict[str, Any]]:
    """One run_tune sweep of the benchmark's trials (training and sampler seeded with `seed`); its
    leaderboard's trial records."""
    import json

    from medfusion import storage
    from medfusion.loader import load_config, preset_values
    from medfusion.tune import run_tune
    from medfusion.tuning.config import TuneConfig

    tune_cfg = load_config(
        TuneConfig,
        base={
            "dataset_uri": data_uri,
            "storage_uri": storage_uri,
            "name": name,
            "model": preset_values("tiny", "model"),
            "data": preset_values("tiny", "data"),
            "train": {
                "epochs": cfg.epochs,
                "max_steps_per_epoch": cfg.steps_per_epoch,
                "num_workers": 1,
                "warmup_steps": 2,
                "seed": seed,
            },
            "search_space": cfg.search_space,
            "search_seed": seed,
            "reduction_factor": cfg.reduction_factor,
            "grace_period": cfg.grace_period,
            "max_concurrent_trials": 1,
            "seeds": 0,
            "register": False,
            **values,
        },
    )
    result = run_tune(tune_cfg)
    return json.loads(storage.read_text(result.leaderboard_uri))["trials"]


def measure_search(cfg: TuneBenchConfig, data_uri: str, storage_uri: str, seed: int) -> dict[str, Any]:
    """Grid (every configuration, every epoch), ASHA over the same configurations, and random search
    (FIFO) given the trial-epochs ASHA spent; every trial trained with `seed`."""
    configs = math.prod(len(v) for v in cfg.search_space.values())
    storage_uri = os.path.join(storage_uri, f"seed{seed}")
    grid = _sweep(cfg, data_uri, storage_uri, "grid", seed, search="grid", scheduler="fifo")
    grid_best, _ = budget_to_reach(grid, math.inf)
    if grid_best is None:
        raise RuntimeError("bench tune: no grid trial reported an objective")
    target = grid_best - cfg.tolerance * abs(grid_best)
    asha = _sweep(cfg, data_uri, storage_uri, "asha", seed, search="grid", scheduler="asha")
    asha_spent = trial_epochs(asha)
    random_trials = max(1, round(asha_spent / cfg.epochs))
    random = _sweep(
        cfg, data_uri, storage_uri, "random", seed, search="random", scheduler="fifo", num_samples=random_trials
    )
    rows = {}
    for name, trials in (("grid", grid), ("asha", asha), ("random", random)):
        best, reached = budget_to_reach(trials, target)
        rows[name] = {
            "trials": len(trials),
            "trial_epochs": trial_epochs(trials),
            "best": best,
            "epochs_to_target": reached,
            "stopped_early": sum(bool(t.get("stopped_early")) for t in trials),
        }
    return {"configs": configs, "target": target, "rows": rows}


def run_tune_bench(cfg: TuneBenchConfig, store_root: str | None = None) -> dict[str, Any]:
    """Run the parts of `cfg`, print tables, return the benchmark JSON object (DESIGN.md)."""
    import shutil

    import ray

    from medfusion.config import TrainConfig

    started_store = None
    data_uri = cfg.data_uri or "s3://medfusion/bench/tune"
    if "search" in cfg.parts and not cfg.data_uri and not os.environ.get("AWS_ENDPOINT_URL"):
        from medfusion.store import DEFAULT_ROOT, Store

        store = Store(store_root or DEFAULT_ROOT)
        started_store = None if store.running() else store
        os.environ.update(store.up().env())
    started_ray = False
    if not ray.is_initialized():
        from medfusion.training.runtime import ensure_ray

        # With the dashboard: ASHA's stopped trials free their Train workers through the State API.
        started_ray = ensure_ray(TrainConfig(num_workers=1), dashboard=True)
    storage_dir = tempfile.mkdtemp(prefix="medfusion-bench-tune-")
    figures: dict[str, dict[str, Any]] = {}
    search_terms: dict[str, tuple[str, str]] = {}
    terms: dict[str, tuple[str, str]] = {}
    try:
        if "search" in cfg.parts:
            from medfusion.bench.train import make_dataset
            from medfusion.loader import preset_values

            image_size = int(preset_values("tiny", "data")["image_size"])
            for rep in range(cfg.repetitions):
                seed = cfg.seed + rep
                make_dataset(data_uri, cfg.samples, image_size, val=0.2, seed=seed)
                search = measure_search(cfg, data_uri, storage_dir, seed)
                _search_table(cfg, search, rep, seed)
                search_terms.update(_search_figures(search["rows"], f"rep{rep}_", figures))
        if "overhead" in cfg.parts:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            overhead = measure_overhead(
                cfg.overhead_trials, cfg.trial_seconds, cfg.iterations, concurrency=max(1, min(cpus, overhead_cpus()))
            )
            print(
                f"\nscheduling: {overhead['trials']} no-op trials of {cfg.trial_seconds:g} s, "
                f"{max(1, min(cpus, overhead_cpus()))} at a time (ideal {overhead['ideal_s']:.1f} s)"
            )
            print(f"{'runner':<24}{'wall s':>9}{'per trial ms':>14}")
            print(f"{'Ray Tune':<24}{overhead['tune_s']:>9.2f}{overhead['tune_per_trial_ms']:>14.0f}")
            print(f"{'multiprocessing.Pool':<24}{overhead['pool_s']:>9.2f}{overhead['pool_per_trial_ms']:>14.0f}")
            figures["tune_noop_wall_s"] = {"value": round(overhead["tune_s"], 3), "unit": "s"}
            figures["pool_noop_wall_s"] = {"value": round(overhead["pool_s"], 3), "unit": "s"}
            figures["tune_overhead_per_trial"] = {"value": round(overhead["tune_per_trial_ms"], 1), "unit": "ms"}
            figures["tune_noop_trials"] = {"value": overhead["tune_trials"], "unit": "trials"}
            figures["pool_noop_trials"] = {"value": overhead["pool_trials"], "unit": "trials"}
            terms["tune_vs_pool_wall"] = ("tune_noop_wall_s", "pool_noop_wall_s")
    finally:
        shutil.rmtree(storage_dir, ignore_errors=True)
        if started_ray:
            ray.shutdown()
        if started_store is not None:
            started_store.down()
    terms = {**search_terms, **terms}
    ratios = ratios_of(figures, terms, digits=4)
    spread = ratio_spread(ratios, cfg.repetitions) if search_terms else {}
    if ratios:
        print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    if spread:
        print(f"\nover {cfg.repetitions} repetitions (seeds {cfg.seed}..{cfg.seed + cfg.repetitions - 1}):")
        print(f"{'ratio':<42}{'median':>9}{'min':>9}{'max':>9}{'measured':>10}")
        for name, stat in spread.items():
            cells = "".join("        -" if stat[k] is None else f"{stat[k]:>9.4f}" for k in ("median", "min", "max"))
            print(f"{name:<42}{cells}{stat['measured']:>6} of {len(stat['values'])}")
    return {
        "bench": "tune",
        "config": {**_plain(cfg), "cores": os.cpu_count()},
        "figures": figures,
        "ratios": ratios,
        "ratio_of": ratio_terms(terms),
        "ratio_spread": spread,
    }


SEARCH_LABELS = {"grid": "grid (FIFO)", "asha": "ASHA (same grid)", "random": "random (FIFO, ASHA's budget)"}


def _search_table(cfg: TuneBenchConfig, search: dict[str, Any], rep: int, seed: int) -> None:
    print(
        f"\nrepetition {rep} (seed {seed}): search over {search['configs']} configurations x {cfg.epochs} epochs; "
        f"target = within {100 * cfg.tolerance:g}% of the grid's best = {search['target']:.4f}"
    )
    print(f"{'sweep':<28}{'trials':>7}{'trial-epochs':>14}{'stopped':>9}{'best':>9}{'epochs to target':>18}")
    for name, row in search["rows"].items():
        reached = "not reached" if row["epochs_to_target"] is None else str(row["epochs_to_target"])
        best = "-" if row["best"] is None else f"{row['best']:.4f}"
        print(
            f"{SEARCH_LABELS[name]:<28}{row['trials']:>7}{row['trial_epochs']:>14}{row['stopped_early']:>9}"
            f"{best:>9}{reached:>18}"
        )


def _search_figures(
    rows: dict[str, dict[str, Any]], prefix: str, figures: dict[str, dict[str, Any]]
) -> dict[str, tuple[str, str]]:
    """Add one repetition's figures (names starting with `prefix`) to `figures`; return its ratio terms."""
    terms: dict[str, tuple[str, str]] = {}
    for name, row in rows.items():
        figures[f"{prefix}{name}_trials"] = {"value": row["trials"], "unit": "trials"}
        figures[f"{prefix}{name}_best_objective"] = {"value": row["best"], "unit": "objective"}
        figures[f"{prefix}{name}_trial_epochs"] = {"value": row["trial_epochs"], "unit": "trial-epochs"}
        figures[f"{prefix}{name}_trial_epochs_to_target"] = {"value": row["epochs_to_target"], "unit": "trial-epochs"}
    for name in ("asha", "random"):
        # Every repetition names the same ratios, so their spread is over all of them (None when the
        # sweep reported no objective).
        terms[f"{prefix}{name}_best_vs_grid_best"] = (f"{prefix}{name}_best_objective", f"{prefix}grid_best_objective")
        # None when the sweep never reached the target: it needed more than it was given.
        terms[f"{prefix}{name}_epochs_to_target_vs_grid_epochs"] = (
            f"{prefix}{name}_trial_epochs_to_target",
            f"{prefix}grid_trial_epochs",
        )
    return terms


def ratio_spread(ratios: dict[str, float | None], repetitions: int) -> dict[str, dict[str, Any]]:
    """For each search ratio ``rep<i>_<name>``: {values (per repetition, None where unmeasured),
    measured (how many have a value), median, min, max (over those; None when none has)}."""
    names = sorted({key.split("_", 1)[1] for key in ratios if key.startswith("rep0_")})
    spread = {}
    for name in names:
        values = [ratios.get(f"rep{i}_{name}") for i in range(repetitions)]
        measured = [v for v in values if v is not None]
        spread[name] = {
            "values": values,
            "measured": len(measured),
            "median": round(statistics.median(measured), 4) if measured else None,
            "min": min(measured, default=None),
            "max": max(measured, default=None),
        }
    return spread


def _plain(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)
