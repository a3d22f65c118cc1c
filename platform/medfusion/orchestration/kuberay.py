"""The KubeRay target (``ray_address=kuberay``): RayJob and RayService manifests, and the calls that
create them and follow them to their end.

A stage runs as a RayJob with a Ray cluster of its own (the shape of
k8s/base/raycluster.medfusion.yaml, from `KubeRayOptions`), deleted when the job ends; deploy creates
or updates a RayService. The Kubernetes client is configured in-cluster or from ~/.kube/config, and
the pipeline's service account needs `REQUIRED_RBAC` (k8s/base/role.pipeline.yaml grants it).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from medfusion import __version__
from medfusion.config import SERVE_TOKEN_ENV, check
from medfusion.loader import load_config
from medfusion.orchestration.jobs import SUCCEEDED, TERMINAL, JobError

# The images of the Dockerfile (k8s/ names the same ones); a KFP run or a RayJob overrides them.
DEFAULT_IMAGE = f"medfusion:{__version__}"
DEFAULT_GPU_IMAGE = f"medfusion-gpu:{__version__}"
SERVE_PORT = 8000
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
RAYJOB_DEPLOYMENT_FAILED = ("Failed", "ValidationFailed")
# Every Kubernetes API call of this module, by (API group, resource): what k8s/base/role.pipeline.yaml
# must grant the pipeline's service account (tests/k8s checks that it does).
REQUIRED_RBAC: dict[tuple[str, str], set[str]] = {
    ("ray.io", "rayjobs"): {"create", "get", "delete"},
    ("ray.io", "rayservices"): {"create", "get", "patch"},
    ("", "pods"): {"list"},
    ("", "pods/log"): {"get"},
}


@dataclass
class KubeRayOptions:
    """The Ray cluster a RayJob or the RayService gets (the shape of k8s/base/raycluster.medfusion.yaml)."""

    namespace: str = ""
    """Namespace of the RayJobs and the RayService; empty: this pod's own namespace."""
    image: str = DEFAULT_IMAGE
    """Image of the head, the CPU workers and the submitter (the project's Dockerfile)."""
    gpu_image: str = DEFAULT_GPU_IMAGE
    """Image of the GPU workers."""
    gpu_workers: int = 0
    """GPU workers (one GPU each); 0 runs everything on CPU workers."""
    cpu_workers: int = 1
    """CPU workers."""
    worker_cpu: str = "4"
    """CPU request and limit of every worker."""
    worker_memory: str = "16Gi"
    """Memory request and limit of every worker."""
    s3_secret: str = "medfusion-s3"
    """Secret whose keys become the AWS_* environment of every Ray pod (k8s/base/secret.s3.template.yaml)."""
    serve_token_secret: str = "medfusion-serve-token"
    """RayService only: Secret whose `token` key is the inference API's bearer token."""
    service_account: str = "medfusion-ray"
    """Service account of the Ray pods (k8s/base/serviceaccount.ray.yaml)."""
    timeout_s: float = 86_400.0
    """Longest a RayJob may run, or a RayService take to become ready, before it counts as failed."""
    poll_s: float = 5.0
    """Seconds between status reads."""
    ray_version: str = "2.60.0"
    """rayVersion of the clusters: the Ray pinned in pyproject.toml."""

    def __post_init__(self) -> None:
        check(self.gpu_workers >= 0 and self.cpu_workers >= 0, "kuberay.gpu_workers/cpu_workers", "must be >= 0")
        check(self.gpu_workers + self.cpu_workers >= 1, "kuberay", "needs at least one worker")
        check(self.timeout_s > 0 and self.poll_s > 0, "kuberay.timeout_s/poll_s", "must be > 0")


def _hardened_pod(container: dict[str, Any], opts: KubeRayOptions, **extra: Any) -> dict[str, Any]:
    return {
        "serviceAccountName": opts.service_account,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 100,
            "fsGroup": 100,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "imagePullPolicy": "IfNotPresent",
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                **container,
            }
        ],
        **extra,
    }


