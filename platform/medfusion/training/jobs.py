"""Submitting a training run to an existing Ray cluster with the Ray Jobs API.

`ray_address=http://HEAD:8265` turns `run_train` into a submitter: the run's full config becomes
dotted overrides of ``python -m medfusion.train`` (the same stage function, with an empty
`ray_address`, so inside the job it joins the cluster it runs on), the job's logs are streamed to
this process's stdout, and a job that does not succeed raises an error carrying its last log lines.

Authentication: a cluster started with Ray token authentication (Ray >= 2.52; on by default for
``ray start --head`` when a token exists) answers 401 without ``Authorization: Bearer <token>``.
The token is looked up the way Ray itself does: ``RAY_AUTH_TOKEN``, then the file named by
``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``; it is sent explicitly, so it works whatever
this process's own ``RAY_AUTH_MODE`` is. Storage credentials (the ``AWS_*`` variables) reach the
job through its runtime_env.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from medfusion.config import TrainConfig, to_dict

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LOG_TAIL_LINES = 30


class JobError(RuntimeError):
    """A submitted Ray job did not succeed; the message names the job, its status and last log lines."""


def auth_token() -> str:
    """The Ray auth token of this environment, or "" when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip()
        except OSError as err:
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the Ray auth token ({err})") from None
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() if default.is_file() else ""


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))  # a YAML flow list, which the config loader parses
    return str(value)


def config_overrides(cfg: TrainConfig) -> list[str]:
    """Every field of `cfg` as a dotted KEY=VALUE override (what the job's command line carries)."""
    out: list[str] = []

    def walk(prefix: str, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                out.append(f"{prefix}{key}={_value(value)}")

    walk("", to_dict(cfg))
    return out


def job_entrypoint(cfg: TrainConfig) -> str:
    """The shell command the job runs: the same run, on the cluster it lands on."""
    inner = {**to_dict(cfg), "ray_address": ""}
    from medfusion.config import load_config

    overrides = config_overrides(load_config(TrainConfig, base=inner))
    return "python -m medfusion.train " + " ".join(shlex.quote(o) for o in overrides)


def job_env(cfg: TrainConfig) -> dict[str, str]:
    """Environment of the job's driver and workers: storage credentials, CPU DeepSpeed when no GPU."""
    from medfusion.train import worker_env

    return {**worker_env(cfg), "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def explicit_address() -> Iterator[None]:
    """JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is
    given; the configured ray_address must win (e.g. RAY_ADDRESS names a local cluster)."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


async def _follow(client: Any, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def submit_and_follow(cfg: TrainConfig, out: TextIO | None = None) -> str:
    """Submit `cfg` (with its run name fixed) to the cluster at `cfg.ray_address`, stream the job's
    logs to `out` (stdout), and return the job id once it succeeded.

    Raises:
        JobError: the cluster cannot be reached or refuses the token, or the job failed or was stopped.
    """
    from ray.job_submission import JobSubmissionClient

    out = out or sys.stdout
    address = cfg.ray_address.rstrip("/")
    try:
        with explicit_address():
            client = JobSubmissionClient(address, headers=auth_headers())
        job_id = client.submit_job(
            entrypoint=job_entrypoint(cfg),
            submission_id=f"medfusion-train-{cfg.name}-{uuid.uuid4().hex[:6]}",
            runtime_env={"env_vars": job_env(cfg)},
            metadata={"medfusion_run": cfg.name},
        )
    except JobError:
        raise
    except Exception as err:  # ConnectionError, HTTP 401/403 (token), bad address...
        raise JobError(f"ray_address {address}: cannot submit the training job ({err})") from None
    out.write(f"[medfusion] submitted Ray job {job_id} to {address}\n")
    out.flush()
    try:
        asyncio.run(_follow(client, job_id, out))
    except Exception as err:  # the log stream dropped; the job's status still decides
        out.write(f"[medfusion] log stream of {job_id} ended early ({err}); waiting for the job\n")
    status = _wait(client, job_id)
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        lines = client.get_job_logs(job_id).strip().splitlines()[-LOG_TAIL_LINES:]
        raise JobError(
            f"Ray job {job_id} on {address} {status}: {info.message or ''}\n  last log lines:\n    "
            + "\n    ".join(lines)
        )
    return job_id


def _wait(client: Any, job_id: str, poll_s: float = 1.0) -> str:
    """The job's status once terminal (the log stream can end a little before the status is final)."""
    import time

    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
