"""`make demo` / `medfusion demo`: the main job, the whole pipeline on an embedded local default.

Starts the local S3 store, then runs the Kubeflow pipeline with kfp.local (each step a subprocess
with its own embedded Ray): prepare a synthetic dataset -> tune (a Ray Tune sweep over fusion
strategies, every trial a Ray Train + DeepSpeed run, ASHA stopping the weak ones) -> evaluate the
winner -> quality gate -> register and deploy -> smoke test against Ray Serve. Prints the
leaderboard, the test metrics, one prediction with its generated findings, and where the plots are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfusion.store import DEFAULT_ROOT, Store

if TYPE_CHECKING:
    from medfusion.pipelines.run import LocalRun


@dataclass
class DemoConfig:
    """What the demo runs on."""

    samples: int = 800
    """Synthetic images to generate."""
    epochs: int = 12
    """Most epochs of each trial (ASHA may stop a trial at epochs / 2)."""
    fusions: list[str] = field(default_factory=lambda: ["gated", "concat"])
    """Fusion strategies the sweep compares (one trial each)."""
    lr: float = 3e-3
    """Peak learning rate of every trial."""
    strategy: str = "deepspeed"
    """Training strategy: deepspeed (ZeRO on CPU with gloo) or ddp."""
    gate_accuracy: float = 0.5
    """The quality gate: deploy only when test accuracy reaches this."""
    prefix: str = "s3://medfusion/demo"
    """Where the dataset, runs and registry go (the local store's bucket)."""
    pipeline_root: str = ".medfusion/pipeline"
    """Folder of every pipeline step's artifacts (kfp.local)."""
    store_root: str = DEFAULT_ROOT
    """Folder of the local store."""
    train_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra TrainConfig fields of every trial, e.g. {num_workers: 1}."""


def run_demo(cfg: DemoConfig) -> LocalRun:
    """Start the local store, run the pipeline on it with kfp.local, and print what it produced.

    Args:
        cfg: what the demo runs on.

    Returns:
        The pipeline run (its outputs, its folder, where the model was deployed).
    """
    # The demo is an entry point, like the CLI: it runs the pipeline, a wrapper above the library.
    from medfusion.orchestration.pipeline import PipelineConfig
    from medfusion.pipelines.run import run_pipeline_local

    state = Store(cfg.store_root).up()
    os.environ.update(state.env())
    print(
        f"[1/2] local S3 store at {state.endpoint} (bucket s3://{state.bucket}; `medfusion store down` stops it)",
        flush=True,
    )
    pipeline = PipelineConfig(
        dataset_uri=f"{cfg.prefix}/dataset",
        storage_uri=f"{cfg.prefix}/runs",
        registry_uri=f"{cfg.prefix}/registry",
        preset="tiny",
        prepare_config={"synth": {"num_samples": cfg.samples}, "overwrite": True},
        use_tune=True,
        search_space={"model.fusion": list(cfg.fusions)},
        tune_config={
            # One worker per trial: on 2 cores twice the optimizer steps of two workers for the same
            # time, which a dataset this small needs to learn within the demo's epochs.
            "train": {
                "epochs": cfg.epochs,
                "strategy": cfg.strategy,
                "lr": cfg.lr,
                "num_workers": 1,
                **cfg.train_overrides,
            },
            "search": "grid",
            "scheduler": "asha",
            "grace_period": max(1, cfg.epochs // 2),
            "seeds": 0,
        },
        gates={"accuracy": cfg.gate_accuracy},
    )
    print(
        f"[2/2] running the pipeline with kfp.local: prepare -> tune ({' vs '.join(cfg.fusions)}) -> evaluate -> gate "
        "-> deploy -> smoke test",
        flush=True,
    )
    result = run_pipeline_local(pipeline, cfg.pipeline_root, enable_caching=False)
    outputs, run_dir = result.outputs, Path(result.run_dir)

    _print_leaderboard(run_dir)
    metrics = outputs.get("metrics") or {}
    print("\ntest metrics of the winner:")
    for name, value in metrics.items():
        if isinstance(value, (int, float)):
            print(f"  {name:<14} {value:.4f}")
    if result.deployed_to:
        print(f"\ndeployed: {result.deployed_to} (gate accuracy >= {cfg.gate_accuracy})")
        smoke = run_dir / "smoke-test" / "executor_output.json"
        if smoke.exists():
            prediction = json.loads(smoke.read_text())["parameterValues"]["Output"]
            top = prediction.get("top_label")
            print(f"one prediction through Ray Serve: {top}  box {prediction.get('box')}")
            print(f"  generated findings: {prediction.get('findings')!r}")
    else:
        print(f"\ndeploy blocked by the quality gate (accuracy < {cfg.gate_accuracy})")
    report_uri = _step_artifact_uri(run_dir, "evaluate", "report")
    if report_uri:
        print(f"\nevaluation report and plots: {report_uri} (and the *.png beside it)")
    print(f"every step's outputs: {run_dir}")
    return result


def _step_artifact_uri(run_dir: Path, step: str, artifact: str) -> str:
    """The `uri` metadata of one output artifact of a finished kfp.local step ("" when absent)."""
    path = run_dir / step / "executor_output.json"
    if not path.exists():
        return ""
    artifacts = json.loads(path.read_text()).get("artifacts", {})
    return artifacts.get(artifact, {}).get("artifacts", [{}])[0].get("metadata", {}).get("uri", "")


def _print_leaderboard(run_dir: Path) -> None:
    """The sweep's leaderboard (best first, the table `medfusion tune` prints) and where its plots are."""
    from medfusion import storage
    from medfusion.tuning.results import leaderboard_table

    uri = _step_artifact_uri(run_dir, "tune", "leaderboard")
    if not uri:
        return
    board = json.loads(storage.read_text(uri))
    print(f"\nleaderboard ({uri}):")
    print(leaderboard_table(board["trials"], list(board["search_space"]), board["pareto_metrics"]))
    sweep = uri.rsplit("/", 1)[0]
    print(f"plots: {sweep}/pareto.png, {sweep}/fusion_boxplots.png")
