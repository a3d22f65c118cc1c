"""The image builds the way DeepSpeed and pip need (no container engine here: the Dockerfile's own
checks are run with sh, its pins are read against pyproject.toml)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
CONSTRAINTS = ROOT / "constraints" / "image.txt"
# What the Dockerfile installs besides the package (DeepSpeed's build prerequisites, DeepSpeed).
BUILD_PREREQUISITES = ("packaging", "psutil", "py-cpuinfo", "ninja", "numpy", "deepspeed", "torch")


def _deepspeed_accelerators() -> list[str]:
    """deepspeed/accelerator/real_accelerator.py SUPPORTED_ACCELERATOR_LIST (read, not imported: no torch)."""
    spec = importlib.util.find_spec("deepspeed")
    assert spec and spec.submodule_search_locations
    source = (Path(next(iter(spec.submodule_search_locations))) / "accelerator" / "real_accelerator.py").read_text()
    (listed,) = re.findall(r"^SUPPORTED_ACCELERATOR_LIST = \[(.*)\]$", source, flags=re.M)
    return re.findall(r"'([^']+)'", listed)


def _run_lines() -> list[str]:
    """Every RUN instruction, continuation lines joined."""
    joined = DOCKERFILE.replace("\\\n", " ")
    return [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


def test_documented_gpu_build_sets_a_deepspeed_accelerator():
    (gpu_build,) = re.findall(
        r"^#\s+docker build -t medfusion-gpu:.*?\.$", DOCKERFILE.replace("\\\n#", ""), flags=re.M | re.S
    )
    (value,) = re.findall(r"--build-arg DS_ACCELERATOR=(\S*)", gpu_build)
    assert value == "cuda" and value in _deepspeed_accelerators()
    (default,) = re.findall(r"^ARG DS_ACCELERATOR=(\S*)$", DOCKERFILE, flags=re.M)
    assert default == "cpu"


@pytest.mark.parametrize("value,ok", [("cpu", True), ("cuda", True), ("", False), ("gpu", False)])
def test_the_build_refuses_an_accelerator_deepspeed_rejects(value, ok):
    (check,) = [line for line in _run_lines() if "DS_ACCELERATOR" in line and line.lstrip().startswith("case")]
    result = subprocess.run(["sh", "-c", check], env={"DS_ACCELERATOR": value}, capture_output=True, check=False)
    assert (result.returncode == 0) is ok, result.stderr
    if ok:
        assert value in _deepspeed_accelerators()


def _constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.!]*", version), (
                f"constraints/image.txt: {line!r} is not an exact pin"
            )
            pins[canonicalize_name(name)] = version
    return pins


def test_every_pip_install_is_held_to_the_constraints():
    installs = [cmd for line in _run_lines() for cmd in line.split("&&") if "pip install" in cmd]
    assert len(installs) >= 4
    for cmd in installs:
        assert "-c constraints/image.txt" in cmd, f"unconstrained: {cmd.strip()}"
    copy_at = DOCKERFILE.index("COPY --chown=1000:100 constraints/image.txt")
    assert copy_at < DOCKERFILE.index("RUN pip install"), "the constraints file is copied before the first install"


def test_constraints_pin_what_pyproject_and_the_build_install():
    pins = _constraints()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dependency in project["dependencies"]:
        req = Requirement(dependency)
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints/image.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} is outside {req.specifier}"
        )
    for name in BUILD_PREREQUISITES:
        assert canonicalize_name(name) in pins, f"constraints/image.txt does not pin {name}"
    (torch,) = re.findall(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE, flags=re.M)
    (ray,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE, flags=re.M)
    assert pins["torch"] == torch and pins["ray"] == ray
    assert pins["kfp-kubernetes"] and pins["kfp"] == "2.17.3"
