"""Named MedFusion variants (timm-style `@register_model`), one per size preset of arXiv 2405.17459's
architecture: `medfusion_tiny` (~1 MB, tests), `medfusion_small` (CPU demo), `medfusion_base` (GPU).

    model = create_model("medfusion_tiny", vocab_size=500, num_classes=7, fusion="concat")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medfusion.config import ModelConfig
from medfusion.loader import load_config, preset_values
from medfusion.models.model import MedFusionModel, build_model

ModelFactory = Callable[..., MedFusionModel]
MODEL_REGISTRY: dict[str, ModelFactory] = {}


def register_model(fn: ModelFactory) -> ModelFactory:
    """Add a factory `fn(vocab_size, num_classes, **overrides)` to the registry under its name."""
    if fn.__name__ in MODEL_REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    MODEL_REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(MODEL_REGISTRY)


def create_model(name: str, vocab_size: int, num_classes: int, **overrides: Any) -> MedFusionModel:
    """Build the registered variant `name`; `overrides` are ModelConfig fields (e.g. fusion="gated")."""
    if name not in MODEL_REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return MODEL_REGISTRY[name](vocab_size, num_classes, **overrides)


def preset_config(preset: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a size preset (medfusion/configs/presets/<preset>.yaml) with field overrides."""
    return load_config(ModelConfig, base={**preset_values(preset, "model"), **overrides})


@register_model
def medfusion_tiny(vocab_size: int, num_classes: int, **overrides: Any) -> MedFusionModel:
    return build_model(preset_config("tiny", **overrides), vocab_size, num_classes)


@register_model
def medfusion_small(vocab_size: int, num_classes: int, **overrides: Any) -> MedFusionModel:
    return build_model(preset_config("small", **overrides), vocab_size, num_classes)


@register_model
def medfusion_base(vocab_size: int, num_classes: int, **overrides: Any) -> MedFusionModel:
    return build_model(preset_config("base", **overrides), vocab_size, num_classes)
