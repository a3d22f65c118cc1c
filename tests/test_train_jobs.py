"""`ray_address=http://HEAD:8265`: the run goes through the stage dispatch every pipeline step uses
(medfusion.orchestration.stages), as a Ray job on a real `ray start --head` on loopback (token
authentication on); its logs are streamed back, its result comes back as a TrainResult, and a failed
job fails the call. `ray_address=kuberay` takes the same path to a RayJob (a fake Kubernetes API here).

The head runs with its own --temp-dir (so it never becomes the machine's default cluster for other
processes' `ray.init()`), in its own process group, and is stopped by killing exactly that group and
any process whose command line names its temp dir.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shlex
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
from medfusion.loader import to_dict
from medfusion.orchestration import kuberay, stages
from medfusion.orchestration.jobs import JobError
from medfusion.store import free_ports
from medfusion.train import load_train_config, run_train

pytestmark = pytest.mark.integration

PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
    "--node-manager-port",
    "--object-manager-port",
)


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
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        DS_ACCELERATOR="cpu",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        *[f"{flag}={port}" for flag, port in ports.items()],
    ]
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
                    log_tail = Path(temp_dir, "head.log").read_text()[-3000:]
                    raise RuntimeError(f"ray head did not come up:\n{log_tail}") from None
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
    run_prepare(
        PrepareConfig(
            source="synthetic", output_uri=uri, overwrite=True, synth=SynthConfig(num_samples=160, image_size=32)
        )
    )
    return uri


def _job_overrides(address: str, dataset_uri: str, storage_uri: str, name: str) -> list[str]:
    settings = ["data.image_size=32", "epochs=1", "num_workers=2", "cpus_per_worker=0.5", "zero_stage=2"]
    where = [f"ray_address={address}", f"dataset_uri={dataset_uri}", f"storage_uri={storage_uri}", f"name={name}"]
    return [*where, *settings, "evaluate=false"]


def _job_config(address: str, dataset_uri: str, storage_uri: str, name: str):
    return load_train_config(preset="tiny", overrides=_job_overrides(address, dataset_uri, storage_uri, name))


def test_medfusion_train_runs_as_a_ray_job_through_the_stage_dispatch(
    ray_head, job_dataset, s3_prefix, monkeypatch, capfd
):
    from medfusion import cli

    address, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    assert cli.main(["train", "--preset", "tiny", *_job_overrides(address, job_dataset, s3_prefix, "via-job")]) == 0
    out = capfd.readouterr().out
    assert "submitted Ray job medfusion-train-via-job-" in out
    assert "[medfusion] epoch 0:" in out, "the job's logs were not streamed"
    # The remote side is the stage dispatch's entry point, which writes the result this side reads back.
    (result_uri,) = storage.list_files(storage.join(s3_prefix, stages.RESULTS_DIR))
    assert f"[medfusion] train result: {result_uri}" in out
    assert f"run {s3_prefix}/via-job: 1 epochs" in out, "the printed summary is the job's TrainResult"
    assert storage.exists(storage.join(s3_prefix, "via-job", "model", "checksums.json"))


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


def test_train_config_round_trips_through_the_stage_dispatch():
    cfg = load_train_config(
        preset="tiny", overrides=["dataset_uri=s3://b/d", "name=r1", "ray_address=http://h:8265", "model.fusion=concat"]
    )
    values = {**to_dict(cfg), "ray_address": ""}
    assert stages.build_config("train", values) == dataclasses.replace(cfg, ray_address="")
    argv = shlex.split(stages.stage_entrypoint("train", values, "s3://b/_results/train.json"))
    assert argv[:4] == ["python", "-m", "medfusion.orchestration", "train"]
    assert json.loads(base64.urlsafe_b64decode(argv[argv.index("--config-b64") + 1])) == values


class _FailingRayJobs:
    """A Kubernetes API whose RayJobs fail at once; it keeps what was created."""

    def __init__(self):
        self.created = []

    def create_namespaced_custom_object(self, **kw):
        self.created.append(kw["body"])

    def get_namespaced_custom_object(self, **kw):
        # KubeRay is done with a RayJob once its jobDeploymentStatus is final (no retry left).
        return {"status": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed", "message": "exit 2"}}

    def delete_namespaced_custom_object(self, **kw):
        pass


def test_kuberay_address_runs_the_train_stage_as_a_rayjob(monkeypatch, tmp_path):
    api = _FailingRayJobs()
    monkeypatch.setattr(kuberay, "_kube", lambda opts: (api, None, "team-a"))
    cfg = load_train_config(
        preset="tiny", overrides=["dataset_uri=s3://b/d", f"storage_uri={tmp_path}", "name=r1", "ray_address=kuberay"]
    )
    with pytest.raises(JobError, match=r"RayJob team-a/medfusion-train-\w+ Failed, job FAILED: exit 2"):
        run_train(cfg)
    (job,) = api.created
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "medfusion.orchestration", "train"]
    values = json.loads(base64.urlsafe_b64decode(argv[argv.index("--config-b64") + 1]))
    assert values["ray_address"] == "" and values["name"] == "r1", "inside the RayJob the run trains where it runs"
