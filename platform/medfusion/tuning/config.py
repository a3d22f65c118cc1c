"""The tune stage's schema: `TuneConfig` (a sweep: its search space, search, scheduler, ablation).

Apart from `medfusion.config` because checking a sweep needs the search-space parser
(`medfusion.tuning.space`), which needs the TrainConfig schema: with TuneConfig in
`medfusion.config`, the two modules imported each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medfusion.config import DataConfig, ModelConfig, ObjectiveConfig, check
from medfusion.registry import DEFAULT_REGISTRY_URI
from medfusion.tuning.results import is_number
from medfusion.tuning.space import check_tune_config

SEARCH_ALGORITHMS = ("optuna", "random", "grid")
TUNE_SCHEDULERS = ("asha", "fifo")


@dataclass
class TuneConfig:
    """The tune stage: a Ray Tune sweep in which every trial is a Ray Train + DeepSpeed run."""

    dataset_uri: str = ""
    """Dataset root (local path or s3://) holding manifest.json, as written by `medfusion data`."""
    storage_uri: str = "s3://medfusion/sweeps"
    """Where sweeps are stored (local folder or s3://); a sweep's folder is <storage_uri>/<name>."""
    name: str = ""
    """Sweep name (its folder under storage_uri); empty makes tune-<UTC time>-<random>."""
    resume: bool = False
    """Continue the interrupted sweep <storage_uri>/<name>: finished trials are kept, unfinished and
    errored ones run again (from their newest checkpoint)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture of every trial (the preset fills it; search_space varies it)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input pipeline of every trial; data.batch_size is the batch per worker."""
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig settings shared by every trial (any `medfusion train` setting but dataset_uri,
    storage_uri, name, resume, ray_address, model and data), e.g. {epochs: 4, num_workers: 1,
    cpus_per_worker: 1}. train.epochs is the most epochs a trial runs. Tune's own defaults:
    evaluate=false, patience=0 (ASHA stops trials), select_metric=val_objective, keep_checkpoints=1."""
    search_space: dict[str, Any] = field(default_factory=dict)
    """What the sweep varies, one dotted setting each: {model.fusion: {choice: [concat, gated]},
    train.lr: {loguniform: [1.0e-4, 3.0e-3]}, model.dropout: {uniform: [0.0, 0.3]},
    model.hidden_dim: {randint: [32, 128]}, zero_stage: [1, 2]} (a list is a choice; keys are
    model.*, data.* or train.* settings, train. may be left out). Merged over search_space_file."""
    search_space_file: str = ""
    """A YAML file (path or s3://) holding a search space, or the name of one shipped in
    medfusion/configs/search_spaces (tiny: every fusion strategy, lr, ZeRO stage, sizes, dropout, loss weights)."""
    search: str = "optuna"
    """How trial configs are picked: optuna (model-based TPE, through Ray Tune's OptunaSearch; random
    search when optuna is not installed), random, or grid (every combination of the choices)."""
    search_seed: int = 0
    """Seed of the search algorithm (optuna's sampler, random sampling)."""
    scheduler: str = "asha"
    """asha (stop a trial whose objective trails the others' at a rung: epochs grace_period x
    reduction_factor^k before the last) or fifo (every trial runs all its epochs)."""
    num_samples: int = 0
    """Trials to run (optuna, random), or repetitions of the grid (grid); 0: 8, or the grid once."""
    max_concurrent_trials: int = 1
    """Trials running at once; 0: as many as the cluster's CPUs and GPUs hold (each trial needs
    trial_cpus + train.num_workers x train.cpus_per_worker CPUs, and its GPUs)."""
    trial_cpus: float = 0.0
    """CPUs reserved for each trial's driver (the Tune function that runs the TorchTrainer); it mostly
    waits, so 0 lets the Train workers and Ray Data have the cores."""
    trial_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each trial's driver reserves besides trial_cpus, to choose the nodes it
    runs on: e.g. {trial-driver: 1} with a head that advertises trial-driver: 1000 keeps every driver
    on the head, so a lost worker node (a spot instance reclaimed) takes only the Train workers of the
    trials on it, and those trials are retried (max_failures), never the others."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it may be stopped."""
    reduction_factor: float = 2.0
    """ASHA: at each rung only the best 1/reduction_factor of the trials continue."""
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig())
    """The score trials are ranked by (maximized), and the metrics of the Pareto front."""
    max_failures: int = 1
    """Retries of a failed trial (Tune FailureConfig; a retry continues from the trial's newest
    checkpoint); a trial that still fails is recorded as errored and the sweep goes on."""
    seeds: int = 3
    """Ablation: train the best configuration of the fused strategies, of image_only and of text_only
    (their own best trials; the fused configuration with the fusion swapped when the sweep has none)
    with this many seeds each and compare them on the test split (mean +- 95% CI); 0 skips it."""
    ablation_epochs: int = 0
    """Epochs of each ablation run; 0: train.epochs."""
    register: bool = True
    """Register the best trial's export in the model registry at registry_uri."""
    registry_uri: str = DEFAULT_REGISTRY_URI
    """Model registry root (local path or s3://)."""
    model_name: str = "medfusion"
    """Name the best model is registered under."""
    interrupt_after_trials: int = 0
    """Testing: interrupt the sweep (as Ctrl-C does) once this many trials have finished; 0 never."""

    def __post_init__(self) -> None:
        check(
            "/" not in self.name and self.name not in (".", ".."),
            "name",
            f"must be a single folder name, got {self.name!r}",
        )
        check(not self.resume or bool(self.name), "name", "is required with resume=true (the sweep to continue)")
        check(
            self.search in SEARCH_ALGORITHMS,
            "search",
            f"must be one of {', '.join(SEARCH_ALGORITHMS)}, got {self.search!r}",
        )
        check(
            self.scheduler in TUNE_SCHEDULERS,
            "scheduler",
            f"must be one of {', '.join(TUNE_SCHEDULERS)}, got {self.scheduler!r}",
        )
        check(self.num_samples >= 0, "num_samples", f"must be >= 0 (0 = default), got {self.num_samples}")
        check(
            self.max_concurrent_trials >= 0,
            "max_concurrent_trials",
            f"must be >= 0 (0 = as resources allow), got {self.max_concurrent_trials}",
        )
        check(self.trial_cpus >= 0, "trial_cpus", f"must be >= 0, got {self.trial_cpus}")
        for resource, amount in self.trial_resources.items():
            check(
                resource not in ("CPU", "GPU", "cpu", "gpu", "memory"),
                f"trial_resources.{resource}",
                "must be a custom resource (trial_cpus reserves CPUs; train.use_gpu the workers' GPUs)",
            )
            check(
                is_number(amount) and amount > 0,
                f"trial_resources.{resource}",
                f"must be a number > 0, got {amount!r}",
            )
        check(self.grace_period >= 1, "grace_period", f"must be >= 1, got {self.grace_period}")
        check(self.reduction_factor > 1, "reduction_factor", f"must be > 1, got {self.reduction_factor}")
        check(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        check(
            self.seeds == 0 or self.seeds >= 2,
            "seeds",
            f"must be 0 (no ablation) or >= 2 (for a confidence interval), got {self.seeds}",
        )
        check(
            self.ablation_epochs >= 0, "ablation_epochs", f"must be >= 0 (0 = train.epochs), got {self.ablation_epochs}"
        )
        check(not self.register or bool(self.registry_uri), "registry_uri", "is required with register=true")
        check(not self.register or bool(self.model_name), "model_name", "is required with register=true")
        check(self.interrupt_after_trials >= 0, "interrupt_after_trials", "must be >= 0 (0 = never)")
        # The trial settings and the inline search space (the file is read by run_tune); dotted
        # overrides arrive as strings, so the train section is kept as the typed values it checked.
        self.train = check_tune_config(self)
