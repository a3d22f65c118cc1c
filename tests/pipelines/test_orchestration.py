"""medfusion.orchestration: targets, configs, the quality gate, the remote side's CLI, artifacts, deploying to the
registry; medfusion.pipelines.run's submit."""

from __future__ import annotations

import base64
import json

import pytest
from pipeline_gates import GATES, MEASURED, untrained_metrics

from medfusion.config import ConfigError, PrepareConfig, TrainConfig
from medfusion.orchestration import artifacts, deploy, gate, stages
from medfusion.orchestration.pipeline import PipelineConfig
from medfusion.pipelines.run import SubmittedRun, submit_pipeline


@pytest.mark.parametrize(
    "address,target",
    [("", "embedded"), ("http://127.0.0.1:8265", "jobs"), ("https://ray.example.com", "jobs"), ("kuberay", "kuberay")],
)
def test_ray_target(address, target):
    assert stages.ray_target(address) == target


@pytest.mark.parametrize("address", ["ray://head:10001", "auto", "127.0.0.1:8265"])
def test_ray_target_rejects_with_the_allowed_values(address):
    with pytest.raises(ConfigError, match=r"ray_address: must be empty .* http://HEAD:8265 .* 'kuberay'"):
        stages.ray_target(address)


def test_build_config_applies_the_preset_under_explicit_values():
    cfg = stages.build_config(
        "train", {"preset": "tiny", "dataset_uri": "d", "model": {"fusion": "concat"}, "ray_address": "http://x:8265"}
    )
    assert isinstance(cfg, TrainConfig) and cfg.model.fusion == "concat" and cfg.model.preset == "tiny"
    assert cfg.ray_address == "", "the pipeline's target decides where train runs"
    prepare = stages.build_config("prepare", {"preset": "tiny", "output_uri": "o", "synth": {"num_samples": 50}})
    assert isinstance(prepare, PrepareConfig) and prepare.synth.num_samples == 50


@pytest.mark.parametrize(
    "stage,values,message",
    [
        ("fit", {}, "stage: must be one of"),
        ("train", {"epochs": 0}, "epochs: must be >= 1"),
        ("prepare", {"source": "x"}, "source: must be one of"),
    ],
)
def test_build_config_errors_name_the_field(stage, values, message):
    with pytest.raises(ConfigError, match=message):
        stages.build_config(stage, values)


@pytest.mark.parametrize(
    "metrics,gates,passed",
    [
        ({"accuracy": 0.8, "mean_iou": 0.5}, {"accuracy": 0.8}, True),
        ({"accuracy": 0.8, "mean_iou": 0.5}, {"accuracy": 0.81}, False),
        ({"accuracy": 0.8, "mean_iou": 0.5}, {"accuracy": 0.5, "mean_iou": 0.6}, False),
        ({"accuracy": 0.8}, {"bleu4": 0.0}, False),  # a gated metric that was not reported fails
    ],
)
def test_quality_gate(metrics, gates, passed):
    result = gate.quality_gate(metrics, gates)
    assert result.passed is passed
    assert result.summary().startswith("PASS" if passed else "BLOCKED")


@pytest.mark.parametrize("zeroed", [False, True], ids=["initial-weights", "zeroed-weights"])
def test_the_pipeline_tests_gate_blocks_a_model_that_learned_nothing(zeroed):
    metrics = untrained_metrics(zeroed=zeroed)
    assert metrics["accuracy"] <= 0.25, metrics["accuracy"]  # chance is 1/7: a guess of one class, mostly
    result = gate.quality_gate(metrics, GATES)
    assert not result.passed, result.summary()
    # ... while every measured run of the fit those tests deploy passes their gate
    assert MEASURED and all(gate.quality_gate({"accuracy": a}, GATES).passed for a in MEASURED.values())


@pytest.mark.parametrize(
    "gates,message", [({}, "at least one"), ({"accuracy": "high"}, "gates.accuracy: the minimum must be a number")]
)
def test_quality_gate_config_errors(gates, message):
    with pytest.raises(ConfigError, match=message):
        gate.quality_gate({"accuracy": 1.0}, gates)


def test_pipeline_config_validates():
    assert PipelineConfig().arguments()["gates"] == {"accuracy": 0.5}
    with pytest.raises(ConfigError, match="fusions: the train step trains one fusion"):
        PipelineConfig(fusions=["concat", "gated"])
    assert PipelineConfig(use_tune=True, fusions=["concat", "gated"]).use_tune  # the sweep compares the fusions
    with pytest.raises(ConfigError, match="ray_address"):
        PipelineConfig(ray_address="head:8265")
    with pytest.raises(ConfigError, match="source_uri: is required for source=manifest"):
        PipelineConfig(source="manifest")


