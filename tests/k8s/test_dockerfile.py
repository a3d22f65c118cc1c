"""The Dockerfile (not built here: no container engine) names the pinned versions and stays hardened."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S*)$", DOCKERFILE, flags=re.M)
    return value


def test_ray_is_the_pinned_version_and_the_base_image_matches():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    assert _arg("RAY_VERSION") == ray.split("==")[1]
    assert _arg("BASE_IMAGE") == "rayproject/ray:${RAY_VERSION}-py311"
    assert "assert ray.__version__ == '${RAY_VERSION}'" in DOCKERFILE  # the build fails if pip replaced Ray


def test_torch_is_the_makefile_version_from_the_cpu_index_first():
    (makefile_torch,) = re.findall(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert _arg("TORCH_VERSION") == makefile_torch
    assert _arg("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    steps = ('"torch==${TORCH_VERSION}"', "--no-build-isolation deepspeed", "pip install -c constraints/image.txt .")
    order = [DOCKERFILE.index(s) for s in steps]
    assert order == sorted(order), "torch, then DeepSpeed (no build isolation), then the package"


def test_runs_as_non_root_and_copies_only_the_package():
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, flags=re.M)
    assert users and all(not u.startswith(("root", "0")) for u in users)
    assert DOCKERFILE.index("USER 1000:100") < DOCKERFILE.index("RUN pip")
    copied = re.findall(r"^COPY --chown=1000:100 (.+) \S+$", DOCKERFILE, flags=re.M)
    assert " ".join(copied).split() == [
        "constraints/image.txt",  # the pins every pip install is held to (test_image_build.py)
        "pyproject.toml",
        "README.md",
        "platform",
        "components",
        "pipelines",
        "serve",
    ]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", ".medfusion", "*.env"} <= set(ignored)


def test_k8s_and_orchestration_name_the_images_this_file_builds():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"docker build -t medfusion:{version} ." in DOCKERFILE
    assert f"docker build -t medfusion-gpu:{version}" in DOCKERFILE


def test_the_image_installs_the_serve_proxys_header_timeout():
    from medfusion.serve.app import proxy_callback
    from medfusion.serving.settings import PROXY_CALLBACK_ENV

    (value,) = re.findall(rf"^ENV {PROXY_CALLBACK_ENV}=(\S+)$", DOCKERFILE, flags=re.M)
    module, _, attr = value.partition(":")
    assert f"{module}:{attr}" == f"{proxy_callback.__module__}:{proxy_callback.__name__}"


def test_the_image_sets_serves_environment_as_medfusion_serve_does():
    from medfusion.serving.settings import SERVE_ENVIRONMENT

    env = dict(re.findall(r"^(?:ENV |    )(RAY_SERVE_\w+)=(\S+)", DOCKERFILE, flags=re.M))
    assert env == SERVE_ENVIRONMENT