def _ray_container(
    name: str,
    image: str,
    cpu: str,
    memory: str,
    opts: KubeRayOptions,
    env: list[dict],
    gpus: int = 0,
    ports: list[dict] | None = None,
) -> dict[str, Any]:
    resources = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    container = {
        "name": name,
        "image": image,
        "envFrom": [{"secretRef": {"name": opts.s3_secret}}],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, *env],
        "resources": {"requests": resources, "limits": dict(resources)},
        "volumeMounts": [{"name": "ray-logs", "mountPath": "/tmp/ray"}],
    }
    if ports:
        container["ports"] = ports
    return container


def ray_cluster_spec(opts: KubeRayOptions, env: list[dict] | None = None) -> dict[str, Any]:
    """A RayClusterSpec: CPU head (no tasks), fixed GPU and CPU worker groups, hardened pods."""
    env = list(env or [])
    volumes = [{"name": "ray-logs", "emptyDir": {}}]
    head = _ray_container(
        "ray-head",
        opts.image,
        "2",
        "8Gi",
        opts,
        env,
        ports=[
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
            {"containerPort": SERVE_PORT, "name": "serve"},
        ],
    )
    groups = []
    if opts.gpu_workers:
        groups.append(("gpu", opts.gpu_image, opts.gpu_workers, 1, env))
    if opts.cpu_workers:
        groups.append(("cpu", opts.image, opts.cpu_workers, 0, [*env, {"name": "DS_ACCELERATOR", "value": "cpu"}]))
    workers = []
    for group, image, replicas, gpus, group_env in groups:
        extra: dict[str, Any] = {"volumes": volumes}
        if gpus:
            extra["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        container = _ray_container("ray-worker", image, opts.worker_cpu, opts.worker_memory, opts, group_env, gpus)
        workers.append(
            {
                "groupName": group,
                "replicas": replicas,
                "minReplicas": replicas,
                "maxReplicas": replicas,
                "rayStartParams": {},
                "template": {
                    "metadata": {"labels": {"app.kubernetes.io/name": "medfusion"}},
                    "spec": _hardened_pod(container, opts, **extra),
                },
            }
        )
    return {
        "rayVersion": opts.ray_version,
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "medfusion"}},
                "spec": _hardened_pod(head, opts, volumes=volumes),
            },
        },
        "workerGroupSpecs": workers,
    }


def _metadata(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app.kubernetes.io/name": "medfusion", "app.kubernetes.io/component": component}}


def rayjob_manifest(name: str, entrypoint: str, opts: KubeRayOptions) -> dict[str, Any]:
    """A RayJob running `entrypoint` on a cluster of its own, deleted when the job ends."""
    submitter = {
        "name": "ray-job-submitter",
        "image": opts.image,
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}},
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(name, "stage"),
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,
            "submitterPodTemplate": {"spec": _hardened_pod(submitter, opts, restartPolicy="Never")},
            "rayClusterSpec": ray_cluster_spec(opts),
        },
    }


def rayservice_manifest(name: str, serve_config: Mapping[str, Any], opts: KubeRayOptions) -> dict[str, Any]:
    """A RayService serving `serve_config` (a Serve config document), bearer token from a Secret."""
    import yaml

    token_env = [
        {
            "name": serve_config["applications"][0]["args"].get("auth_token_env", SERVE_TOKEN_ENV),
            "valueFrom": {"secretKeyRef": {"name": opts.serve_token_secret, "key": "token"}},
        }
    ]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(name, "serve"),
        "spec": {
            "serveConfigV2": yaml.safe_dump(dict(serve_config), sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(opts, env=token_env),
        },
    }


