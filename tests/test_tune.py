"""The tune stage: search spaces checked before Ray starts, and real sweeps on the local Ray and S3.

The sweeps run `medfusion tune` in a subprocess: tune starts its own embedded Ray *with the
dashboard* (Ray Train frees a stopped trial's workers through the State API), while the test
session's shared Ray (`ray_local`) runs without one. The main sweep is interrupted after two trials
(interrupt_after_trials, the way Ctrl-C interrupts it) and resumed with --resume; it then runs the
ablation over three seeds and registers the best model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from medfusion import storage
from medfusion.config import ConfigError, DataConfig
from medfusion.loader import load_config, preset_values
from medfusion.tuning import results as R
from medfusion.tuning.config import TuneConfig
from medfusion.tuning.space import packaged_search_spaces, parse_search_space, read_search_space, trial_values

SAMPLES, IMAGE = 240, 32
# One trial at a time, one worker with one CPU (the other of the 2 CPUs reads and preprocesses);
# 6 optimizer steps of 16 samples per epoch.
TRIAL = (
    "data.image_size=32 data.batch_size=16 train.num_workers=1 train.cpus_per_worker=1 train.max_steps_per_epoch=6 "
    "train.warmup_steps=1 train.shuffle_buffer=0 max_concurrent_trials=1"
).split()


def _tiny(**values):
    base = {"model": preset_values("tiny", "model"), "data": preset_values("tiny", "data"), "dataset_uri": "/nowhere"}
    return load_config(TuneConfig, base={**base, **values})


# ---------------------------------------------------------------------------------------------- unit


@pytest.mark.parametrize(
    "space, message",
    [
        ({"model.fusoin": ["concat"]}, "search_space.model.fusoin: unknown setting; did you mean model.fusion"),
        ({"dropout": {"uniform": [0.0, 0.3]}}, "search_space.dropout: unknown setting; did you mean model.dropout?"),
        ({"train.lr": {"loguniform": [0.0, 1.0e-3]}}, "search_space.lr: loguniform needs low > 0"),
        ({"train.lr": {"uniform": [3.0e-3, 1.0e-4]}}, "search_space.lr: uniform needs low < high"),
        ({"model.fusion": {"choice": []}}, "search_space.model.fusion: choice needs a non-empty list"),
        (
            {"model.fusion": ["concat", "sum"]},
            "search_space.model.fusion: 'sum' does not make a valid trial config (model.fusion: must be one of",
        ),
        (
            {"zero_stage": [0, 5]},
            "search_space.zero_stage: 5 does not make a valid trial config (zero_stage: must be 0, 1, 2 or 3",
        ),
        (
            {"model.hidden_dim": {"uniform": [32, 128]}},
            "search_space.model.hidden_dim: uniform draws real numbers but model.hidden_dim is an integer setting",
        ),
        (
            {"model.hidden_dim": {"randint": [32.5, 128]}},
            "search_space.model.hidden_dim: randint bounds must be integers",
        ),
        ({"train.lr": {"normal": [0, 1]}}, "search_space.lr: unknown domain 'normal'"),
        ({"epochs": [1, 2]}, "search_space.epochs: cannot be searched"),
        (
            {"model.hidden_dim": [30, 64], "model.fusion": ["gated", "cross_attention"]},
            "search_space: the combination model.hidden_dim=30, model.fusion='cross_attention' "
            "does not make a valid trial config",
        ),
    ],
)
def test_search_space_errors_name_the_key(space, message):
    with pytest.raises(ConfigError) as err:
        _tiny(search_space=space)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"search": "grid", "search_space": {"train.lr": {"loguniform": [1.0e-4, 1.0e-3]}}},
            "search_space.lr: grid search takes only choices",
        ),
        ({"train": {"epoch": 3}}, "train.epoch: unknown training setting; did you mean epochs?"),
        ({"train": {"model": {}}}, "train.model: not a trial setting"),
        ({"train": {"zero_stage": 4}}, "train.zero_stage: must be 0, 1, 2 or 3"),
        ({"train": {"epochs": 2}, "grace_period": 3}, "grace_period: must be <= train.epochs (2)"),
        ({"objective": {"bleu4": -1}}, "objective.bleu4: must be >= 0"),
        (
            {"objective": {"classification_metric": "f1"}},
            "objective.classification_metric: must be one of accuracy, auroc",
        ),
        ({"seeds": 1}, "seeds: must be 0 (no ablation) or >= 2"),
        ({"resume": True}, "name: is required with resume=true"),
        ({"trial_resources": {"CPU": 1}}, "trial_resources.CPU: must be a custom resource"),
        ({"trial_resources": {"trial-driver": 0}}, "trial_resources.trial-driver: must be a number > 0, got 0"),
        ({"trial_resources": {"trial-driver": "one"}}, "trial_resources.trial-driver: must be a number > 0"),
    ],
)
def test_tune_config_errors_name_the_field(values, message):
    with pytest.raises(ConfigError) as err:
        _tiny(**values)
    assert message in str(err.value)


def test_bad_search_space_file_fails_before_ray_starts(tmp_path, monkeypatch):
    import medfusion.tune as tune

    monkeypatch.setattr(tune, "start_ray", lambda *a, **k: pytest.fail("Ray was started"))
    space = tmp_path / "space.yaml"
    space.write_text("model.fusion: [concat, gated]\ntrain.zero_stage: {choice: [2, 5]}\n")
    cfg = _tiny(search_space_file=str(space), storage_uri=str(tmp_path / "sweeps"), name="bad")
    with pytest.raises(ConfigError, match=r"search_space.zero_stage: 5 does not make a valid trial config"):
        tune.run_tune(cfg)
    assert not (tmp_path / "sweeps").exists(), "the sweep folder was written before the search space was checked"


def test_cli_overrides_build_the_search_space_and_trial_settings():
    overrides = [
        "search_space.model.fusion=[concat, gated]",
        "search_space.train.lr={loguniform: [1.0e-4, 1.0e-3]}",
        "train.epochs=4",
        "objective.bleu4=0.5",
        "search=random",
    ]
    cfg = load_config(TuneConfig, overrides=overrides)
    dims = parse_search_space(read_search_space(cfg), trial_values(cfg))
    searched = [(d.key, d.domain, d.values) for d in dims]
    assert searched == [("model.fusion", "choice", ("concat", "gated")), ("lr", "loguniform", (1e-4, 1e-3))]
    weights = {"classification": 1.0, "mean_iou": 1.0, "bleu4": 0.5}
    assert cfg.train == {"epochs": 4} and cfg.objective.weights == weights


@pytest.mark.parametrize("name", packaged_search_spaces())
def test_every_shipped_search_space_is_valid(name):
    cfg = _tiny(search_space_file=name)
    dims = parse_search_space(read_search_space(cfg), trial_values(cfg))
    fusion = next(d for d in dims if d.key == "model.fusion")
    assert {"image_only", "text_only"} <= set(fusion.values)


def test_pareto_front_and_ranking():
    def rec(trial_id, status, acc, iou, bleu):
        objective = None if acc is None else acc + iou + bleu
        return R.TrialRecord(trial_id, status, val_accuracy=acc, val_mean_iou=iou, val_bleu4=bleu, objective=objective)

    records = [
        rec("a", R.FINISHED, 0.9, 0.1, 0.0),  # best classifier
        rec("b", R.STOPPED, 0.5, 0.5, 0.1),  # best objective
        rec("c", R.FINISHED, 0.4, 0.4, 0.05),  # dominated by b
        rec("d", R.FINISHED, 0.2, 0.2, 0.3),  # best text
        rec("e", R.ERRORED, None, None, None),
    ]
    assert R.pareto_front(records, ["val_accuracy", "val_mean_iou", "val_bleu4"]) == ["a", "b", "d"]
    ranked = R.rank(records)
    assert [(r.trial_id, r.rank) for r in ranked] == [("b", 1), ("a", 2), ("c", 3), ("d", 4), ("e", 5)]
    table = R.leaderboard_table([r.to_dict() for r in ranked], ["model.fusion"], ["val_accuracy"])
    assert table.splitlines()[2].split()[:2] == ["1", "b"] and "early" in table.splitlines()[0]


# leaderboard.json's trial entries, key by key: what bench/tune.py, the demo and the KFP artifact read.
LEADERBOARD_KEYS = (
    "trial_id status fusion params val_accuracy val_auroc_macro val_mean_iou val_bleu4 val_loss objective best_epoch "
    "epochs_run stopped_early attempts run_uri model_uri checkpoint_uri error rank"
).split()


def test_a_trial_record_is_its_leaderboard_entry_and_reads_back():
    record = R.TrialRecord(
        trial_id="t1",
        status=R.STOPPED,
        fusion="gated",
        params={"model.fusion": "gated", "lr": 3e-4},
        val_accuracy=0.7,
        val_mean_iou=0.2,
        objective=0.9,
        best_epoch=1,
        epochs_run=1,
        attempts=1,
        run_uri="s3://b/s/trials/t1",
        model_uri="s3://b/s/trials/t1/model",
        rank=2,
    )
    entry = json.loads(json.dumps(record.to_dict()))
    assert list(entry) == LEADERBOARD_KEYS
    assert entry["stopped_early"] is True and entry["val_bleu4"] is None and entry["params"]["lr"] == 3e-4
    assert R.TrialRecord.from_dict(entry) == record
    assert R.TrialRecord.from_dict({**entry, "added_later": 1}) == record  # an unknown key is left out
    assert record.usable and record.val_metrics == {"val_accuracy": 0.7, "val_mean_iou": 0.2}
    assert not R.TrialRecord("t2", R.FINISHED, objective=0.5).usable  # no export
    with pytest.raises(KeyError, match="val_f1: not a trial metric"):
        record.metric("val_f1")


def test_mean_and_student_t_interval():
    stat = R.mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / np.sqrt(3)  # t(0.975, 2 dof) x std 1 / sqrt(3)
    assert stat["mean"] == pytest.approx(2.0) and stat["ci"] == pytest.approx([2.0 - half, 2.0 + half])
    assert R.mean_ci([0.5, float("nan")]) == {"n": 1, "mean": 0.5, "std": None, "ci": None}


def test_objective_and_val_bleu_match_evaluation():
    from medfusion.metrics import corpus_bleu, objective_value, text_metrics

    generated = ["small nodule in the left upper zone.", "no acute findings"]
    references = ["small nodule in the left upper zone.", "no acute cardiopulmonary findings"]
    assert corpus_bleu(generated, references) == pytest.approx(text_metrics(generated, references)["bleu4"])
    weights = {"classification": 1.0, "mean_iou": 2.0, "bleu4": 0.0}
    validation = {"val_auroc_macro": 0.8, "val_mean_iou": 0.25, "val_bleu4": 0.3}
    assert objective_value(validation, weights, "auroc", prefix="val_") == pytest.approx(1.3)
    no_lesions = {"accuracy": 0.5, "mean_iou": float("nan")}
    assert objective_value(no_lesions, weights) == pytest.approx(0.5)  # an undefined metric counts 0


def test_the_pipeline_builds_the_tune_config_from_the_component_values():
    from medfusion.orchestration.stages import build_config

    values = {
        "preset": "tiny",
        "dataset_uri": "s3://b/d",
        "storage_uri": "s3://b/sweeps",
        "search_space": {"model.fusion": ["concat", "gated"], "lr": [1e-3, 3e-4]},
        "train": {"epochs": 3},
    }
    cfg = build_config("tune", values)
    assert (cfg.model.preset, cfg.model.hidden_dim, cfg.train["epochs"]) == ("tiny", 64, 3)
    with pytest.raises(ConfigError, match="search_space.model.fusion: 'sum'"):
        build_config("tune", {"preset": "tiny", "dataset_uri": "d", "search_space": {"model.fusion": ["sum"]}})


# ---------------------------------------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def dataset(s3_store, synthetic_dataset):
    return synthetic_dataset(f"s3://{s3_store.state().bucket}/tune-tests/data", SAMPLES, IMAGE)


@pytest.fixture(scope="module")
def roots(s3_store):
    bucket = s3_store.state().bucket
    return {"storage_uri": f"s3://{bucket}/tune-tests/sweeps", "registry_uri": f"s3://{bucket}/tune-tests/registry"}


def _tune(*args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    """`medfusion tune ARGS` in a subprocess (its own embedded Ray with the dashboard)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    command = [sys.executable, "-m", "medfusion.cli", "tune", *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    print(f"$ medfusion tune {' '.join(args)}  ({elapsed:.0f} s, exit {proc.returncode})")
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc, elapsed


def _attempts(run_uri: str) -> int:
    return len(storage.list_files(storage.join(run_uri, "attempts")))


@pytest.fixture(scope="module")
def sweep(dataset, roots):
    """Grid over fusion x lr (4 trials of up to 2 epochs; ASHA's rung after epoch 1 stops a trial whose
    objective trails), interrupted after 2 trials, then resumed; ablation over 3 seeds (1 epoch
    each); the best model registered. The objective weighs IoU and BLEU only: six steps teach a
    classifier little, and a diverged one (lr=1.0) that predicts the majority class can score as
    well, but its boxes are worthless (IoU 0), so the lr=1.0 trials are the ones ASHA stops."""
    args = [
        *["--preset", "tiny", "--data", dataset, "--name", "main", "--seeds", "3"],
        *[f"storage_uri={roots['storage_uri']}", f"registry_uri={roots['registry_uri']}", "model_name=tuned"],
        *TRIAL,
        *["train.epochs=2", "search=grid", "search_space.model.fusion=[concat, image_only]"],
        *["search_space.train.lr=[3.0e-3, 1.0]", "ablation_epochs=1", "max_failures=1", "objective.classification=0"],
    ]
    first, first_s = _tune(*args, "interrupt_after_trials=2")
    sweep_uri = storage.join(roots["storage_uri"], "main")
    interrupted = json.loads(storage.read_text(storage.join(sweep_uri, "leaderboard.json")))
    done = [t for t in interrupted["trials"] if t["status"] in R.SUCCESSFUL]
    before = {t["trial_id"]: {**t, "attempts": _attempts(t["run_uri"])} for t in done}
    second, second_s = _tune(
        "--resume", "--name", "main", f"storage_uri={roots['storage_uri']}", "interrupt_after_trials=0"
    )
    print(f"interrupted run {first_s:.0f} s, resumed run {second_s:.0f} s")
    resumed = second.returncode == 0
    return {
        "first": first,
        "second": second,
        "interrupted": interrupted,
        "before": before,
        "sweep_uri": sweep_uri,
        "leaderboard": json.loads(storage.read_text(storage.join(sweep_uri, "leaderboard.json"))) if resumed else None,
        "result": json.loads(storage.read_text(storage.join(sweep_uri, "result.json"))) if resumed else None,
    }


@pytest.mark.integration
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep):
    first, second = sweep["first"], sweep["second"]
    assert first.returncode == 2 and "interrupted" in first.stderr and "--resume" in first.stderr, first.stderr[-2000:]
    assert sweep["interrupted"]["interrupted"] is True
    trials = sweep["interrupted"]["trials"]
    assert len(sweep["before"]) == 2, f"expected 2 trials done before the interruption: {trials}"
    assert second.returncode == 0, second.stderr[-3000:]
    final = {t["trial_id"]: t for t in sweep["leaderboard"]["trials"]}
    assert len(final) == 4 and sweep["leaderboard"]["interrupted"] is False
    for trial_id, before in sweep["before"].items():
        after = final[trial_id]
        assert after["attempts"] == before["attempts"] == 1, f"trial {trial_id} was run again after --resume"
        for key in ("status", "objective", "epochs_run", "val_accuracy", "val_mean_iou", "val_bleu4", "checkpoint_uri"):
            assert after[key] == before[key], f"{trial_id}.{key} changed on resume"
    assert all(t["attempts"] == 1 for t in final.values())


