"""Lineage: what a trained model was made from, recorded in its export's lineage.json.

    dataset_uri / dataset_version   the manifest's hash (medfusion.data.dataset.dataset_version)
    code_version                    `git describe --always --dirty` of the checkout the code runs
                                    from, or ``medfusion==<package version>`` for an installed package
    config                          the full stage config, as plain data
    seed, run_id, run_uri           how to reproduce and where the run lives
    created_at                      UTC time of the record

The record is built once on the driver (where the checkout is) and handed to the workers, so every
export of a run names the same code, whatever image its workers run in.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

GIT_TIMEOUT_S = 5.0


def package_version() -> str:
    try:
        return metadata.version("medfusion")
    except metadata.PackageNotFoundError:
        return "unknown"


def code_version(source_dir: str | Path | None = None) -> str:
    """``git describe --always --dirty`` of the checkout holding `source_dir` (default: this
    package's folder), or ``medfusion==<version>`` when it is not in a git checkout."""
    folder = Path(source_dir) if source_dir else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return f"git:{out.stdout.strip()}"
    return f"medfusion=={package_version()}"


def build_lineage(
    *,
    dataset_uri: str,
    dataset_version: str,
    config: Mapping[str, Any],
    seed: int,
    run_id: str,
    run_uri: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """The lineage record of one run (trial ids, parent runs... go in `extra`)."""
    return {
        "dataset_uri": dataset_uri,
        "dataset_version": dataset_version,
        "code_version": code_version(),
        "config": dict(config),
        "seed": int(seed),
        "run_id": run_id,
        "run_uri": run_uri,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
