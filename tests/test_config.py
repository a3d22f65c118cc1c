"""Configs: every checked-in YAML loads, overrides are typed, errors name the field."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from importlib import resources
from pathlib import Path

import pytest
import yaml

import medfusion
from medfusion import config as C
from medfusion.loader import field_docs, load_config, preset_values

CONFIG_SUFFIXES = ("Config", "Options")


def _config_classes() -> list[tuple[str, str]]:
    """Every dataclass named *Config or *Options in the package's source, as (module, class).

    Found by parsing the source rather than by a list, so that a new config cannot skip the checks.
    """
    root = Path(medfusion.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            decorated = isinstance(node, ast.ClassDef) and any(
                "dataclass" in ast.unparse(d) for d in node.decorator_list
            )
            if decorated and node.name.endswith(CONFIG_SUFFIXES):
                module = ".".join(("medfusion", *path.relative_to(root).with_suffix("").parts))
                found.append((module, node.name))
    return found


CONFIG_CLASSES = _config_classes()
SECTIONS = {"model": C.ModelConfig, "data": C.DataConfig, "synth": C.SynthConfig}


@pytest.mark.parametrize("preset", C.PRESETS)
def test_every_preset_loads_into_its_dataclasses(preset):
    text = resources.files("medfusion.configs").joinpath(f"presets/{preset}.yaml").read_text()
    data = yaml.safe_load(text)
    assert set(data) <= set(SECTIONS), f"unknown sections in {preset}.yaml"
    for section, cls in SECTIONS.items():
        cfg = load_config(cls, base=preset_values(preset, section))
        assert isinstance(cfg, cls)
    assert load_config(C.ModelConfig, base=preset_values(preset, "model")).preset == preset


def test_config_discovery_finds_the_stage_and_bench_configs():
    names = {name for _, name in CONFIG_CLASSES}
    assert {"TrainConfig", "TuneConfig", "ServeConfig", "PipelineConfig", "ServeBenchConfig"} <= names


@pytest.mark.parametrize("module, name", CONFIG_CLASSES, ids=[name for _, name in CONFIG_CLASSES])
def test_every_field_has_a_docstring(module, name):
    cls = getattr(importlib.import_module(module), name)
    assert dataclasses.is_dataclass(cls)
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize(
    "overrides, check",
    [
        (["synth.image_size=64"], lambda c: c.synth.image_size == 64),
        (["overwrite=true"], lambda c: c.overwrite is True),
        (["shard_size_mb=0.5"], lambda c: c.shard_size_mb == 0.5),
        (["classes=a,b,c"], lambda c: c.classes == ["a", "b", "c"]),
        (["synth.class_weights=[1, 2, 1, 1, 1, 1, 1]"], lambda c: c.synth.class_weights[1] == 2.0),
        (["split.val=0.2", "split.test=0.2"], lambda c: (c.split.val, c.split.test) == (0.2, 0.2)),
    ],
)
def test_dotted_overrides_are_typed(overrides, check):
    assert check(load_config(C.PrepareConfig, overrides=overrides))


@pytest.mark.parametrize(
    "cls, overrides, message",
    [
        (C.PrepareConfig, ["synth.bogus=1"], "synth.bogus: unknown field"),
        (C.PrepareConfig, ["source=ftp"], "source: must be one of synthetic"),
        (C.PrepareConfig, ["source=manifest"], "source_uri: is required"),
        (C.PrepareConfig, ["synth.label_noise=1.5"], "synth.label_noise: must be in [0, 1)"),
        (C.PrepareConfig, ["synth.num_samples=ten"], "synth.num_samples: expected int"),
        (C.PrepareConfig, ["overwrite=maybe"], "overwrite: expected true or false"),
        (C.PrepareConfig, ["split.val=0.6", "split.test=0.5"], "split: val + test"),
        (C.ModelConfig, ["fusion=sum"], "model.fusion: must be one of concat"),
        (C.DataConfig, ["batch_size=0"], "data.batch_size: must be >= 1"),
        (C.DataConfig, ["block_rows=0"], "data.block_rows: must be >= 1, got 0"),
        (C.PrepareConfig, ["novalue"], "expected KEY=VALUE"),
    ],
)
def test_bad_values_name_the_field(cls, overrides, message):
    with pytest.raises(C.ConfigError, match=None) as err:
        load_config(cls, overrides=overrides)
    assert message in str(err.value)


def test_yaml_file_is_a_partial_override(tmp_path):
    path = tmp_path / "prepare.yaml"
    path.write_text("synth:\n  num_samples: 50\nshard_size_mb: 1\n")
    cfg = load_config(C.PrepareConfig, path, ["synth.seed=7"])
    assert (cfg.synth.num_samples, cfg.synth.seed, cfg.shard_size_mb, cfg.synth.image_size) == (50, 7, 1.0, 128)


def test_missing_or_bad_yaml_is_named(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        load_config(C.PrepareConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(C.ConfigError, match="bad.yaml: expected a mapping"):
        load_config(C.PrepareConfig, bad)
