"""The Ray Jobs API target against a real `ray start --head` on loopback: a stage is submitted, its
logs are streamed back, its result is read back, and a failing job fails the caller with its logs."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from medfusion.config import ConfigError
from medfusion.orchestration import jobs, stages
from medfusion.store import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head (dashboard and Jobs API on 127.0.0.1) in a process group of its own, stopped by its id.

    A head that exits while starting (a port taken between choosing and binding it) is started again
    on fresh ports, twice at most; the error then carries its log."""
    log_dir = tmp_path_factory.mktemp("ray")
    errors = []
    for attempt in range(3):
        head, address, temp_dir = _start_head(log_dir / f"head-{attempt}.log")
        try:
            _wait_for_jobs_api(address, head)
        except RuntimeError as error:
            _stop_head(head, temp_dir)
            errors.append(f"{error}\n{(log_dir / f'head-{attempt}.log').read_text(errors='replace')[-2000:]}")
            continue
        try:
            yield address
        finally:
            _stop_head(head, temp_dir)
        return
    raise RuntimeError("ray start --head did not come up in 3 tries:\n" + "\n---\n".join(errors))


def _start_head(log_path: Path) -> tuple[subprocess.Popen, str, str]:
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    # A temp dir of its own (short: Ray's socket paths have a length limit): `ray start` records its
    # address in <temp dir>/ray_current_cluster, where in /tmp/ray every later bare ray.init() on this
    # machine (other tests, other sessions) would find it and attach to it.
    temp_dir = tempfile.mkdtemp(prefix="mfray", dir="/tmp")
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        "--num-cpus=1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        *(f"{k}={v}" for k, v in ports.items()),
    ]
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return head, f"http://127.0.0.1:{dashboard}", temp_dir


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop the process group this fixture started (it may have ended already)."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(address: str, head: subprocess.Popen, timeout_s: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}")
        try:
            if httpx.get(f"{address}/api/jobs/", headers=jobs.auth_headers(), timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the Jobs API at {address} did not answer within {timeout_s:.0f} s")


def test_a_stage_runs_as_a_ray_job_and_its_result_comes_back(ray_head, tmp_path):
    out = io.StringIO()
    values = {
        "source": "synthetic",
        "output_uri": str(tmp_path / "data"),
        "preset": "tiny",
        "synth": {"num_samples": 40},
    }
    result = stages.run_stage("prepare", values, ray_head, out=out)
    assert result["dataset_uri"] == str(tmp_path / "data") and sum(result["rows"].values()) == 40
    assert (tmp_path / "data" / "manifest.json").is_file()
    logs = out.getvalue()
    assert "submitted Ray job medfusion-prepare-" in logs and "prepare result:" in logs, logs[-2000:]


def test_a_failing_job_fails_the_caller_with_its_last_log_lines(ray_head):
    out = io.StringIO()
    entrypoint = "python -c \"import sys; print('medfusion-boom'); sys.exit(3)\""
    with pytest.raises(jobs.JobError, match=r"(?s)FAILED.*medfusion-boom"):
        jobs.submit_job(ray_head, entrypoint, f"medfusion-fail-{uuid.uuid4().hex[:6]}", out=out)
    assert "medfusion-boom" in out.getvalue()


def test_a_bad_config_fails_before_anything_is_submitted(ray_head):
    with pytest.raises(ConfigError, match="source: must be one of"):
        stages.run_stage("prepare", {"source": "nope", "output_uri": "/tmp/x"}, ray_head)


def test_ray_auth_token_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert jobs.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.auth_headers() == {"Authorization": "Bearer from-home"}
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.auth_headers() == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(jobs.JobError, match="RAY_AUTH_TOKEN_PATH=.*cannot read the Ray auth token"):
        jobs.auth_headers()


def test_job_env_carries_storage_credentials_and_what_the_stage_adds(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    env = jobs.job_env({"DS_ACCELERATOR": "cpu"})
    assert env["AWS_ACCESS_KEY_ID"] == "key" and "AWS_SESSION_TOKEN" not in env
    assert env["DS_ACCELERATOR"] == "cpu" and env["PYTHONUNBUFFERED"] == "1"
