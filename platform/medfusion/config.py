"""Typed configuration of every stage: the schemas, and nothing that reads files.

Each stage takes one dataclass. A field's docstring (the string literal right under it) becomes its
``--help`` text; validation lives in ``__post_init__`` and names the field and the allowed values.
How a config is built (defaults <- preset <- YAML file <- dotted overrides) is `medfusion.loader`;
the sweep's schema is `medfusion.tuning.config`; each benchmark's config sits beside its benchmark.

This is the bottom layer with `medfusion.storage`: it imports nothing of medfusion, and everything
may import it. One file for all stage schemas because they nest (TrainConfig holds ModelConfig and
DataConfig; TuneConfig and the benches hold them too) and the CLI's help is generated from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRESETS = ("tiny", "small", "base", "cxr")
SOURCES = ("synthetic", "manifest", "iu_xray", "nih")
SPLITS = ("train", "val", "test")
FUSIONS = ("concat", "gated", "bilinear", "cross_attention", "image_only", "text_only")
# The environment variable holding the inference API's bearer token (ServeConfig.auth_token_env's default).
SERVE_TOKEN_ENV = "MEDFUSION_SERVE_TOKEN"
# The `ray_address` value that runs a stage as a KubeRay RayJob (medfusion.orchestration.stages.ray_target).
KUBERAY = "kuberay"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def check(condition: bool, name: str, message: str) -> None:
    """Raise ConfigError("<name>: <message>") unless `condition` holds."""
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
        check(self.num_samples > 0, "synth.num_samples", f"must be > 0, got {self.num_samples}")
        check(16 <= self.image_size <= 1024, "synth.image_size", f"must be in [16, 1024], got {self.image_size}")
        check(len(self.classes) >= 2, "synth.classes", "needs at least 2 classes")
        check(len(set(self.classes)) == len(self.classes), "synth.classes", "has duplicates")
        check(
            not self.class_weights or len(self.class_weights) == len(self.classes),
            "synth.class_weights",
            f"needs one weight per class ({len(self.classes)}), got {len(self.class_weights)}",
        )
        check(all(w >= 0 for w in self.class_weights), "synth.class_weights", "must be >= 0")
        check(0.0 <= self.label_noise < 1.0, "synth.label_noise", f"must be in [0, 1), got {self.label_noise}")
        check(self.images_per_patient >= 1, "synth.images_per_patient", "must be >= 1")


SPLIT_UNITS = ("patient", "image")


@dataclass
class SplitConfig:
    """How rows without an explicit `split` are assigned: by patient, unless asked per image."""

    val: float = 0.1
    """Fraction of patients in the validation split."""
    test: float = 0.1
    """Fraction of patients in the test split."""
    salt: str = "medfusion"
    """Salt of the patient hash; change it to draw a different split."""
    unit: str = "patient"
    """patient: every row needs a patient id (a source that has none is refused), and a patient's
    images stay in one split. image: each image is its own patient, for data without patient ids,
    knowing that one patient's images may then land in train and test."""

    def __post_init__(self) -> None:
        check(self.unit in SPLIT_UNITS, "split.unit", f"must be one of {', '.join(SPLIT_UNITS)}, got {self.unit!r}")
        check(0.0 <= self.val < 1.0, "split.val", f"must be in [0, 1), got {self.val}")
        check(0.0 <= self.test < 1.0, "split.test", f"must be in [0, 1), got {self.test}")
        check(self.val + self.test < 1.0, "split", "val + test must leave room for train")


BOX_FORMATS = ("xyxy", "xywh")


