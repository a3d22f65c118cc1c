"""`ray_address=http://HEAD:8265`: the run is submitted as a Ray job to a real `ray start --head` on
loopback (token authentication on), its logs are streamed back, and a failed job fails the call.

The head runs with its own --temp-dir (so it never becomes the machine's default cluster for other
processes' `ray.init()`), in its own process group, and is stopped by killing exactly that group and
any process whose command line names its temp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from medfusion import storage
from medfusion.config import PrepareConfig, SynthConfig
from medfusion.store import free_ports
from medfusion.train import load_train_config, run_train
from medfusion.training.jobs import JobError

pytestmark = pytest.mark.integration

PORT_FLAGS = (
    "--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
    "--node-manager-port", "--object-manager-port",
)  # fmt: skip


def _our_processes(marker: str) -> list[int]:
    """Pids whose command line names `marker` (our head's unique temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_head(s3_store):
    """A Ray head with token auth and 2 CPUs; yields (dashboard URL, token)."""
    temp_dir = tempfile.mkdtemp(prefix="mfhead", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = uuid.uuid4().hex
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, DS_ACCELERATOR="cpu",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus=2",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        f"--temp-dir={temp_dir}", *[f"{flag}={port}" for flag, port in ports.items()],
    ]  # fmt: skip
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                request = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(request, timeout=5).read()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray head did not come up:\n{Path(temp_dir, 'head.log').read_text()[-3000:]}")
                time.sleep(1)
        yield address, token
    finally:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                pass
            for pid in _our_processes(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while (head.poll() is None or _our_processes(temp_dir)) and time.monotonic() < deadline:
                time.sleep(0.5)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def job_dataset(s3_store):
    from medfusion.data.prepare import run_prepare

    uri = f"s3://{s3_store.state().bucket}/train-jobs/data"
    run_prepare(PrepareConfig(source="synthetic", output_uri=uri, overwrite=True, synth=SynthConfig(num_samples=160, image_size=32)))
    return uri


def _job_config(address: str, dataset_uri: str, storage_uri: str, name: str):
    return load_train_config(
        preset="tiny",
        overrides=[
            f"ray_address={address}", f"dataset_uri={dataset_uri}", f"storage_uri={storage_uri}", f"name={name}",
            "data.image_size=32", "epochs=1", "num_workers=2", "cpus_per_worker=0.5", "zero_stage=2", "evaluate=false",
        ],
    )  # fmt: skip


def test_run_is_submitted_as_a_ray_job_and_streams_its_logs(ray_head, job_dataset, s3_prefix, monkeypatch, capfd):
    address, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    result = run_train(_job_config(address, job_dataset, s3_prefix, "via-job"))
    out = capfd.readouterr().out
    assert "submitted Ray job medfusion-train-via-job-" in out
    assert "[medfusion] epoch 0:" in out, "the job's logs were not streamed"
    assert result.run_uri == f"{s3_prefix}/via-job" and result.epochs_run == 1
    assert storage.exists(storage.join(result.model_uri, "checksums.json"))


def test_failed_job_fails_the_call_with_its_message(ray_head, s3_prefix, monkeypatch):
    address, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    missing = f"{s3_prefix}/no-such-dataset"
    with pytest.raises(JobError) as err:
        run_train(_job_config(address, missing, s3_prefix, "bad-data"))
    message = str(err.value)
    assert "FAILED" in message and f"dataset_uri: {missing}: no dataset here" in message


def test_wrong_token_is_refused(ray_head, job_dataset, s3_prefix, monkeypatch):
    address, _ = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(JobError, match=f"ray_address {address}: cannot submit"):
        run_train(_job_config(address, job_dataset, s3_prefix, "wrong-token"))
