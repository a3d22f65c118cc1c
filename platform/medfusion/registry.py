"""The model registry: named, immutable model versions with a model card and lineage, on a local
folder or an ``s3://`` prefix.

    <registry>/<name>/<version>/   a complete export (Predictor.from_export loads it as it is) whose
                                   lineage.json links dataset -> run/trial -> checkpoint -> export ->
                                   this version, plus card.md and version.json (metadata)
    <registry>/<name>/latest       one line: the version ``NAME`` and ``NAME:latest`` resolve to

Completion. version.json is written last, after every export file, lineage.json and card.md: a
version folder without it is a copy in progress or one that crashed, which no lookup ever returns and
which the next registration of that version simply overwrites.

Versions. By default a version is content-addressed, ``sha-<12 hex of sha256(the export's
checksums.json)>``, so registering the same export again is a no-op that returns the existing
version, and two registrations of different exports never share a folder. A complete version is never
rewritten; registering different content under an existing explicit version raises RegistryError.
(Two registrations of *different* content under the same explicit version at the same instant are
not detected: pick explicit versions from one writer, or keep the default.) The export files of a
version, lineage.json included, are a function of the registration's inputs alone (no timestamps), so
concurrent registrations of the same export write identical bytes and leave a verified export; only
card.md and version.json then carry the registration time of one or the other.

``latest`` is written only after its version is complete, in one atomic write (a temporary file and
``os.replace`` locally, a single PUT on S3), so it never names a partial copy. Under concurrency it
names the registration that completed last: each registration (with ``set_latest``) points it at its
own version, also when that version already existed, which is how an older version is promoted back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medfusion import storage
from medfusion.config import ConfigError

DEFAULT_REGISTRY_URI = "s3://medfusion/registry"  # the default of every config that names a registry
REGISTRY_ENV = "MEDFUSION_REGISTRY"
LATEST = "latest"
VERSION_FILE = "version.json"
CARD_FILE = "card.md"
LINEAGE_FILE = "lineage.json"  # medfusion.export.LINEAGE_FILE (not imported: reading needs no torch)
FORMAT_VERSION = 1
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(NAME_PATTERN)  # used with fullmatch
# Metrics shown in `models list`, in this order when present (else the first few reported).
LIST_METRICS = ("accuracy", "macro_f1", "mean_iou", "rouge_l", "bleu4")
# Hyper-parameters the model card shows, matched on the last segment of a dotted config key.
KEY_PARAMS = (
    "preset",
    "fusion",
    "cnn_widths",
    "embed_dim",
    "hidden_dim",
    "decoder_dim",
    "attention_heads",
    "dropout",
    "modality_dropout",
    "image_size",
    "lr",
    "weight_decay",
    "batch_size",
    "epochs",
    "strategy",
    "zero_stage",
    "seed",
)


class RegistryError(ValueError):
    """A registration that would break the registry's rules (e.g. overwrite an immutable version)."""


class ModelNotFoundError(ConfigError, LookupError):
    """An unknown or incomplete model name or version; the message lists what exists."""


@dataclass
class ModelVersion:
    """One registered model version, as version.json and lineage.json describe it."""

    name: str
    version: str
    uri: str
    """The version folder: an export folder (Predictor.from_export(uri) loads it)."""
    registered_at: str
    """UTC ISO-8601 time of the registration (taken as its copy starts)."""
    dataset_version: str
    metrics: dict[str, float]
    metrics_ci: dict[str, list[float]]
    """Metric -> [low, high] of its 95% confidence interval, where known."""
    source_uri: str
    """The export it was copied from."""
    lineage: dict[str, Any] = field(default_factory=dict)
    """What the version's lineage.json holds."""
    is_latest: bool = False

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


# ------------------------------------------------------------------------------------ references


def _check_name(value: str, what: str) -> str:
    if not _NAME.fullmatch(value or ""):
        raise ConfigError(f"{what}: {value!r} is not a valid name (allowed: {NAME_PATTERN}, e.g. medfusion-tiny)")
    return value


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME`` -> (NAME, "latest"); ``NAME:VERSION`` -> (NAME, VERSION).

    Raises:
        ConfigError: naming the reference and the allowed pattern.
    """
    name, sep, version = ref.strip().partition(":")
    _check_name(name, f"model reference {ref!r}: name")
    if not sep:
        return name, LATEST
    return name, _check_name(version, f"model reference {ref!r}: version")


def _version_uri(registry_uri: str, name: str, version: str) -> str:
    return storage.join(registry_uri, name, version)


def _latest_uri(registry_uri: str, name: str) -> str:
    return storage.join(registry_uri, name, LATEST)


# ------------------------------------------------------------------------------------ helpers


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries (metrics.json may hold nulls, nested details, counts as text)."""
    return {str(k): v for k, v in ((k, _number(v)) for k, v in metrics.items()) if v is not None}


