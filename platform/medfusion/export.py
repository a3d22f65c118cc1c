"""The export folder: everything serving and evaluation need to rebuild a trained model, no pickle.

    model.safetensors   the state dict (safetensors: tensors only, nothing executable)
    config.json         {"format_version", "model_name", "model": ModelConfig, "data": {image_size,
                         max_report_tokens, max_findings_tokens}, "vocab_size", "num_classes", ...}
    tokenizer.json      medfusion.data.tokenizer.Tokenizer.to_json()
    classes.json        class names in index order
    metrics.json        the metrics the model was selected on (non-finite values as null)
    lineage.json        dataset version, code version, config, trial id... (given by the caller)
    checksums.json      {"algorithm": "sha256", "files": {name: hex digest}}, written last

All I/O goes through medfusion.storage, so `uri` is a local folder or an ``s3://`` prefix.
`load_export` checks every file against checksums.json before it parses anything, so a truncated
or tampered export fails with an ExportError that names the file instead of a parser traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from medfusion import storage
from medfusion.config import ConfigError, ModelConfig
from medfusion.data.tokenizer import Tokenizer
from medfusion.loader import load_config, to_dict
from medfusion.models import MedFusionModel, build_model, count_parameters

# 2: the box head predicts a box per image region (heads.BoxHead); version-1 weights do not fit it.
# 3: a box per class (heads.BoxHead's class queries), and a model may have no trained decoder
#    (model.describes false: the dataset had no findings text).
# 4: each class's box score has its own output weights (heads.BoxHead.objectness_out).
# 5: the findings decoder attends over regions with their cell's (x, y) (models.decoder_regions).
# 6: the findings decoder is told where the box head found the lesion (models.place_features).
FORMAT_VERSION = 6
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CLASSES_FILE = "classes.json"
METRICS_FILE = "metrics.json"
LINEAGE_FILE = "lineage.json"
CHECKSUMS_FILE = "checksums.json"
EXPORT_FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, CLASSES_FILE, METRICS_FILE, LINEAGE_FILE)
DATA_KEYS = ("image_size", "max_report_tokens", "max_findings_tokens")


class ExportError(ValueError):
    """An export folder is missing a file, has a corrupted file, or does not match its config."""


@dataclass
class LoadedExport:
    """A verified export: the model (eval mode) and everything it was trained with."""

    uri: str
    model: MedFusionModel
    tokenizer: Tokenizer
    classes: list[str]
    config: dict[str, Any]
    """config.json as written (model config, data settings, sizes)."""
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    checksums: dict[str, str]

    @property
    def data(self) -> dict[str, int]:
        return dict(self.config["data"])

    @property
    def version(self) -> str:
        """Short content hash of the weights: changes exactly when the weights do."""
        return self.checksums[MODEL_FILE][:12]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _data_settings(data_settings: Any) -> dict[str, int]:
    values = dataclasses.asdict(data_settings) if dataclasses.is_dataclass(data_settings) else dict(data_settings)
    missing = [k for k in DATA_KEYS if k not in values]
    if missing:
        raise ExportError(f"data_settings: missing {', '.join(missing)} (needed at inference)")
    return {k: int(values[k]) for k in DATA_KEYS}


def export_model(
    model: MedFusionModel,
    uri: str,
    *,
    tokenizer: Tokenizer,
    classes: Sequence[str],
    data_settings: Any,
    metrics: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any] | None = None,
) -> str:
    """Write `model` and its inference settings to the export folder `uri`; return `uri`.

    Args:
        model: built by medfusion.models.build_model (a DDP/DeepSpeed wrapper's `.module` is used).
        tokenizer: the dataset's tokenizer (its size must match the model's vocabulary).
        classes: class names in index order (as many as the classifier's outputs).
        data_settings: a DataConfig or a mapping with image_size, max_report_tokens, max_findings_tokens.
        metrics, lineage: recorded as given.
    """
    model = getattr(model, "module", model)
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise ExportError("model has no ModelConfig (build it with medfusion.models.build_model)")
    if len(tokenizer) != model.vocab_size:
        raise ExportError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {model.vocab_size}")
    if len(classes) != model.num_classes:
        raise ExportError(f"{len(classes)} class names given but the model has {model.num_classes} outputs")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    config = {
        "format_version": FORMAT_VERSION,
        "model_name": f"medfusion_{cfg.preset}",
        "model": to_dict(cfg),
        "data": _data_settings(data_settings),
        "vocab_size": model.vocab_size,
        "num_classes": model.num_classes,
        "multi_label": cfg.multi_label,
        "parameters": count_parameters(model),
    }
    files = {
        MODEL_FILE: save_safetensors(state, metadata={"format": "pt", "medfusion_format": str(FORMAT_VERSION)}),
        CONFIG_FILE: storage.json_bytes(config, sort_keys=True),
        TOKENIZER_FILE: tokenizer.to_json().encode(),
        CLASSES_FILE: storage.json_bytes(list(classes), sort_keys=True),
        METRICS_FILE: storage.json_bytes(dict(metrics or {}), sort_keys=True),
        LINEAGE_FILE: storage.json_bytes(dict(lineage or {}), sort_keys=True),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(uri, name), data)
    # Last: an export with checksums.json is complete (a crash before this leaves an unloadable folder).
    checksums = {"algorithm": "sha256", "files": {name: _sha256(data) for name, data in files.items()}}
    storage.write_bytes(storage.join(uri, CHECKSUMS_FILE), storage.json_bytes(checksums, sort_keys=True))
    return uri


def _read(uri: str, name: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(uri, name))
    except FileNotFoundError:
        raise ExportError(f"{storage.join(uri, name)}: missing from the export") from None


def verify_export(uri: str) -> dict[str, bytes]:
    """Read every export file and check it against checksums.json; return the verified contents.

    Raises:
        ExportError: a missing file, or one whose sha256 does not match (naming it and both digests).
    """
    raw = _read(uri, CHECKSUMS_FILE)
    try:
        listed = json.loads(raw)["files"]
        assert isinstance(listed, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ExportError(f"{storage.join(uri, CHECKSUMS_FILE)}: not a valid checksums file") from None
    unlisted = [name for name in EXPORT_FILES if name not in listed]
    if unlisted:
        raise ExportError(f"{storage.join(uri, CHECKSUMS_FILE)}: does not list {', '.join(unlisted)}")
    contents = {}
    for name in EXPORT_FILES:
        data = _read(uri, name)
        digest = _sha256(data)
        if digest != listed[name]:
            raise ExportError(
                f"{storage.join(uri, name)}: sha256 mismatch (expected {listed[name][:12]}…, got {digest[:12]}…, "
                f"{len(data)} bytes): the export is corrupted or was modified"
            )
        contents[name] = data
    contents[CHECKSUMS_FILE] = raw
    return contents


def _parse_json(uri: str, name: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as err:
        raise ExportError(f"{storage.join(uri, name)}: not valid JSON ({err})") from None


def load_export(uri: str, device: str | torch.device = "cpu") -> LoadedExport:
    """Verify and load an export folder (local or s3://); the model is returned in eval mode.

    Raises:
        ExportError: anything missing, corrupted or inconsistent, naming the file.
    """
    files = verify_export(uri)
    config = _parse_json(uri, CONFIG_FILE, files[CONFIG_FILE])
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        found = config.get("format_version") if isinstance(config, dict) else None
        raise ExportError(
            f"{storage.join(uri, CONFIG_FILE)}: format_version {found!r}, this code reads {FORMAT_VERSION}"
        )
    try:
        model_cfg = load_config(ModelConfig, base=config["model"])
        _data_settings(config["data"])
        vocab_size, num_classes = int(config["vocab_size"]), int(config["num_classes"])
    except (ConfigError, ExportError, KeyError, TypeError, ValueError) as err:
        raise ExportError(f"{storage.join(uri, CONFIG_FILE)}: {err}") from None
    try:
        tokenizer = Tokenizer.from_json(files[TOKENIZER_FILE].decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{storage.join(uri, TOKENIZER_FILE)}: {err}") from None
    classes = _parse_json(uri, CLASSES_FILE, files[CLASSES_FILE])
    if not isinstance(classes, list) or len(classes) != num_classes:
        raise ExportError(f"{storage.join(uri, CLASSES_FILE)}: expected a list of {num_classes} class names")
    if len(tokenizer) != vocab_size:
        raise ExportError(
            f"{storage.join(uri, TOKENIZER_FILE)}: {len(tokenizer)} tokens, config.json says {vocab_size}"
        )
    model = build_model(model_cfg, vocab_size, num_classes)
    try:
        state = load_safetensors(files[MODEL_FILE])
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as err:
        raise ExportError(f"{storage.join(uri, MODEL_FILE)}: does not fit config.json ({err})") from None
    return LoadedExport(
        uri=uri,
        model=model.to(device).eval(),
        tokenizer=tokenizer,
        classes=[str(c) for c in classes],
        config=config,
        metrics=_parse_json(uri, METRICS_FILE, files[METRICS_FILE]),
        lineage=_parse_json(uri, LINEAGE_FILE, files[LINEAGE_FILE]),
        checksums=json.loads(files[CHECKSUMS_FILE])["files"],
    )
