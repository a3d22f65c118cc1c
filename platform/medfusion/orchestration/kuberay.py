"""The KubeRay target (``ray_address=kuberay``): RayJob and RayService manifests, and the calls that
create them and follow them to their end, as the KubeRay operator (v1.7) handles them.

A stage runs as a RayJob with a Ray cluster of its own (the shape of
k8s/base/raycluster.medfusion.yaml, from `KubeRayOptions`), deleted when the job ends. Deploy creates
a RayService from a complete spec, or, when one of that name exists (k8s/base/rayservice.medfusion.yaml
or an earlier deploy), patches only the ``args`` of its Serve application in ``spec.serveConfigV2``:
KubeRay applies a serveConfigV2 change to the running cluster, while any ``rayClusterConfig`` change
would make it build a new cluster from this step's shape (rayservice_controller.go). Every cluster
uses Ray token auth from one Secret (`RAY_AUTH_SECRET`). The Kubernetes client is configured
in-cluster or from ~/.kube/config, and the pipeline's service account needs exactly `REQUIRED_RBAC`
(k8s/base/role.pipeline.yaml grants it).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from medfusion import __version__
from medfusion.config import SERVE_TOKEN_ENV, ConfigError, check
from medfusion.loader import load_config
from medfusion.orchestration.jobs import SUCCEEDED, JobError

# The images of the Dockerfile (k8s/ names the same ones); a KFP run or a RayJob overrides them.
DEFAULT_IMAGE = f"medfusion:{__version__}"
DEFAULT_GPU_IMAGE = f"medfusion-gpu:{__version__}"
SERVE_PORT = 8000
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# The Secrets of k8s/base/secret.*.template.yaml: the Ray pods and the pipeline's step pods read them.
S3_SECRET = "medfusion-s3"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")
RAY_AUTH_SECRET = "medfusion-ray-auth"
RAY_AUTH_SECRET_KEY = "auth_token"  # the key KubeRay reads (utils/constant.go RAY_AUTH_TOKEN_SECRET_KEY)
RAY_AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"  # where Ray, KubeRay's pods and medfusion.orchestration.jobs read it
SERVE_TOKEN_SECRET = "medfusion-serve-token"
SERVE_TOKEN_SECRET_KEY = "token"
# How soon the GCS declares a lost node dead: a health check every second, 1 s to answer, dead after 3
# missed (2-3 s measured in tests/cluster, whose nodes run with these values). Ray's defaults (every 3 s,
# a 10 s timeout, 5 misses) take 15 s, and up to 50 s for a pod whose IP stops answering. The GCS reads
# them, so they go on every head.
GCS_HEALTH_CHECK_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
# The custom resource only heads advertise: a sweep's trial drivers reserve it (TuneConfig.trial_resources)
# to stay off worker pods that can be lost. A group's `resources` become `ray start --resources`
# (KubeRay common/pod.go updateRayStartParamsResources).
TRIAL_DRIVER_RESOURCE = "trial-driver"
HEAD_RESOURCES = {TRIAL_DRIVER_RESOURCE: "1000"}
# A RayJob's jobDeploymentStatus once KubeRay is done with it (rayjob_types.go IsJobDeploymentTerminal,
# and ValidationFailed, which it never leaves); jobStatus FAILED alone may still become Retrying.
RAYJOB_FINISHED = ("Complete", "Failed", "ValidationFailed")
RAYJOB_COMPLETE = "Complete"
# How long after its own deadline KubeRay gets to mark a RayJob Failed before this side gives up.
DEADLINE_GRACE_S = 600.0
# KubeRay's name rules (utils/validation.go ValidateRay{Job,Service}Metadata): DNS-1035, and short
# enough for the names it derives (<name>-<5 random characters>-head-svc).
MAX_NAME_LENGTH = {"RayJob": 47, "RayService": 47}
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# Every Kubernetes API call of this module, by (API group, resource): what k8s/base/role.pipeline.yaml
# grants the pipeline's service account, no more (tests/k8s checks that the two are equal).
REQUIRED_RBAC: dict[tuple[str, str], set[str]] = {
    ("ray.io", "rayjobs"): {"create", "get", "delete"},
    ("ray.io", "rayservices"): {"create", "get", "patch"},
    ("", "pods"): {"list"},
    ("", "pods/log"): {"get"},
}


@dataclass
class KubeRayOptions:
    """The Ray cluster of a stage's RayJob or of a new RayService (k8s/base/raycluster.medfusion.yaml's shape)."""

    namespace: str = ""
    """Namespace of the RayJobs and the RayService; empty: this pod's own namespace."""
    image: str = ""
    """Image of the head, the CPU workers and the submitter; empty: the pipeline step's own image
    (medfusion:<version> outside a pipeline). A digest (name@sha256:...) pins it."""
    gpu_image: str = DEFAULT_GPU_IMAGE
    """Image of the GPU workers (the Dockerfile built with DS_ACCELERATOR=cuda)."""
    gpu_workers: int = 0
    """GPU workers a cluster starts with (one GPU each); 0 and max_gpu_workers 0: no GPU group."""
    max_gpu_workers: int = 0
    """Most GPU workers the Ray autoscaler may run; 0: gpu_workers (a fixed size)."""
    cpu_workers: int = 1
    """CPU workers a cluster starts with."""
    max_cpu_workers: int = 0
    """Most CPU workers the Ray autoscaler may run; 0: cpu_workers (a fixed size)."""
    head_cpu: str = "2"
    """CPU request and limit of the head (it schedules no tasks: num-cpus 0)."""
    head_memory: str = "8Gi"
    """Memory request and limit of the head."""
    worker_cpu: str = "4"
    """CPU request and limit of a CPU worker."""
    worker_memory: str = "16Gi"
    """Memory request and limit of a CPU worker."""
    gpu_worker_cpu: str = "8"
    """CPU request and limit of a GPU worker."""
    gpu_worker_memory: str = "32Gi"
    """Memory request and limit of a GPU worker."""
    idle_timeout_s: int = 300
    """With autoscaling (a max above its start size): a worker idle this long is removed."""
    timeout_s: float = 86_400.0
    """Longest a RayJob may run (its activeDeadlineSeconds), or a RayService take to serve."""
    pre_running_timeout_s: int = 1800
    """A RayJob whose cluster is not running after this long fails (preRunningDeadlineSeconds),
    e.g. when no GPU node can be had, instead of waiting until timeout_s."""
    backoff_limit: int = 0
    """Further tries of a failed RayJob, each on a fresh cluster; 0: the pipeline step's own retries."""
    s3_secret: str = S3_SECRET
    """Secret whose keys become the AWS_* environment of every Ray pod (k8s/base/secret.s3.template.yaml)."""
    ray_auth_secret: str = RAY_AUTH_SECRET
    """Secret holding the clusters' Ray token under auth_token (authOptions; secret.ray-auth.template.yaml)."""
    serve_token_secret: str = SERVE_TOKEN_SECRET
    """RayService only: Secret whose `token` key is the inference API's bearer token."""
    service_account: str = "medfusion-ray"
    """Service account of the Ray pods (k8s/base/serviceaccount.ray.yaml)."""
    poll_s: float = 5.0
    """Seconds between status reads."""
    ray_version: str = "2.60.0"
    """rayVersion of the clusters: the Ray pinned in pyproject.toml (token auth needs >= 2.52)."""

    def __post_init__(self) -> None:
        for name in ("gpu_workers", "max_gpu_workers", "cpu_workers", "max_cpu_workers"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.gpu_workers + self.cpu_workers >= 1, "gpu_workers/cpu_workers", "needs at least one worker")
        for start, most in (("gpu_workers", "max_gpu_workers"), ("cpu_workers", "max_cpu_workers")):
            top = getattr(self, most)
            check(top == 0 or top >= getattr(self, start), most, f"must be 0 or >= {start}, got {top}")
        check(self.timeout_s > 0 and self.poll_s > 0, "timeout_s/poll_s", "must be > 0")
        check(self.pre_running_timeout_s > 0, "pre_running_timeout_s", f"must be > 0, got {self.pre_running_timeout_s}")
        check(self.backoff_limit >= 0 and self.idle_timeout_s >= 0, "backoff_limit/idle_timeout_s", "must be >= 0")

    def groups(self) -> list[tuple[str, int, int]]:
        """(group, start size, most) of each worker group the cluster has, GPU first."""
        out = []
        for group, start, most in (
            ("gpu", self.gpu_workers, self.max_gpu_workers),
            ("cpu", self.cpu_workers, self.max_cpu_workers),
        ):
            if max(start, most):
                out.append((group, start, max(start, most)))
        return out


