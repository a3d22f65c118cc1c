"""Search spaces: what a sweep varies and over which values, checked before Ray starts.

A search space maps dotted settings to domains (a YAML file or a dict):

    model.fusion: {choice: [concat, gated, cross_attention, image_only, text_only]}
    train.lr: {loguniform: [1.0e-4, 3.0e-3]}
    model.dropout: {uniform: [0.0, 0.3]}
    model.hidden_dim: {randint: [32, 128]}     # both ends included
    zero_stage: [1, 2]                          # a list is a choice

A key is a setting of the trial's TrainConfig: ``model.*``, ``data.*`` or a training setting, written
``train.lr`` or just ``lr``. Every key must exist (an unknown one is named, with the closest real
ones), every range must be valid, and every candidate value (each choice and both ends of each range,
and every combination of them while there are at most MAX_COMBINATIONS) must make a valid trial
config: ``zero_stage: [0, 5]`` fails naming ``zero_stage`` and 5 before any trial starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import itertools
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from medfusion.config import ConfigError, TrainConfig
from medfusion.loader import load_config, merge, to_dict

DOMAINS = ("choice", "uniform", "loguniform", "randint")
# Settings a search space may not vary, and why.
NOT_SEARCHABLE = {
    "dataset_uri": "every trial trains on the sweep's dataset_uri",
    "storage_uri": "trials are stored in the sweep's folder",
    "name": "tune names each trial's run after its trial id",
    "resume": "tune resumes trials itself",
    "ray_address": "trials run on the sweep's Ray cluster",
    "epochs": "train.epochs is every trial's budget (ASHA's max_t); set it in train",
    "model.multi_label": "it comes from the dataset manifest",
    "model.preset": "it only names the preset the model settings came from",
}
# TrainConfig fields that a TuneConfig's `train` section may not set (tune sets them, or they have
# their own top-level section).
NOT_TRAIN_SETTINGS = {
    "dataset_uri": "set dataset_uri at the top level of the tune config",
    "storage_uri": "trials are stored under the sweep's folder (storage_uri at the top level)",
    "name": "each trial's run is named after its trial id",
    "resume": "use resume=true at the top level to continue a sweep",
    "ray_address": "trials run on the sweep's Ray cluster",
    "model": "set model.* at the top level of the tune config",
    "data": "set data.* at the top level of the tune config",
}
# A trial's training defaults where they differ from `medfusion train`'s (train.* overrides them).
TRIAL_DEFAULTS: dict[str, Any] = {
    "evaluate": False,
    "patience": 0,
    "select_metric": "val_objective",
    "keep_checkpoints": 1,
}
MAX_COMBINATIONS = 4096
SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Dimension:
    """One searched setting."""

    key: str
    """The TrainConfig path (``lr``, ``model.fusion``)."""
    domain: str
    """choice, uniform, loguniform or randint."""
    values: tuple[Any, ...]
    """The choices, or (low, high)."""

    @property
    def encoded(self) -> bool:
        """Choices that are not scalars (lists) travel through Tune and Optuna as JSON strings."""
        return self.domain == "choice" and not all(isinstance(v, SCALARS) for v in self.values)

    def tune_domain(self, grid: bool = False) -> Any:
        """The Ray Tune domain (grid: tune.grid_search over the choices)."""
        from ray import tune

        if self.domain == "choice":
            values = [json.dumps(v) for v in self.values] if self.encoded else list(self.values)
            return tune.grid_search(values) if grid else tune.choice(values)
        low, high = self.values
        if self.domain == "uniform":
            return tune.uniform(low, high)
        if self.domain == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(low, high + 1)  # Tune's upper end is exclusive; ours is included

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded and isinstance(value, str) else value

    def describe(self) -> str:
        if self.domain == "choice":
            return f"choice of {list(self.values)}"
        return f"{self.domain} [{self.values[0]}, {self.values[1]}]"


# ----------------------------------------------------------------------------------------------
# the settings a trial has
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def settings() -> dict[str, Any]:
    """Every dotted setting of a TrainConfig (``lr``, ``model.fusion``, ``data.batch_size``) -> its type."""

    def walk(cls: type, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                out.update(walk(tp, f"{prefix}{f.name}."))
            else:
                out[prefix + f.name] = tp
        return out

    return walk(TrainConfig, "")


def canonical_key(key: str) -> str:
    """``train.lr`` -> ``lr`` (a training setting may be written with or without ``train.``)."""
    return key[len("train.") :] if key.startswith("train.") else key


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not close and "." in key:
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def assign(values: Mapping[str, Any], assignment: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of nested config `values` with dotted `assignment` keys set (``model.fusion`` -> [model][fusion])."""
    out = copy.deepcopy(dict(values))
    for key, value in assignment.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def trial_config(base: Mapping[str, Any], assignment: Mapping[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig of a trial: `base` (trial_values) with the searched values set."""
    return load_config(TrainConfig, base=assign(base, assignment or {}))


def trial_values(cfg: Any) -> dict[str, Any]:
    """What every trial of the TuneConfig `cfg` starts from (TrainConfig fields as plain values):
    tune's trial defaults <- cfg.train <- cfg.model, cfg.data and cfg.dataset_uri."""
    values = merge(dict(TRIAL_DEFAULTS), dict(cfg.train))
    values.update(model=to_dict(cfg.model), data=to_dict(cfg.data), dataset_uri=cfg.dataset_uri)
    return values


# ----------------------------------------------------------------------------------------------
# parsing and checking
# ----------------------------------------------------------------------------------------------


def _number(value: Any, key: str, domain: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"search_space.{key}: {domain} bounds must be numbers, got {value!r}")
    try:
        number = float(value)  # YAML reads 1e-4 (no dot) as a string
    except (TypeError, ValueError):
        raise ConfigError(f"search_space.{key}: {domain} bounds must be numbers, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"search_space.{key}: {domain} bounds must be finite, got {value!r}")
    return number


def _dimension(key: str, spec: Any, tp: Any, grid: bool) -> Dimension:
    if isinstance(spec, (list, tuple)):
        spec = {"choice": list(spec)}
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(
            f"search_space.{key}: expected one of {{{', '.join(f'{d}: ...' for d in DOMAINS)}}} "
            f"or a list of choices, got {spec!r}"
        )
    ((domain, args),) = spec.items()
    if domain not in DOMAINS:
        raise ConfigError(f"search_space.{key}: unknown domain {domain!r}; the domains are {', '.join(DOMAINS)}")
    if grid and domain != "choice":
        raise ConfigError(f"search_space.{key}: grid search takes only choices (lists), not {domain}")
    if domain == "choice":
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"search_space.{key}: choice needs a non-empty list of values, got {args!r}")
        return Dimension(key, domain, tuple(args))
    if not isinstance(args, (list, tuple)) or len(args) != 2:
        raise ConfigError(f"search_space.{key}: {domain} needs [low, high], got {args!r}")
    origin = typing.get_origin(tp) or tp
    if domain in ("uniform", "loguniform") and origin is not float:
        kind = "an integer" if origin is int else f"a {getattr(origin, '__name__', origin)}"
        hint = "randint or choice" if origin is int else "choice"
        raise ConfigError(f"search_space.{key}: {domain} draws real numbers but {key} is {kind} setting; use {hint}")
    if domain == "randint":
        if origin not in (int, float):
            raise ConfigError(
                f"search_space.{key}: randint draws integers but {key} is not a number setting; use choice"
            )
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in args):
            raise ConfigError(f"search_space.{key}: randint bounds must be integers, got {list(args)}")
        low, high = args
    else:
        low, high = (_number(v, key, domain) for v in args)
    if not low < high:
        raise ConfigError(f"search_space.{key}: {domain} needs low < high, got [{args[0]}, {args[1]}]")
    if domain == "loguniform" and low <= 0:
        raise ConfigError(f"search_space.{key}: loguniform needs low > 0, got {args[0]}")
    return Dimension(key, domain, (low, high))


def _check_candidates(dims: list[Dimension], base: Mapping[str, Any]) -> None:
    """Each candidate value alone, then every combination (when there are not too many)."""
    for dim in dims:
        for value in dim.values:
            try:
                trial_config(base, {dim.key: value})
            except ConfigError as err:
                raise ConfigError(
                    f"search_space.{dim.key}: {value!r} does not make a valid trial config ({err})"
                ) from None
    if len(dims) < 2 or math.prod(len(d.values) for d in dims) > MAX_COMBINATIONS:
        return
    for combo in itertools.product(*(d.values for d in dims)):
        assignment = dict(zip((d.key for d in dims), combo))
        try:
            trial_config(base, assignment)
        except ConfigError as err:
            together = ", ".join(f"{k}={v!r}" for k, v in assignment.items())
            raise ConfigError(
                f"search_space: the combination {together} does not make a valid trial config ({err})"
            ) from None


def flatten_space(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections (``model: {fusion: [...]}``, or what dotted CLI overrides make) to dotted keys;
    strings (CLI values such as ``"[concat, gated]"``) are read as YAML."""
    known = settings()
    out: dict[str, Any] = {}
    for name, spec in raw.items():
        key = f"{prefix}{name}"
        if isinstance(spec, str):
            try:
                spec = yaml.safe_load(spec)
            except yaml.YAMLError as err:
                raise ConfigError(f"search_space.{key}: not valid YAML ({err})") from None
        is_domain = isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in DOMAINS
        if isinstance(spec, Mapping) and not is_domain and canonical_key(key) not in known:
            out.update(flatten_space(spec, key + "."))
        else:
            out[key] = spec
    return out


def parse_search_space(raw: Mapping[str, Any], base: Mapping[str, Any], *, grid: bool = False) -> list[Dimension]:
    """The dimensions of a search space, checked against the trial config `base` (trial_values).

    Raises:
        ConfigError: naming the key (and the value) that is unknown, not searchable, out of range or
            that makes an invalid trial config.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"search_space: expected a mapping of settings to domains, got {type(raw).__name__}")
    known = settings()
    dims: list[Dimension] = []
    seen: dict[str, str] = {}
    for written, spec in flatten_space(raw).items():
        key = canonical_key(str(written))
        if key in seen:
            raise ConfigError(f"search_space.{key}: given twice ({seen[key]} and {written})")
        seen[key] = str(written)
        if key in NOT_SEARCHABLE:
            raise ConfigError(f"search_space.{written}: cannot be searched ({NOT_SEARCHABLE[key]})")
        if key not in known:
            searchable = sorted(k for k in known if k not in NOT_SEARCHABLE)
            raise ConfigError(f"search_space.{written}: unknown setting{_suggest(key, searchable)}")
        dims.append(_dimension(key, spec, known[key], grid))
    _check_candidates(dims, base)
    return dims


def check_tune_config(cfg: Any) -> dict[str, Any]:
    """What TuneConfig.__post_init__ cannot check field by field: the `train` section, ASHA's grace
    period against train.epochs, and the inline search space.

    Returns:
        The `train` section with each value coerced to its TrainConfig type.
    """
    known = settings()
    train_fields = sorted(k for k in known if "." not in k and k not in NOT_TRAIN_SETTINGS)
    for key in cfg.train:
        if key in NOT_TRAIN_SETTINGS:
            raise ConfigError(f"train.{key}: not a trial setting ({NOT_TRAIN_SETTINGS[key]})")
        if key not in train_fields:
            raise ConfigError(f"train.{key}: unknown training setting{_suggest(key, train_fields)}")
    values = trial_values(cfg)
    try:
        base = load_config(TrainConfig, base=values)
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(("model.", "data.")) else f"train.{message}") from None
    train = {key: getattr(base, key) for key in cfg.train}
    values.update(train)
    if cfg.scheduler == "asha":
        if cfg.grace_period > base.epochs:
            raise ConfigError(f"grace_period: must be <= train.epochs ({base.epochs}), got {cfg.grace_period}")
    if cfg.search_space:
        parse_search_space(cfg.search_space, values, grid=cfg.search == "grid")
    return train


