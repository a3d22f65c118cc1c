"""The pipeline's typed config: `PipelineConfig`, one field per parameter of the Kubeflow pipeline.

``medfusion pipeline run --local`` and ``medfusion pipeline submit`` load it from YAML and dotted
overrides; the pipeline itself (``medfusion.pipelines.medfusion_pipeline``) and its run and submit
helpers (``medfusion.pipelines.run``) are wrappers above the library, which never imports them.
`training_values` and `tuning_values` lay the typed training parameters over the train and tune
steps' config dicts (what the KFP components call).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medfusion.config import FUSIONS, PRESETS, SOURCES, ConfigError, TrainConfig, check
from medfusion.loader import load_config
from medfusion.orchestration.gate import quality_gate
from medfusion.orchestration.kuberay import DEFAULT_IMAGE, KubeRayOptions, check_resource_name
from medfusion.orchestration.stages import ray_target
from medfusion.registry import DEFAULT_REGISTRY_URI

# The TrainConfig settings that are pipeline parameters of their own (typed in the KFP UI).
TYPED_TRAINING = ("epochs", "lr", "num_workers", "use_gpu")
SEARCHED_FUSION = "model.fusion"  # the search-space key of the fusion strategy
DEFAULT_GATES = {"accuracy": 0.5}  # above chance for the synthetic presets' 7 classes, below a trained model


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
    """Size preset of data and model: tiny, small, base or cxr."""
    epochs: int = TrainConfig.epochs
    """Training epochs (tune: the most epochs a trial runs)."""
    lr: float = TrainConfig.lr
    """Peak learning rate (tune: where a search space without lr starts)."""
    num_workers: int = TrainConfig.num_workers
    """Ray Train workers of a training run (each trial's, with tune)."""
    use_gpu: bool = TrainConfig.use_gpu
    """One GPU per Ray Train worker (needs GPU workers: kuberay.gpu_workers, or a GPU cluster)."""
    fusions: list[str] = field(default_factory=lambda: ["gated"])
    """Fusion strategies: the one to train, or (use_tune) the ones the sweep compares."""
    prepare_config: dict[str, Any] = field(default_factory=dict)
    """PrepareConfig fields for the prepare step, e.g. {synth: {num_samples: 600}, overwrite: true}."""
    train_config: dict[str, Any] = field(default_factory=dict)
    """Other TrainConfig fields of the train step, e.g. {zero_stage: 3, precision: bf16}."""
    use_tune: bool = False
    """Run a Ray Tune sweep (fusions, search_space) instead of one training run."""
    search_space: dict[str, Any] = field(default_factory=dict)
    """What else the sweep varies, e.g. {lr: [1e-3, 3e-4], model.dropout: {uniform: [0, 0.3]}} (use_tune only)."""
    tune_config: dict[str, Any] = field(default_factory=dict)
    """Other TuneConfig fields (use_tune only), e.g. {num_samples: 8, train: {zero_stage: 1}}."""
    evaluate_config: dict[str, Any] = field(default_factory=dict)
    """EvaluateConfig fields of the evaluate step (split, engine, limit...)."""
    gates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GATES))
    """Quality gate: {metric: minimum} over evaluate's headline metrics; deploy runs only when all pass."""
    serve_config: dict[str, Any] = field(default_factory=dict)
    """ServeConfig fields of the deployed application (device, autoscaling, limits...); model is set by deploy."""
    ray_address: str = ""
    """Where Ray runs: kuberay (a RayJob per stage, a RayService), http://HEAD:8265 (Ray Jobs API), or
    empty: embedded in each step's pod (local runs; `pipeline submit` refuses it)."""
    kuberay: KubeRayOptions = field(default_factory=KubeRayOptions)
    """The Ray clusters of ray_address=kuberay: namespace, images, GPU and CPU worker groups, their sizes
    and autoscaling, deadlines (the fields of medfusion.orchestration.kuberay.KubeRayOptions)."""
    image: str = DEFAULT_IMAGE
    """Container image of every step, and of the Ray pods unless kuberay.image says otherwise."""
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
        if isinstance(self.kuberay, Mapping):
            self.kuberay = load_config(KubeRayOptions, base=dict(self.kuberay))
        self._move_typed_settings()
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        check(bool(self.fusions), "fusions", "needs at least one fusion strategy")
        for fusion in self.fusions:
            check(fusion in FUSIONS, "fusions", f"each must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        check(
            self.use_tune or len(self.fusions) == 1,
            "fusions",
            f"the train step trains one fusion; several ({', '.join(self.fusions)}) need use_tune=true",
        )
        if ray_target(self.ray_address) == "kuberay":
            check_resource_name("RayService", self.model_name, "model_name")
        for metric, minimum in list(self.gates.items()):
            if isinstance(minimum, str):  # a dotted CLI override: gates.accuracy=0.8
                try:
                    self.gates[metric] = float(minimum)
                except ValueError:
                    raise ConfigError(f"gates.{metric}: the minimum must be a number, got {minimum!r}") from None
        quality_gate({}, self.gates)  # validates the thresholds

    def _move_typed_settings(self) -> None:
        """Settings given in the dicts (config files, `medfusion demo`) move into the typed parameters,
        so that a run shows them where the KFP UI does; the same setting given twice is an error."""
        self.train_config = copy.deepcopy(self.train_config)
        self.tune_config = copy.deepcopy(self.tune_config)
        self.search_space = dict(self.search_space)
        defaults = PipelineConfig.__dataclass_fields__
        sections = [("train_config", self.train_config), ("tune_config.train", self.tune_config.get("train", {}))]
        for where, section in sections:
            for name in TYPED_TRAINING:
                if name in section:
                    self._take(f"{where}.{name}", name, section.pop(name), defaults[name].default)
            fusion = section.get("model", {}).pop("fusion", None)
            if fusion is not None:
                self._take(f"{where}.model.fusion", "fusions", [fusion], ["gated"])
        searched = self.search_space.pop(SEARCHED_FUSION, None)
        if searched is not None:
            choices = searched.get("choice") if isinstance(searched, Mapping) else searched
            check(isinstance(choices, list), f"search_space.{SEARCHED_FUSION}", "must be a list of fusions")
            self._take(f"search_space.{SEARCHED_FUSION}", "fusions", list(choices), ["gated"])

    def _take(self, where: str, name: str, value: Any, default: Any) -> None:
        current = getattr(self, name)
        if isinstance(current, bool):  # "false" from a dotted override is no truthy string here
            value = value if isinstance(value, bool) else str(value).lower() in ("true", "yes", "1", "on")
        elif isinstance(current, list):
            value = [str(v) for v in value]
        else:
            try:
                value = type(current)(value)
            except ValueError:
                raise ConfigError(f"{where}: expected {type(current).__name__}, got {value!r}") from None
        if current != default and current != value:
            raise ConfigError(f"{where}: set the pipeline parameter {name} instead ({value!r} vs {current!r})")
        setattr(self, name, value)

    def arguments(self) -> dict[str, Any]:
        """The pipeline's arguments (its parameters have these names)."""
        return dataclasses.asdict(self)


