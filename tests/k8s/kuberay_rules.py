"""What the KubeRay operator (v1.7.0, the release of crds/) does with a Ray object beyond its schema,
written down from its source so that tests can hold the manifests and the generated objects to it.

Each function names the controller file and function of ray-project/kuberay (tag v1.7.0) it follows:

- `owned_services`, `child_cluster_pattern`: the Services and RayClusters the operator creates for a
  RayCluster, RayJob or RayService (names and which ones it takes over).
- `validation_errors`: the controller-side validation (``utils/validation.go``) that rejects an object
  the API server accepted.
- `ingress_allowed`: the NetworkPolicy ingress semantics (Kubernetes networking/v1), to ask whether
  the operator's calls (`OPERATOR_CALLS`) reach a Ray pod.
- `worker_gcs_reconnect_timeout_s`, `head_pod_serves_traffic`: what a node failure meets on a Ray pod as
  KubeRay starts it (how long a worker outlives its head, which pods the Serve Service sends traffic to).
- `custom_resources`: the custom Ray resources a group's pods advertise (`ray start --resources`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

RAY_KINDS = ("RayCluster", "RayJob", "RayService")
# k8s.io/apimachinery/pkg/util/rand.String's alphabet (GenerateRayClusterName appends 5 of them).
RAND_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
# utils/constant.go: MaxRayClusterNameLength, MaxRayServiceNameLength, MaxRayJobNameLength.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayService": 47, "RayJob": 47}
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MIN_AUTH_RAY_VERSION = (2, 52, 0)  # validation.go ValidateRayClusterSpec: authOptions.mode token

# Labels KubeRay puts on every Ray pod (common/pod.go labelPod).
NODE_TYPE = "ray.io/node-type"
IS_RAY_NODE = "ray.io/is-ray-node"
# Where the operator runs and how its pods are labelled: the Helm chart's `kuberay-operator.name`
# label (helm-chart/kuberay-operator/templates/deployment.yaml) in the namespace README tells to
# install it into; Prometheus as KubeRay's install/prometheus/install.sh installs it.
OPERATOR_NAMESPACE = "kuberay-system"
OPERATOR_POD = {"app.kubernetes.io/name": "kuberay-operator"}
PROMETHEUS_NAMESPACE = "prometheus-system"
DASHBOARD_PORT = 8265  # utils/constant.go DefaultDashboardPort, port name "dashboard"
SERVE_PORT = 8000  # utils/constant.go DefaultServingPort, port name "serve"
METRICS_PORT = 8080  # utils/constant.go DefaultMetricsPort
# The operator's own calls into a Ray cluster (without the apiserver proxy, its default):
# - utils/util.go GetRayDashboardClientFunc + FetchHeadServiceURL: http://<head-svc>.<ns>.svc:8265, the
#   Serve REST API (RayService: rayservice_controller.go reconcileServe -> UpdateDeployments,
#   GetServeDetails) and the Jobs API (RayJob: rayjob_controller.go -> GetJobInfo, StopJob);
# - utils/util.go GetRayHttpProxyClientFunc: http://<head pod IP>:8000/-/healthz from
#   rayservice_controller.go updateHeadPodServeLabel (whether the head pod serves traffic).
OPERATOR_CALLS = (("head", DASHBOARD_PORT), ("head", SERVE_PORT))


def _cluster_spec(obj: dict) -> dict:
    field = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[obj["kind"]]
    return obj["spec"] if field is None else obj["spec"].get(field) or {}


def head_service_name(obj: dict) -> str:
    """utils/util.go GenerateHeadServiceName: ``<name>-head-svc`` for a RayService or RayJob (their own
    head Service, which follows whichever cluster serves), and for a RayCluster unless
    ``headGroupSpec.headService.metadata.name`` sets another name."""
    name = obj["metadata"]["name"]
    if obj["kind"] == "RayCluster":
        custom = obj["spec"]["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name")
        if custom:
            return custom
    return f"{name}-head-svc"


def owned_services(obj: dict) -> list[str]:
    """Every Service name the operator creates for `obj` in its namespace, random child names excluded.

    - RayCluster: its head Service (common/service.go BuildServiceForHeadPod); with the annotation
      ``ray.io/enable-serve-service: "true"`` also ``<name>-serve-svc`` (BuildServeServiceForRayCluster).
    - RayService: ``<name>-head-svc`` (BuildHeadServiceForRayService) and ``<name>-serve-svc``
      (BuildServeService, utils.GenerateServeServiceName), besides its child cluster's own head Service.
    - RayJob: ``<name>-head-svc`` (common/job.go BuildHeadServiceForRayJob), besides its child cluster's.

    rayservice_controller.go reconcileServices (and rayjob_controller.go reconcileServices) *update* an
    existing Service of that name whose ``ray.io/cluster`` selector differs: two objects that own the
    same name steal each other's traffic.
    """
    name = obj["metadata"]["name"]
    services = [head_service_name(obj)]
    if obj["kind"] == "RayService":
        services.append(f"{name}-serve-svc")
    elif (
        obj["kind"] == "RayCluster"
        and obj["metadata"].get("annotations", {}).get("ray.io/enable-serve-service") == "true"
    ):
        services.append(f"{name}-serve-svc")
    return services


def child_cluster_pattern(obj: dict) -> re.Pattern[str] | None:
    """utils/util.go GenerateRayClusterName: a RayService's or RayJob's RayCluster is ``<name>-`` and
    five random characters (its head Service ``<that>-head-svc``); None for a RayCluster."""
    if obj["kind"] == "RayCluster":
        return None
    return re.compile(rf"{re.escape(obj['metadata']['name'])}-[{RAND_ALPHABET}]{{5}}")


def collisions(objects: list[dict]) -> list[str]:
    """Service names owned twice, and RayClusters whose name a RayService/RayJob child could take."""
    owners: dict[str, list[str]] = {}
    ray = [o for o in objects if o["kind"] in RAY_KINDS]
    for obj in ray:
        for service in owned_services(obj):
            owners.setdefault(service, []).append(f"{obj['kind']}/{obj['metadata']['name']}")
    problems = [f"Service {svc} owned by {', '.join(who)}" for svc, who in sorted(owners.items()) if len(who) > 1]
    for parent in ray:
        pattern = child_cluster_pattern(parent)
        for obj in ray:
            if pattern and obj["kind"] == "RayCluster" and pattern.fullmatch(obj["metadata"]["name"]):
                child, owner = obj["metadata"]["name"], f"{parent['kind']}/{parent['metadata']['name']}"
                problems.append(f"RayCluster/{child} looks like a child of {owner}")
    return problems


# ------------------------------------------------------------------------------- validation.go


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def _cluster_spec_errors(spec: dict, where: str) -> Iterator[str]:
    """validation.go ValidateRayClusterSpec, the parts a manifest here can get wrong."""
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    head = spec["headGroupSpec"]
    if not head["template"]["spec"].get("containers"):
        yield f"{where}: headGroupSpec should have at least one container"
    for group in spec.get("workerGroupSpecs", []):
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            yield f"{where}: worker group {group['groupName']} must set both minReplicas and maxReplicas"
        if lo is not None and hi is not None and lo > hi:
            yield f"{where}: worker group {group['groupName']} has minReplicas {lo} greater than maxReplicas {hi}"
    head_container = head["template"]["spec"]["containers"][0]
    ft = spec.get("gcsFaultToleranceOptions")
    if ft is not None:
        if head.get("rayStartParams", {}).get("redis-password"):
            yield f"{where}: cannot set redis-password in rayStartParams with gcsFaultToleranceOptions"
        for env in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS"):
            if env in _env_names(head_container):
                yield f"{where}: cannot set {env} in the head pod with gcsFaultToleranceOptions"
    elif "RAY_REDIS_ADDRESS" in _env_names(head_container):
        yield f"{where}: RAY_REDIS_ADDRESS implicitly enables GCS FT; set gcsFaultToleranceOptions"
    auth = spec.get("authOptions")
    if auth and auth.get("mode", "token") == "token":
        if not spec.get("rayVersion"):
            yield f"{where}: authOptions.mode is 'token' but RayVersion was not specified"
        elif _version(spec["rayVersion"]) < MIN_AUTH_RAY_VERSION:
            yield f"{where}: authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {spec['rayVersion']}"
    if "networkPolicy" in spec:
        yield f"{where}: spec.networkPolicy requires the RayClusterNetworkPolicy feature gate (alpha, off by default)"


def validation_errors(obj: dict) -> list[str]:
    """What the operator's validation (utils/validation.go) rejects in `obj`; empty when it passes.

    ValidateRayClusterMetadata / ValidateRayJobMetadata / ValidateRayServiceMetadata (name length,
    DNS-1035), ValidateRayClusterSpec, ValidateRayJobSpec (deadlines, backoffLimit, TTL without
    shutdown) and ValidateRayServiceSpec (no headService name, upgrade type); BuildServeService
    (common/service.go) needs a head port named "serve" for a RayService.
    """
    kind, name = obj["kind"], obj["metadata"]["name"]
    where = f"{kind}/{name}"
    errors = []
    if len(name) > MAX_NAME_LENGTH[kind]:
        errors.append(f"{where}: {kind} name should be no more than {MAX_NAME_LENGTH[kind]} characters")
    if not DNS1035.fullmatch(name):
        errors.append(f"{where}: {kind} name should be a valid DNS1035 label")
    spec = obj["spec"]
    cluster = _cluster_spec(obj)
    if cluster:
        errors.extend(_cluster_spec_errors(cluster, where))
    if kind == "RayJob":
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append(f"{where}: shutdownAfterJobFinishes false cannot have TTLSecondsAfterFinished")
        for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if field in spec and spec[field] <= 0:
                errors.append(f"{where}: {field} must be a positive integer")
        if spec.get("backoffLimit", 0) < 0:
            errors.append(f"{where}: backoffLimit must be a positive integer")
        if not cluster and not spec.get("clusterSelector"):
            errors.append(f"{where}: one of RayClusterSpec or ClusterSelector must be set")
    if kind == "RayService":
        if cluster["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name"):
            errors.append(f"{where}: spec.rayClusterConfig.headGroupSpec.headService.metadata.name should not be set")
        upgrade = spec.get("upgradeStrategy", {}).get("type")
        if upgrade not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
            errors.append(f"{where}: Spec.UpgradeStrategy.Type value {upgrade} is invalid")
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = [p.get("name", "") for p in head.get("ports", [])]
        if not any(p == "serve" or p.startswith("serve-") for p in ports) and "serveService" not in spec:
            errors.append(f"{where}: the head container needs a port named 'serve' (no Serve Service otherwise)")
    return errors


# ------------------------------------------------------------------- NetworkPolicy (networking/v1)


def _selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """A LabelSelector against labels ({} selects everything; None is "not given")."""
    if selector is None:
        return True
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def _peer_matches(peer: dict, policy_ns: str, source: dict) -> bool:
    if "ipBlock" in peer:
        return False  # pod-to-pod questions only
    pod_ok = _selects(peer.get("podSelector", {}), source["labels"])
    if "namespaceSelector" in peer:
        ns_labels = {"kubernetes.io/metadata.name": source["namespace"]}
        return _selects(peer["namespaceSelector"], ns_labels) and pod_ok
    return source["namespace"] == policy_ns and pod_ok


def _port_matches(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    return any(p.get("port") in (None, port) or (p.get("port", 0) <= port <= p.get("endPort", -1)) for p in ports)


def ingress_allowed(policies: list[dict], namespace: str, dest_labels: dict, source: dict, port: int) -> bool:
    """Whether `source` ({"namespace", "labels"}) reaches a pod with `dest_labels` in `namespace` on
    TCP `port`: allowed when no Ingress policy selects the pod, else when one of their rules admits it."""
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace", namespace) == namespace
        and _selects(p["spec"]["podSelector"], dest_labels)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            peer_ok = not peers or any(_peer_matches(peer, namespace, source) for peer in peers)
            if peer_ok and _port_matches(rule, port):
                return True
    return False


def ray_pod_labels(obj: dict, node_type: str, group: str = "") -> dict[str, str]:
    """The labels of a Ray pod of `obj` (common/pod.go labelPod: KubeRay's own, then the template's)."""
    cluster = _cluster_spec(obj)
    spec = (
        cluster["headGroupSpec"]
        if node_type == "head"
        else next(g for g in cluster["workerGroupSpecs"] if not group or g["groupName"] == group)
    )
    labels = {IS_RAY_NODE: "yes", NODE_TYPE: node_type, "ray.io/cluster": obj["metadata"]["name"]}
    template_labels = spec["template"].get("metadata", {}).get("labels", {})
    labels.update({k: v for k, v in template_labels.items() if k not in (NODE_TYPE, "ray.io/group", "ray.io/cluster")})
    return labels


# ------------------------------------------------------------------------ node failures (common/pod.go)

GCS_RECONNECT_TIMEOUT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"  # utils/constant.go
DEFAULT_WORKER_GCS_RECONNECT_TIMEOUT_S = 600  # utils/constant.go DefaultWorkerRayGcsReconnectTimeoutS
RAY_GCS_RECONNECT_TIMEOUT_S = 60  # Ray's own default of gcs_rpc_server_reconnect_timeout_s
FT_ENABLED_ANNOTATION = "ray.io/ft-enabled"  # utils/constant.go RayFTEnabledAnnotationKey


def gcs_fault_tolerant(obj: dict) -> bool:
    """utils/util.go IsGCSFaultToleranceEnabled: gcsFaultToleranceOptions set, or the ft-enabled annotation."""
    annotations = obj["metadata"].get("annotations", {})
    return _cluster_spec(obj).get("gcsFaultToleranceOptions") is not None or (
        annotations.get(FT_ENABLED_ANNOTATION, "").lower() == "true"
    )


def worker_gcs_reconnect_timeout_s(obj: dict, group: str) -> int:
    """How long a worker of `group` outlives an unreachable GCS (a head restarting) before its raylet exits.

    common/pod.go configureGCSFaultTolerance: with GCS fault tolerance, a worker container without
    RAY_gcs_rpc_server_reconnect_timeout_s gets DefaultWorkerRayGcsReconnectTimeoutS (600); else the
    container's own value holds, and without either Ray's default (60).
    """
    (spec,) = [g for g in _cluster_spec(obj)["workerGroupSpecs"] if g["groupName"] == group]
    container = spec["template"]["spec"]["containers"][0]
    own = [e.get("value") for e in container.get("env", []) if e["name"] == GCS_RECONNECT_TIMEOUT_ENV]
    if own:
        return int(own[-1])
    return DEFAULT_WORKER_GCS_RECONNECT_TIMEOUT_S if gcs_fault_tolerant(obj) else RAY_GCS_RECONNECT_TIMEOUT_S


def head_pod_serves_traffic(obj: dict) -> bool:
    """Whether a RayService's Serve Service (<name>-serve-svc) may send requests to the head pod.

    common/pod.go BuildPod labels a RayService's workers ray.io/serve=true (their readiness probe, on the
    Serve proxy, gates them) and its head "false"; rayservice_controller.go updateHeadPodServeLabel turns
    the head's to "true" once its proxy is healthy, unless spec.excludeHeadPodFromServeSvc.
    """
    return obj["kind"] == "RayService" and not obj["spec"].get("excludeHeadPodFromServeSvc", False)


def custom_resources(group_spec: dict) -> dict[str, float]:
    """The custom resources `ray start` gets for a head or worker group's pods.

    common/pod.go updateRayStartParamsResources: the group's top-level `resources` (Kubernetes quantities)
    other than cpu, memory and GPUs become rayStartParams["resources"] as JSON, replacing one given
    there; getResourcesMap reads that JSON after trimming quotes (the old escaped form fails it).
    """
    import json

    params = dict(group_spec.get("rayStartParams", {}))
    own = {
        name: float(quantity)
        for name, quantity in group_spec.get("resources", {}).items()
        if name.lower() not in ("cpu", "memory") and not name.lower().endswith("gpu")
    }
    if own:
        return own
    text = params.get("resources", "").strip("'\"` ")
    return {k: float(v) for k, v in json.loads(text).items()} if text else {}