@dataclass
class PrepareConfig:
    """The prepare stage: read a source, write Parquet shards and manifest.json."""

    source: str = "synthetic"
    """Where samples come from: synthetic, manifest (CSV/JSONL), iu_xray, or nih (ChestX-ray14's
    BBox_List_2017.csv, with Data_Entry_2017.csv when present)."""
    source_uri: str = ""
    """The manifest file (manifest), the dataset folder (iu_xray), or nih's folder or box CSV;
    unused for synthetic."""
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
    box_format: str = "xyxy"
    """manifest: how the box column gives a box in pixels: xyxy (x0 y0 x1 y1, corners) or xywh (x y w h,
    the top-left corner and the size, as NIH's BBox_List_2017.csv)."""
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
        check(self.source in SOURCES, "source", f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        check(
            self.source == "synthetic" or bool(self.source_uri),
            "source_uri",
            f"is required for source={self.source}",
        )
        check(self.shard_size_mb > 0, "shard_size_mb", f"must be > 0, got {self.shard_size_mb}")
        check(
            0.0 <= self.max_rejected_fraction <= 1.0,
            "max_rejected_fraction",
            f"must be in [0, 1], got {self.max_rejected_fraction}",
        )
        check(len(set(self.classes)) == len(self.classes), "classes", "has duplicates")
        check(self.max_report_chars > 0, "max_report_chars", f"must be > 0, got {self.max_report_chars}")
        check(
            self.box_format in BOX_FORMATS,
            "box_format",
            f"must be one of {', '.join(BOX_FORMATS)}, got {self.box_format!r}",
        )
        check(self.vocab_size >= 8, "vocab_size", f"must be >= 8, got {self.vocab_size}")
        check(self.image_size >= 0, "image_size", f"must be >= 0, got {self.image_size}")


@dataclass
class AugmentConfig:
    """Random transforms of training images (train split only); off by default."""

    enabled: bool = False
    """Augment training images; the fields below apply only then."""
    affine_p: float = 0.5
    """Probability of the random affine (scale, rotation, translation) per image."""
    scale: float = 0.1
    """The affine's zoom factor is drawn from [1 - scale, 1 + scale]."""
    rotate_deg: float = 7.0
    """The affine's rotation is drawn from [-rotate_deg, rotate_deg] degrees (films are taken upright)."""
    translate: float = 0.05
    """The affine's shift along each axis is drawn from [-translate, translate] of the image side."""
    crop_p: float = 0.3
    """Probability of a random square crop resized back to the full side, per image."""
    crop_min: float = 0.8
    """Smallest crop side, as a fraction of the image side (drawn from [crop_min, 1])."""
    intensity_p: float = 0.5
    """Probability of the intensity jitter (brightness, contrast, gamma) per image."""
    brightness: float = 0.1
    """Added grey level, drawn from [-brightness, brightness] (grey levels in [0, 1])."""
    contrast: float = 0.2
    """Contrast factor about the image's mean, drawn from [1 - contrast, 1 + contrast]."""
    gamma: float = 0.2
    """Gamma drawn log-uniformly from [1 / (1 + gamma), 1 + gamma]."""
    min_box_visible: float = 0.5
    """A box must keep at least this fraction of its (transformed) area inside the frame, else the
    image keeps its geometry."""

    def __post_init__(self) -> None:
        for name in ("affine_p", "crop_p", "intensity_p"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"data.augment.{name}", f"must be in [0, 1], got {value}")
        check(0.0 <= self.scale < 0.5, "data.augment.scale", f"must be in [0, 0.5), got {self.scale}")
        check(0.0 <= self.rotate_deg <= 30.0, "data.augment.rotate_deg", f"must be in [0, 30], got {self.rotate_deg}")
        check(0.0 <= self.translate <= 0.25, "data.augment.translate", f"must be in [0, 0.25], got {self.translate}")
        check(0.5 <= self.crop_min <= 1.0, "data.augment.crop_min", f"must be in [0.5, 1], got {self.crop_min}")
        check(0.0 <= self.brightness <= 0.5, "data.augment.brightness", f"must be in [0, 0.5], got {self.brightness}")
        check(0.0 <= self.contrast < 1.0, "data.augment.contrast", f"must be in [0, 1), got {self.contrast}")
        check(0.0 <= self.gamma <= 1.0, "data.augment.gamma", f"must be in [0, 1], got {self.gamma}")
        visible = self.min_box_visible
        check(0.0 < visible <= 1.0, "data.augment.min_box_visible", f"must be in (0, 1], got {visible}")


REPORT_KEEP = ("head", "tail", "head_tail")
MAX_POS_WEIGHT = 20.0


@dataclass
class DataConfig:
    """How shards are read and turned into model inputs (Ray Data)."""

    image_size: int = 128
    """Side the images are resized to before the model."""
    max_report_tokens: int = 64
    """Note tokens kept; longer notes are cut (`medfusion data inspect` counts how many are)."""
    report_keep: str = "head"
    """Which part of a note longer than max_report_tokens is kept: head (the start), tail (the end,
    where case notes conclude) or head_tail (the first and last halves)."""
    max_findings_tokens: int = 48
    """Findings tokens kept, <bos> and <eos> included."""
    batch_size: int = 32
    """Samples per batch per worker."""
    columns_prefetch: int = 2
    """Batches prefetched ahead of the consumer (Ray Data iter_batches prefetch_batches)."""
    block_rows: int = 256
    """Model rows per Ray Data block, rounded up to whole batches (and kept under 64 MiB). Each block
    costs the same to hand from a decode task to the consumer whatever its size: larger blocks stream
    faster, smaller ones bring a pass's first batch sooner (README, "Benchmarks")."""
    report_dropout: float = 0.0
    """Training only: probability of hiding the note, so the model also works on the image alone."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training only: random transforms that move the boxes with the pixels (no left-right flip)."""

    def __post_init__(self) -> None:
        check(16 <= self.image_size <= 1024, "data.image_size", f"must be in [16, 1024], got {self.image_size}")
        check(self.max_report_tokens >= 1, "data.max_report_tokens", "must be >= 1")
        check(
            self.report_keep in REPORT_KEEP,
            "data.report_keep",
            f"must be one of {', '.join(REPORT_KEEP)}, got {self.report_keep!r}",
        )
        check(self.max_findings_tokens >= 3, "data.max_findings_tokens", "must be >= 3 (<bos> x <eos>)")
        check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.columns_prefetch >= 0, "data.columns_prefetch", "must be >= 0")
        check(self.block_rows >= 1, "data.block_rows", f"must be >= 1, got {self.block_rows}")
        check(0.0 <= self.report_dropout <= 1.0, "data.report_dropout", "must be in [0, 1]")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


