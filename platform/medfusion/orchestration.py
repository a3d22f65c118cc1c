"""Where Ray runs, for every stage of the pipeline; the quality gate; deploy and smoke test.

One string, ``ray_address``, picks the execution target of a stage (the same value for every step of
a pipeline run):

    ""                   embedded: the stage function runs in this process, which starts a local Ray
                         when the stage needs one (what ``kfp.local`` and ``medfusion pipeline run
                         --local`` use)
    "http://HEAD:8265"   Ray Jobs API: the stage runs as a Ray job on that cluster; its logs are streamed
                         here and a job that does not succeed raises JobError with its last log lines
    "kuberay"            KubeRay: a RayJob custom resource (with its own Ray cluster) is created in the
                         namespace, followed until it ends, and deleted; deploy creates or updates a
                         RayService (needs the RBAC of k8s/base/role.pipeline.yaml)

A stage run remotely runs ``python -m medfusion.orchestration STAGE`` on the cluster: the same stage
function, with the same config, writing its result as JSON to `result_uri` in object storage that both
sides reach; this process reads it back, so a caller gets the same result dict whichever the target.

The KFP components in ``medfusion.components`` are thin wrappers of `run_stage`, `record_artifact`,
`log_evaluation`, `quality_gate`, `deploy` and `smoke_test`.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import importlib
import json
import math
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from medfusion import storage
from medfusion.config import ConfigError, _check, load_config, preset_values

KUBERAY = "kuberay"
TARGETS = ("embedded", "jobs", "kuberay")
PROJECT_VERSION = "0.1.0"
# The images of the Dockerfile (k8s/ names the same ones); a KFP run or a RayJob overrides them.
DEFAULT_IMAGE = f"medfusion:{PROJECT_VERSION}"
DEFAULT_GPU_IMAGE = f"medfusion-gpu:{PROJECT_VERSION}"
SERVE_IMPORT_PATH = "medfusion.serve.app:build_app"
SERVE_PORT = 8000
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
RAYJOB_SUCCEEDED = "SUCCEEDED"
RAYJOB_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RAYJOB_DEPLOYMENT_FAILED = ("Failed", "ValidationFailed")
# Every Kubernetes API call of this module, by (API group, resource): what k8s/base/role.pipeline.yaml
# must grant the pipeline's service account (tests/k8s checks that it does).
REQUIRED_RBAC: dict[tuple[str, str], set[str]] = {
    ("ray.io", "rayjobs"): {"create", "get", "delete"},
    ("ray.io", "rayservices"): {"create", "get", "patch"},
    ("", "pods"): {"list"},
    ("", "pods/log"): {"get"},
}


class JobError(RuntimeError):
    """A stage run on a Ray cluster did not succeed; the message names the job and its last log lines."""


# ----------------------------------------------------------------------------------------------
# stages and targets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """A stage function and its config class, by import path (imported only when run)."""

    function: str
    config: str
    preset_sections: tuple[str, ...] = ()
    """Config sections that a ``preset`` key fills from medfusion/configs/presets (as the CLI's --preset)."""


STAGES: dict[str, Stage] = {
    "prepare": Stage("medfusion.data.prepare:run_prepare", "medfusion.config:PrepareConfig", ("synth",)),
    "train": Stage("medfusion.train:run_train", "medfusion.config:TrainConfig", ("model", "data")),
    "tune": Stage("medfusion.tune:run_tune", "medfusion.config:TuneConfig", ("model", "data")),
    "evaluate": Stage("medfusion.evaluate:run_evaluate", "medfusion.config:EvaluateConfig"),
}


def _resolve(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def ray_target(ray_address: str) -> str:
    """``embedded``, ``jobs`` or ``kuberay`` for a `ray_address` value (ConfigError otherwise)."""
    if not ray_address:
        return "embedded"
    if ray_address == KUBERAY:
        return "kuberay"
    if ray_address.startswith(("http://", "https://")):
        return "jobs"
    raise ConfigError(
        f"ray_address: must be empty (embedded Ray), the Ray dashboard URL http://HEAD:8265 (Jobs API) "
        f"or {KUBERAY!r} (a RayJob per stage), got {ray_address!r}"
    )


def build_config(stage: str, values: Mapping[str, Any]) -> Any:
    """The stage's typed config from plain values; a ``preset`` key fills the preset's sections first."""
    if stage not in STAGES:
        raise ConfigError(f"stage: must be one of {', '.join(STAGES)}, got {stage!r}")
    spec = STAGES[stage]
    values = dict(values)
    preset = values.pop("preset", "")
    base: dict[str, Any] = {}
    for section in spec.preset_sections if preset else ():
        base[section] = {**preset_values(preset, section), **values.pop(section, {})}
    if stage == "train":
        values["ray_address"] = ""  # the pipeline's target decides where it runs, not TrainConfig's own
    if stage == "tune":
        # The pipeline registers in its deploy step, after the quality gate: a sweep's winner must not
        # become <name>:latest before it has passed.
        values["register"] = False
    return load_config(_resolve(spec.config), base={**base, **values})


def _plain(result: Any) -> dict[str, Any]:
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)


def run_stage(
    stage: str,
    values: Mapping[str, Any],
    ray_address: str = "",
    *,
    result_root: str = "",
    kuberay: KubeRayOptions | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Run one stage where `ray_address` says; return its result as a dict (URIs and numbers).

    Args:
        stage: a key of STAGES.
        values: the stage config's fields (partial; validated here, before anything is submitted).
        ray_address: empty, ``http://HEAD:8265`` or ``kuberay`` (see the module docstring).
        result_root: object-storage folder for the result JSON of a remote run (default: ``_results``
            next to the stage's output URI).
        kuberay: cluster shape and images of the RayJob (``kuberay`` only).

    Raises:
        ConfigError: a config value or `ray_address` is invalid.
        JobError: the remote job failed, was stopped, or could not be submitted.
    """
    cfg = build_config(stage, values)
    target = ray_target(ray_address)
    if target == "embedded":
        return _plain(_resolve(STAGES[stage].function)(cfg))
    result_uri = storage.join(result_root or _default_result_root(cfg), f"{stage}-{uuid.uuid4().hex[:10]}.json")
    entrypoint = stage_entrypoint(stage, dataclasses.asdict(cfg), result_uri)
    name = f"medfusion-{stage}-{uuid.uuid4().hex[:6]}"
    if target == "jobs":
        submit_job(ray_address, entrypoint, name, env=job_env(), out=out)
    else:
        run_rayjob(rayjob_manifest(name, entrypoint, kuberay or KubeRayOptions()), kuberay or KubeRayOptions(), out=out)
    return json.loads(storage.read_text(result_uri))


def _default_result_root(cfg: Any) -> str:
    """``_results`` beside the stage's output (never inside a dataset, whose folder is checked)."""
    for attr, beside in (("output_uri", True), ("storage_uri", False), ("model_uri", True)):
        uri = getattr(cfg, attr, "").rstrip("/")
        if uri:
            return storage.join(uri.rsplit("/", 1)[0] if beside else uri, "_results")
    raise ConfigError("result_root: required for a remote run when the config names no output location")


def stage_entrypoint(stage: str, values: Mapping[str, Any], result_uri: str) -> str:
    """The shell command a remote run executes: this module's CLI with the config as base64 JSON."""
    payload = base64.urlsafe_b64encode(json.dumps(values).encode()).decode()
    argv = ("python", "-m", "medfusion.orchestration", stage, "--config-b64", payload, "--result-uri", result_uri)
    return " ".join(shlex.quote(a) for a in argv)


def job_env() -> dict[str, str]:
    """Environment of a submitted job: storage credentials (when set here) and unbuffered output."""
    env = {k: os.environ[k] for k in storage._AWS_ENV if os.environ.get(k)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ----------------------------------------------------------------------------------------------
# Ray Jobs API
# ----------------------------------------------------------------------------------------------


def submit_job(address: str, entrypoint: str, submission_id: str, env: Mapping[str, str] | None = None,
               out: TextIO | None = None, poll_s: float = 1.0, tail_lines: int = 30) -> str:
    """Submit `entrypoint` to the cluster at `address`, stream its logs to `out`, return its id once it
    succeeded (JobError otherwise). The Ray auth token is sent when this environment has one."""
    import asyncio

    from ray.job_submission import JobSubmissionClient

    from medfusion.training.jobs import auth_headers

    out = out or sys.stdout
    address = address.rstrip("/")
    try:
        client = JobSubmissionClient(address, headers=auth_headers())
        job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                   runtime_env={"env_vars": dict(env or {})})
    except Exception as err:  # unreachable address, HTTP 401/403, a bad runtime_env...
        raise JobError(f"ray_address {address}: cannot submit {submission_id} ({err})") from None
    out.write(f"[medfusion] submitted Ray job {job_id} to {address}\n")

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(follow())
    except Exception as err:  # the stream dropped: the job's status still decides
        out.write(f"[medfusion] log stream of {job_id} ended early ({err}); waiting for the job\n")
    while (status := str(client.get_job_status(job_id).value)) not in RAYJOB_TERMINAL:
        time.sleep(poll_s)
    if status != RAYJOB_SUCCEEDED:
        info = client.get_job_info(job_id)
        lines = client.get_job_logs(job_id).strip().splitlines()[-tail_lines:]
        raise JobError(f"Ray job {job_id} on {address} {status}: {info.message or ''}\n  last log lines:\n    "
                       + "\n    ".join(lines))
    return job_id


# ----------------------------------------------------------------------------------------------
# KubeRay
# ----------------------------------------------------------------------------------------------


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
        _check(self.gpu_workers >= 0 and self.cpu_workers >= 0, "kuberay.gpu_workers/cpu_workers", "must be >= 0")
        _check(self.gpu_workers + self.cpu_workers >= 1, "kuberay", "needs at least one worker")
        _check(self.timeout_s > 0 and self.poll_s > 0, "kuberay.timeout_s/poll_s", "must be > 0")


def _hardened_pod(container: dict[str, Any], opts: KubeRayOptions, **extra: Any) -> dict[str, Any]:
    return {
        "serviceAccountName": opts.service_account,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "imagePullPolicy": "IfNotPresent",
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            **container,
        }],
        **extra,
    }


def _ray_container(name: str, image: str, cpu: str, memory: str, opts: KubeRayOptions, env: list[dict],
                   gpus: int = 0, ports: list[dict] | None = None) -> dict[str, Any]:
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
    head = _ray_container("ray-head", opts.image, "2", "8Gi", opts, env, ports=[
        {"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"}, {"containerPort": SERVE_PORT, "name": "serve"}])
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
        workers.append({
            "groupName": group, "replicas": replicas, "minReplicas": replicas, "maxReplicas": replicas,
            "rayStartParams": {},
            "template": {"metadata": {"labels": {"app.kubernetes.io/name": "medfusion"}},
                         "spec": _hardened_pod(container, opts, **extra)},
        })
    return {
        "rayVersion": opts.ray_version,
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"metadata": {"labels": {"app.kubernetes.io/name": "medfusion"}},
                         "spec": _hardened_pod(head, opts, volumes=volumes)},
        },
        "workerGroupSpecs": workers,
    }


