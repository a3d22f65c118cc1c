"""Typed configuration for every stage.

Each stage takes one dataclass. A field's docstring (the string literal right under it) becomes its
``--help`` text; validation lives in ``__post_init__`` and names the field and the allowed values.
YAML files are partial overrides of the defaults, and the CLI accepts dotted overrides such as
``data.image_size=64``. Presets (``tiny``, ``small``, ``base``) are YAML files in
``medfusion/configs/presets`` applied before the user's file.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

PRESETS = ("tiny", "small", "base")
SOURCES = ("synthetic", "manifest", "iu_xray")
FUSIONS = ("concat", "gated", "bilinear", "cross_attention", "image_only", "text_only")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{name}: {message}")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """Parameters of the procedural chest-radiograph generator."""

    num_samples: int = 600
    """Number of images to generate (all splits together)."""
    image_size: int = 128
    """Side of the square images in pixels."""
    classes: list[str] = field(
        default_factory=lambda: [
            "normal",
            "pneumonia",
            "tuberculosis",
            "benign_nodule",
            "malignant_nodule",
            "pleural_effusion",
            "cardiomegaly",
        ]
    )
    """Classes to generate, a subset of the generator's catalogue (medfusion.data.synth.CATALOGUE)."""
    class_weights: list[float] = field(default_factory=list)
    """Relative frequency per class in `classes` order; empty means balanced."""
    label_noise: float = 0.0
    """Fraction of samples whose label is replaced by a random other class (the image and text stay)."""
    images_per_patient: int = 2
    """Average number of studies per synthetic patient (patients drive the split)."""
    seed: int = 0
    """Seed; the whole dataset is a deterministic function of it and the fields above."""

    def __post_init__(self) -> None:
        _check(self.num_samples > 0, "synth.num_samples", f"must be > 0, got {self.num_samples}")
        _check(16 <= self.image_size <= 1024, "synth.image_size", f"must be in [16, 1024], got {self.image_size}")
        _check(len(self.classes) >= 2, "synth.classes", "needs at least 2 classes")
        _check(len(set(self.classes)) == len(self.classes), "synth.classes", "has duplicates")
        _check(
            not self.class_weights or len(self.class_weights) == len(self.classes),
            "synth.class_weights",
            f"needs one weight per class ({len(self.classes)}), got {len(self.class_weights)}",
        )
        _check(all(w >= 0 for w in self.class_weights), "synth.class_weights", "must be >= 0")
        _check(0.0 <= self.label_noise < 1.0, "synth.label_noise", f"must be in [0, 1), got {self.label_noise}")
        _check(self.images_per_patient >= 1, "synth.images_per_patient", "must be >= 1")