@pytest.mark.integration
def test_asha_stops_a_trial_and_the_results_are_written(sweep):
    assert sweep["second"].returncode == 0, sweep["second"].stderr[-3000:]
    board, result = sweep["leaderboard"], sweep["result"]
    trials = board["trials"]
    assert {t["fusion"] for t in trials} == {"concat", "image_only"}
    epochs_run = [(t["trial_id"], t["epochs_run"]) for t in trials]
    assert any(t["stopped_early"] and t["epochs_run"] == 1 for t in trials), epochs_run
    assert any(t["status"] == R.FINISHED and t["epochs_run"] == 2 for t in trials)
    objectives = [t["objective"] for t in trials]
    assert objectives == sorted(objectives, reverse=True)
    assert board["best"] == trials[0]["trial_id"] == result["best_trial_id"]
    assert set(board["pareto"]) <= {t["trial_id"] for t in trials} and trials[0]["trial_id"] in board["pareto"]
    best = trials[0]
    assert set(best["params"]) == {"model.fusion", "lr"}
    # objective.classification=0: the objective is IoU + BLEU-4, so BLEU-4 must be the measured remainder
    assert isinstance(best["val_bleu4"], float), best
    assert best["objective"] == pytest.approx((best["val_mean_iou"] or 0.0) + best["val_bleu4"], abs=1e-6), best
    assert best["val_auroc_macro"] is not None
    assert storage.exists(storage.join(best["model_uri"], "model.safetensors"))
    assert best["checkpoint_uri"].startswith("s3://")
    for name in ("pareto.png", "fusion_boxplots.png", "ablation.png"):
        assert storage.read_bytes(storage.join(sweep["sweep_uri"], name))[:8] == b"\x89PNG\r\n\x1a\n", name
    out = sweep["second"].stdout
    assert "objective" in out and "early" in out and best["trial_id"] in out  # the printed leaderboard
    assert result["trials"] == 4 and result["trials_stopped_early"] >= 1 and result["model_uri"] == best["model_uri"]