def _metadata(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app.kubernetes.io/name": "medfusion", "app.kubernetes.io/component": component}}


def rayjob_manifest(name: str, entrypoint: str, opts: KubeRayOptions) -> dict[str, Any]:
    """A RayJob running `entrypoint` on a cluster of its own, deleted when the job ends."""
    submitter = {"name": "ray-job-submitter", "image": opts.image,
                 "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}}}
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

    token_env = [{"name": serve_config["applications"][0]["args"].get("auth_token_env", "MEDFUSION_SERVE_TOKEN"),
                  "valueFrom": {"secretKeyRef": {"name": opts.serve_token_secret, "key": "token"}}}]
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
    """Create the RayJob, stream its submitter's log, wait until it ends, delete it; return its status.

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
            if status.get("jobStatus") in RAYJOB_TERMINAL or status.get("jobDeploymentStatus") in RAYJOB_DEPLOYMENT_FAILED:
                break
            if time.monotonic() > deadline:
                raise JobError(f"RayJob {namespace}/{name}: not finished after {opts.timeout_s:.0f} s (status {status})")
            if not followed and status.get("jobStatus") == "RUNNING":
                followed = _follow_submitter_logs(core, namespace, name, out)
            time.sleep(opts.poll_s)
    finally:
        api.delete_namespaced_custom_object(**ref)  # its Ray cluster goes with it
    if status.get("jobStatus") != RAYJOB_SUCCEEDED:
        raise JobError(f"RayJob {namespace}/{name} {status.get('jobStatus') or status.get('jobDeploymentStatus')}: "
                       f"{status.get('message', '')} (kubectl logs job/{name} -n {namespace})")
    return status


def apply_rayservice(manifest: dict[str, Any], opts: KubeRayOptions, out: TextIO | None = None) -> str:
    """Create the RayService or update it in place (KubeRay rolls the app without downtime); wait until
    it serves; return its in-cluster URL."""
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
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
        if ready:
            return f"http://{name}-serve-svc.{namespace}.svc.cluster.local:{SERVE_PORT}"
        if time.monotonic() > deadline:
            raise JobError(f"RayService {namespace}/{name}: not ready after {opts.timeout_s:.0f} s (status {status})")
        time.sleep(opts.poll_s)


# ----------------------------------------------------------------------------------------------
# KFP artifacts (duck-typed: kfp is not imported here)
# ----------------------------------------------------------------------------------------------


def record_artifact(artifact: Any, uri: str, result: Mapping[str, Any]) -> None:
    """Describe a stage output in a KFP artifact: `uri` and the result's other URIs and names in its
    metadata, the whole result as JSON in its file (the data itself stays where the stage wrote it).

    Numbers stay out of the metadata: KFP stores it as a protobuf Struct, which turns ints into floats,
    and the changed metadata would change the cache key of every downstream step."""
    artifact.metadata["uri"] = uri
    for key, value in result.items():
        if isinstance(value, str) and key != "uri":
            artifact.metadata[key] = value
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(result, indent=2, default=str))


def artifact_uri(artifact: Any) -> str:
    """Where the data of an artifact written by `record_artifact` is."""
    uri = artifact.metadata.get("uri") or json.loads(Path(artifact.path).read_text()).get("uri", "")
    if not uri:
        raise ValueError(f"artifact {artifact.uri}: names no data location (metadata 'uri')")
    return uri


def log_metrics(metrics: Any, values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Log every finite number of `values` to a KFP Metrics artifact; return them."""
    logged = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics.log_metric(prefix + key, float(value))
            logged[prefix + key] = float(value)
    return logged


def log_result_metrics(metrics: Any, result: Mapping[str, Any]) -> dict[str, float]:
    """A train or tune result's numbers into a KFP Metrics artifact: its top-level numbers (best value,
    epochs...) and its ``test_metrics`` / ``best_metrics`` (prefixed ``test_`` / ``best_``)."""
    logged = log_metrics(metrics, result)
    for key, prefix in (("test_metrics", "test_"), ("best_metrics", "best_")):
        logged.update(log_metrics(metrics, result.get(key) or {}, prefix=prefix))
    return logged


def log_evaluation(result: Mapping[str, Any], metrics: Any, classification: Any, report: Any) -> dict[str, float]:
    """An evaluate result into KFP artifacts: headline metrics, the confusion matrix, report.html."""
    record = json.loads(storage.read_text(result["metrics_uri"]))
    classification.log_confusion_matrix(list(record["classes"]), [[int(v) for v in row] for row in record["confusion_matrix"]])
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(storage.read_text(result["report_uri"]))
    report.metadata["uri"] = result["report_uri"]
    return log_metrics(metrics, result["metrics"])


def write_leaderboard(artifact: Any, leaderboard_uri: str, max_rows: int = 50) -> None:
    """Tune's leaderboard.json as a KFP Markdown artifact: the table `medfusion tune` prints (rank,
    trial, fusion, searched settings, metrics, objective, epochs, early stop, status), best first."""
    from medfusion.tuning.results import leaderboard_table

    data = json.loads(storage.read_text(leaderboard_uri))
    trials = data.get("trials", [])
    table = leaderboard_table(trials[:max_rows], list(data.get("search_space", {})), list(data.get("pareto_metrics", [])))
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(f"Leaderboard ({len(trials)} trials, best first): {leaderboard_uri}\n\n```\n{table}\n```\n")
    artifact.metadata["uri"] = leaderboard_uri


# ----------------------------------------------------------------------------------------------
# the quality gate
# ----------------------------------------------------------------------------------------------


@dataclass
class GateResult:
    """Whether a model may be deployed, and why."""

    passed: bool
    checks: list[dict[str, Any]] = field(default_factory=list)
    """One per gate: metric, value (None when not reported), threshold, passed."""

    def summary(self) -> str:
        parts = [f"{c['metric']} {c['value'] if c['value'] is not None else 'missing'} "
                 f"{'>=' if c['passed'] else '<'} {c['threshold']}" for c in self.checks]
        return ("PASS: " if self.passed else "BLOCKED: ") + "; ".join(parts)


def quality_gate(metrics: Mapping[str, Any], gates: Mapping[str, Any]) -> GateResult:
    """Pass when every gated metric reaches its minimum (all evaluate headline metrics are
    higher-is-better); a gated metric that was not reported fails its gate.

    Raises:
        ConfigError: no gates, or a threshold that is not a number.
    """
    if not gates:
        raise ConfigError("gates: at least one {metric: minimum} is required (e.g. {accuracy: 0.8})")
    checks = []
    for metric, threshold in gates.items():
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ConfigError(f"gates.{metric}: the minimum must be a number, got {threshold!r}")
        value = metrics.get(metric)
        value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        checks.append({"metric": metric, "value": value, "threshold": float(threshold),
                       "passed": value is not None and value >= threshold})
    return GateResult(passed=all(c["passed"] for c in checks), checks=checks)


def write_gate_decision(artifact: Any, result: GateResult) -> None:
    """The gate's verdict as a Markdown table in a KFP Markdown artifact (and on stdout)."""
    print(result.summary())
    lines = ["| metric | value | minimum | passed |", "|---|---|---|---|"]
    lines += [f"| {c['metric']} | {c['value'] if c['value'] is not None else 'not reported'} | {c['threshold']} | "
              f"{'yes' if c['passed'] else 'no'} |" for c in result.checks]
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(f"**{'Deploy' if result.passed else 'Blocked'}**: {result.summary()}\n\n" + "\n".join(lines) + "\n")
    artifact.metadata["passed"] = result.passed


# ----------------------------------------------------------------------------------------------
# deploy and smoke test
# ----------------------------------------------------------------------------------------------


DEPLOYMENTS_DIR = "_deployments"  # <registry>/<name>/_deployments/<version>/: never a valid version name


def serve_config_document(args: Mapping[str, Any], app_name: str = "medfusion", route_prefix: str = "/") -> dict[str, Any]:
    """A Serve config (the format of serve/serve_config.yaml) for one application with these args."""
    from medfusion.serving import serve_config

    serve_config(args)  # validate (ConfigError names the field)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [{"name": app_name, "route_prefix": route_prefix, "import_path": SERVE_IMPORT_PATH,
                          "args": dict(args)}],
    }