def training_values(
    config: Mapping[str, Any], *, epochs: int, lr: float, num_workers: int, use_gpu: bool, fusions: Sequence[str]
) -> dict[str, Any]:
    """The train step's TrainConfig values: `config` with the typed parameters over it.

    Raises:
        ConfigError: more than one fusion (one training run trains one).
    """
    check(len(fusions) == 1, "fusions", f"the train step trains one fusion, got {list(fusions)} (use_tune=true)")
    values = copy.deepcopy(dict(config))
    values.update(epochs=epochs, lr=lr, num_workers=num_workers, use_gpu=use_gpu)
    values["model"] = {**values.get("model", {}), "fusion": fusions[0]}
    return values


def tuning_values(
    config: Mapping[str, Any],
    search_space: Mapping[str, Any],
    *,
    epochs: int,
    lr: float,
    num_workers: int,
    use_gpu: bool,
    fusions: Sequence[str],
) -> dict[str, Any]:
    """The tune step's TuneConfig values: the typed parameters as every trial's training settings and the
    fusions as a searched dimension, over `config` and `search_space`."""
    values = copy.deepcopy(dict(config))
    typed = {"epochs": epochs, "lr": lr, "num_workers": num_workers, "use_gpu": use_gpu}
    values["train"] = {**values.get("train", {}), **typed}
    values["search_space"] = {**search_space, SEARCHED_FUSION: list(fusions)}
    return values