def packaged_search_spaces() -> list[str]:
    """Names of the search spaces shipped in medfusion/configs/search_spaces."""
    folder = resources.files("medfusion.configs").joinpath("search_spaces")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _search_space_text(uri: str) -> str:
    from medfusion import storage

    if "/" not in uri and not uri.endswith((".yaml", ".yml")) and uri in packaged_search_spaces():
        return resources.files("medfusion.configs").joinpath(f"search_spaces/{uri}.yaml").read_text()
    return storage.read_text(uri)


def read_search_space(cfg: Any) -> dict[str, Any]:
    """The sweep's search space: search_space_file (YAML, path or s3://) with search_space on top."""
    raw: dict[str, Any] = {}
    if cfg.search_space_file:
        try:
            loaded = yaml.safe_load(_search_space_text(cfg.search_space_file))
        except FileNotFoundError:
            raise ConfigError(f"search_space_file: {cfg.search_space_file} not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"search_space_file: {cfg.search_space_file} is not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"search_space_file: {cfg.search_space_file} must hold a mapping of settings to domains")
        raw = {canonical_key(k): v for k, v in flatten_space(loaded).items()}
    raw.update({canonical_key(k): v for k, v in flatten_space(cfg.search_space).items()})
    if not raw:
        raise ConfigError(
            "search_space: empty; give search_space or search_space_file (e.g. model.fusion: [concat, gated])"
        )
    return raw


def param_space(dims: list[Dimension], grid: bool = False) -> dict[str, Any]:
    """Tune's param_space: one flat key per dimension (the dotted setting)."""
    return {dim.key: dim.tune_domain(grid) for dim in dims}


def assignment_of(dims: list[Dimension], config: Mapping[str, Any]) -> dict[str, Any]:
    """The searched values of a Tune trial config, decoded."""
    return {dim.key: dim.decode(config[dim.key]) for dim in dims if dim.key in config}
