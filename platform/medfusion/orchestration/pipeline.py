"""The pipeline's typed config: `PipelineConfig`, one field per parameter of the Kubeflow pipeline.

``medfusion pipeline run --local`` and ``medfusion pipeline submit`` load it from YAML and dotted
overrides; the pipeline itself (``medfusion.pipelines.medfusion_pipeline``) and its run and submit
helpers (``medfusion.pipelines.run``) are wrappers above the library, which never imports them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from medfusion.config import PRESETS, SOURCES, ConfigError, check
from medfusion.orchestration.gate import quality_gate
from medfusion.orchestration.kuberay import DEFAULT_IMAGE
from medfusion.orchestration.stages import ray_target
from medfusion.registry import DEFAULT_REGISTRY_URI


@dataclass
class PipelineConfig:
    """The parameters of the Kubeflow pipeline (pipelines/medfusion_pipeline.py), one field each."""

    source: str = "synthetic"
    """Dataset source of the prepare step: synthetic, manifest (CSV/JSONL) or iu_xray."""
    source_uri: str = ""
    """The manifest file or the IU X-Ray folder (path or s3://); unused for synthetic."""
    dataset_uri: str = "s3://medfusion/datasets/pipeline"
    """Where the prepare step writes the dataset (path or s3://); a rerun needs prepare_config.overwrite."""
    storage_uri: str = "s3://medfusion/runs"
    """Where training and tuning write their run folders (path or s3://)."""
    registry_uri: str = DEFAULT_REGISTRY_URI
    """Model registry root: deploy publishes the approved export to <registry_uri>/<model_name>/<version>."""
    model_name: str = "medfusion"
    """Name of the published model, the Serve application and the RayService."""
    preset: str = "tiny"
    """Size preset of data and model: tiny, small or base."""
    prepare_config: dict[str, Any] = field(default_factory=dict)
    """PrepareConfig fields for the prepare step, e.g. {synth: {num_samples: 600}, overwrite: true}."""
    train_config: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields for the train step, e.g. {epochs: 3, num_workers: 2}."""
    use_tune: bool = False
    """Run a Ray Tune sweep (search_space) instead of one training run."""
    search_space: dict[str, Any] = field(default_factory=dict)
    """Tune's search space, e.g. {model.fusion: [concat, gated], lr: [1e-3, 3e-4]} (use_tune only)."""
    tune_config: dict[str, Any] = field(default_factory=dict)
    """Other TuneConfig fields (use_tune only)."""
    evaluate_config: dict[str, Any] = field(default_factory=dict)
    """EvaluateConfig fields of the evaluate step (split, engine, limit...)."""
    gates: dict[str, float] = field(default_factory=lambda: {"accuracy": 0.0})
    """Quality gate: {metric: minimum} over evaluate's headline metrics; deploy runs only when all pass."""
    serve_config: dict[str, Any] = field(default_factory=dict)
    """ServeConfig fields of the deployed application (device, autoscaling, limits...); model is set by deploy."""
    ray_address: str = ""
    """Where Ray runs: empty (embedded, local runs), http://HEAD:8265 (Ray Jobs API) or kuberay (RayJob/RayService)."""
    namespace: str = ""
    """Kubernetes namespace of RayJobs and the RayService (ray_address=kuberay); empty: the step's own."""
    image: str = DEFAULT_IMAGE
    """Container image of every step and of the Ray pods (the project's Dockerfile, pushed to your registry)."""
    serve_url: str = ""
    """Where the deployed application answers (Jobs API target); empty: the head's port 8000."""

    def __post_init__(self) -> None:
        check(self.source in SOURCES, "source", f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        check(
            self.source == "synthetic" or bool(self.source_uri), "source_uri", f"is required for source={self.source}"
        )
        check(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name in ("dataset_uri", "storage_uri", "registry_uri", "model_name", "image"):
            check(bool(getattr(self, name)), name, "is required")
        check(not self.use_tune or bool(self.search_space), "search_space", "is required with use_tune=true")
        ray_target(self.ray_address)
        for metric, minimum in list(self.gates.items()):
            if isinstance(minimum, str):  # a dotted CLI override: gates.accuracy=0.8
                try:
                    self.gates[metric] = float(minimum)
                except ValueError:
                    raise ConfigError(f"gates.{metric}: the minimum must be a number, got {minimum!r}") from None
        quality_gate({}, self.gates)  # validates the thresholds

    def arguments(self) -> dict[str, Any]:
        """The pipeline's arguments (its parameters have these names)."""
        return dataclasses.asdict(self)