def check_resource_name(kind: str, name: str, field: str = "name") -> None:
    """Raise ConfigError (naming `field`) unless KubeRay accepts `name` for a `kind` (RayJob, RayService)."""
    limit = MAX_NAME_LENGTH[kind]
    check(
        bool(DNS1035.fullmatch(name)) and len(name) <= limit,
        field,
        f"{name!r} is not a valid {kind} name (lowercase letters, digits and '-', starting with a letter, "
        f"at most {limit} characters)",
    )


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
    mounts = [{"name": "ray-logs", "mountPath": "/tmp/ray"}]
    if gpus:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    container = {
        "name": name,
        "image": image,
        "envFrom": [{"secretRef": {"name": opts.s3_secret}}],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, *env],
        "resources": {"requests": resources, "limits": dict(resources)},
        "volumeMounts": mounts,
        # `ray stop` lets the raylet drain before the pod goes (as k8s/base's pods do).
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }
    if ports:
        container["ports"] = ports
    return container


def ray_cluster_spec(opts: KubeRayOptions, env: list[dict] | None = None, component: str = "stage") -> dict[str, Any]:
    """A RayClusterSpec: CPU head (no tasks, `GCS_HEALTH_CHECK_ENV`), GPU and CPU worker groups (autoscaled
    where a group's most exceeds its start size), Ray token auth, hardened pods labelled with `component`."""
    env = list(env or [])
    image = opts.image or DEFAULT_IMAGE
    labels = {"app.kubernetes.io/name": "medfusion", "app.kubernetes.io/component": component}
    logs = {"name": "ray-logs", "emptyDir": {}}
    head = _ray_container(
        "ray-head",
        image,
        opts.head_cpu,
        opts.head_memory,
        opts,
        [*env, *({"name": k, "value": v} for k, v in GCS_HEALTH_CHECK_ENV.items())],
        ports=[
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
            {"containerPort": SERVE_PORT, "name": "serve"},
            {"containerPort": 8080, "name": "metrics"},
        ],
    )
    workers = []
    for group, start, most in opts.groups():
        gpu = group == "gpu"
        extra: dict[str, Any] = {"volumes": [logs]}
        if gpu:
            extra["volumes"] = [logs, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
            extra["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        group_env = env if gpu else [*env, {"name": "DS_ACCELERATOR", "value": "cpu"}]
        container = _ray_container(
            "ray-worker",
            opts.gpu_image if gpu else image,
            opts.gpu_worker_cpu if gpu else opts.worker_cpu,
            opts.gpu_worker_memory if gpu else opts.worker_memory,
            opts,
            group_env,
            gpus=1 if gpu else 0,
            ports=[{"containerPort": SERVE_PORT, "name": "serve"}] if component == "serve" else None,
        )
        workers.append(
            {
                "groupName": group,
                "replicas": start,
                "minReplicas": start,
                "maxReplicas": most,
                "rayStartParams": {},
                "template": {"metadata": {"labels": dict(labels)}, "spec": _hardened_pod(container, opts, **extra)},
            }
        )
    spec: dict[str, Any] = {
        "rayVersion": opts.ray_version,
        "authOptions": {"mode": "token", "secretName": opts.ray_auth_secret},
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "resources": dict(HEAD_RESOURCES),
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"metadata": {"labels": dict(labels)}, "spec": _hardened_pod(head, opts, volumes=[logs])},
        },
        "workerGroupSpecs": workers,
    }
    if any(start < most for _, start, most in opts.groups()):
        spec["enableInTreeAutoscaling"] = True
        spec["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": opts.idle_timeout_s,
            "resources": {
                "requests": {"cpu": "500m", "memory": "512Mi"},
                "limits": {"cpu": "500m", "memory": "512Mi"},
            },
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }
    return spec