@pytest.mark.integration
def test_ablation_compares_fused_image_only_and_text_only_over_three_seeds(sweep):
    assert sweep["second"].returncode == 0, sweep["second"].stderr[-3000:]
    ablation = json.loads(storage.read_text(storage.join(sweep["sweep_uri"], "ablation.json")))
    assert ablation["split"] == "test" and ablation["seeds"] == 3
    assert [v["fusion"] for v in ablation["variants"].values()] == ["concat", "image_only", "text_only"]
    for name, variant in ablation["variants"].items():
        assert variant["runs_ok"] == 3, name
        for metric in ("accuracy", "mean_iou", "bleu4", "objective"):
            stat = variant["summary"][metric]
            low, high = stat["ci"]
            assert stat["n"] == 3 and low <= stat["mean"] <= high, (name, metric, stat)
    variants = ablation["variants"]
    fused = variants["fused"]
    assert fused["from"] == ablation["trial_id"] and fused["config"]["lr"] == pytest.approx(3e-3)
    assert variants["image_only"]["from"] != ablation["trial_id"]  # image_only's own best trial
    # The sweep has no text_only trial: the fused configuration with the fusion swapped stands in.
    assert variants["text_only"]["config"] == {**fused["config"], "model.fusion": "text_only"}
    assert "± " in sweep["second"].stdout  # the printed ablation table


