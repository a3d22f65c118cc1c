"""Building a config: dataclass defaults <- size preset <- YAML file <- dotted overrides.

The schemas are in `medfusion.config` (and beside the benchmarks and in `medfusion.tuning.config`);
this module turns plain data into them, with errors that name the field. It may be imported from
anywhere in medfusion and imports only `medfusion.config`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from medfusion.config import PRESETS, ConfigError

T = TypeVar("T")


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
    hints = typing.get_type_hints(cls)
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


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `update`, recursing into mappings that both hold (neither is modified)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
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


def apply_preset(preset: str, values: dict[str, Any], sections: tuple[str, ...] = ("model", "data")) -> dict[str, Any]:
    """`values` with a size preset's settings under each of `sections` (the user's values win).

    Every entry point applies presets through this function: the CLI, the pipeline's stage dispatch,
    and the train and tune stages' config loaders. An empty `preset` returns `values` unchanged.
    """
    if not preset:
        return dict(values)
    out = dict(values)
    for section in sections:
        part = preset_values(preset, section)
        if part:
            out[section] = {**part, **(out.get(section) or {})}
    return out


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
        values = merge(values, loaded)
    if overrides:
        values = merge(values, parse_overrides(overrides))
    return _build(cls, values)


def dump_yaml(cfg: Any) -> str:
    """The full config as YAML (what a run records next to its outputs)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