def test_entrypoint_round_trips_through_the_remote_cli(tmp_path):
    # What a Ray job or a RayJob runs: `python -m medfusion.orchestration STAGE ...`, here in-process.
    values = {
        "source": "synthetic",
        "output_uri": str(tmp_path / "data"),
        "preset": "tiny",
        "synth": {"num_samples": 40},
    }
    result_uri = str(tmp_path / "_results" / "prepare.json")
    argv = stages.stage_entrypoint("prepare", values, result_uri).split()
    assert argv[:4] == ["python", "-m", "medfusion.orchestration", "prepare"]
    assert json.loads(base64.urlsafe_b64decode(argv[argv.index("--config-b64") + 1])) == values
    assert stages.main(argv[3:]) == 0
    result = json.loads((tmp_path / "_results" / "prepare.json").read_text())
    assert result["dataset_uri"] == str(tmp_path / "data") and sum(result["rows"].values()) == 40


def test_remote_cli_reports_config_errors(tmp_path, capsys):
    payload = base64.urlsafe_b64encode(json.dumps({"source": "nope"}).encode()).decode()
    assert stages.main(["prepare", "--config-b64", payload, "--result-uri", str(tmp_path / "r.json")]) == 2
    assert "source: must be one of" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


class _Artifact:
    def __init__(self, path):
        self.path, self.uri, self.metadata, self.logged = str(path), str(path), {}, {}

    def log_metric(self, key, value):
        self.logged[key] = value


def test_artifacts_carry_the_data_uri_and_no_numbers_in_metadata(tmp_path):
    artifact = _Artifact(tmp_path / "a" / "dataset")
    artifacts.record_artifact(
        artifact, "s3://b/data", {"dataset_uri": "s3://b/data", "version": "v1", "rejected": 0, "rows": {"train": 3}}
    )
    assert artifact.metadata == {"uri": "s3://b/data", "dataset_uri": "s3://b/data", "version": "v1"}
    assert artifacts.artifact_uri(artifact) == "s3://b/data"
    assert json.loads((tmp_path / "a" / "dataset").read_text())["rows"] == {"train": 3}
    metrics = _Artifact(tmp_path / "m")
    logged = artifacts.log_result_metrics(
        metrics,
        {
            "best_value": 0.5,
            "epochs_run": 2,
            "stopped_early": False,
            "test_metrics": {"accuracy": 0.7, "x": float("nan")},
        },
    )
    assert logged == {"best_value": 0.5, "epochs_run": 2.0, "test_accuracy": 0.7}


def test_leaderboard_artifact_is_the_cli_table(tmp_path):
    trial = {
        "rank": 1,
        "trial_id": "t1",
        "fusion": "gated",
        "params": {"model.fusion": "gated", "lr": 0.003},
        "val_accuracy": 0.7,
        "objective": 1.2,
        "epochs_run": 4,
        "stopped_early": False,
        "status": "TERMINATED",
        "config_dump": {"deep": 1},
    }
    board = {
        "search_space": {"model.fusion": "choice", "lr": "loguniform"},
        "pareto_metrics": ["val_accuracy"],
        "trials": [trial, {**trial, "rank": 2, "trial_id": "t2", "fusion": "concat", "stopped_early": True}],
    }
    (tmp_path / "leaderboard.json").write_text(json.dumps(board))
    artifact = _Artifact(tmp_path / "out" / "leaderboard")
    artifacts.write_leaderboard(artifact, str(tmp_path / "leaderboard.json"))
    text = (tmp_path / "out" / "leaderboard").read_text()
    header = next(line for line in text.splitlines() if line.startswith("#"))
    assert header.split()[:4] == ["#", "trial", "fusion", "lr"] and "objective" in header and "config_dump" not in text
    assert (
        text.index("t1") < text.index("t2")
        and "2 trials" in text
        and artifact.metadata["uri"].endswith("leaderboard.json")
    )


def test_pipeline_config_from_cli_overrides():
    from medfusion.loader import load_config

    cfg = load_config(
        PipelineConfig,
        overrides=["gates.accuracy=0.8", "train_config.epochs=2", "use_tune=false", "ray_address=kuberay"],
    )
    assert cfg.gates == {"accuracy": 0.8} and cfg.ray_address == "kuberay"
    assert cfg.epochs == 2 and "epochs" not in cfg.train_config  # moved into the typed parameter
    with pytest.raises(ConfigError, match="gates.accuracy: the minimum must be a number, got 'high'"):
        load_config(PipelineConfig, overrides=["gates.accuracy=high"])