def _metrics_ci(metrics_ci: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    out = {}
    for metric, interval in metrics_ci.items():
        bounds = (
            [_number(v) for v in interval] if isinstance(interval, Sequence) and not isinstance(interval, str) else []
        )
        if len(bounds) != 2 or None in bounds or bounds[0] > bounds[1]:
            raise ConfigError(f"metrics_ci.{metric}: expected [low, high] with low <= high, got {interval!r}")
        out[str(metric)] = bounds
    return out


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def key_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The key hyper-parameters of a (nested) config: dotted key -> value, KEY_PARAMS order."""
    flat = _flatten(config)
    picked = {}
    for param in KEY_PARAMS:
        key = next((k for k in flat if k.rsplit(".", 1)[-1] == param), None)
        if key is not None:
            picked[key] = flat[key]
    return picked


def _scan(registry_uri: str) -> list[tuple[str, ...]]:
    """Every file under the registry as path segments relative to its root."""
    _, base = storage.filesystem(registry_uri)
    if not storage.is_s3(registry_uri):
        # os.walk, not a pyarrow listing: a registration running beside us creates folders and renames
        # temporary files while we walk, which must not fail the listing.
        return [(*Path(folder).relative_to(base).parts, file) for folder, _, files in os.walk(base) for file in files]
    prefix = f"s3://{base.rstrip('/')}/"
    return [tuple(uri[len(prefix) :].split("/")) for uri in storage.list_files(registry_uri) if uri.startswith(prefix)]


def _read_json(uri: str) -> dict[str, Any]:
    try:
        value = json.loads(storage.read_bytes(uri))
    except ValueError as err:
        raise RegistryError(f"{uri}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise RegistryError(f"{uri}: expected a JSON object")
    return value


def _marker(version_uri: str) -> dict[str, Any] | None:
    """version.json of a complete version, or None while the version is absent or partial."""
    try:
        return _read_json(storage.join(version_uri, VERSION_FILE))
    except FileNotFoundError:
        return None


def registered_as(uri: str) -> str:
    """``NAME:VERSION`` when `uri` is a complete registry version folder, else "" (a plain export)."""
    try:
        meta = _marker(uri)
    except (OSError, RegistryError, ValueError):
        return ""
    if not meta or not meta.get("name") or not meta.get("version"):
        return ""
    return f"{meta['name']}:{meta['version']}"


def _model_version(registry_uri: str, name: str, version: str, meta: Mapping[str, Any], latest: str) -> ModelVersion:
    uri = _version_uri(registry_uri, name, version)
    return ModelVersion(
        name=name,
        version=version,
        uri=uri,
        registered_at=str(meta.get("registered_at", "")),
        dataset_version=str(meta.get("dataset_version") or ""),
        metrics={k: float(v) for k, v in dict(meta.get("metrics") or {}).items()},
        metrics_ci={k: [float(x) for x in v] for k, v in dict(meta.get("metrics_ci") or {}).items()},
        source_uri=str(meta.get("source_uri", "")),
        lineage=_read_json(storage.join(uri, LINEAGE_FILE)),
        is_latest=version == latest,
    )


# ------------------------------------------------------------------------------------ writing


def _lineage(
    export_lineage: Mapping[str, Any],
    extra: Mapping[str, Any],
    *,
    source_uri: str,
    name: str,
    version: str,
    uri: str,
    registry_uri: str,
    content_sha256: str,
) -> dict[str, Any]:
    """The export's lineage, the caller's on top, and the links down to this version. No timestamps:
    concurrent registrations of the same export must write identical bytes."""
    merged = {**dict(export_lineage), **dict(extra)}
    merged.update(
        source_uri=source_uri,
        model_name=name,
        model_version=version,
        model_uri=uri,
        registry_uri=registry_uri,
        export_checksums_sha256=content_sha256,
    )
    merged["chain"] = [
        {"step": "dataset", "uri": merged.get("dataset_uri"), "version": merged.get("dataset_version")},
        {
            "step": "run",
            "trial_id": merged.get("trial_id"),
            "run_id": merged.get("run_id"),
            "sweep_uri": merged.get("sweep_uri"),
        },
        {"step": "checkpoint", "uri": merged.get("checkpoint_uri")},
        {"step": "export", "uri": source_uri},
        {"step": "model", "ref": f"{name}:{version}", "uri": uri},
    ]
    return merged


def _or_unknown(value: Any) -> str:
    return "unknown" if value in (None, "") else str(value)


def render_card(mv: ModelVersion, params: Mapping[str, Any], export_config: Mapping[str, Any]) -> str:
    """The model card (card.md) of a version: what it is, how good, from what, and what it is not for."""
    lineage = mv.lineage
    lines = [
        f"# Model card: {mv.ref}",
        "",
        f"- **Registered**: {mv.registered_at}",
        f"- **Architecture**: {export_config.get('model_name', 'medfusion')} (CNN image encoder, BiLSTM + attention "
        f"note encoder, fusion, classification / box / findings heads; arXiv 2405.17459), "
        f"{_or_unknown(export_config.get('parameters'))} parameters",
        f"- **Data version**: `{_or_unknown(mv.dataset_version)}` ({_or_unknown(lineage.get('dataset_uri'))})",
        f"- **Code version**: {_or_unknown(lineage.get('code_version'))}",
        f"- **Registry folder**: {mv.uri}",
        f"- **Copied from**: {mv.source_uri}",
        "",
        "## Metrics",
        "",
    ]
    if mv.metrics or mv.metrics_ci:
        lines += ["| metric | value | 95% CI |", "|---|---|---|"]
        for metric in [*mv.metrics, *(m for m in mv.metrics_ci if m not in mv.metrics)]:
            value, ci = mv.metrics.get(metric), mv.metrics_ci.get(metric)
            lines.append(
                f"| {metric} | {'-' if value is None else f'{value:.4f}'} | "
                f"{f'[{ci[0]:.4f}, {ci[1]:.4f}]' if ci else 'not computed'} |"
            )
        lines += [
            "",
            "As recorded at registration (the caller's, else the export's metrics.json). A CI covers "
            "the sampling noise of the evaluation split only, not a shift to other data.",
        ]
    else:
        lines.append("No metrics were recorded with this version.")
    lines += ["", "## Configuration (key hyper-parameters)", ""]
    if params:
        lines += [
            "| parameter | value |",
            "|---|---|",
            *(f"| {k} | {json.dumps(storage.json_safe(v))} |" for k, v in params.items()),
        ]
    else:
        lines.append("Not recorded.")
    lines += [
        "",
        "The full configuration is in lineage.json (`config`) and config.json.",
        "",
        "## Intended use",
        "",
        "Research and education: studying multimodal (image + clinical note) fusion for disease classification, "
        "lesion localization and findings generation on the project's synthetic benchmark or on datasets you "
        "prepared and validated yourself. **Not for clinical use**: not a medical device, not validated for "
        "diagnosis, triage or treatment decisions.",
        "",
        "## Limitations",
        "",
        "- Quality is known only on the data version above; on other sites, scanners, populations or real "
        "radiographs it is unknown until measured there.",
        "- Localization predicts a single box per image; generated findings can read fluently and still be wrong.",
        "- No subgroup or fairness analysis and no calibration study were made.",
        "- A clinical note is optional at inference; quality without one is not reported separately unless a "
        "metric above says so.",
        "",
        "## Lineage",
        "",
    ]
    labels = {"dataset": "dataset", "run": "run", "checkpoint": "checkpoint", "export": "export", "model": "model"}
    for step in lineage.get("chain", []):
        details = ", ".join(f"{k} {v}" for k, v in step.items() if k != "step" and v not in (None, ""))
        lines.append(f"1. {labels.get(step.get('step'), step.get('step'))}: {details or 'unknown'}")
    return "\n".join(lines) + "\n"


def register(
    export_uri: str,
    registry_uri: str,
    name: str,
    *,
    version: str = "",
    metrics: Mapping[str, float] | None = None,
    metrics_ci: Mapping[str, Sequence[float]] | None = None,
    lineage: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    set_latest: bool = True,
) -> ModelVersion:
    """Copy a verified export into the registry as ``name:version`` and (by default) make it latest.

    Args:
        export_uri: the export folder (local or s3://); it is verified against its checksums first.
        registry_uri: the registry root (local or s3://).
        name: the model name (NAME_PATTERN).
        version: an explicit version; default ``sha-<12 hex>`` of the export's content.
        metrics: the metrics to record (default: the numbers in the export's metrics.json).
        metrics_ci: metric -> [low, high] 95% confidence interval, where known.
        lineage: merged over the export's lineage.json (e.g. sweep_uri, trial_id, checkpoint_uri).
        config: the configuration whose key hyper-parameters the card shows (default: lineage's
            ``config``, else the export's config.json).
        set_latest: point ``name:latest`` at this version once it is complete.

    Returns:
        The registered version; the existing one when this content is already registered.

    Raises:
        ExportError: the export is missing a file or a file is corrupted (naming it).
        RegistryError: `version` exists with different content (versions are immutable).
        ConfigError: a bad name, version or metrics_ci.
    """
    from medfusion.export import CHECKSUMS_FILE, verify_export

    _check_name(name, "name")
    if version:
        _check_name(version, "version")
        if version == LATEST:
            raise ConfigError(f"version: {LATEST!r} is the alias of the newest registration, not a version name")
    files = verify_export(export_uri)
    content_sha256 = hashlib.sha256(files[CHECKSUMS_FILE]).hexdigest()
    version = version or f"sha-{content_sha256[:12]}"
    uri = _version_uri(registry_uri, name, version)
    storage.ensure_bucket(uri)
    existing = _marker(uri)
    if existing is None:
        _copy(
            files,
            uri,
            registry_uri=registry_uri,
            name=name,
            version=version,
            source_uri=export_uri,
            content_sha256=content_sha256,
            metrics=metrics,
            metrics_ci=metrics_ci,
            lineage=lineage,
            config=config,
        )
    elif existing.get("content_sha256") != content_sha256:
        raise RegistryError(
            f"{name}:{version} already exists at {uri} with other content (registered {existing.get('registered_at')} "
            f"from {existing.get('source_uri')}); versions are immutable: register {export_uri} under a new "
            "version, or leave version empty for a content-addressed one"
        )
    if set_latest:
        storage.write_text(_latest_uri(registry_uri, name), version + "\n")  # atomic: tmp + rename, or one PUT
    return get_version(registry_uri, f"{name}:{version}")


def _copy(
    files: dict[str, bytes],
    uri: str,
    *,
    registry_uri: str,
    name: str,
    version: str,
    source_uri: str,
    content_sha256: str,
    metrics: Mapping[str, float] | None,
    metrics_ci: Mapping[str, Sequence[float]] | None,
    lineage: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
) -> None:
    """Write the version folder; version.json last (a crash before it leaves an invisible partial copy)."""
    from medfusion.export import CHECKSUMS_FILE, CONFIG_FILE, EXPORT_FILES, METRICS_FILE

    export_config = json.loads(files[CONFIG_FILE])
    merged = _lineage(
        json.loads(files[LINEAGE_FILE]),
        lineage or {},
        source_uri=source_uri,
        name=name,
        version=version,
        uri=uri,
        registry_uri=registry_uri,
        content_sha256=content_sha256,
    )
    lineage_bytes = storage.json_bytes(merged, sort_keys=True)
    contents = {**{f: files[f] for f in EXPORT_FILES}, LINEAGE_FILE: lineage_bytes}
    # The copy stays a loadable export: its checksums now cover the registry's lineage.json.
    checksums = {"algorithm": "sha256", "files": {f: hashlib.sha256(d).hexdigest() for f, d in contents.items()}}
    recorded = _metrics(metrics if metrics is not None else json.loads(files[METRICS_FILE]))
    mv = ModelVersion(
        name=name,
        version=version,
        uri=uri,
        registered_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        dataset_version=str(merged.get("dataset_version") or ""),
        metrics=recorded,
        metrics_ci=_metrics_ci(metrics_ci or {}),
        source_uri=source_uri,
        lineage=merged,
    )
    params = key_params(
        config
        or merged.get("config")
        or {"model": export_config.get("model", {}), "data": export_config.get("data", {})}
    )
    for file_name, data in contents.items():
        storage.write_bytes(storage.join(uri, file_name), data)
    storage.write_text(storage.join(uri, CARD_FILE), render_card(mv, params, export_config))
    storage.write_bytes(storage.join(uri, CHECKSUMS_FILE), storage.json_bytes(checksums, sort_keys=True))
    meta = {k: v for k, v in asdict(mv).items() if k not in ("lineage", "is_latest", "uri")}
    meta.update(
        format_version=FORMAT_VERSION,
        content_sha256=content_sha256,
        dataset_uri=merged.get("dataset_uri"),
        params=params,
    )
    storage.write_bytes(
        storage.join(uri, VERSION_FILE), storage.json_bytes(meta, sort_keys=True)
    )  # last: the version is complete


# ------------------------------------------------------------------------------------ reading


def _latest(registry_uri: str, name: str) -> str:
    try:
        return storage.read_text(_latest_uri(registry_uri, name)).strip()
    except FileNotFoundError:
        return ""


def list_versions(registry_uri: str, name: str = "") -> list[ModelVersion]:
    """The complete versions of one model (or of every model), newest registration first."""
    if name:
        _check_name(name, "name")
    found = [
        (p[0], p[1])
        for p in _scan(registry_uri)
        if len(p) == 3
        and p[2] == VERSION_FILE
        and p[0] == (name or p[0])
        and _NAME.fullmatch(p[0])
        and _NAME.fullmatch(p[1])
    ]
    latest = {n: _latest(registry_uri, n) for n in {n for n, _ in found}}
    versions = [
        _model_version(
            registry_uri, n, v, _read_json(storage.join(_version_uri(registry_uri, n, v), VERSION_FILE)), latest[n]
        )
        for n, v in found
    ]
    return sorted(versions, key=lambda mv: (mv.registered_at, mv.name, mv.version), reverse=True)


def _not_found(registry_uri: str, name: str, version: str) -> ModelNotFoundError:
    paths = _scan(registry_uri)
    names = sorted({p[0] for p in paths if len(p) == 3 and p[2] == VERSION_FILE})
    if name not in names:
        known = ", ".join(names) if names else "none (the registry is empty)"
        return ModelNotFoundError(f"model {name!r} is not in the registry {registry_uri}; models: {known}")
    versions = [mv.version for mv in list_versions(registry_uri, name)]
    partial = any(len(p) == 3 and p[:2] == (name, version) for p in paths)
    why = (
        (
            f"{name}:{version} is incomplete (no {VERSION_FILE}: a registration in progress or interrupted; "
            "registering its export again completes it)"
        )
        if partial
        else f"model {name!r} has no version {version!r}"
    )
    return ModelNotFoundError(f"{why}; versions in {registry_uri} (newest first): {', '.join(versions)}")


def get_version(registry_uri: str, ref: str) -> ModelVersion:
    """The complete version a reference ``NAME[:VERSION]`` names (``latest`` when VERSION is omitted).

    Raises:
        ConfigError: a malformed reference.
        ModelNotFoundError: an unknown name or version (listing the known ones), or an incomplete copy.
    """
    name, version = parse_ref(ref)
    latest = _latest(registry_uri, name)
    if version == LATEST:
        if not latest:
            raise _not_found(registry_uri, name, LATEST)
        version = latest
    meta = _marker(_version_uri(registry_uri, name, version))
    if meta is None:
        raise _not_found(registry_uri, name, version)
    return _model_version(registry_uri, name, version, meta, latest)


def resolve_model_uri(registry_uri: str, name: str, version: str = LATEST) -> str:
    """The export folder of ``name:version`` (a complete version only); the hook serving calls."""
    return get_version(registry_uri, f"{name}:{version or LATEST}").uri


# ------------------------------------------------------------------------------------ display


def _list_metrics(metrics: Mapping[str, float], limit: int = 3) -> list[str]:
    """The metrics `models list` shows: LIST_METRICS first, also under a prefix (test_accuracy...)."""
    shown = [
        next(k for k in metrics if k == m or k.endswith(f"_{m}"))
        for m in LIST_METRICS
        if any(k == m or k.endswith(f"_{m}") for k in metrics)
    ]
    return list(dict.fromkeys(shown + list(metrics)))[:limit]


def format_table(versions: Sequence[ModelVersion]) -> str:
    """`models list`: one row per version (name, version, registered, data version, metrics, latest)."""
    if not versions:
        return "no registered models"
    rows = [("NAME", "VERSION", "REGISTERED (UTC)", "DATA VERSION", "METRICS", "LATEST")]
    for mv in versions:
        shown = _list_metrics(mv.metrics)
        rows.append(
            (
                mv.name,
                mv.version,
                mv.registered_at[:19].replace("T", " "),
                (mv.dataset_version or "unknown")[:16],
                " ".join(f"{m}={mv.metrics[m]:.4f}" for m in shown) or "-",
                "*" if mv.is_latest else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def describe(mv: ModelVersion) -> str:
    """`models show`: the model card followed by where everything is."""
    card = storage.read_text(storage.join(mv.uri, CARD_FILE))
    return (
        f"{card}\n## Where\n\n- version folder (export): {mv.uri}\n- copied from: {mv.source_uri}\n"
        f"- lineage: {storage.join(mv.uri, LINEAGE_FILE)}\n- latest: {'yes' if mv.is_latest else 'no'}\n"
    )
