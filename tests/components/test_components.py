"""Every component is importable, typed, a thin wrapper of a medfusion function, on the project image,
and installs nothing at run time."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
import typing

import pytest

from medfusion.config import SERVE_TOKEN_ENV
from medfusion.orchestration.kuberay import DEFAULT_IMAGE

# component -> (the library call it wraps, the artifact types it takes and produces)
COMPONENTS = {
    "prepare_data": ("stages.run_stage", {"dataset": "system.Dataset"}),
    "train": ("stages.run_stage", {"dataset": "system.Dataset", "model": "system.Model", "metrics": "system.Metrics"}),
    "tune": (
        "stages.run_stage",
        {
            "dataset": "system.Dataset",
            "model": "system.Model",
            "leaderboard": "system.Markdown",
            "metrics": "system.Metrics",
        },
    ),
    "evaluate": (
        "stages.run_stage",
        {
            "dataset": "system.Dataset",
            "metrics": "system.Metrics",
            "classification": "system.ClassificationMetrics",
            "report": "system.HTML",
        },
    ),
    "quality_gate": ("gate.quality_gate", {"decision": "system.Markdown"}),
    "deploy": ("deployment.deploy", {"published": "system.Model"}),
    "smoke_test": ("deploy.run_smoke_test", {"dataset": "system.Dataset"}),
}
MAX_STATEMENTS = 7  # a wrapper: import, build the values, one call, record its outputs, return


def _component(name: str):
    return getattr(importlib.import_module(f"medfusion.components.{name}.component"), name)


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_is_typed_and_documented(name):
    component = _component(name)
    func = component.python_func
    hints = typing.get_type_hints(func)
    for parameter in inspect.signature(func).parameters:
        assert parameter in hints, f"{name}.{parameter} has no type annotation"
    assert "return" in hints, f"{name} has no return annotation"
    assert func.__doc__ and "Args:" in func.__doc__, f"{name}: docstring with Args"


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_uses_the_project_image_and_installs_nothing(name):
    container = _component(name).component_spec.implementation.container
    assert container.image == DEFAULT_IMAGE
    command = " ".join(container.command + container.args)
    assert "pip install" not in command, f"{name}: the image has everything; nothing is installed at run time"


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_artifacts(name):
    spec = _component(name).component_spec
    artifacts = {
        k: v.type.split("@")[0] for k, v in {**(spec.inputs or {}), **(spec.outputs or {})}.items() if "@" in v.type
    }
    assert artifacts == COMPONENTS[name][1]


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_is_a_thin_wrapper(name):
    # STYLE.md item 1: no branching in a wrapper; it calls the library and records what it returned.
    func = _component(name).python_func
    (tree,) = ast.parse(textwrap.dedent(inspect.getsource(func))).body
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert len(body) <= MAX_STATEMENTS, f"{name}: {len(body)} statements"
    branching = [
        type(n).__name__ for n in ast.walk(tree) if isinstance(n, (ast.If, ast.For, ast.While, ast.Try, ast.IfExp))
    ]
    assert not branching, f"{name}: {branching} belongs in medfusion.orchestration"
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert COMPONENTS[name][0] in calls, f"{name} does not call {COMPONENTS[name][0]}"
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports, f"{name}: imports go inside the function (KFP ships only its body)"


def test_every_component_folder_is_listed():
    from pathlib import Path

    folder = Path(importlib.import_module("medfusion.components").__file__).parent
    found = {p.parent.name for p in folder.glob("*/component.py")}
    assert found == set(COMPONENTS)


def test_smoke_test_token_default_is_the_serve_token_variable():
    # The component spells the name out (KFP runs its source alone); it must stay the library's.
    default = inspect.signature(_component("smoke_test").python_func).parameters["token_env"].default
    assert default == SERVE_TOKEN_ENV
