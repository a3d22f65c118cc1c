"""The whole pipeline with kfp.local (SubprocessRunner, embedded Ray, the local S3 store) on `tiny`
data: it deploys and smoke-tests the model when the quality gate passes, and stops before deploy when
the threshold is above the metric the model reached."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path

import pytest
import yaml

from medfusion import registry, storage
from medfusion.orchestration.pipeline import PipelineConfig
from medfusion.pipelines.run import run_pipeline_local

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

# Small enough for 2 loaded cores: 160 images, one epoch of 3 steps on one worker, 32 test images.
PREPARE = {"synth": {"num_samples": 160}}
TRAIN = {
    "epochs": 1,
    "num_workers": 1,
    "strategy": "ddp",
    "max_steps_per_epoch": 3,
    "evaluate": False,
    "data": {"batch_size": 16},
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
        gates={"accuracy": 0.0},
    )
    outputs, run_dir = _run(cfg, kfp_local)
    return cfg, outputs, run_dir


def _executor_output(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


def test_pipeline_runs_end_to_end_and_deploys_when_the_gate_passes(passing_run):
    cfg, outputs, run_dir = passing_run
    assert outputs["deployable"] is True
    assert 0.0 <= outputs["metrics"]["accuracy"] <= 1.0 and "mean_iou" in outputs["metrics"]

    # evaluate's artifacts: the confusion matrix over the dataset's classes, and the HTML report
    evaluate = _executor_output(run_dir, "evaluate")["artifacts"]
    (classification,) = evaluate["classification"]["artifacts"]
    matrix = classification["metadata"]["confusionMatrix"]
    assert len(matrix["rows"]) == len(matrix["annotationSpecs"]) >= 2
    test_rows = json.loads((run_dir / "prepare-data" / "dataset").read_text())["rows"]["test"]
    assert sum(sum(row["row"]) for row in matrix["rows"]) == min(test_rows, EVALUATE["limit"])
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


def test_gate_blocks_deploy_when_the_threshold_is_above_the_reached_metric(passing_run, kfp_local):
    cfg, outputs, _ = passing_run
    # This run takes the pipeline's other branch, a Ray Tune sweep of two fusions (FIFO, no
    # ablation), and a threshold above any reachable accuracy, so the gate must block.
    blocked = dataclasses.replace(
        cfg,
        gates={"accuracy": 1.01},
        registry_uri=f"{cfg.registry_uri}-blocked",
        use_tune=True,
        search_space={"model.fusion": ["concat", "image_only"]},
        tune_config={
            "train": {k: v for k, v in TRAIN.items() if k != "data"},
            "data": TRAIN["data"],
            "search": "grid",
            "scheduler": "fifo",
            "seeds": 0,
        },
    )
    blocked_outputs, run_dir = _run(blocked, kfp_local)
    assert (run_dir / "tune").exists() and not (run_dir / "train").exists()
    leaderboard = (run_dir / "tune" / "leaderboard").read_text()
    assert "2 trials" in leaderboard and "concat" in leaderboard and "image_only" in leaderboard, leaderboard
    assert blocked_outputs["metrics"]["accuracy"] < 1.01
    assert blocked_outputs["deployable"] is False
    assert not (run_dir / "deploy").exists() and not (run_dir / "smoke-test").exists()
    assert storage.list_files(blocked.registry_uri) == []
    decision = (run_dir / "quality-gate" / "decision").read_text()
    assert decision.startswith("**Blocked**") and "accuracy" in decision
