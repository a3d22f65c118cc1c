"""Operating the Serve app under load on the local Ray: autoscaling, a killed replica, a version rollover.

Bounded: each test sends at most a few thousand small requests; delays in the test configs are short.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import ray
from serve_cases import make_export, png, replica_states, wait_for

from medfusion import registry
from medfusion.bench.serve import LoadResult, encode_multipart, run_load

pytestmark = pytest.mark.integration

BODY, CONTENT_TYPE = encode_multipart(png(), "fever and productive cough")


class Background:
    """run_load in a thread; `result` once joined."""

    def __init__(self, url: str, **kwargs) -> None:
        self.result: LoadResult | None = None
        self._thread = threading.Thread(target=self._run, args=(url, kwargs), daemon=True)
        self._thread.start()

    def _run(self, url: str, kwargs: dict) -> None:
        self.result = run_load(f"{url}/v1/predict", BODY, CONTENT_TYPE, **kwargs)

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float) -> LoadResult:
        self._thread.join(timeout_s)
        assert self.result is not None, "the load did not finish"
        return self.result


def test_load_at_concurrency_32_scales_up_then_down_without_5xx(deploy, tiny_export):
    url = deploy(
        "scale",
        model=tiny_export.uri,
        num_cpus=0.5,
        max_batch_size=8,
        max_ongoing_requests=16,
        max_queued_requests=-1,
        autoscaling={
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 4,
            "upscale_delay_s": 0.5,
            "downscale_delay_s": 2,
            "look_back_period_s": 1,
            "metrics_interval_s": 0.5,
        },
    )
    assert replica_states("scale") == {"RUNNING": 1}
    load = Background(url, concurrency=32, requests=2000, max_seconds=90)
    most = 1
    while load.running():
        most = max(most, replica_states("scale").get("RUNNING", 0))
        time.sleep(0.25)
    result = load.join(5)
    print(f"scale: {result.summary()} max replicas {most}")
    assert result.requests >= 500 and result.transport_errors == 0
    assert dict(result.statuses) == {200: result.requests}, result.statuses  # zero 5xx (and zero 4xx)
    assert most == 2, "the autoscaler never added a replica under load"
    wait_for(lambda: replica_states("scale") == {"RUNNING": 1}, 60, message="scale down to 1 replica")


def _model_replica_actors(app: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{app}#MedFusionDeployment#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def test_killed_replica_under_load_is_replaced(deploy, tiny_export):
    url = deploy(
        "fault",
        model=tiny_export.uri,
        num_cpus=0.25,
        max_batch_size=8,
        max_ongoing_requests=16,
        max_queued_requests=-1,
        autoscaling={"min_replicas": 2, "max_replicas": 2},
    )
    before = _model_replica_actors("fault")
    assert len(before) == 2
    load = Background(url, concurrency=16, requests=1000, max_seconds=60)
    time.sleep(3.0)
    assert load.running()
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    result = load.join(90)
    print(f"fault: {result.summary()} transport errors {result.transport_errors}")
    failed = result.errors
    assert failed <= 0.01 * result.requests, (result.statuses, result.transport_errors)
    # The killed replica counts as RUNNING until the controller notices its death: wait for its actor
    # to be gone and a new one to take its place, then for both to run.
    wait_for(
        lambda: len(after := _model_replica_actors("fault")) == 2 and before[0] not in after,
        90,
        message="a replacement replica actor",
    )
    wait_for(lambda: replica_states("fault") == {"RUNNING": 2}, 90, message="replacement replica RUNNING")
    assert before[1] in _model_replica_actors("fault"), "the surviving replica was left alone"


def test_version_change_is_a_config_update_with_zero_failed_requests(deploy, tiny_export, tmp_path):
    # Both versions come from the model registry: the app first serves NAME:VERSION, then NAME:latest.
    root = str(tmp_path / "registry")
    v1 = registry.register(tiny_export.uri, root, "roll-model")
    v2 = make_export(str(tmp_path / "model-v2"), seed=1)
    assert v2.version != tiny_export.version
    url = deploy("roll", model=f"roll-model:{v1.version}", registry_uri=root, num_cpus=0.25, max_queued_requests=-1)
    versions: list[str] = []
    load = Background(
        url,
        concurrency=4,
        requests=100_000,
        max_seconds=25,
        on_response=lambda r: versions.append(r.json()["model"]["version"]) if r.status_code == 200 else None,
    )
    time.sleep(3.0)
    registry.register(v2.uri, root, "roll-model")  # the new latest
    deploy("roll", model="roll-model:latest", registry_uri=root, num_cpus=0.25, max_queued_requests=-1)  # the update
    result = load.join(60)
    print(f"rollover: {result.summary()} responses per version {dict(Counter(versions))}")
    assert result.errors == 0 and dict(result.statuses) == {200: result.requests}, result.statuses
    assert versions[0] == tiny_export.version and versions[-1] == v2.version
    assert set(versions[-20:]) == {v2.version}  # rolled over for good