# Image backbones (medfusion.models.backbones): the paper's small residual CNN, or a standard one.
BACKBONES = ("medfusion", "densenet121", "resnet18", "resnet50")
# Weight files model.image_init_uri may name: safetensors, or a torch state dict (read with weights_only).
IMAGE_INIT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class ModelConfig:
    """Architecture of MedFusionModel (see medfusion.models)."""

    preset: str = "tiny"
    """Preset the fields below were filled from: tiny, small, base, or cxr (real chest films)."""
    backbone: str = "medfusion"
    """Image encoder: medfusion (the residual CNN of cnn_widths/cnn_blocks/stem_stride), densenet121
    (CheXNet's), resnet18 or resnet50 (MONAI's 2-D networks; cnn_* and stem_stride do not apply)."""
    image_init_uri: str = ""
    """Weights the image encoder starts from (local path or s3://): a .safetensors file or a torch state
    dict (.pt/.pth/.bin) in torchvision, timm or MONAI key layout, or a MedFusion model's; empty: random.
    Read when a training run builds its model; nothing is downloaded."""
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
    describes: bool = True
    """The findings decoder is trained and used (set from the dataset: false when its training split
    has no findings text; then there is no decoder loss and predictions carry no findings)."""
    balance_classes: bool = False
    """Multi-label: weigh each class's positives by its negatives-to-positives ratio in the training
    split (BCE pos_weight, at most MAX_POS_WEIGHT), so a rare finding is not learnt as "always absent"."""
    pos_weight: list[float] = field(default_factory=list)
    """Set from the dataset when balance_classes: the per-class positive weights (empty: all 1)."""
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
        check(self.preset in PRESETS, "model.preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        check(
            self.backbone in BACKBONES,
            "model.backbone",
            f"must be one of {', '.join(BACKBONES)}, got {self.backbone!r}",
        )
        check(
            not self.image_init_uri or self.image_init_uri.lower().endswith(IMAGE_INIT_SUFFIXES),
            "model.image_init_uri",
            f"must name a {', '.join(IMAGE_INIT_SUFFIXES)} file (or be empty), got {self.image_init_uri!r}",
        )
        check(self.in_channels in (1, 3), "model.in_channels", f"must be 1 or 3, got {self.in_channels}")
        check(len(self.cnn_widths) >= 1 and all(w > 0 for w in self.cnn_widths), "model.cnn_widths", "must be positive")
        check(self.cnn_blocks >= 1, "model.cnn_blocks", "must be >= 1")
        refine_steps = self.box_refine_steps
        check(0 <= refine_steps <= 4, "model.box_refine_steps", f"must be in [0, 4], got {refine_steps}")
        check(self.stem_stride in (1, 2), "model.stem_stride", f"must be 1 or 2, got {self.stem_stride}")
        check(self.embed_dim > 0 and self.hidden_dim > 0, "model.embed_dim/hidden_dim", "must be > 0")
        check(self.fusion in FUSIONS, "model.fusion", f"must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        check(self.attention_heads >= 1, "model.attention_heads", "must be >= 1")
        check(
            self.fusion != "cross_attention" or self.hidden_dim % self.attention_heads == 0,
            "model.attention_heads",
            f"must divide model.hidden_dim ({self.hidden_dim}) for fusion=cross_attention, got {self.attention_heads}",
        )
        check(self.bilinear_rank >= 1, "model.bilinear_rank", f"must be >= 1, got {self.bilinear_rank}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        check(0.0 <= self.modality_dropout <= 1.0, "model.modality_dropout", "must be in [0, 1]")
        check(self.beam_size >= 1, "model.beam_size", f"must be >= 1, got {self.beam_size}")
        check(self.max_decode_len >= 2, "model.max_decode_len", "must be >= 2")
        for name in ("loss_cls", "loss_box", "loss_text"):
            check(getattr(self, name) >= 0, f"model.{name}", "must be >= 0")


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
        check(self.split in SPLITS, "split", f"must be one of {', '.join(SPLITS)}, got {self.split!r}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.limit >= 0, "limit", f"must be >= 0 (0 = the whole split), got {self.limit}")
        check(self.engine in EVAL_ENGINES, "engine", f"must be one of {', '.join(EVAL_ENGINES)}, got {self.engine!r}")
        check(self.concurrency >= 1, "concurrency", f"must be >= 1, got {self.concurrency}")
        check(self.device in EVAL_DEVICES, "device", f"must be one of {', '.join(EVAL_DEVICES)}, got {self.device!r}")
        check(self.beam_size >= 0, "beam_size", f"must be >= 0 (0 = the model's), got {self.beam_size}")
        check(1 <= self.num_images <= 64, "num_images", f"must be in [1, 64], got {self.num_images}")


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
        check(self.min_replicas >= 0, "autoscaling.min_replicas", f"must be >= 0, got {self.min_replicas}")
        check(
            self.max_replicas >= max(self.min_replicas, 1),
            "autoscaling.max_replicas",
            f"must be >= max(min_replicas, 1) = {max(self.min_replicas, 1)}, got {self.max_replicas}",
        )
        check(self.target_ongoing_requests > 0, "autoscaling.target_ongoing_requests", "must be > 0")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            value = getattr(self, name)
            check(0 <= value <= 86_400, f"autoscaling.{name}", f"must be in [0, 86400], got {value}")
        for name in ("look_back_period_s", "metrics_interval_s"):
            value = getattr(self, name)
            check(0 < value <= 3_600, f"autoscaling.{name}", f"must be in (0, 3600], got {value}")


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
        check(self.max_body_bytes >= 1024, "limits.max_body_bytes", f"must be >= 1024, got {self.max_body_bytes}")
        check(self.max_pixels >= 1, "limits.max_pixels", f"must be >= 1, got {self.max_pixels}")
        check(self.max_report_chars >= 1, "limits.max_report_chars", f"must be >= 1, got {self.max_report_chars}")
        check(
            0 < self.request_timeout_s <= 3_600,
            "limits.request_timeout_s",
            f"must be in (0, 3600], got {self.request_timeout_s}",
        )
        check(
            0 <= self.retry_after_s <= 3_600, "limits.retry_after_s", f"must be in [0, 3600], got {self.retry_after_s}"
        )


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
    auth_token_env: str = SERVE_TOKEN_ENV
    """Environment variable holding the bearer token; when it is set and not empty, /v1 requires it (set but
    empty: auth is off, with a warning)."""
    auth_token_file: str = ""
    """File holding the bearer token (e.g. a mounted Kubernetes secret); takes precedence over auth_token_env."""
    require_auth: bool = False
    """Refuse to start without a non-empty bearer token (from auth_token_file or auth_token_env) instead of
    serving /v1 open: on in every checked-in deployment."""
    autoscaling: ServeAutoscalingConfig = field(default_factory=ServeAutoscalingConfig)
    """Autoscaling of the model deployment."""
    limits: ServeLimitsConfig = field(default_factory=ServeLimitsConfig)
    """Request limits and timeouts of the ingress."""

    def __post_init__(self) -> None:
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            f"must be cpu, cuda, cuda:N or auto, got {self.device!r}",
        )
        check(self.beam_size >= 0, "beam_size", f"must be >= 0, got {self.beam_size}")
        check(self.max_decode_len == 0 or self.max_decode_len >= 2, "max_decode_len", "must be 0 or >= 2")
        check(1 <= self.max_batch_size <= 1024, "max_batch_size", f"must be in [1, 1024], got {self.max_batch_size}")
        check(0 <= self.batch_wait_timeout_s <= 10, "batch_wait_timeout_s", "must be in [0, 10]")
        check(
            self.max_ongoing_requests >= self.max_batch_size,
            "max_ongoing_requests",
            f"must be >= max_batch_size ({self.max_batch_size}), got {self.max_ongoing_requests}",
        )
        check(
            self.max_queued_requests == -1 or self.max_queued_requests >= 1,
            "max_queued_requests",
            f"must be -1 (no limit) or >= 1, got {self.max_queued_requests}",
        )
        check(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus/num_gpus", "must be >= 0")
        check(self.torch_threads >= 0, "torch_threads", f"must be >= 0, got {self.torch_threads}")
        check(self.ingress_replicas >= 0, "ingress_replicas", f"must be >= 0, got {self.ingress_replicas}")
        check(self.ingress_max_ongoing_requests >= 1, "ingress_max_ongoing_requests", "must be >= 1")
        check(self.ingress_num_cpus >= 0, "ingress_num_cpus", f"must be >= 0, got {self.ingress_num_cpus}")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

STRATEGIES = ("deepspeed", "ddp")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("cosine", "linear", "constant")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
SELECT_MODES = ("auto", "min", "max")
# What validation reports each epoch (all-reduced over workers); select_metric is one of these.
VAL_METRICS = (
    "val_loss",
    "val_cls_loss",
    "val_box_loss",
    "val_text_loss",
    "val_accuracy",
    "val_auroc_macro",
    "val_mean_iou",
    "val_bleu4",
    "val_objective",
)
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
    that cluster as a Ray job and stream its logs; kuberay: a RayJob with a Ray cluster of its own
    (medfusion.orchestration, as the pipeline's steps)."""
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
    """Worker-group restarts from the last checkpoint before a crashed run fails (Ray FailureConfig):
    a worker process that dies, or a node lost under a worker."""
    placement_strategy: str = "PACK"
    """How the workers' placement group spreads over Ray nodes: PACK (fewest nodes), SPREAD (as many as
    it can), STRICT_SPREAD (one worker per node, or wait), STRICT_PACK (one node)."""
    worker_wait_s: float = 600.0
    """How long a start or restart waits for the workers' resources (a lost node's replacement to join)
    before the run fails, naming the lost node and the resources it waited for."""
    max_steps_per_epoch: int = 0
    """Cap on optimizer steps per epoch (quick runs, benchmarks); 0 takes the whole split."""
    shuffle_buffer: int = 256
    """Rows in each worker's local shuffle buffer (0 keeps shard order)."""
    evaluate: bool = True
    """Evaluate the best model on the test split at the end (metrics.json, plots, report.html)."""
    log_every_steps: int = 50
    """Rank 0 prints a progress line every this many optimizer steps (epoch, step, loss); 0 only per epoch."""
    fault_inject_step: int = 0
    """Testing: the last worker kills itself (SIGKILL) once at this global step; 0 never."""

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(
            self.lr_schedule in LR_SCHEDULES,
            "lr_schedule",
            f"must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}",
        )
        check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.clip >= 0, "clip", f"must be >= 0 (0 = off), got {self.clip}")
        check(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(
            self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
        )
        check(
            self.precision != "fp16" or self.use_gpu, "precision", "fp16 needs use_gpu=true (use bf16 or fp32 on CPU)"
        )
        check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        check(self.cpus_per_worker >= 0, "cpus_per_worker", f"must be >= 0, got {self.cpus_per_worker}")
        check(
            self.ray_address in ("", KUBERAY) or self.ray_address.startswith(("http://", "https://")),
            "ray_address",
            f"must be empty (embedded Ray), the dashboard URL http://HEAD:8265 (Jobs API) or {KUBERAY!r} "
            f"(a RayJob), got {self.ray_address!r}",
        )
        check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        check(self.patience >= 0, "patience", f"must be >= 0 (0 = no early stopping), got {self.patience}")
        check(
            self.select_metric in VAL_METRICS,
            "select_metric",
            f"must be one of {', '.join(VAL_METRICS)}, got {self.select_metric!r}",
        )
        check(
            self.select_mode in SELECT_MODES,
            "select_mode",
            f"must be one of {', '.join(SELECT_MODES)}, got {self.select_mode!r}",
        )
        check(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        check(
            self.placement_strategy in PLACEMENT_STRATEGIES,
            "placement_strategy",
            f"must be one of {', '.join(PLACEMENT_STRATEGIES)}, got {self.placement_strategy!r}",
        )
        check(self.worker_wait_s > 0, "worker_wait_s", f"must be > 0 seconds, got {self.worker_wait_s}")
        check(
            self.max_steps_per_epoch >= 0,
            "max_steps_per_epoch",
            f"must be >= 0 (0 = whole split), got {self.max_steps_per_epoch}",
        )
        check(self.shuffle_buffer >= 0, "shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        check(
            self.log_every_steps >= 0,
            "log_every_steps",
            f"must be >= 0 (0 = per epoch only), got {self.log_every_steps}",
        )
        check(
            self.fault_inject_step >= 0, "fault_inject_step", f"must be >= 0 (0 = never), got {self.fault_inject_step}"
        )
        check(
            "/" not in self.name and self.name not in (".", ".."),
            "name",
            f"must be a single folder name, got {self.name!r}",
        )

    @property
    def mode(self) -> str:
        """The effective select_mode ("min" or "max")."""
        if self.select_mode != "auto":
            return self.select_mode
        return "min" if self.select_metric.endswith("loss") else "max"


# --------------------------------------------------------------------------------------------
# The objective (val_objective: what the train stage's select_metric and a sweep rank by)
# --------------------------------------------------------------------------------------------


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
            check(weight >= 0, f"objective.{term}", f"must be >= 0, got {weight}")
        check(any(getattr(self, t) > 0 for t in OBJECTIVE_TERMS), "objective", "needs at least one weight > 0")
        check(
            self.classification_metric in CLASSIFICATION_METRICS,
            "objective.classification_metric",
            f"must be one of {', '.join(CLASSIFICATION_METRICS)}, got {self.classification_metric!r}",
        )

    @property
    def weights(self) -> dict[str, float]:
        """Term -> weight."""
        return {term: float(getattr(self, term)) for term in OBJECTIVE_TERMS}
