"""The RayJob and RayService that medfusion.orchestration.kuberay creates (ray_address=kuberay) validate
strictly against the KubeRay v1 CRDs, and are as hardened as the checked-in manifests."""

from __future__ import annotations

import kuberay_schemas as ks
import pytest
import yaml

from medfusion.config import SERVE_TOKEN_ENV, ConfigError
from medfusion.orchestration import kuberay
from medfusion.orchestration.deploy import serve_config_document
from medfusion.orchestration.stages import stage_entrypoint

SHAPES = {"cpu-only": {}, "gpu": {"gpu_workers": 2, "cpu_workers": 0}, "both": {"gpu_workers": 1, "cpu_workers": 2}}


@pytest.mark.parametrize("shape", SHAPES)
def test_rayjob_manifest_is_valid(shape):
    opts = kuberay.KubeRayOptions(**SHAPES[shape])
    entrypoint = stage_entrypoint("train", {"dataset_uri": "s3://b/d"}, "s3://b/_results/train.json")
    job = kuberay.rayjob_manifest("medfusion-train-abc123", entrypoint, opts)
    assert ks.errors(job) == []
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["entrypoint"].startswith(
        "python -m medfusion.orchestration train"
    )
    groups = {g["groupName"]: g["replicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups == {k: v for k, v in (("gpu", opts.gpu_workers), ("cpu", opts.cpu_workers)) if v}


def test_rayservice_manifest_is_valid_and_takes_the_token_from_a_secret():
    document = serve_config_document({"model": "s3://b/registry/medfusion/sha-1", "device": "auto"})
    service = kuberay.rayservice_manifest("medfusion", document, kuberay.KubeRayOptions(gpu_workers=1))
    assert ks.errors(service) == []
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == document
    for group in [
        service["spec"]["rayClusterConfig"]["headGroupSpec"],
        *service["spec"]["rayClusterConfig"]["workerGroupSpecs"],
    ]:
        (container,) = group["template"]["spec"]["containers"]
        (token,) = [e for e in container["env"] if e["name"] == SERVE_TOKEN_ENV]
        assert token["valueFrom"]["secretKeyRef"] == {"name": "medfusion-serve-token", "key": "token"}


def test_generated_pods_are_hardened():
    job = kuberay.rayjob_manifest("j", "python -c pass", kuberay.KubeRayOptions(gpu_workers=1))
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    templates = [
        cluster["headGroupSpec"]["template"],
        *(g["template"] for g in cluster["workerGroupSpecs"]),
        job["spec"]["submitterPodTemplate"],
    ]
    for template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]) and container["resources"]["requests"]


def test_options_are_validated():
    with pytest.raises(ConfigError, match="needs at least one worker"):
        kuberay.KubeRayOptions(gpu_workers=0, cpu_workers=0)
    assert kuberay.kuberay_options("team-a", "reg/medfusion:0.1.0").namespace == "team-a"