@dataclass
class DeployResult:
    """What deploy did."""

    model_uri: str
    """The published export the application serves."""
    serve_config_uri: str
    """The Serve config document (YAML), at <registry>/<name>/_deployments/<version>/serve_config.yaml."""
    url: str
    """Where the application answers; empty for the embedded target, where nothing outlives the step."""
    target: str


def deploy(model_uri: str, registry_uri: str, model_name: str, serve_args: Mapping[str, Any],
           ray_address: str = "", *, serve_url: str = "", kuberay: KubeRayOptions | None = None,
           out: TextIO | None = None) -> DeployResult:
    """Register the model (medfusion.registry) and deploy the Serve application where `ray_address` says.

    - embedded: publish and write the Serve config only (`smoke_test_embedded` brings it up; nothing
      started in a pipeline step outlives it);
    - Jobs API: ``PUT /api/serve/applications/`` on that cluster's dashboard (what ``serve deploy`` does),
      then wait until the application is RUNNING; `serve_url` defaults to the head's port 8000;
    - kuberay: create or update the RayService ``model_name``.
    """
    import yaml

    target = ray_target(ray_address)
    from medfusion import registry

    # Republishing the same export is a no-op (content-addressed version); it becomes name:latest.
    version = registry.register(model_uri, registry_uri, model_name)
    published = version.uri
    document = serve_config_document({**serve_args, "model": published}, app_name=model_name)
    # Beside the version, not inside it: a registered version is immutable.
    config_uri = storage.join(registry_uri, model_name, DEPLOYMENTS_DIR, version.version, "serve_config.yaml")
    storage.write_text(config_uri, yaml.safe_dump(document, sort_keys=False))
    url = ""
    if target == "jobs":
        url = _deploy_serve_rest(ray_address, document, model_name, serve_url, out or sys.stdout)
    elif target == "kuberay":
        opts = kuberay or KubeRayOptions()
        url = apply_rayservice(rayservice_manifest(model_name, document, opts), opts, out=out)
    return DeployResult(model_uri=published, serve_config_uri=config_uri, url=url, target=target)


