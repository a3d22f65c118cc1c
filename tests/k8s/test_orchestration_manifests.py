"""The RayJob and RayService that medfusion.orchestration creates (ray_address=kuberay) validate
strictly against the KubeRay v1 CRDs, and are as hardened as the checked-in manifests."""

from __future__ import annotations

import pytest
import yaml

import kuberay_schemas as ks
from medfusion import orchestration as o

SHAPES = {"cpu-only": {}, "gpu": {"gpu_workers": 2, "cpu_workers": 0}, "both": {"gpu_workers": 1, "cpu_workers": 2}}


@pytest.mark.parametrize("shape", SHAPES)
def test_rayjob_manifest_is_valid(shape):
    opts = o.KubeRayOptions(**SHAPES[shape])
    entrypoint = o.stage_entrypoint("train", {"dataset_uri": "s3://b/d"}, "s3://b/_results/train.json")
    job = o.rayjob_manifest("medfusion-train-abc123", entrypoint, opts)
    assert ks.errors(job) == []
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["entrypoint"].startswith("python -m medfusion.orchestration train")
    groups = {g["groupName"]: g["replicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups == {k: v for k, v in (("gpu", opts.gpu_workers), ("cpu", opts.cpu_workers)) if v}


def test_rayservice_manifest_is_valid_and_takes_the_token_from_a_secret():
    document = o.serve_config_document({"model": "s3://b/registry/medfusion/sha-1", "device": "auto"})
    service = o.rayservice_manifest("medfusion", document, o.KubeRayOptions(gpu_workers=1))
    assert ks.errors(service) == []
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == document
    for group in [service["spec"]["rayClusterConfig"]["headGroupSpec"], *service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        (token,) = [e for e in container["env"] if e["name"] == "MEDFUSION_SERVE_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"] == {"name": "medfusion-serve-token", "key": "token"}


def test_generated_pods_are_hardened():
    job = o.rayjob_manifest("j", "python -c pass", o.KubeRayOptions(gpu_workers=1))
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"]), job["spec"]["submitterPodTemplate"]]
    for template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]) and container["resources"]["requests"]


def test_options_are_validated():
    with pytest.raises(o.ConfigError, match="needs at least one worker"):
        o.KubeRayOptions(gpu_workers=0, cpu_workers=0)
    assert o.kuberay_options("team-a", "reg/medfusion:0.1.0").namespace == "team-a"
