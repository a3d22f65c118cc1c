"""The Ray Jobs API client: submit a command to a running Ray cluster, stream its logs, wait for it.

`medfusion.orchestration.stages.run_stage` uses it for ``ray_address=http://HEAD:8265`` (the pipeline's
steps and ``medfusion train``); `medfusion.orchestration.deploy` uses its auth headers for Serve's
REST API, which the same dashboard serves. `JobError` and the terminal job states are the ones
the KubeRay target uses as well.

Authentication: a cluster started with Ray token authentication (on by default for ``ray start
--head`` when a token exists) answers 401 without ``Authorization: Bearer <token>``. The token is
looked up the way Ray itself does: ``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``,
then ``~/.ray/auth_token``; it is sent explicitly, so it works whatever this process's own
``RAY_AUTH_MODE`` is. On Kubernetes a pipeline step gets ``RAY_AUTH_TOKEN`` from the Secret that the
Ray clusters' ``authOptions`` name (``medfusion-ray-auth``, key ``auth_token``, mapped by the pipeline
with kfp-kubernetes); the trailing newline a ``--from-file`` Secret may hold is stripped. Storage
credentials (the ``AWS_*`` variables) reach the job through its runtime_env.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from medfusion import storage

SUCCEEDED = "SUCCEEDED"
# The states a Ray job (and a KubeRay RayJob's jobStatus) never leaves.
TERMINAL = frozenset({SUCCEEDED, "FAILED", "STOPPED"})
LOG_TAIL_LINES = 30


class JobError(RuntimeError):
    """A stage run on a Ray cluster did not succeed; the message names the job and its last log lines."""


def auth_token() -> str:
    """The Ray auth token of this environment, or "" when there is none.

    Raises:
        JobError: RAY_AUTH_TOKEN_PATH names a file that cannot be read.
    """
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
    """The ``Authorization`` header for the Ray dashboard's APIs (none without a token)."""
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def explicit_address() -> Iterator[None]:
    """JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is
    given; the configured ray_address must win (e.g. RAY_ADDRESS names a local cluster)."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a submitted job's driver: storage credentials (when set here), `extra` (what the
    stage's workers need, e.g. `medfusion.training.runtime.worker_env`) and unbuffered output."""
    env = {k: os.environ[k] for k in storage.AWS_ENV_VARS if os.environ.get(k)}
    env.update(extra or {})
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def _follow(client: Any, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _wait(client: Any, job_id: str, poll_s: float) -> str:
    """The job's status once terminal (the log stream can end a little before the status is final)."""
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    return status


def submit_job(
    address: str,
    entrypoint: str,
    submission_id: str,
    env: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    poll_s: float = 1.0,
    tail_lines: int = LOG_TAIL_LINES,
) -> str:
    """Submit `entrypoint` to the cluster at `address`, stream its logs, wait until it ends.

    Args:
        address: the Ray dashboard URL, ``http://HEAD:8265``.
        entrypoint: the shell command the job runs.
        submission_id: the job's id (unique on the cluster).
        env: environment variables of the job (its runtime_env), e.g. `job_env()`.
        metadata: string labels the Jobs API keeps with the job.
        out: where the job's logs are streamed (stdout).
        poll_s: seconds between status reads once the log stream has ended.
        tail_lines: log lines a JobError quotes.

    Returns:
        The job's id, once it succeeded.

    Raises:
        JobError: the cluster cannot be reached or refuses the token, or the job failed or was stopped.
    """
    from ray.job_submission import JobSubmissionClient

    out = out or sys.stdout
    address = address.rstrip("/")
    try:
        with explicit_address():
            client = JobSubmissionClient(address, headers=auth_headers())
        job_id = client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env={"env_vars": dict(env or {})},
            metadata=dict(metadata or {}),
        )
    except JobError:
        raise
    except Exception as err:  # unreachable address, HTTP 401/403 (token), a bad runtime_env...
        raise JobError(f"ray_address {address}: cannot submit {submission_id} ({err})") from None
    out.write(f"[medfusion] submitted Ray job {job_id} to {address}\n")
    out.flush()
    try:
        asyncio.run(_follow(client, job_id, out))
    except Exception as err:  # the log stream dropped: the job's status still decides
        out.write(f"[medfusion] log stream of {job_id} ended early ({err}); waiting for the job\n")
    status = _wait(client, job_id, poll_s)
    if status != SUCCEEDED:
        info = client.get_job_info(job_id)
        lines = client.get_job_logs(job_id).strip().splitlines()[-tail_lines:]
        raise JobError(
            f"Ray job {job_id} on {address} {status}: {info.message or ''}\n  last log lines:\n    "
            + "\n    ".join(lines)
        )
    return job_id