def _deploy_serve_rest(address: str, document: dict[str, Any], app_name: str, serve_url: str, out: TextIO,
                       timeout_s: float = 900.0) -> str:
    import httpx

    from medfusion.training.jobs import auth_headers

    base = address.rstrip("/")
    headers = auth_headers()
    response = httpx.put(f"{base}/api/serve/applications/", json=document, headers=headers, timeout=60)
    if response.status_code >= 400:
        raise JobError(f"serve deploy to {base}: HTTP {response.status_code}: {response.text[:500]}")
    out.write(f"[medfusion] deployed Serve application {app_name!r} to {base}\n")
    deadline = time.monotonic() + timeout_s
    while True:
        apps = httpx.get(f"{base}/api/serve/applications/", headers=headers, timeout=30).json().get("applications", {})
        status = apps.get(app_name, {}).get("status", "")
        if status == "RUNNING":
            break
        if status == "DEPLOY_FAILED" or time.monotonic() > deadline:
            raise JobError(f"Serve application {app_name!r} on {base}: {status or 'missing'}: "
                           f"{apps.get(app_name, {}).get('message', '')}")
        time.sleep(2.0)
    if serve_url:
        return serve_url
    host = base.split("://", 1)[1].rsplit(":", 1)[0]
    return f"http://{host}:{SERVE_PORT}"