def _metadata(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app.kubernetes.io/name": "medfusion", "app.kubernetes.io/component": component}}


def rayjob_manifest(name: str, entrypoint: str, opts: KubeRayOptions) -> dict[str, Any]:
    """A RayJob running `entrypoint` on a cluster of its own, deleted when the job ends, with deadlines.

    Raises:
        ConfigError: `name` is not a name KubeRay accepts for a RayJob.
    """
    check_resource_name("RayJob", name)
    submitter = {
        "name": "ray-job-submitter",
        "image": opts.image or DEFAULT_IMAGE,
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}},
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(name, "stage"),
        "spec": {
            "entrypoint": entrypoint,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,
            "activeDeadlineSeconds": int(opts.timeout_s),
            "preRunningDeadlineSeconds": min(opts.pre_running_timeout_s, int(opts.timeout_s)),
            "backoffLimit": opts.backoff_limit,
            "submitterPodTemplate": {"spec": _hardened_pod(submitter, opts, restartPolicy="Never")},
            "rayClusterSpec": ray_cluster_spec(opts),
        },
    }


def rayservice_manifest(name: str, serve_config: Mapping[str, Any], opts: KubeRayOptions) -> dict[str, Any]:
    """A RayService serving `serve_config` (a Serve config document), bearer token from a Secret; a
    rayClusterConfig change is rolled out on a new cluster (upgradeStrategy NewCluster).

    Raises:
        ConfigError: `name` is not a name KubeRay accepts for a RayService.
    """
    import yaml

    check_resource_name("RayService", name)
    token_env = [
        {
            "name": serve_config["applications"][0]["args"].get("auth_token_env", SERVE_TOKEN_ENV),
            "valueFrom": {"secretKeyRef": {"name": opts.serve_token_secret, "key": SERVE_TOKEN_SECRET_KEY}},
        }
    ]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(name, "serve"),
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": yaml.safe_dump(dict(serve_config), sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(opts, env=token_env, component="serve"),
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
    """Create the RayJob, stream its submitter's log, wait until KubeRay is done with it, delete it.

    Done means a final jobDeploymentStatus (`RAYJOB_FINISHED`): with a backoffLimit, a FAILED job is
    retried on a fresh cluster (Retrying) and followed on; the RayJob's own deadlines fail it first.

    Args:
        manifest: the RayJob (`rayjob_manifest`).
        opts: the namespace, the timeout and the poll interval.
        out: where the submitter's log is streamed (stdout).

    Returns:
        The RayJob's final status.

    Raises:
        JobError: the job failed (naming KubeRay's reason, e.g. DeadlineExceeded), was stopped, or
            KubeRay did not finish it within its deadline.
    """
    out = out or sys.stdout
    api, core, namespace = _kube(opts)
    name = manifest["metadata"]["name"]
    ref = {"group": "ray.io", "version": "v1", "namespace": namespace, "plural": "rayjobs", "name": name}
    api.create_namespaced_custom_object(body=manifest, **{k: v for k, v in ref.items() if k != "name"})
    out.write(f"[medfusion] created RayJob {namespace}/{name}\n")
    deadline = time.monotonic() + opts.timeout_s + min(DEADLINE_GRACE_S, opts.timeout_s)
    followed = False
    try:
        while True:
            status = api.get_namespaced_custom_object(**ref).get("status", {})
            if status.get("jobDeploymentStatus") in RAYJOB_FINISHED:
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
    if status.get("jobDeploymentStatus") != RAYJOB_COMPLETE or status.get("jobStatus") != SUCCEEDED:
        reason = f" ({status['reason']})" if status.get("reason") else ""
        raise JobError(
            f"RayJob {namespace}/{name} {status.get('jobDeploymentStatus')}{reason}, job "
            f"{status.get('jobStatus') or 'not started'}: {status.get('message', '')} "
            f"(kubectl logs job/{name} -n {namespace})"
        )
    return status


