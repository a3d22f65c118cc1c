"""The pipeline compiles, matches its checked-in YAML, and takes exactly PipelineConfig's parameters."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import yaml

from medfusion.orchestration.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "pipelines" / "medfusion_pipeline.yaml"


def _documents(path: Path) -> list[dict]:
    """The pipeline spec, then the platform spec (kfp-kubernetes: the Secrets of the step pods)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _spec(path: Path = COMPILED) -> dict:
    return _documents(path)[0]


def _compile(tmp_path: Path) -> list[dict]:
    from medfusion.pipelines.medfusion_pipeline import compile_pipeline

    return _documents(Path(compile_pipeline(str(tmp_path / "pipeline.yaml"))))


def test_checked_in_yaml_is_current(tmp_path):
    fresh = _compile(tmp_path)
    assert fresh == _documents(COMPILED), (
        "pipelines/medfusion_pipeline.yaml is stale: run `python -m medfusion.pipelines.medfusion_pipeline`"
    )


def test_compiles_from_the_command_line(tmp_path):
    out = tmp_path / "p.yaml"
    subprocess.run(
        [sys.executable, "-m", "medfusion.pipelines.medfusion_pipeline", str(out)], check=True, capture_output=True
    )
    assert _spec(out)["pipelineInfo"]["name"] == "medfusion"


def test_parameters_are_pipeline_config_fields_with_the_same_defaults():
    spec = _spec()
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    defaults = dataclasses.asdict(PipelineConfig())
    assert set(parameters) == set(defaults)
    for name, parameter in parameters.items():
        assert parameter.get("defaultValue", "") == defaults[name] or (
            parameter.get("defaultValue") is None and defaults[name] in ("", {}, False)
        ), name


def _tasks(spec: dict) -> dict[str, dict]:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_steps_caching_and_retries_are_deliberate():
    tasks = _tasks(_spec())
    cached = {
        name: t.get("cachingOptions", {}).get("enableCache", False)
        for name, t in tasks.items()
        if "componentRef" in t and not name.startswith("condition")
    }
    assert cached == {
        "prepare-data": True,
        "tune": True,
        "train": True,
        "evaluate": True,
        "quality-gate": False,
        "deploy": False,
        "smoke-test": False,
    }
    retries = {name: t.get("retryPolicy", {}).get("maxRetryCount", 0) for name, t in tasks.items() if name in cached}
    assert retries == {
        "prepare-data": 2,
        "tune": 2,
        "train": 2,
        "evaluate": 2,
        "quality-gate": 0,
        "deploy": 1,
        "smoke-test": 2,
    }


def test_tune_or_train_and_the_gate_are_conditions():
    spec = _spec()
    conditions = [
        t["triggerPolicy"]["condition"] for t in _tasks(spec).values() if t.get("triggerPolicy", {}).get("condition")
    ]
    assert any("use_tune" in c and "== true" in c for c in conditions), conditions
    assert any("use_tune" in c and "!(" in c for c in conditions), conditions  # the Else branch
    assert any("quality-gate-Output" in c for c in conditions), conditions
    tasks = _tasks(spec)
    # deploy and the smoke test live inside the gate's branch, not in the root DAG
    assert "deploy" not in spec["root"]["dag"]["tasks"] and "deploy" in tasks and "smoke-test" in tasks


def test_every_step_runs_on_the_image_parameter():
    spec = _spec()
    for name, executor in spec["deploymentSpec"]["executors"].items():
        assert executor["container"]["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}", name