def sample_request(dataset_uri: str, split: str = "test") -> dict[str, Any]:
    """A real request body from the first sample of a dataset split: ``{"image_b64", "report"}``."""
    import pyarrow.parquet as pq

    from medfusion.data.dataset import open_dataset

    shard = open_dataset(dataset_uri).shard_uris(split)[0]
    fs, path = storage.filesystem(shard)
    row = pq.read_table(path, columns=["image", "report"], filesystem=fs).slice(0, 1).to_pylist()[0]
    return {"image_b64": base64.b64encode(row["image"]).decode(), "report": row["report"] or ""}


def smoke_test(url: str, request: Mapping[str, Any], token: str = "", timeout_s: float = 300.0) -> dict[str, Any]:
    """Wait until the application at `url` is ready, then check what a client sees: model info, a
    prediction for `request`, and (when a token is set) a 401 without it. Returns the prediction
    without its attention maps (the step's output, printed by the KFP runner: a few lines, not pages).

    Raises:
        JobError: naming the endpoint and the answer that was wrong.
    """
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise JobError(f"{url}/readyz: not ready after {timeout_s:.0f} s")
        time.sleep(2.0)
    checks = [("GET /healthz", httpx.get(f"{url}/healthz", timeout=30), 200),
              ("GET /v1/model", httpx.get(f"{url}/v1/model", headers=headers, timeout=30), 200)]
    if token:
        checks.append(("POST /v1/predict without token", httpx.post(f"{url}/v1/predict", json=dict(request), timeout=60), 401))
    predict = httpx.post(f"{url}/v1/predict", json=dict(request), headers=headers, timeout=120)
    checks.append(("POST /v1/predict", predict, 200))
    for what, response, expected in checks:
        if response.status_code != expected:
            raise JobError(f"smoke test {url}: {what} answered {response.status_code}, expected {expected}: {response.text[:300]}")
    prediction = predict.json()
    missing = [k for k in ("labels", "box", "findings") if k not in prediction]
    if missing or not prediction["labels"]:
        raise JobError(f"smoke test {url}: POST /v1/predict lacks {missing or ['labels']}: {str(prediction)[:300]}")
    return {k: v for k, v in prediction.items() if not k.endswith("_attention")}