def merged_serve_config(current: str, document: Mapping[str, Any], service: str) -> dict[str, Any]:
    """The RayService's Serve config with the args of `document`'s applications laid over its own.

    Everything else the RayService's owner set (deployments: GPUs, autoscaling, shutdown and health
    checks; HTTP options; other applications) is kept, so that a deploy changes the model and only that.

    Raises:
        JobError: the RayService has a Serve config without an application `document` names.
    """
    import yaml

    existing = yaml.safe_load(current or "") or {}
    if not existing.get("applications"):
        return dict(document)
    apps = {app["name"]: app for app in existing["applications"]}
    for app in document["applications"]:
        if app["name"] not in apps:
            raise JobError(
                f"RayService {service} has no Serve application {app['name']!r} (it has {', '.join(sorted(apps))}): "
                "deploy updates an application's model, it never adds one; name the model after the application"
            )
        apps[app["name"]]["args"] = {**apps[app["name"]].get("args", {}), **app["args"]}
    return existing


def _serving(status: Mapping[str, Any], generation: int | None, apps: list[str]) -> tuple[bool, str]:
    """(serves the spec of `generation`, why not): KubeRay has seen it, the RayService is Ready, no new
    cluster is being prepared and every application of ours is RUNNING on the active cluster."""
    conditions = {c.get("type"): c for c in status.get("conditions", [])}
    statuses = status.get("activeServiceStatus", {}).get("applicationStatuses", {})
    for app in apps:
        if statuses.get(app, {}).get("status") == "DEPLOY_FAILED":
            return False, f"DEPLOY_FAILED: {statuses[app].get('message', '')}"
    if generation is not None and status.get("observedGeneration", 0) < generation:
        return False, "KubeRay has not seen the update yet"
    if conditions.get("Ready", {}).get("status") != "True":
        return False, "not Ready"
    if conditions.get("UpgradeInProgress", {}).get("status") == "True":
        return False, "a new cluster is being prepared"
    waiting = [a for a in apps if statuses.get(a, {}).get("status") != "RUNNING"]
    return not waiting, f"applications not RUNNING: {', '.join(waiting)}" if waiting else ""