@dataclass
class SplitConfig:
    """How rows without an explicit `split` are assigned, always by patient."""

    val: float = 0.1
    """Fraction of patients in the validation split."""
    test: float = 0.1
    """Fraction of patients in the test split."""
    salt: str = "medfusion"
    """Salt of the patient hash; change it to draw a different split."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.val < 1.0, "split.val", f"must be in [0, 1), got {self.val}")
        _check(0.0 <= self.test < 1.0, "split.test", f"must be in [0, 1), got {self.test}")
        _check(self.val + self.test < 1.0, "split", "val + test must leave room for train")


@dataclass
class PrepareConfig:
    """The prepare stage: read a source, write Parquet shards and manifest.json."""

    source: str = "synthetic"
    """Where samples come from: synthetic, manifest (CSV/JSONL) or iu_xray."""
    source_uri: str = ""
    """The manifest file (manifest) or the dataset folder (iu_xray); unused for synthetic."""
    output_uri: str = ""
    """Dataset root to write (local path or s3://bucket/prefix)."""
    overwrite: bool = False
    """Replace an existing dataset at output_uri; otherwise a rerun is refused."""
    shard_size_mb: float = 128.0
    """Target size of one Parquet shard in MiB."""
    max_rejected_fraction: float = 0.05
    """Fail the run when more than this fraction of rows is rejected."""
    max_report_chars: int = 20000
    """Reports and findings longer than this are truncated (with a count in the manifest)."""
    vocab_size: int = 4000
    """Largest vocabulary built from the training split (special tokens included)."""
    min_token_freq: int = 1
    """Tokens seen fewer times than this in train map to <unk>."""
    classes: list[str] = field(default_factory=list)
    """Class names in index order; empty infers them from the source (sorted). A row with a label
    outside a given list is rejected."""
    iu_frontal_only: bool = True
    """iu_xray: keep frontal projections only (lateral views are a different task)."""
    image_size: int = 0
    """Resize stored images to this side (0 keeps the original size; synthetic uses synth.image_size)."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    """Generator parameters (source=synthetic)."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """Patient-level split fractions for rows without an explicit split."""

    def __post_init__(self) -> None:
        _check(self.source in SOURCES, "source", f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        _check(
            self.source == "synthetic" or bool(self.source_uri),
            "source_uri",
            f"is required for source={self.source}",
        )
        _check(self.shard_size_mb > 0, "shard_size_mb", f"must be > 0, got {self.shard_size_mb}")
        _check(
            0.0 <= self.max_rejected_fraction <= 1.0,
            "max_rejected_fraction",
            f"must be in [0, 1], got {self.max_rejected_fraction}",
        )
        _check(len(set(self.classes)) == len(self.classes), "classes", "has duplicates")
        _check(self.max_report_chars > 0, "max_report_chars", f"must be > 0, got {self.max_report_chars}")
        _check(self.vocab_size >= 8, "vocab_size", f"must be >= 8, got {self.vocab_size}")
        _check(self.image_size >= 0, "image_size", f"must be >= 0, got {self.image_size}")


@dataclass
class DataConfig:
    """How shards are read and turned into model inputs (Ray Data)."""

    image_size: int = 128
    """Side the images are resized to before the model."""
    max_report_tokens: int = 64
    """Note tokens kept (longer notes are truncated)."""
    max_findings_tokens: int = 48
    """Findings tokens kept, <bos> and <eos> included."""
    batch_size: int = 32
    """Samples per batch per worker."""
    columns_prefetch: int = 2
    """Batches prefetched ahead of the consumer (Ray Data iter_batches prefetch_batches)."""
    report_dropout: float = 0.0
    """Training only: probability of hiding the note, so the model also works on the image alone."""

    def __post_init__(self) -> None:
        _check(16 <= self.image_size <= 1024, "data.image_size", f"must be in [16, 1024], got {self.image_size}")
        _check(self.max_report_tokens >= 1, "data.max_report_tokens", "must be >= 1")
        _check(self.max_findings_tokens >= 3, "data.max_findings_tokens", "must be >= 3 (<bos> x <eos>)")
        _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.columns_prefetch >= 0, "data.columns_prefetch", "must be >= 0")
        _check(0.0 <= self.report_dropout <= 1.0, "data.report_dropout", "must be in [0, 1]")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Architecture of MedFusionModel (see medfusion.models)."""

    preset: str = "tiny"
    """Size preset the fields below were filled from: tiny, small or base."""
    in_channels: int = 1
    """Image channels (1 grayscale, 3 RGB)."""
    cnn_widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Channels of each ResNet stage; each stage halves the resolution."""
    cnn_blocks: int = 1
    """Residual blocks per stage."""
    stem_stride: int = 1
    """Stride of the stem convolution: 2 halves the resolution before the first stage, a quarter of
    the CNN's compute (the `small` preset at 128 px)."""
    embed_dim: int = 64
    """Token embedding size."""
    hidden_dim: int = 64
    """LSTM hidden size per direction, and the width of fused features."""
    fusion: str = "gated"
    """Fusion strategy: concat, gated, bilinear, cross_attention, image_only or text_only."""
    bilinear_rank: int = 32
    """Rank of the low-rank bilinear pooling (fusion=bilinear)."""
    attention_heads: int = 4
    """Heads of the cross-attention fusion."""
    decoder_dim: int = 128
    """Hidden size of the findings decoder LSTM."""
    dropout: float = 0.1
    """Dropout in the encoders and heads."""
    modality_dropout: float = 0.2
    """Training only: probability of dropping the note (image-only input) per sample."""
    multi_label: bool = False
    """Sigmoid multi-label head instead of softmax (set from the dataset manifest)."""
    loss_cls: float = 1.0
    """Weight of the classification loss."""
    box_refine_steps: int = 2
    """Steps of the box refiner, which looks again at the pixels around the box (0: no refiner)."""
    loss_box: float = 1.0
    """Weight of the localization loss (L1 + GIoU + objectness)."""
    loss_text: float = 0.5
    """Weight of the findings decoder's cross-entropy."""
    beam_size: int = 1
    """Beam width at inference (1 = greedy)."""
    max_decode_len: int = 48
    """Longest generated findings, in tokens."""

    def __post_init__(self) -> None:
        _check(self.preset in PRESETS, "model.preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        _check(self.in_channels in (1, 3), "model.in_channels", f"must be 1 or 3, got {self.in_channels}")
        _check(len(self.cnn_widths) >= 1 and all(w > 0 for w in self.cnn_widths), "model.cnn_widths", "must be positive")
        _check(self.cnn_blocks >= 1, "model.cnn_blocks", "must be >= 1")
        refine_steps = self.box_refine_steps
        _check(0 <= refine_steps <= 4, "model.box_refine_steps", f"must be in [0, 4], got {refine_steps}")
        _check(self.stem_stride in (1, 2), "model.stem_stride", f"must be 1 or 2, got {self.stem_stride}")
        _check(self.embed_dim > 0 and self.hidden_dim > 0, "model.embed_dim/hidden_dim", "must be > 0")
        _check(self.fusion in FUSIONS, "model.fusion", f"must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        _check(self.attention_heads >= 1, "model.attention_heads", "must be >= 1")
        _check(
            self.fusion != "cross_attention" or self.hidden_dim % self.attention_heads == 0,
            "model.attention_heads",
            f"must divide model.hidden_dim ({self.hidden_dim}) for fusion=cross_attention, got {self.attention_heads}",
        )
        _check(self.bilinear_rank >= 1, "model.bilinear_rank", f"must be >= 1, got {self.bilinear_rank}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(0.0 <= self.modality_dropout <= 1.0, "model.modality_dropout", "must be in [0, 1]")
        _check(self.beam_size >= 1, "model.beam_size", f"must be >= 1, got {self.beam_size}")
        _check(self.max_decode_len >= 2, "model.max_decode_len", "must be >= 2")
        for name in ("loss_cls", "loss_box", "loss_text"):
            _check(getattr(self, name) >= 0, f"model.{name}", "must be >= 0")


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------


@dataclass
class IngestBenchConfig:
    """`medfusion bench ingest`: Ray Data vs a plain DataLoader vs the decode ceiling."""

    samples: int = 2000
    """N: samples in the dataset measured (the RSS check also streams 4N)."""
    data_uri: str = ""
    """Dataset root to write the benchmark shards to (default: s3://medfusion/bench/ingest on the local store)."""
    batch_size: int = 64
    """Batch size of both pipelines."""
    image_size: int = 128
    """Stored and model image side."""
    loader_workers: int = 2
    """Worker processes of the baseline DataLoader."""
    shard_size_mb: float = 8.0
    """Shard size of the generated dataset (small so that there are several shards to parallelize)."""

    def __post_init__(self) -> None:
        _check(self.samples >= 64, "samples", f"must be >= 64, got {self.samples}")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

EVAL_ENGINES = ("local", "ray")
EVAL_DEVICES = ("cpu", "cuda", "auto")


@dataclass
class EvaluateConfig:
    """The evaluate stage: an exported model on one dataset split -> metrics.json, PNG plots, report.html."""

    model_uri: str = ""
    """Export folder of the model (local path or s3://), as written by train or tune."""
    data_uri: str = ""
    """Dataset root (local path or s3://) holding manifest.json."""
    split: str = "test"
    """Split to evaluate: train, val or test."""
    output_uri: str = ""
    """Folder for metrics.json, the plots and report.html; empty means eval-<split> next to the model folder."""
    batch_size: int = 32
    """Samples per model call."""
    limit: int = 0
    """Evaluate only the split's first this-many samples (shard order); 0 evaluates them all."""
    engine: str = "local"
    """local: shards read with pyarrow in this process; ray: Ray Data map_batches with the Predictor as actors."""
    concurrency: int = 1
    """engine=ray: most Predictor actors (the pool grows from 1; each actor loads the model once)."""
    device: str = "cpu"
    """cpu, cuda or auto (cuda when available); with engine=ray and cuda each actor gets one GPU."""
    beam_size: int = 0
    """Beam width of findings generation; 0 keeps the exported model's setting."""
    num_images: int = 8
    """Samples (the split's first ones) drawn in the predictions grid and the attention figures."""

    def __post_init__(self) -> None:
        from medfusion.data.schema import SPLITS

        _check(self.split in SPLITS, "split", f"must be one of {', '.join(SPLITS)}, got {self.split!r}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.limit >= 0, "limit", f"must be >= 0 (0 = the whole split), got {self.limit}")
        _check(
            self.engine in EVAL_ENGINES, "engine", f"must be one of {', '.join(EVAL_ENGINES)}, got {self.engine!r}"
        )
        _check(self.concurrency >= 1, "concurrency", f"must be >= 1, got {self.concurrency}")
        _check(
            self.device in EVAL_DEVICES, "device", f"must be one of {', '.join(EVAL_DEVICES)}, got {self.device!r}"
        )
        _check(self.beam_size >= 0, "beam_size", f"must be >= 0 (0 = the model's), got {self.beam_size}")
        _check(1 <= self.num_images <= 64, "num_images", f"must be in [1, 64], got {self.num_images}")


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


@dataclass
class ServeAutoscalingConfig:
    """Ray Serve autoscaling of the model deployment (field names are Serve's own)."""

    min_replicas: int = 1
    """Fewest model replicas, also the number started."""
    max_replicas: int = 2
    """Most model replicas the autoscaler may run."""
    target_ongoing_requests: float = 16.0
    """Requests in flight per replica the autoscaler aims for (about one full batch)."""
    upscale_delay_s: float = 10.0
    """How long the load must stay above target before a replica is added."""
    downscale_delay_s: float = 60.0
    """How long the load must stay below target before a replica is removed."""
    look_back_period_s: float = 10.0
    """Window over which ongoing requests are averaged."""
    metrics_interval_s: float = 2.0
    """How often replicas and handles report their load to the autoscaler."""

    def __post_init__(self) -> None:
        _check(self.min_replicas >= 0, "autoscaling.min_replicas", f"must be >= 0, got {self.min_replicas}")
        _check(
            self.max_replicas >= max(self.min_replicas, 1),
            "autoscaling.max_replicas",
            f"must be >= max(min_replicas, 1) = {max(self.min_replicas, 1)}, got {self.max_replicas}",
        )
        _check(self.target_ongoing_requests > 0, "autoscaling.target_ongoing_requests", "must be > 0")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            value = getattr(self, name)
            _check(0 <= value <= 86_400, f"autoscaling.{name}", f"must be in [0, 86400], got {value}")
        for name in ("look_back_period_s", "metrics_interval_s"):
            value = getattr(self, name)
            _check(0 < value <= 3_600, f"autoscaling.{name}", f"must be in (0, 3600], got {value}")


@dataclass
class ServeLimitsConfig:
    """What the HTTP ingress accepts; anything beyond gets a 4xx, never a 500."""

    max_body_bytes: int = 16 * 2**20
    """Largest request body (Content-Length and streamed size): 413 beyond it."""
    max_pixels: int = 40_000_000
    """Largest image in pixels (width x height, read from the header before decoding): 422 beyond it.
    The decompression-bomb guard; equal to medfusion.data.images.DEFAULT_MAX_PIXELS by default."""
    max_report_chars: int = 20_000
    """Longest clinical note in characters: 422 beyond it (the model reads only its first tokens anyway)."""
    request_timeout_s: float = 30.0
    """Deadline of one request inside the ingress: 408 when the body is not received in time, 504 when
    the prediction is not ready in time."""
    retry_after_s: float = 1.0
    """Retry-After (seconds, rounded up) sent with 503 answers (queue full, model unavailable)."""

    def __post_init__(self) -> None:
        _check(self.max_body_bytes >= 1024, "limits.max_body_bytes", f"must be >= 1024, got {self.max_body_bytes}")
        _check(self.max_pixels >= 1, "limits.max_pixels", f"must be >= 1, got {self.max_pixels}")
        _check(self.max_report_chars >= 1, "limits.max_report_chars", f"must be >= 1, got {self.max_report_chars}")
        _check(
            0 < self.request_timeout_s <= 3_600,
            "limits.request_timeout_s",
            f"must be in (0, 3600], got {self.request_timeout_s}",
        )
        _check(0 <= self.retry_after_s <= 3_600, "limits.retry_after_s", f"must be in [0, 3600], got {self.retry_after_s}")


@dataclass
class ServeConfig:
    """The online inference application (`medfusion serve`, `medfusion.serve.app:build_app` args)."""

    model: str = ""
    """The model: an export folder (local path or s3://...), or NAME[:VERSION] from the registry at
    registry_uri (VERSION defaults to latest)."""
    registry_uri: str = ""
    """Model registry root (local path or s3://...); needed only when model is NAME[:VERSION]."""
    device: str = "cpu"
    """Torch device of the model replicas: cpu, cuda, cuda:N or auto."""
    beam_size: int = 0
    """Beam width of the findings decoder (0: the exported model's setting)."""
    max_decode_len: int = 0
    """Longest generated findings in tokens (0: the exported model's setting)."""
    max_batch_size: int = 16
    """Largest dynamic batch of the model deployment (@serve.batch)."""
    batch_wait_timeout_s: float = 0.1
    """The longest a partial batch waits for more requests. A batch closes earlier once it holds as
    many requests as the replica held at once in the last second, so a lone request runs at once."""
    max_ongoing_requests: int = 32
    """Requests one model replica holds at once (>= max_batch_size, so the next batch fills while one runs)."""
    max_queued_requests: int = 256
    """Requests queued per caller for the model beyond that; more get 503 with Retry-After (-1: no limit)."""
    num_cpus: float = 1.0
    """CPUs reserved per model replica."""
    num_gpus: float = 0.0
    """GPUs reserved per model replica (set device=cuda or auto with it)."""
    torch_threads: int = 0
    """torch intra-op threads per model replica (0: torch's default)."""
    ingress_replicas: int = 1
    """Replicas of the HTTP ingress (parsing, validation, auth; it holds no model, and retries a request
    once when a model replica dies under it). 0: no ingress deployment; the model replicas answer HTTP
    themselves, one Ray hop fewer per request (more requests/s per core), without that retry."""
    ingress_max_ongoing_requests: int = 512
    """Requests one ingress replica holds at once; the proxy answers 503 beyond that and max_queued_requests."""
    ingress_num_cpus: float = 0.0
    """CPUs reserved per ingress replica (it mostly waits on the model, like Serve's proxy, which reserves none)."""
    auth_token_env: str = "MEDFUSION_SERVE_TOKEN"
    """Environment variable holding the bearer token; when it is set and not empty, /v1 requires it."""
    auth_token_file: str = ""
    """File holding the bearer token (e.g. a mounted Kubernetes secret); takes precedence over auth_token_env."""
    autoscaling: ServeAutoscalingConfig = field(default_factory=ServeAutoscalingConfig)
    """Autoscaling of the model deployment."""
    limits: ServeLimitsConfig = field(default_factory=ServeLimitsConfig)
    """Request limits and timeouts of the ingress."""

    def __post_init__(self) -> None:
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            f"must be cpu, cuda, cuda:N or auto, got {self.device!r}",
        )
        _check(self.beam_size >= 0, "beam_size", f"must be >= 0, got {self.beam_size}")
        _check(self.max_decode_len == 0 or self.max_decode_len >= 2, "max_decode_len", "must be 0 or >= 2")
        _check(1 <= self.max_batch_size <= 1024, "max_batch_size", f"must be in [1, 1024], got {self.max_batch_size}")
        _check(0 <= self.batch_wait_timeout_s <= 10, "batch_wait_timeout_s", "must be in [0, 10]")
        _check(
            self.max_ongoing_requests >= self.max_batch_size,
            "max_ongoing_requests",
            f"must be >= max_batch_size ({self.max_batch_size}), got {self.max_ongoing_requests}",
        )
        _check(
            self.max_queued_requests == -1 or self.max_queued_requests >= 1,
            "max_queued_requests",
            f"must be -1 (no limit) or >= 1, got {self.max_queued_requests}",
        )
        _check(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus/num_gpus", "must be >= 0")
        _check(self.torch_threads >= 0, "torch_threads", f"must be >= 0, got {self.torch_threads}")
        _check(self.ingress_replicas >= 0, "ingress_replicas", f"must be >= 0, got {self.ingress_replicas}")
        _check(self.ingress_max_ongoing_requests >= 1, "ingress_max_ongoing_requests", "must be >= 1")
        _check(self.ingress_num_cpus >= 0, "ingress_num_cpus", f"must be >= 0, got {self.ingress_num_cpus}")


SERVE_LAYOUTS = ("split", "combined")


@dataclass
class ServeBenchConfig:
    """`medfusion bench serve`: the Serve app (batched) vs plain FastAPI/uvicorn vs offline forward."""

    model: str = ""
    """Export to serve (path or s3://); empty writes an untrained export of `preset` to a temporary folder."""
    preset: str = "tiny"
    """Size preset of that untrained export: tiny (the HTTP path dominates on CPU), small or base."""
    requests: int = 400
    """Requests per system and concurrency level (bounded; see also max_seconds)."""
    max_seconds: float = 30.0
    """Time limit per system and concurrency level; the level stops at whichever comes first."""
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    """Closed-loop client concurrency levels."""
    warmup_requests: int = 16
    """Requests sent before each system is measured (not counted)."""
    image_size: int = 128
    """Side of the synthetic request images in pixels (PNG)."""
    with_report: bool = True
    """Send the synthetic clinical note with each request."""
    max_batch_size: int = 32
    """Dynamic batch size of the Serve app, and the offline batch size."""
    batch_wait_timeout_s: float = 0.1
    """Longest batch wait of the Serve app (ServeConfig.batch_wait_timeout_s)."""
    model_replicas: int = 1
    """Model replicas of the Serve app (fixed: autoscaling would blur the comparison)."""
    layouts: list[str] = field(default_factory=lambda: ["split", "combined"])
    """Serve app layouts to measure: split (ingress + model deployments, ingress_replicas=1) and
    combined (the model replicas answer HTTP, ingress_replicas=0)."""
    http_floor: bool = True
    """Also measure Serve's HTTP path alone (a replica that answers a fixed JSON): the bound that the
    machine's cores, not the model, put on the Serve app."""

    def __post_init__(self) -> None:
        _check(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        _check(self.requests >= 10, "requests", f"must be >= 10, got {self.requests}")
        _check(0 < self.max_seconds <= 3_600, "max_seconds", f"must be in (0, 3600], got {self.max_seconds}")
        _check(
            bool(self.concurrency) and all(1 <= c <= 1024 for c in self.concurrency),
            "concurrency",
            f"must be a non-empty list of values in [1, 1024], got {self.concurrency}",
        )
        _check(self.warmup_requests >= 0, "warmup_requests", "must be >= 0")
        _check(16 <= self.image_size <= 4096, "image_size", f"must be in [16, 4096], got {self.image_size}")
        _check(1 <= self.max_batch_size <= 1024, "max_batch_size", "must be in [1, 1024]")
        _check(0 <= self.batch_wait_timeout_s <= 10, "batch_wait_timeout_s", "must be in [0, 10]")
        _check(self.model_replicas >= 1, "model_replicas", "must be >= 1")
        _check(
            bool(self.layouts) and set(self.layouts) <= set(SERVE_LAYOUTS),
            "layouts",
            f"must be a non-empty list of {', '.join(SERVE_LAYOUTS)}, got {self.layouts}",
        )


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

STRATEGIES = ("deepspeed", "ddp")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("cosine", "linear", "constant")
SELECT_MODES = ("auto", "min", "max")
# What validation reports each epoch (all-reduced over workers); select_metric is one of these.
VAL_METRICS = (
    "val_loss", "val_cls_loss", "val_box_loss", "val_text_loss", "val_accuracy", "val_auroc_macro", "val_mean_iou",
    "val_bleu4", "val_objective",
)  # fmt: skip
# The objective (val_objective, a sweep's score): a weighted sum of the three task metrics, where the
# classification term is accuracy or macro AUROC.
OBJECTIVE_TERMS = ("classification", "mean_iou", "bleu4")
CLASSIFICATION_METRICS = ("accuracy", "auroc")


@dataclass
class TrainConfig:
    """The train stage: Ray Train workers stream their dataset shard and train through DeepSpeed (or DDP)."""

    dataset_uri: str = ""
    """Dataset root (local path or s3://) holding manifest.json, as written by `medfusion data`."""
    storage_uri: str = "s3://medfusion/runs"
    """Where runs are stored (local folder or s3://); a run's folder is <storage_uri>/<name>."""
    name: str = ""
    """Run name (its folder under storage_uri); empty makes train-<UTC time>-<random>."""
    resume: str = ""
    """Run folder to continue from its newest checkpoint (sets storage_uri and name)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture (the preset fills it)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input pipeline; data.batch_size is the batch per worker and per micro-step."""
    epochs: int = 10
    """Passes over the training split."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Optimizer steps of linear learning-rate warmup from 0 to lr."""
    lr_schedule: str = "cosine"
    """After warmup: cosine (to 0 at the last step), linear (to 0) or constant."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (DeepSpeed gradient_accumulation_steps)."""
    clip: float = 1.0
    """Gradient-norm clipping threshold; 0 turns clipping off."""
    strategy: str = "deepspeed"
    """deepspeed (ZeRO stage from zero_stage) or ddp (plain PyTorch DistributedDataParallel)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (off), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    precision: str = "auto"
    """fp32, bf16, fp16 (GPU only) or auto (bf16 on GPU, fp32 on CPU)."""
    num_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; the rest of the cluster's CPUs read and preprocess data (Ray Data
    tasks need at least one free). 0 reserves none: workers and preprocessing share the cores."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); otherwise CPU workers with gloo and DS_ACCELERATOR=cpu."""
    ray_address: str = ""
    """Empty: embedded local Ray (or the cluster this process runs in); http://HEAD:8265: submit to
    that cluster as a Ray job and stream its logs."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run folder (the newest ones); the best model's export is kept apart."""
    patience: int = 3
    """Early stopping: stop after this many epochs without improving select_metric; 0 never stops early."""
    select_metric: str = "val_loss"
    """Validation metric that picks the best epoch (exported) and drives early stopping."""
    select_mode: str = "auto"
    """min, max, or auto (min for losses, max otherwise)."""
    seed: int = 0
    """Seed of model initialization, shuffling and modality dropout."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before a crashed run fails (Ray FailureConfig)."""
    max_steps_per_epoch: int = 0
    """Cap on optimizer steps per epoch (quick runs, benchmarks); 0 takes the whole split."""
    shuffle_buffer: int = 256
    """Rows in each worker's local shuffle buffer (0 keeps shard order)."""
    evaluate: bool = True
    """Evaluate the best model on the test split at the end (metrics.json, plots, report.html)."""
    fault_inject_step: int = 0
    """Testing: the last worker kills itself (SIGKILL) once at this global step; 0 never."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        _check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.clip >= 0, "clip", f"must be >= 0 (0 = off), got {self.clip}")
        _check(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        _check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _check(self.precision != "fp16" or self.use_gpu, "precision", "fp16 needs use_gpu=true (use bf16 or fp32 on CPU)")
        _check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        _check(self.cpus_per_worker >= 0, "cpus_per_worker", f"must be >= 0, got {self.cpus_per_worker}")
        _check(
            not self.ray_address or self.ray_address.startswith(("http://", "https://")),
            "ray_address",
            f"must be empty (embedded Ray) or the dashboard URL http://HEAD:8265, got {self.ray_address!r}",
        )
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _check(self.patience >= 0, "patience", f"must be >= 0 (0 = no early stopping), got {self.patience}")
        _check(self.select_metric in VAL_METRICS, "select_metric", f"must be one of {', '.join(VAL_METRICS)}, got {self.select_metric!r}")
        _check(self.select_mode in SELECT_MODES, "select_mode", f"must be one of {', '.join(SELECT_MODES)}, got {self.select_mode!r}")
        _check(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        _check(self.max_steps_per_epoch >= 0, "max_steps_per_epoch", f"must be >= 0 (0 = whole split), got {self.max_steps_per_epoch}")
        _check(self.shuffle_buffer >= 0, "shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _check(self.fault_inject_step >= 0, "fault_inject_step", f"must be >= 0 (0 = never), got {self.fault_inject_step}")
        _check("/" not in self.name and self.name not in (".", ".."), "name", f"must be a single folder name, got {self.name!r}")

    @property
    def mode(self) -> str:
        """The effective select_mode ("min" or "max")."""
        if self.select_mode != "auto":
            return self.select_mode
        return "min" if self.select_metric.endswith("loss") else "max"


# --------------------------------------------------------------------------------------------
# Tuning
# --------------------------------------------------------------------------------------------

SEARCH_ALGORITHMS = ("optuna", "random", "grid")
TUNE_SCHEDULERS = ("asha", "fifo")


@dataclass
class ObjectiveConfig:
    """val_objective = classification x val_<classification_metric> + mean_iou x val_mean_iou + bleu4 x
    val_bleu4 (an undefined metric, e.g. IoU on a split without lesions, counts 0)."""

    classification: float = 1.0
    """Weight of the classification metric."""
    mean_iou: float = 1.0
    """Weight of the mean IoU of the predicted lesion boxes."""
    bleu4: float = 1.0
    """Weight of the corpus BLEU-4 of the generated findings (greedy decoding)."""
    classification_metric: str = "accuracy"
    """The classification metric: accuracy or auroc (macro one-vs-rest)."""

    def __post_init__(self) -> None:
        for term in OBJECTIVE_TERMS:
            weight = getattr(self, term)
            _check(weight >= 0, f"objective.{term}", f"must be >= 0, got {weight}")
        _check(any(getattr(self, t) > 0 for t in OBJECTIVE_TERMS), "objective", "needs at least one weight > 0")
        _check(
            self.classification_metric in CLASSIFICATION_METRICS,
            "objective.classification_metric",
            f"must be one of {', '.join(CLASSIFICATION_METRICS)}, got {self.classification_metric!r}",
        )

    @property
    def weights(self) -> dict[str, float]:
        """Term -> weight."""
        return {term: float(getattr(self, term)) for term in OBJECTIVE_TERMS}


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
    registry_uri: str = "s3://medfusion/registry"
    """Model registry root (local path or s3://)."""
    model_name: str = "medfusion"
    """Name the best model is registered under."""
    interrupt_after_trials: int = 0
    """Testing: interrupt the sweep (as Ctrl-C does) once this many trials have finished; 0 never."""

    def __post_init__(self) -> None:
        _check("/" not in self.name and self.name not in (".", ".."), "name", f"must be a single folder name, got {self.name!r}")
        _check(not self.resume or bool(self.name), "name", "is required with resume=true (the sweep to continue)")
        _check(self.search in SEARCH_ALGORITHMS, "search", f"must be one of {', '.join(SEARCH_ALGORITHMS)}, got {self.search!r}")
        _check(self.scheduler in TUNE_SCHEDULERS, "scheduler", f"must be one of {', '.join(TUNE_SCHEDULERS)}, got {self.scheduler!r}")
        _check(self.num_samples >= 0, "num_samples", f"must be >= 0 (0 = default), got {self.num_samples}")
        _check(self.max_concurrent_trials >= 0, "max_concurrent_trials", f"must be >= 0 (0 = as resources allow), got {self.max_concurrent_trials}")
        _check(self.trial_cpus >= 0, "trial_cpus", f"must be >= 0, got {self.trial_cpus}")
        _check(self.grace_period >= 1, "grace_period", f"must be >= 1, got {self.grace_period}")
        _check(self.reduction_factor > 1, "reduction_factor", f"must be > 1, got {self.reduction_factor}")
        _check(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        _check(self.seeds == 0 or self.seeds >= 2, "seeds", f"must be 0 (no ablation) or >= 2 (for a confidence interval), got {self.seeds}")
        _check(self.ablation_epochs >= 0, "ablation_epochs", f"must be >= 0 (0 = train.epochs), got {self.ablation_epochs}")
        _check(not self.register or bool(self.registry_uri), "registry_uri", "is required with register=true")
        _check(not self.register or bool(self.model_name), "model_name", "is required with register=true")
        _check(self.interrupt_after_trials >= 0, "interrupt_after_trials", "must be >= 0 (0 = never)")
        from medfusion.tuning.space import check_tune_config

        check_tune_config(self)  # the trial settings and the inline search space (the file is read by run_tune)


@dataclass
class TrainBenchConfig:
    """`medfusion bench train`: Ray Train + DeepSpeed vs a plain PyTorch loop on the same model and data."""

    device: str = "cpu"
    """cpu, or cuda (one GPU per worker; peak GPU memory is reported)."""
    zero_stages: list[int] = field(default_factory=lambda: [2])
    """ZeRO stages measured with one Ray Train worker, one row each (e.g. 0,1,2,3)."""
    preset: str = ""
    """Model and data size preset; empty means tiny on cpu, small on cuda."""
    samples: int = 768
    """Training images generated for the benchmark dataset."""
    batch_size: int = 0
    """Batch size of every variant; 0 takes the preset's data.batch_size."""
    steps: int = 24
    """Optimizer steps timed per variant (after warmup_steps)."""
    warmup_steps: int = 4
    """Steps run before timing starts (worker start-up, first batches, allocator)."""
    workers: int = 2
    """Workers of the multi-worker variant (c); 0 skips it (it also needs that many GPUs on cuda)."""
    threads: int = 1
    """Torch intra-op threads of every training process (the same for all variants)."""
    data_uri: str = ""
    """Dataset root for the benchmark shards (default: s3://medfusion/bench/train on the local store)."""

    def __post_init__(self) -> None:
        _check(self.device in ("cpu", "cuda"), "device", f"must be cpu or cuda, got {self.device!r}")
        _check(bool(self.zero_stages) and all(s in (0, 1, 2, 3) for s in self.zero_stages), "zero_stages", f"must be a list of 0-3, got {self.zero_stages}")
        _check(not self.preset or self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)} or empty, got {self.preset!r}")
        _check(self.samples >= 64, "samples", f"must be >= 64, got {self.samples}")
        _check(self.batch_size >= 0, "batch_size", f"must be >= 0 (0 = the preset's), got {self.batch_size}")
        _check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        _check(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")


@dataclass
class TuneBenchConfig:
    """`medfusion bench tune`: ASHA vs random search vs the full grid, and Tune's scheduling overhead."""

    parts: list[str] = field(default_factory=lambda: ["search", "overhead"])
    """What to measure: search (grid, ASHA, random on the tiny setup) and/or overhead (no-op trials)."""
    samples: int = 400
    """Synthetic images of the benchmark dataset (tiny preset, 64 px)."""
    epochs: int = 9
    """Most epochs a trial runs (ASHA's max_t; with reduction_factor 3 its rungs are at 1, 3 and 9)."""
    steps_per_epoch: int = 6
    """Optimizer steps per epoch of every trial (train.max_steps_per_epoch)."""
    search_space: dict[str, Any] = field(
        default_factory=lambda: {"model.fusion": ["concat", "gated", "cross_attention", "image_only", "text_only"],
                                 "train.lr": [3.0e-4, 3.0e-3]}
    )  # fmt: skip
    """The grid (choices only): every combination is one trial of the grid sweep."""
    reduction_factor: float = 3.0
    """ASHA: the best 1/reduction_factor of the trials at a rung go on."""
    tolerance: float = 0.01
    """"Within 1% of the grid's best": objective >= (1 - tolerance) x the grid's best."""
    seed: int = 0
    """Seed of random search's sampler."""
    overhead_trials: int = 16
    """No-op trials of the overhead measurement."""
    trial_seconds: float = 5.0
    """How long each no-op trial sleeps: the shortest trial worth scheduling (a tiny training trial
    takes 20 s or more); the per-trial overhead in ms is printed too, for any other trial length."""
    iterations: int = 4
    """Reports per no-op trial."""
    data_uri: str = ""
    """Dataset root for the benchmark shards (default: s3://medfusion/bench/tune on the local store)."""

    def __post_init__(self) -> None:
        _check(bool(self.parts) and set(self.parts) <= {"search", "overhead"}, "parts", f"must be a list of search and/or overhead, got {self.parts}")
        _check(self.samples >= 64, "samples", f"must be >= 64, got {self.samples}")
        _check(self.epochs >= 2, "epochs", f"must be >= 2 (ASHA needs a rung to stop at), got {self.epochs}")
        _check(self.steps_per_epoch >= 1, "steps_per_epoch", f"must be >= 1, got {self.steps_per_epoch}")
        _check(bool(self.search_space) and all(isinstance(v, list) and v for v in self.search_space.values()),
               "search_space", "must map each key to a non-empty list of choices (a grid)")  # fmt: skip
        _check(self.reduction_factor > 1, "reduction_factor", f"must be > 1, got {self.reduction_factor}")
        _check(0 <= self.tolerance < 1, "tolerance", f"must be in [0, 1), got {self.tolerance}")
        _check(self.overhead_trials >= 1, "overhead_trials", f"must be >= 1, got {self.overhead_trials}")
        _check(self.trial_seconds > 0, "trial_seconds", f"must be > 0, got {self.trial_seconds}")
        _check(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")


# --------------------------------------------------------------------------------------------
# Loading: defaults <- preset <- YAML file <- dotted overrides
# --------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Return each field's docstring (the string literal that follows it in the class body)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert `value` (from YAML or a CLI string) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, prefix=name + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], name)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = yaml.safe_load(value)  # a YAML flow mapping from the CLI: key={a: 1, b: [x, y]}
            except yaml.YAMLError as err:
                raise ConfigError(f"{name}: not a YAML mapping: {value!r} ({err})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            number = float(value) if tp is float else int(str(value), 0) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(number, float):
            if not number.is_integer():
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
            number = int(number)
        return tp(number)
    if tp is str:
        return "" if value is None else str(value)
    return value


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    hints = _resolved_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown field of {cls.__name__}; known fields: {', '.join(sorted(known))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if prefix and not str(err).startswith(prefix):
            raise ConfigError(f"{prefix}{err}") from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data (what YAML and JSON files hold)."""
    return dataclasses.asdict(cfg)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["data.image_size=64", "fusion=gated"]`` into a nested dict of strings."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. data.image_size=64")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set both as a value and a section")
        node[parts[-1]] = raw
    return tree


def preset_values(preset: str, section: str) -> dict[str, Any]:
    """The values a size preset sets for one config section (e.g. ``model``)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: must be one of {', '.join(PRESETS)}, got {preset!r}")
    text = resources.files("medfusion.configs").joinpath(f"presets/{preset}.yaml").read_text()
    data = yaml.safe_load(text) or {}
    return data.get(section, {})


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> T:
    """Build a config: dataclass defaults <- `base` <- YAML file at `path` <- dotted `overrides`.

    Raises:
        ConfigError: naming the field, for unknown keys and invalid values.
    """
    values: dict[str, Any] = dict(base or {})
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p}: not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
        values = _merge(values, loaded)
    if overrides:
        values = _merge(values, parse_overrides(overrides))
    return _build(cls, values)


def dump_yaml(cfg: Any) -> str:
    """The full config as YAML (what a run records next to its outputs)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
