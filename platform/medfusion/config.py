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
    """engine=ray: number of Predictor actors (each loads the model once)."""
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
