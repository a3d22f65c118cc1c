"""`make demo` / `medfusion demo`: the main job, the whole pipeline on an embedded local default.

Starts the local S3 store, then runs the Kubeflow pipeline with kfp.local (each step a subprocess
with its own embedded Ray): prepare a synthetic dataset -> train (Ray Train + DeepSpeed) ->
evaluate -> quality gate -> deploy to the registry -> smoke test against Ray Serve. Prints the test
metrics, one prediction with its generated findings, and where the report and plots are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfusion.store import DEFAULT_ROOT, Store


@dataclass
class DemoConfig:
    """What the demo runs on."""

    samples: int = 800
    """Synthetic images to generate."""
    epochs: int = 12
    """Training epochs."""
    strategy: str = "deepspeed"
    """Training strategy: deepspeed (ZeRO on CPU with gloo) or ddp."""
    gate_accuracy: float = 0.3
    """The quality gate: deploy only when test accuracy reaches this."""
    prefix: str = "s3://medfusion/demo"
    """Where the dataset, runs and registry go (the local store's bucket)."""
    pipeline_root: str = ".medfusion/pipeline"
    """Folder of every pipeline step's artifacts (kfp.local)."""
    store_root: str = DEFAULT_ROOT
    """Folder of the local store."""
    train_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra TrainConfig fields, e.g. {num_workers: 2}."""


def run_demo(cfg: DemoConfig) -> dict:
    from medfusion.orchestration import PipelineConfig, run_pipeline_local

    state = Store(cfg.store_root).up()
    os.environ.update(state.env())
    print(f"[1/2] local S3 store at {state.endpoint} (bucket s3://{state.bucket}; `medfusion store down` stops it)", flush=True)
    pipeline = PipelineConfig(
        dataset_uri=f"{cfg.prefix}/dataset",
        storage_uri=f"{cfg.prefix}/runs",
        registry_uri=f"{cfg.prefix}/registry",
        preset="tiny",
        prepare_config={"synth": {"num_samples": cfg.samples}, "overwrite": True},
        train_config={"epochs": cfg.epochs, "strategy": cfg.strategy, **cfg.train_overrides},
        gates={"accuracy": cfg.gate_accuracy},
    )
    print("[2/2] running the pipeline with kfp.local: prepare -> train -> evaluate -> gate -> deploy -> smoke test", flush=True)
    result = run_pipeline_local(pipeline, cfg.pipeline_root, enable_caching=False)
    outputs, run_dir = result["outputs"], Path(result["run_dir"])

    metrics = outputs.get("metrics") or {}
    print("\ntest metrics:")
    for name, value in metrics.items():
        if isinstance(value, (int, float)):
            print(f"  {name:<14} {value:.4f}")
    if result["deployed_to"]:
        print(f"\ndeployed: {result['deployed_to']} (gate accuracy >= {cfg.gate_accuracy})")
        smoke = run_dir / "smoke-test" / "executor_output.json"
        if smoke.exists():
            prediction = json.loads(smoke.read_text())["parameterValues"]["Output"]
            top = prediction.get("top_label")
            print(f"one prediction through Ray Serve: {top}  box {prediction.get('box')}")
            print(f"  generated findings: {prediction.get('findings')!r}")
    else:
        print(f"\ndeploy blocked by the quality gate (accuracy < {cfg.gate_accuracy})")
    report = run_dir / "evaluate" / "executor_output.json"
    if report.exists():
        artifacts = json.loads(report.read_text()).get("artifacts", {})
        uri = artifacts.get("report", {}).get("artifacts", [{}])[0].get("metadata", {}).get("uri", "")
        if uri:
            print(f"\nreport and plots: {uri} (and the *.png beside it)")
    print(f"every step's outputs: {run_dir}")
    return result
