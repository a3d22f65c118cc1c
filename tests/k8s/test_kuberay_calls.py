"""The KubeRay target's control flow against a fake Kubernetes API (no cluster here): a RayJob is
created, followed until KubeRay is done with it (its jobDeploymentStatus, rayjob_types.go
IsJobDeploymentTerminal) and always deleted; a RayService is created, or its Serve config patched when
it exists (tests/pipelines/test_pipeline_platform.py has the patch itself)."""

from __future__ import annotations

import io

import pytest

from medfusion.orchestration import kuberay
from medfusion.orchestration.deploy import serve_config_document
from medfusion.orchestration.jobs import JobError


class FakeCustomObjects:
    def __init__(self, statuses, existing=False):
        self.statuses, self.existing, self.calls = list(statuses), existing, []

    def create_namespaced_custom_object(self, **kw):
        self.calls.append(("create", kw["plural"], kw["body"]["metadata"]["name"]))

    def get_namespaced_custom_object(self, **kw):
        if kw["plural"] == "rayservices" and not self.existing and not any(c[0] == "create" for c in self.calls):
            from kubernetes.client.exceptions import ApiException

            raise ApiException(status=404)
        return {"status": self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]}

    def patch_namespaced_custom_object(self, **kw):
        self.calls.append(("patch", kw["plural"], kw["name"]))
        return {"metadata": {"name": kw["name"], "generation": 2}}

    def delete_namespaced_custom_object(self, **kw):
        self.calls.append(("delete", kw["plural"], kw["name"]))


class FakeCore:
    def list_namespaced_pod(self, namespace, label_selector):
        return type("Pods", (), {"items": []})()


def _use(monkeypatch, api):
    monkeypatch.setattr(kuberay, "_kube", lambda opts: (api, FakeCore(), "team-a"))


OPTS = kuberay.KubeRayOptions(poll_s=0.01, timeout_s=5)


def test_a_succeeded_rayjob_is_deleted_and_returns_its_status(monkeypatch):
    api = FakeCustomObjects(
        [{}, {"jobStatus": "RUNNING"}, {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}]
    )
    _use(monkeypatch, api)
    status = kuberay.run_rayjob(
        kuberay.rayjob_manifest("medfusion-train-1", "python -c pass", OPTS), OPTS, out=io.StringIO()
    )
    assert status["jobStatus"] == "SUCCEEDED"
    assert api.calls == [("create", "rayjobs", "medfusion-train-1"), ("delete", "rayjobs", "medfusion-train-1")]


@pytest.mark.parametrize(
    "final",
    [
        {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed", "reason": "AppFailed", "message": "exit 3"},
        {"jobDeploymentStatus": "ValidationFailed"},
    ],
)
def test_a_failed_rayjob_raises_and_is_still_deleted(monkeypatch, final):
    api = FakeCustomObjects([{"jobStatus": "RUNNING"}, final])
    _use(monkeypatch, api)
    pattern = r"RayJob team-a/medfusion-train-2 (Failed \(AppFailed\), job FAILED: exit 3|ValidationFailed)"
    with pytest.raises(JobError, match=pattern):
        kuberay.run_rayjob(
            kuberay.rayjob_manifest("medfusion-train-2", "python -c pass", OPTS), OPTS, out=io.StringIO()
        )
    assert api.calls[-1] == ("delete", "rayjobs", "medfusion-train-2")


def test_a_rayjob_past_its_timeout_fails_and_is_deleted(monkeypatch):
    api = FakeCustomObjects([{"jobStatus": "PENDING"}])
    _use(monkeypatch, api)
    opts = kuberay.KubeRayOptions(poll_s=0.01, timeout_s=0.05)
    with pytest.raises(JobError, match="not finished after"):
        kuberay.run_rayjob(
            kuberay.rayjob_manifest("medfusion-train-3", "python -c pass", opts), opts, out=io.StringIO()
        )
    assert api.calls[-1] == ("delete", "rayjobs", "medfusion-train-3")


@pytest.mark.parametrize("existing,verb", [(False, "create"), (True, "patch")])
def test_rayservice_is_created_or_updated_in_place(monkeypatch, existing, verb):
    serving = {
        "observedGeneration": 2,
        "conditions": [{"type": "Ready", "status": "True"}],
        "activeServiceStatus": {"applicationStatuses": {"medfusion": {"status": "RUNNING"}}},
    }
    api = FakeCustomObjects([serving], existing=existing)
    _use(monkeypatch, api)
    manifest = kuberay.rayservice_manifest("medfusion", serve_config_document({"model": "s3://b/m"}), OPTS)
    url = kuberay.apply_rayservice(manifest, OPTS, out=io.StringIO())
    assert url == "http://medfusion-serve-svc.team-a.svc.cluster.local:8000"
    assert api.calls == [(verb, "rayservices", "medfusion")]
