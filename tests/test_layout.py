"""The package layout of DESIGN.md: one import root, no generic top-level names."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_mapped_packages_import_under_medfusion():
    for name in ("medfusion", "medfusion.components", "medfusion.pipelines", "medfusion.serve", "medfusion.data"):
        assert importlib.import_module(name)


@pytest.mark.parametrize("name", ["serve", "pipelines", "components"])
def test_no_generic_top_level_packages(name, tmp_path):
    # From a neutral folder, so only what is installed counts (not the repo's own folders).
    code = f"import importlib.util; print(importlib.util.find_spec({name!r}) is None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", f"a top-level package {name!r} is importable"


def test_platform_is_still_the_standard_library():
    import platform
    import sysconfig

    assert Path(platform.__file__).parent == Path(sysconfig.get_paths()["stdlib"])


def test_every_source_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    roots = {
        "medfusion": ROOT / "platform" / "medfusion",
        "medfusion.components": ROOT / "components",
        "medfusion.pipelines": ROOT / "pipelines",
        "medfusion.serve": ROOT / "serve",
    }
    found = set()
    for name, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)) if rel else name)
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_import_has_no_side_effects(tmp_path):
    # Importing the library starts nothing, creates no folders and does not import torch or ray.
    code = (
        "import sys, medfusion, medfusion.config, medfusion.storage, medfusion.store, medfusion.cli, "
        "medfusion.data.dataset, medfusion.data.prepare;"
        "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'kfp') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    assert list(tmp_path.iterdir()) == []