def _kube(opts: KubeRayOptions) -> tuple[Any, Any, str]:
    """(CustomObjectsApi, CoreV1Api, namespace), configured in-cluster or from ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    namespace = opts.namespace
    if not namespace:
        namespace = Path(SA_NAMESPACE_FILE).read_text().strip() if Path(SA_NAMESPACE_FILE).is_file() else "default"
    return client.CustomObjectsApi(), client.CoreV1Api(), namespace


def _follow_submitter_logs(core: Any, namespace: str, job_name: str, out: TextIO) -> bool:
    """Stream the submitter pod's log (`ray job submit` follows the job); False while it has no pod yet."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items
    running = [p for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")]
    if not running:
        return False
    stream = core.read_namespaced_pod_log(running[0].metadata.name, namespace, follow=True, _preload_content=False)
    for chunk in stream.stream():
        out.write(chunk.decode(errors="replace"))
        out.flush()
    return True


def run_rayjob(manifest: dict[str, Any], opts: KubeRayOptions, out: TextIO | None = None) -> dict[str, Any]:
    """Create the RayJob, stream its submitter's log, wait until it ends, delete it.

    Args:
        manifest: the RayJob (`rayjob_manifest`).
        opts: the namespace, the timeout and the poll interval.
        out: where the submitter's log is streamed (stdout).

    Returns:
        The RayJob's final status.

    Raises:
        JobError: the job failed, was stopped, or did not finish within ``opts.timeout_s``.
    """
    out = out or sys.stdout
    api, core, namespace = _kube(opts)
    name = manifest["metadata"]["name"]
    ref = {"group": "ray.io", "version": "v1", "namespace": namespace, "plural": "rayjobs", "name": name}
    api.create_namespaced_custom_object(body=manifest, **{k: v for k, v in ref.items() if k != "name"})
    out.write(f"[medfusion] created RayJob {namespace}/{name}\n")
    deadline = time.monotonic() + opts.timeout_s
    followed = False
    try:
        while True:
            status = api.get_namespaced_custom_object(**ref).get("status", {})
            if status.get("jobStatus") in TERMINAL or status.get("jobDeploymentStatus") in RAYJOB_DEPLOYMENT_FAILED:
                break
            if time.monotonic() > deadline:
                raise JobError(
                    f"RayJob {namespace}/{name}: not finished after {opts.timeout_s:.0f} s (status {status})"
                )
            if not followed and status.get("jobStatus") == "RUNNING":
                followed = _follow_submitter_logs(core, namespace, name, out)
            time.sleep(opts.poll_s)
    finally:
        api.delete_namespaced_custom_object(**ref)  # its Ray cluster goes with it
    if status.get("jobStatus") != SUCCEEDED:
        raise JobError(
            f"RayJob {namespace}/{name} {status.get('jobStatus') or status.get('jobDeploymentStatus')}: "
            f"{status.get('message', '')} (kubectl logs job/{name} -n {namespace})"
        )
    return status


def apply_rayservice(manifest: dict[str, Any], opts: KubeRayOptions, out: TextIO | None = None) -> str:
    """Create the RayService or update it in place (KubeRay rolls the app without downtime); wait until
    it serves.

    Args:
        manifest: the RayService (`rayservice_manifest`).
        opts: the namespace, the timeout and the poll interval.
        out: where progress lines go (stdout).

    Returns:
        The application's in-cluster URL.

    Raises:
        JobError: the RayService was not ready within ``opts.timeout_s``.
    """
    from kubernetes.client.exceptions import ApiException

    out = out or sys.stdout
    api, _, namespace = _kube(opts)
    name = manifest["metadata"]["name"]
    ref = {"group": "ray.io", "version": "v1", "namespace": namespace, "plural": "rayservices"}
    try:
        api.get_namespaced_custom_object(name=name, **ref)
        api.patch_namespaced_custom_object(name=name, body={"spec": manifest["spec"]}, **ref)
        out.write(f"[medfusion] updated RayService {namespace}/{name}\n")
    except ApiException as err:
        if err.status != 404:
            raise
        api.create_namespaced_custom_object(body=manifest, **ref)
        out.write(f"[medfusion] created RayService {namespace}/{name}\n")
    deadline = time.monotonic() + opts.timeout_s
    while True:
        status = api.get_namespaced_custom_object(name=name, **ref).get("status", {})
        ready = status.get("serviceStatus") == "Running" or any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", [])
        )
        if ready:
            return f"http://{name}-serve-svc.{namespace}.svc.cluster.local:{SERVE_PORT}"
        if time.monotonic() > deadline:
            raise JobError(f"RayService {namespace}/{name}: not ready after {opts.timeout_s:.0f} s (status {status})")
        time.sleep(opts.poll_s)


def kuberay_options(namespace: str = "", image: str = "", overrides: Mapping[str, Any] | None = None) -> KubeRayOptions:
    """KubeRayOptions from a pipeline's parameters (empty values keep the defaults).

    Args:
        namespace: the namespace of the RayJobs and the RayService.
        image: the image of the Ray pods.
        overrides: further KubeRayOptions fields.
    """
    values = dict(overrides or {})
    if namespace:
        values["namespace"] = namespace
    if image:
        values["image"] = image
    return load_config(KubeRayOptions, base=values)