def apply_rayservice(manifest: dict[str, Any], opts: KubeRayOptions, out: TextIO | None = None) -> str:
    """Create the RayService, or patch only the Serve args of the one that exists; wait until it serves.

    An existing RayService gets a JSON merge patch of ``spec.serveConfigV2`` alone (`merged_serve_config`):
    KubeRay redeploys the application on the running cluster (rayservice_controller.go reconcileServe ->
    updateServeDeployment) and the cluster shape its owner chose stays. Serving means the patched
    generation is observed, Ready, and our applications RUNNING.

    Args:
        manifest: the RayService (`rayservice_manifest`), its cluster used only when it is created.
        opts: the namespace, the timeout and the poll interval.
        out: where progress lines go (stdout).

    Returns:
        The application's in-cluster URL.

    Raises:
        JobError: the application failed to deploy or did not serve within ``opts.timeout_s``.
    """
    import yaml
    from kubernetes.client.exceptions import ApiException

    out = out or sys.stdout
    api, _, namespace = _kube(opts)
    name = manifest["metadata"]["name"]
    ref = {"group": "ray.io", "version": "v1", "namespace": namespace, "plural": "rayservices"}
    document = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    try:
        current = api.get_namespaced_custom_object(name=name, **ref)
    except ApiException as err:
        if err.status != 404:
            raise
        current = None
    if current is None:
        created = api.create_namespaced_custom_object(body=manifest, **ref) or {}
        generation = created.get("metadata", {}).get("generation")
        out.write(f"[medfusion] created RayService {namespace}/{name}\n")
    else:
        merged = merged_serve_config(current.get("spec", {}).get("serveConfigV2", ""), document, f"{namespace}/{name}")
        patch = {"spec": {"serveConfigV2": yaml.safe_dump(merged, sort_keys=False)}}
        patched = api.patch_namespaced_custom_object(name=name, body=patch, **ref) or {}
        generation = patched.get("metadata", {}).get("generation")
        out.write(f"[medfusion] updated the Serve config of RayService {namespace}/{name}\n")
    apps = [app["name"] for app in document["applications"]]
    deadline = time.monotonic() + opts.timeout_s
    while True:
        status = api.get_namespaced_custom_object(name=name, **ref).get("status", {})
        serving, why = _serving(status, generation, apps)
        if serving:
            return f"http://{name}-serve-svc.{namespace}.svc.cluster.local:{SERVE_PORT}"
        if why.startswith("DEPLOY_FAILED") or time.monotonic() > deadline:
            raise JobError(f"RayService {namespace}/{name}: {why} (after {opts.timeout_s:.0f} s at most)")
        time.sleep(opts.poll_s)


def kuberay_options(namespace: str = "", image: str = "", overrides: Mapping[str, Any] | None = None) -> KubeRayOptions:
    """KubeRayOptions from a pipeline's parameters.

    Args:
        namespace: the namespace of the RayJobs and the RayService, unless `overrides` names one.
        image: the pipeline steps' image: the Ray pods' too, unless `overrides` names one.
        overrides: KubeRayOptions fields (the pipeline's `kuberay` parameter).

    Raises:
        ConfigError: a field is unknown or invalid (naming it).
    """
    values = dict(overrides or {})
    if namespace and not values.get("namespace"):
        values["namespace"] = namespace
    if image and not values.get("image"):
        values["image"] = image
    try:
        return load_config(KubeRayOptions, base=values)
    except ConfigError as err:
        raise ConfigError(f"kuberay.{err}") from None