def test_submit_pipeline_uses_kfp_client(monkeypatch):
    import kfp

    calls = {}

    class FakeClient:
        def __init__(self, **kwargs):
            calls["client"] = kwargs

        def create_run_from_pipeline_func(self, func, **kwargs):
            calls["run"] = {"func": func.name, **kwargs}
            return type("Result", (), {"run_id": "run-123"})()

    monkeypatch.setattr(kfp, "Client", FakeClient)
    cfg = PipelineConfig(ray_address="kuberay", kuberay={"namespace": "team-a"})
    submitted = submit_pipeline(
        cfg,
        "https://kfp.example.com/pipeline",
        namespace="team-a",
        existing_token="t0k",
        service_account="medfusion-pipeline",
    )
    assert submitted == SubmittedRun(run_id="run-123", url="https://kfp.example.com/pipeline/#/runs/details/run-123")
    assert calls["client"]["host"] == "https://kfp.example.com/pipeline" and calls["client"]["existing_token"] == "t0k"
    assert calls["run"]["func"] == "medfusion" and calls["run"]["arguments"] == cfg.arguments()
    assert calls["run"]["service_account"] == "medfusion-pipeline" and calls["run"]["namespace"] == "team-a"


MODULES = ("stages", "jobs", "kuberay", "artifacts", "gate", "deploy", "pipeline")
HEAVY = (
    "torch",
    "ray",
    "kfp",
    "kubernetes",
    "deepspeed",
    "medfusion.serve",
    "medfusion.pipelines",
    "medfusion.components",
)


def test_import_starts_nothing_heavy_and_no_wrapper(tmp_path):
    import subprocess
    import sys

    modules = ", ".join(f"medfusion.orchestration.{m}" for m in MODULES)
    code = f"import sys, {modules}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "stage,values,root",
    [
        ("prepare", {"output_uri": "s3://b/datasets/d1"}, "s3://b/datasets/_results"),
        ("train", {"dataset_uri": "s3://b/datasets/d1", "storage_uri": "s3://b/runs"}, "s3://b/runs/_results"),
        (
            "evaluate",
            {"model_uri": "s3://b/runs/r1/model", "data_uri": "s3://b/datasets/d1"},
            "s3://b/runs/r1/_results",
        ),
    ],
)
def test_remote_results_go_beside_the_outputs_never_into_the_dataset(stage, values, root):
    assert stages._default_result_root(stages.build_config(stage, values)) == root


def test_deploy_registers_the_export_and_keeps_the_serve_config_out_of_the_version(tmp_path):
    import torch
    import yaml

    from medfusion import registry, storage
    from medfusion.config import DataConfig
    from medfusion.data.tokenizer import Tokenizer
    from medfusion.export import export_model, verify_export
    from medfusion.models import create_model

    tokenizer = Tokenizer.build(["a small opacity in the left lung"])
    torch.manual_seed(0)
    model = create_model("medfusion_tiny", len(tokenizer), 3)
    export = export_model(
        model,
        str(tmp_path / "export"),
        tokenizer=tokenizer,
        classes=["a", "b", "c"],
        data_settings=DataConfig(image_size=64),
        lineage={"dataset_version": "d1"},
    )
    root = str(tmp_path / "registry")
    first = deploy.deploy(export, root, "medfusion", {"device": "cpu"})
    again = deploy.deploy(export, root, "medfusion", {"device": "cpu"})  # republishing is a no-op
    latest = registry.get_version(root, "medfusion")
    assert first.model_uri == again.model_uri == latest.uri and latest.is_latest and first.target == "embedded"
    assert [v.version for v in registry.list_versions(root)] == [latest.version]
    assert first.serve_config_uri == storage.join(
        root, "medfusion", deploy.DEPLOYMENTS_DIR, latest.version, "serve_config.yaml"
    )
    app = yaml.safe_load(storage.read_text(first.serve_config_uri))["applications"][0]
    assert app["args"]["model"] == latest.uri and app["name"] == "medfusion"
    assert "serve_config.yaml" not in {p.rsplit("/", 1)[-1] for p in storage.list_files(latest.uri)}
    verify_export(latest.uri)


def test_submit_names_the_host_when_kfp_is_unreachable_or_refuses():
    import http.server
    import threading

    from medfusion.store import free_port

    cfg = PipelineConfig(ray_address="kuberay")
    with pytest.raises(
        ConnectionError, match=r"--host http://127.0.0.1:\d+/pipeline: cannot reach the Kubeflow Pipelines API"
    ):
        submit_pipeline(cfg, f"http://127.0.0.1:{free_port()}/pipeline")

    class Unauthorized(http.server.BaseHTTPRequestHandler):
        def _deny(self):
            self.send_response(401, "Unauthorized")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "no token"}')

        do_GET = do_POST = _deny

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConnectionError, match=r"answered 401 Unauthorized \(check --existing-token"):
            submit_pipeline(cfg, f"http://127.0.0.1:{server.server_port}/pipeline", namespace="team-a")
    finally:
        server.shutdown()
        server.server_close()
