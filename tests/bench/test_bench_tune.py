"""`medfusion bench tune` runs both parts end to end (tiny sizes: speeds are not asserted,
only what holds on any machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bench_invariants import check_counts, check_ratios

from medfusion.bench.tune import TuneBenchConfig, budget_to_reach, ratio_spread, run_tune_bench, trial_epochs
from medfusion.config import ConfigError
from medfusion.loader import load_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parts=search,train"], "parts: must be a list of search and/or overhead"),
        (["epochs=1"], "epochs: must be >= 2"),
        (["tolerance=1.5"], "tolerance: must be in"),
        (["trial_seconds=0"], "trial_seconds: must be > 0"),
        (["repetitions=0"], "repetitions: must be >= 1"),
        (["grace_period=9"], r"grace_period: must be >= 1 and below epochs \(9\), got 9"),
    ],
)
def test_bench_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TuneBenchConfig, overrides=overrides)


def test_search_space_must_be_a_grid():
    with pytest.raises(ConfigError, match="search_space: must map each key to a non-empty list"):
        TuneBenchConfig(search_space={"train.lr": {"loguniform": [1e-4, 1e-2]}})


@pytest.mark.parametrize(
    "trials, target, expected",
    [
        # run order is the trial number, not the leaderboard's rank
        (
            [
                {"trial_id": "x_00001", "epochs_run": 4, "objective": 0.9},
                {"trial_id": "x_00000", "epochs_run": 1, "objective": 0.5},
            ],
            0.89,
            (0.9, 5),
        ),
        (
            [
                {"trial_id": "x_00000", "epochs_run": 2, "objective": 0.95},
                {"trial_id": "x_00001", "epochs_run": 4, "objective": 0.97},
            ],
            0.9,
            (0.97, 2),
        ),
        (
            [
                {"trial_id": "x_00000", "epochs_run": 2, "objective": None},
                {"trial_id": "x_00001", "epochs_run": 4, "objective": 0.5},
            ],
            0.9,
            (0.5, None),
        ),
    ],
)
def test_budget_counts_trial_epochs_in_run_order(trials, target, expected):
    assert budget_to_reach(trials, target) == expected
    assert trial_epochs(trials) == sum(t["epochs_run"] for t in trials)


@pytest.mark.parametrize(
    "ratios, expected",
    [
        # odd count: the middle value; min and max over the repetitions
        (
            {"rep0_x": 0.3, "rep1_x": 0.1, "rep2_x": 0.2, "tune_vs_pool_wall": 1.1},
            {"x": {"values": [0.3, 0.1, 0.2], "measured": 3, "median": 0.2, "min": 0.1, "max": 0.3}},
        ),
        # a repetition that never reached the target is listed, and left out of the statistics
        (
            {"rep0_x": 0.4, "rep1_x": None, "rep2_x": 0.2},
            {"x": {"values": [0.4, None, 0.2], "measured": 2, "median": 0.3, "min": 0.2, "max": 0.4}},
        ),
        (
            {"rep0_x": None, "rep1_x": None, "rep2_x": None},
            {"x": {"values": [None, None, None], "measured": 0, "median": None, "min": None, "max": None}},
        ),
    ],
)
def test_ratio_spread_over_repetitions(ratios, expected):
    assert ratio_spread(ratios, 3) == expected


@pytest.mark.integration
def test_overhead_part_measures_tune_and_the_pool(ray_local, capsys):
    result = run_tune_bench(TuneBenchConfig(parts=["overhead"], overhead_trials=4, trial_seconds=0.5, iterations=2))
    table = capsys.readouterr().out
    assert "Ray Tune" in table and "multiprocessing.Pool" in table
    assert result["bench"] == "tune" and json.loads(json.dumps(result)) == result
    assert result["figures"]["tune_noop_wall_s"]["value"] >= 1.0  # 4 trials of 0.5 s, 2 at a time
    assert result["figures"]["pool_noop_wall_s"]["value"] >= 1.0
    assert result["ratio_of"] == {"tune_vs_pool_wall": ["tune_noop_wall_s", "pool_noop_wall_s"]}
    check_ratios(result)
    check_counts(result["figures"], ["tune_noop_trials", "pool_noop_trials"], 4)
    assert result["ratio_spread"] == {}  # no search part, nothing repeated


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_search_part_runs_grid_asha_and_random(s3_prefix, tmp_path):
    # A process of its own: the sweep's Ray needs the dashboard (ASHA frees stopped trials through
    # the State API), which the test session's shared Ray does not start.
    # About 12 Ray Train runs of a few steps each: 486 s alone on 2 cores, over 900 s when the
    # machine is busy with other work. The limits guard against a hang, not a slow machine.
    argv = [
        sys.executable,
        "-m",
        "medfusion.cli",
        "bench",
        "tune",
        "parts=search",
        "samples=128",
        "epochs=2",
        "steps_per_epoch=2",
        "search_space={model.fusion: [concat, gated]}",
        "repetitions=2",
        "seed=5",
        f"data_uri={s3_prefix}/bench-tune",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=1700, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    figures = result["figures"]
    for rep in ("rep0_", "rep1_"):
        assert figures[f"{rep}grid_trial_epochs"]["value"] == 2 * 2  # every configuration, every epoch
        assert figures[f"{rep}grid_best_objective"]["value"] is not None
        assert figures[f"{rep}asha_trial_epochs"]["value"] <= figures[f"{rep}grid_trial_epochs"]["value"]
        check_counts(figures, [f"{rep}grid_trials", f"{rep}asha_trials"], 2)  # ASHA starts every grid configuration
        assert {
            f"{rep}asha_best_vs_grid_best": [f"{rep}asha_best_objective", f"{rep}grid_best_objective"],
            f"{rep}asha_epochs_to_target_vs_grid_epochs": [
                f"{rep}asha_trial_epochs_to_target",
                f"{rep}grid_trial_epochs",
            ],
            f"{rep}random_epochs_to_target_vs_grid_epochs": [
                f"{rep}random_trial_epochs_to_target",
                f"{rep}grid_trial_epochs",
            ],
        }.items() <= result["ratio_of"].items()
    check_ratios(result)
    # different seeds train different trials: the two repetitions' grids do not score alike
    assert figures["rep0_grid_best_objective"]["value"] != figures["rep1_grid_best_objective"]["value"]
    spread = result["ratio_spread"]
    assert set(spread) == {
        "asha_best_vs_grid_best",
        "random_best_vs_grid_best",
        "asha_epochs_to_target_vs_grid_epochs",
        "random_epochs_to_target_vs_grid_epochs",
    }
    for name, stat in spread.items():
        assert stat["values"] == [result["ratios"][f"rep0_{name}"], result["ratios"][f"rep1_{name}"]], name
    assert "repetition 1 (seed 6)" in out.stdout and "ASHA (same grid)" in out.stdout