@contextmanager
def serve_embedded(serve_config_uri: str) -> Iterator[tuple[str, str]]:
    """Run the application of a Serve config document on an embedded Ray, on 127.0.0.1, with a fresh
    bearer token; yield (url, token); shut it all down afterwards."""
    import secrets

    import ray
    import yaml
    from ray import serve

    from medfusion.serving import serve_config, serve_forever
    from medfusion.store import free_port

    app = yaml.safe_load(storage.read_text(serve_config_uri))["applications"][0]
    cfg = serve_config(app["args"])
    token = secrets.token_hex(16)
    os.environ[cfg.auth_token_env] = token  # before Ray starts: its workers inherit the environment
    # address="local": a bare ray.init() would attach to whatever cluster `ray start` last started on
    # this machine (/tmp/ray/ray_current_cluster), someone else's or long gone.
    ray.init(address="local", include_dashboard=False, configure_logging=False)
    url = serve_forever(cfg, host="127.0.0.1", port=free_port(), app_name=app["name"], block=False)
    try:
        yield url, token
    finally:
        serve.shutdown()
        ray.shutdown()


def run_smoke_test(ray_address: str, url: str, serve_config_uri: str, dataset_uri: str,
                   token_env: str = "MEDFUSION_SERVE_TOKEN") -> dict[str, Any]:
    """Smoke-test a deployed application with the first test sample of the dataset it was trained on.

    Embedded target: the application of `serve_config_uri` is started on an embedded Ray for the test
    and stopped after it. Otherwise `url` is called, with the bearer token from `token_env`.
    """
    request = sample_request(dataset_uri)
    if ray_target(ray_address) == "embedded":
        with serve_embedded(serve_config_uri) as (local_url, token):
            return smoke_test(local_url, request, token)
    if not url:
        raise ConfigError("url: required to smoke-test a deployment on a cluster (deploy's output)")
    return smoke_test(url, request, os.environ.get(token_env, ""))


