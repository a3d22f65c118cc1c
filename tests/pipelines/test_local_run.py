"""The whole pipeline with kfp.local (SubprocessRunner, embedded Ray, the local S3 store) on `tiny`
data, under one quality gate (pipeline_gates.GATES): it deploys and smoke-tests the model its train
step fits, and stops before deploy when its models learned nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path

import pytest
import yaml
from pipeline_gates import GATES

from medfusion import registry, storage
from medfusion.orchestration.pipeline import PipelineConfig
from medfusion.pipelines.run import run_pipeline_local

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

# Small enough for 2 loaded cores, and a model that learns: 2400 images (about 1900 in train), one
# epoch of 60 steps on one worker (about 45 s), 32 test images.
PREPARE = {"synth": {"num_samples": 2400}}
TRAIN = {
    "epochs": 1,
    "num_workers": 1,
    "strategy": "ddp",
    "lr": 3e-3,
    "warmup_steps": 2,
    "evaluate": False,
    "data": {"batch_size": 32},
}
EVALUATE = {"limit": 32}


@pytest.fixture(scope="module")
def kfp_local(tmp_path_factory, s3_store):
    """The pipeline root of kfp.local; its steps (subprocesses) inherit the store's AWS_* environment."""
    root = tmp_path_factory.mktemp("kfp") / "pipeline_root"
    saved = os.environ.pop("RAY_ADDRESS", None)  # each step starts its own embedded Ray (run_pipeline_local)
    yield root
    if saved is not None:
        os.environ["RAY_ADDRESS"] = saved


def _run(cfg: PipelineConfig, root: Path):
    # What `medfusion pipeline run --local` calls.
    result = run_pipeline_local(cfg, str(root))
    return result.outputs, Path(result.run_dir)


@pytest.fixture(scope="module")
def passing_run(kfp_local, s3_store):
    prefix = f"s3://{s3_store.state().bucket}/kfp-{uuid.uuid4().hex[:8]}"
    cfg = PipelineConfig(
        dataset_uri=f"{prefix}/dataset",
        storage_uri=f"{prefix}/runs",
        registry_uri=f"{prefix}/registry",
        prepare_config=PREPARE,
        train_config=TRAIN,
        evaluate_config=EVALUATE,
        gates=dict(GATES),
    )
    outputs, run_dir = _run(cfg, kfp_local)
    return cfg, outputs, run_dir


def _executor_output(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


def test_pipeline_runs_end_to_end_and_deploys_when_the_gate_passes(passing_run):
    cfg, outputs, run_dir = passing_run
    accuracy = outputs["metrics"]["accuracy"]
    assert outputs["deployable"] is True and accuracy >= GATES["accuracy"] and "mean_iou" in outputs["metrics"]
    assert (run_dir / "quality-gate" / "decision").read_text().startswith("**Deploy**")

    # evaluate's artifacts: the confusion matrix over the dataset's classes (its diagonal is the gated
    # accuracy), and the HTML report
    evaluate = _executor_output(run_dir, "evaluate")["artifacts"]
    (classification,) = evaluate["classification"]["artifacts"]
    matrix = classification["metadata"]["confusionMatrix"]
    assert len(matrix["rows"]) == len(matrix["annotationSpecs"]) >= 2
    test_rows = json.loads((run_dir / "prepare-data" / "dataset").read_text())["rows"]["test"]
    evaluated = sum(sum(row["row"]) for row in matrix["rows"])
    assert evaluated == min(test_rows, EVALUATE["limit"])
    assert sum(row["row"][i] for i, row in enumerate(matrix["rows"])) / evaluated == pytest.approx(accuracy)
    assert "<html" in (run_dir / "evaluate" / "report").read_text().lower()

    # deploy registered the export as the model's latest version, its Serve config beside it
    latest = registry.get_version(cfg.registry_uri, cfg.model_name)
    published = latest.uri
    assert latest.is_latest and storage.exists(storage.join(published, "checksums.json"))
    serve_config = storage.join(cfg.registry_uri, cfg.model_name, "_deployments", latest.version, "serve_config.yaml")
    app = yaml.safe_load(storage.read_text(serve_config))["applications"][0]
    assert app["import_path"] == "medfusion.serve.app:build_app" and app["args"]["model"] == published

    # the smoke test served it and got a prediction for a real test image
    prediction = _executor_output(run_dir, "smoke-test")["parameterValues"]["Output"]
    assert prediction["labels"] and isinstance(prediction["findings"], str) and "box" in prediction
    assert not [k for k in prediction if k.endswith("_attention")]  # the step's printed output stays short


def test_gate_blocks_deploy_of_models_that_learned_nothing(passing_run, kfp_local):
    cfg, outputs, _ = passing_run
    # This run takes the pipeline's other branch, a Ray Tune sweep of two fusions (FIFO, no
    # ablation), whose trials take one optimizer step (in warmup) each: its best model learned
    # nothing, and the gate that passed the trained model must block it.
    blocked = dataclasses.replace(
        cfg,
        registry_uri=f"{cfg.registry_uri}-blocked",
        use_tune=True,
        search_space={"model.fusion": ["concat", "image_only"]},
        tune_config={
            "train": {"strategy": "ddp", "max_steps_per_epoch": 1, "warmup_steps": 20, "evaluate": False},
            "data": TRAIN["data"],
            "search": "grid",
            "scheduler": "fifo",
            "seeds": 0,
        },
    )
    assert blocked.gates == GATES
    blocked_outputs, run_dir = _run(blocked, kfp_local)
    assert (run_dir / "tune").exists() and not (run_dir / "train").exists()
    leaderboard = (run_dir / "tune" / "leaderboard").read_text()
    assert "2 trials" in leaderboard and "concat" in leaderboard and "image_only" in leaderboard, leaderboard
    assert blocked_outputs["metrics"]["accuracy"] < GATES["accuracy"] <= outputs["metrics"]["accuracy"]
    assert blocked_outputs["deployable"] is False
    assert not (run_dir / "deploy").exists() and not (run_dir / "smoke-test").exists()
    assert storage.list_files(blocked.registry_uri) == []
    decision = (run_dir / "quality-gate" / "decision").read_text()
    assert decision.startswith("**Blocked**") and "accuracy" in decision