@pytest.mark.integration
def test_best_model_is_registered_and_predicts(sweep, roots, dataset):
    from medfusion import registry
    from medfusion.data.dataset import iter_local_batches, open_dataset
    from medfusion.predictor import Predictor

    assert sweep["second"].returncode == 0, sweep["second"].stderr[-3000:]
    name, _, version = sweep["result"]["registered"].partition(":")
    mv = registry.get_version(roots["registry_uri"], f"{name}:{version}")
    lineage = (mv.name, mv.lineage["trial_id"], mv.lineage["sweep_uri"])
    assert lineage == ("tuned", sweep["result"]["best_trial_id"], sweep["sweep_uri"])
    assert mv.lineage["checkpoint_uri"] and mv.lineage["objective"] == pytest.approx(sweep["result"]["objective"])
    low, high = mv.metrics_ci["test_accuracy"]
    assert low <= mv.metrics["test_accuracy"] <= high
    predictor = Predictor.from_export(registry.resolve_model_uri(roots["registry_uri"], "tuned"))
    info = open_dataset(dataset)
    batch = next(iter_local_batches(info, "test", DataConfig(**predictor.export.data), limit=4))
    out = predictor.predict_batch(batch)
    assert out["probs"].shape == (4, len(info.classes)) and len(out["generated"]) == 4


@pytest.mark.integration
def test_a_failing_trial_is_retried_then_recorded_and_the_others_kept(dataset, roots):
    # grad_accum=1000 passes every config check but needs more rows than the dataset has: the trial
    # fails when it starts (each time: max_failures=1 retries it once), the other trial trains.
    proc, _ = _tune(
        *["--preset", "tiny", "--data", dataset, "--name", "failing", "--seeds", "0"],
        *[f"storage_uri={roots['storage_uri']}", *TRIAL, "train.epochs=1", "search=grid"],
        *["search_space.grad_accum=[1, 1000]", "register=false", "max_failures=1"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = json.loads(storage.read_text(storage.join(roots["storage_uri"], "failing", "leaderboard.json")))
    good, bad = board["trials"]
    assert (good["params"], good["status"], good["rank"]) == ({"grad_accum": 1}, R.FINISHED, 1)
    assert good["objective"] is not None
    assert bad["params"] == {"grad_accum": 1000} and bad["status"] == R.ERRORED and bad["objective"] is None
    assert "grad_accum" in bad["error"] and bad["attempts"] == 2, bad
    assert board["best"] == good["trial_id"] and storage.exists(storage.join(good["run_uri"], "metrics.json"))