def kuberay_options(namespace: str = "", image: str = "", overrides: Mapping[str, Any] | None = None) -> KubeRayOptions:
    """KubeRayOptions from a pipeline's parameters (empty values keep the defaults)."""
    values = dict(overrides or {})
    if namespace:
        values["namespace"] = namespace
    if image:
        values["image"] = image
    return load_config(KubeRayOptions, base=values)


# ----------------------------------------------------------------------------------------------
# the pipeline's parameters (medfusion pipeline run --local | compile | submit)
# ----------------------------------------------------------------------------------------------


@dataclass
class PipelineConfig:
    """The parameters of the Kubeflow pipeline (pipelines/medfusion_pipeline.py), one field each."""

    source: str = "synthetic"
    """Dataset source of the prepare step: synthetic, manifest (CSV/JSONL) or iu_xray."""
    source_uri: str = ""
    """The manifest file or the IU X-Ray folder (path or s3://); unused for synthetic."""
    dataset_uri: str = "s3://medfusion/datasets/pipeline"
    """Where the prepare step writes the dataset (path or s3://); a rerun needs prepare_config.overwrite."""
    storage_uri: str = "s3://medfusion/runs"
    """Where training and tuning write their run folders (path or s3://)."""
    registry_uri: str = "s3://medfusion/registry"
    """Model registry root: deploy publishes the approved export to <registry_uri>/<model_name>/<version>."""
    model_name: str = "medfusion"
    """Name of the published model, the Serve application and the RayService."""
    preset: str = "tiny"
    """Size preset of data and model: tiny, small or base."""
    prepare_config: dict[str, Any] = field(default_factory=dict)
    """PrepareConfig fields for the prepare step, e.g. {synth: {num_samples: 600}, overwrite: true}."""
    train_config: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields for the train step, e.g. {epochs: 3, num_workers: 2}."""
    use_tune: bool = False
    """Run a Ray Tune sweep (search_space) instead of one training run."""
    search_space: dict[str, Any] = field(default_factory=dict)
    """Tune's search space, e.g. {model.fusion: [concat, gated], lr: [1e-3, 3e-4]} (use_tune only)."""
    tune_config: dict[str, Any] = field(default_factory=dict)
    """Other TuneConfig fields (use_tune only)."""
    evaluate_config: dict[str, Any] = field(default_factory=dict)
    """EvaluateConfig fields of the evaluate step (split, engine, limit...)."""
    gates: dict[str, float] = field(default_factory=lambda: {"accuracy": 0.0})
    """Quality gate: {metric: minimum} over evaluate's headline metrics; deploy runs only when all pass."""
    serve_config: dict[str, Any] = field(default_factory=dict)
    """ServeConfig fields of the deployed application (device, autoscaling, limits...); model is set by deploy."""
    ray_address: str = ""
    """Where Ray runs: empty (embedded, local runs), http://HEAD:8265 (Ray Jobs API) or kuberay (RayJob/RayService)."""
    namespace: str = ""
    """Kubernetes namespace of RayJobs and the RayService (ray_address=kuberay); empty: the step's own."""
    image: str = DEFAULT_IMAGE
    """Container image of every step and of the Ray pods (the project's Dockerfile, pushed to your registry)."""
    serve_url: str = ""
    """Where the deployed application answers (Jobs API target); empty: the head's port 8000."""

    def __post_init__(self) -> None:
        from medfusion.config import PRESETS, SOURCES

        _check(self.source in SOURCES, "source", f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        _check(self.source == "synthetic" or bool(self.source_uri), "source_uri", f"is required for source={self.source}")
        _check(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name in ("dataset_uri", "storage_uri", "registry_uri", "model_name", "image"):
            _check(bool(getattr(self, name)), name, "is required")
        _check(not self.use_tune or bool(self.search_space), "search_space", "is required with use_tune=true")
        ray_target(self.ray_address)
        for metric, minimum in list(self.gates.items()):
            if isinstance(minimum, str):  # a dotted CLI override: gates.accuracy=0.8
                try:
                    self.gates[metric] = float(minimum)
                except ValueError:
                    raise ConfigError(f"gates.{metric}: the minimum must be a number, got {minimum!r}") from None
        quality_gate({}, self.gates)  # validates the thresholds

    def arguments(self) -> dict[str, Any]:
        """The pipeline's arguments (its parameters have these names)."""
        return dataclasses.asdict(self)


def run_pipeline_local(cfg: PipelineConfig, pipeline_root: str, enable_caching: bool = True) -> dict[str, Any]:
    """Run the whole pipeline here with kfp.local (each step a subprocess of this interpreter, Ray
    embedded in the steps that need it); return its outputs and where every step's outputs are.

    Object storage is reached through this process's AWS_* environment, which the steps inherit.
    """
    import warnings

    from kfp import local

    from medfusion.pipelines.medfusion_pipeline import medfusion_pipeline

    root = Path(pipeline_root).absolute()
    before = set(root.glob("medfusion-*"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=enable_caching)
    # Each step (a subprocess) starts its own Ray: RAY_ADDRESS=local keeps a bare ray.init() in a stage
    # from attaching to whatever cluster `ray start` last started on this machine.
    saved = os.environ.get("RAY_ADDRESS")
    if cfg.ray_address == "" and not saved:
        os.environ["RAY_ADDRESS"] = "local"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # resource settings and image names mean nothing to the local runner
            run = medfusion_pipeline(**cfg.arguments())
    finally:
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
    new = sorted(set(root.glob("medfusion-*")) - before)
    outputs = dict(run.outputs)
    return {"outputs": outputs, "run_dir": str(new[-1]) if new else "", "deployed_to": (
        storage.join(cfg.registry_uri, cfg.model_name) if outputs.get("deployable") else "")}


def submit_pipeline(cfg: PipelineConfig, host: str, *, namespace: str = "", experiment: str = "medfusion",
                    run_name: str = "", service_account: str = "", existing_token: str = "", cookies: str = "",
                    ssl_ca_cert: str = "", enable_caching: bool | None = None) -> dict[str, str]:
    """Submit a run of the pipeline to the Kubeflow Pipelines API at `host`; return its id and URL.

    Auth is kfp.Client's: `existing_token` (a bearer token), `cookies` (e.g. an OIDC session cookie),
    or none (in-cluster service account credentials or an open endpoint).
    """
    import kfp

    from medfusion.pipelines.medfusion_pipeline import medfusion_pipeline

    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=existing_token or None,
                            cookies=cookies or None, ssl_ca_cert=ssl_ca_cert or None)
        result = client.create_run_from_pipeline_func(
            medfusion_pipeline, arguments=cfg.arguments(), run_name=run_name or None, experiment_name=experiment,
            namespace=namespace or None, service_account=service_account or None, enable_caching=enable_caching)
    except urllib3.exceptions.HTTPError as err:
        reason = getattr(err, "reason", None) or err
        raise ConnectionError(f"--host {host}: cannot reach the Kubeflow Pipelines API ({reason})") from None
    except ApiException as err:
        hint = " (check --existing-token / --cookies and --namespace)" if err.status in (401, 403) else ""
        raise ConnectionError(f"--host {host}: the Kubeflow Pipelines API answered {err.status} {err.reason}{hint}") from None
    return {"run_id": result.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}"}


# ----------------------------------------------------------------------------------------------
# the remote side: python -m medfusion.orchestration STAGE --config-b64 ... --result-uri ...
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run one stage embedded on the cluster this job landed on and write its result JSON."""
    parser = argparse.ArgumentParser(prog="python -m medfusion.orchestration")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--config-b64", required=True, help="the stage config as urlsafe-base64 JSON")
    parser.add_argument("--result-uri", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    values = json.loads(base64.urlsafe_b64decode(args.config_b64.encode()))
    try:
        result = run_stage(args.stage, values)
    except (ConfigError, RuntimeError, OSError, ValueError) as err:
        print(f"medfusion: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    storage.write_text(args.result_uri, json.dumps(result, default=str))
    print(f"[medfusion] {args.stage} result: {args.result_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
