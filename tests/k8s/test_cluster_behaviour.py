"""k8s/ as the KubeRay operator (v1.7.0) and Kubernetes treat it, on what ``kubectl kustomize`` renders.

Schemas see fields; these tests hold the rendered base and overlays (and the RayJob/RayService that
medfusion.orchestration.kuberay generates) to behaviour the schemas cannot see, each rule written
down from KubeRay's controller source in kuberay_rules.py (the file and function are named there and
below): which Services an object owns, what the operator's validation rejects, whether the operator's
own calls get through the NetworkPolicies, token auth, fault tolerance and disruption budgets.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import kuberay_rules as kr
import kuberay_schemas as ks
import pytest
import tomllib
import yaml
from render import kustomize

from medfusion.config import ServeLimitsConfig

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAYS = {"dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}
TARGETS = {"base": BASE, **OVERLAYS}
NAMESPACES = {"base": "default", "dev": "medfusion-dev", "prod": "medfusion"}
RAY_AUTH_SECRET = "medfusion-ray-auth"
RAY_AUTH_SECRET_KEY = "auth_token"  # utils/constant.go RAY_AUTH_TOKEN_SECRET_KEY


def _rendered(target: str) -> list[dict]:
    """What `kubectl apply -k` applies, plus the RayJob a user creates beside it (rayjob.train.yaml)."""
    (job,) = ks.load_documents(BASE / "rayjob.train.yaml")
    objects = kustomize(TARGETS[target])
    if target != "base":
        job["metadata"]["namespace"] = NAMESPACES[target]
    return [*objects, job]


def _generated() -> list[dict]:
    """The RayJob of a pipeline stage and the RayService of deploy (ray_address=kuberay)."""
    from medfusion.orchestration import kuberay
    from medfusion.orchestration.deploy import serve_config_document
    from medfusion.orchestration.stages import stage_entrypoint

    opts = kuberay.KubeRayOptions(gpu_workers=1, cpu_workers=1)
    entrypoint = stage_entrypoint("train", {"dataset_uri": "s3://b/d"}, "s3://b/_results/train.json")
    job = kuberay.rayjob_manifest("medfusion-train-0a1b2c", entrypoint, opts)
    document = serve_config_document({"model": "s3://b/registry/medfusion/sha-1"})
    return [job, kuberay.rayservice_manifest("medfusion", document, opts)]


def _ray(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in kr.RAY_KINDS]


def _all_ray_objects() -> list[tuple[str, dict]]:
    out = [(f"{t}:{o['kind']}/{o['metadata']['name']}", o) for t in TARGETS for o in _ray(_rendered(t))]
    return out + [(f"generated:{o['kind']}/{o['metadata']['name']}", o) for o in _generated()]


def _cluster(obj: dict) -> dict:
    return kr._cluster_spec(obj)


RAY_OBJECTS = _all_ray_objects()
RAY_IDS = [name for name, _ in RAY_OBJECTS]


# ------------------------------------------------------------------------ the CRDs are v1.7.0, whole


def test_vendored_crds_are_the_release_the_readme_names():
    readme = (ROOT / "tests" / "k8s" / "crds" / "README.md").read_text()
    assert "v1.7.0" in readme and "59d663aeec13760646da3db9c1cf8cfe883e30b7" in readme
    for name in ks.CRD_FILES.values():
        digest = hashlib.sha256((ks.CRD_DIR / name).read_bytes()).hexdigest()
        assert f"`{name}` | `{digest}`" in readme, f"{name}: sha256 {digest} is not the one crds/README.md lists"


@pytest.mark.parametrize(
    "kind,path",
    [
        ("RayCluster", ("spec", "authOptions")),
        ("RayCluster", ("spec", "gcsFaultToleranceOptions")),
        ("RayJob", ("spec", "activeDeadlineSeconds")),
        ("RayJob", ("spec", "backoffLimit")),
        ("RayJob", ("spec", "preRunningDeadlineSeconds")),
        ("RayService", ("spec", "upgradeStrategy")),
        ("RayService", ("spec", "rayClusterConfig", "authOptions")),
    ],
)
def test_crds_know_the_fields_current_kuberay_has(kind, path):
    # The pruned v1.0 copies had none of these: strict validation rejected what KubeRay 1.7 accepts.
    node = ks.crd_json_schema(kind)
    for part in path:
        node = node["properties"][part]
    assert node


# --------------------------------------------------------------- 1. who owns which Service (util.go)


@pytest.mark.parametrize(
    "obj,expected",
    [
        ({"kind": "RayCluster", "metadata": {"name": "a"}, "spec": {"headGroupSpec": {}}}, "a-head-svc"),
        (
            {
                "kind": "RayCluster",
                "metadata": {"name": "a"},
                "spec": {"headGroupSpec": {"headService": {"metadata": {"name": "x"}}}},
            },
            "x",
        ),
        ({"kind": "RayService", "metadata": {"name": "a"}, "spec": {}}, "a-head-svc"),
        ({"kind": "RayJob", "metadata": {"name": "a"}, "spec": {}}, "a-head-svc"),
    ],
    ids=["raycluster", "raycluster-headService-name", "rayservice", "rayjob"],
)
def test_head_service_naming_rule_of_util_go(obj, expected):
    # ray-operator/controllers/ray/utils/util.go GenerateHeadServiceName
    assert kr.head_service_name(obj) == expected


@pytest.mark.parametrize("target", TARGETS)
def test_no_two_ray_objects_own_the_same_service(target):
    # rayservice_controller.go reconcileServices rewrites the selector of an existing Service of its
    # name: a RayCluster `medfusion` and a RayService `medfusion` both own medfusion-head-svc.
    from medfusion.orchestration.pipeline import PipelineConfig

    objects = _rendered(target)
    # What the pipeline creates beside them; a RayService of the same name is the one deploy patches.
    deployed = {"kind": "RayService", "metadata": {"name": PipelineConfig().model_name}, "spec": {}}
    for obj in [*_generated(), deployed]:
        if not any((o["kind"], o["metadata"]["name"]) == (obj["kind"], obj["metadata"]["name"]) for o in objects):
            objects.append(obj)
    assert kr.collisions(objects) == []


def test_the_jobs_api_address_is_the_clusters_head_service():
    (cluster,) = [o for o in kustomize(BASE) if o["kind"] == "RayCluster"]
    address = f"http://{kr.head_service_name(cluster)}:8265"
    readme = (ROOT / "README.md").read_text()
    assert address in readme, f"README: ray_address for the standing cluster is {address}"
    assert address in (BASE / "raycluster.medfusion.yaml").read_text()


# ----------------------------------------------------------------- controller validation (validation.go)


@pytest.mark.parametrize("name,obj", RAY_OBJECTS, ids=RAY_IDS)
def test_the_operator_accepts_every_ray_object(name, obj):
    assert kr.validation_errors(obj) == []


def _service_with(mutate) -> dict:
    (service,) = ks.load_documents(BASE / "rayservice.medfusion.yaml")
    mutate(service)
    return service


@pytest.mark.parametrize(
    "obj,expected",
    [
        (
            _service_with(lambda o: o["spec"]["rayClusterConfig"].update(rayVersion="2.50.0")),
            "minimum Ray version is 2.52.0",
        ),
        (
            _service_with(
                lambda o: o["spec"]["rayClusterConfig"]["headGroupSpec"].update(headService={"metadata": {"name": "x"}})
            ),
            "headService.metadata.name should not be set",
        ),
        (_service_with(lambda o: o["metadata"].update(name="m" * 48)), "no more than 47 characters"),
        (_service_with(lambda o: o["metadata"].update(name="Med_Fusion")), "valid DNS1035 label"),
        (
            _service_with(
                lambda o: o["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                    ports=[{"containerPort": 8265, "name": "dashboard"}]
                )
            ),
            "port named 'serve'",
        ),
    ],
    ids=["auth-needs-ray-2.52", "rayservice-head-service-name", "name-length", "dns-1035", "serve-port"],
)
def test_the_validation_rules_bite(obj, expected):
    # utils/validation.go ValidateRayClusterSpec / ValidateRayServiceSpec / ValidateRayServiceMetadata,
    # common/service.go BuildServeService.
    assert any(expected in e for e in kr.validation_errors(obj)), kr.validation_errors(obj)


@pytest.mark.parametrize("target", TARGETS)
def test_rendered_objects_validate_strictly_against_the_v1_7_crds(target):
    for obj in kustomize(TARGETS[target]):
        assert ks.errors(obj) == [], f"{target}: {obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("name,obj", RAY_OBJECTS, ids=RAY_IDS)
def test_ray_version_is_the_pinned_one(name, obj):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    assert _cluster(obj)["rayVersion"] == ray.split("==")[1]


# ------------------------------------------------------------------ 4. NetworkPolicy vs the operator


def _policies(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] == "NetworkPolicy"]


def _pods(objects: list[dict]) -> list[tuple[str, dict]]:
    """(what, labels) of every kind of Ray pod the objects create."""
    pods = []
    for obj in _ray(objects):
        pods.append((f"{obj['kind']}/{obj['metadata']['name']} head", kr.ray_pod_labels(obj, "head")))
        for group in _cluster(obj).get("workerGroupSpecs", []):
            what = f"{obj['kind']}/{obj['metadata']['name']} {group['groupName']} worker"
            pods.append((what, kr.ray_pod_labels(obj, "worker", group["groupName"])))
    return pods


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_operator_reaches_the_dashboard_and_the_serve_proxy(target):
    # utils/util.go GetRayDashboardClientFunc (8265: Serve REST API for rayservice_controller.go
    # reconcileServe, Jobs API for the RayJob controller) and GetRayHttpProxyClientFunc (8000/-/healthz
    # from updateHeadPodServeLabel), both called from the operator's pod in its own namespace.
    objects = _rendered(target)
    operator = {"namespace": kr.OPERATOR_NAMESPACE, "labels": kr.OPERATOR_POD}
    for what, labels in _pods(objects):
        if labels[kr.NODE_TYPE] != "head":
            continue
        for _, port in kr.OPERATOR_CALLS:
            assert kr.ingress_allowed(_policies(objects), NAMESPACES[target], labels, operator, port), (what, port)


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_ray_pod_is_covered_and_closed_to_other_namespaces(target):
    objects = _rendered(target)
    stranger = {"namespace": "elsewhere", "labels": {"app": "curious"}}
    for what, labels in _pods(objects):
        for port in (6379, 8265, 10001, 52365):  # GCS, dashboard/Jobs API, client, raylet agent
            assert not kr.ingress_allowed(_policies(objects), NAMESPACES[target], labels, stranger, port), (what, port)


@pytest.mark.parametrize("target", OVERLAYS)
def test_what_must_get_through_gets_through(target):
    objects = _rendered(target)
    policies, ns = _policies(objects), NAMESPACES[target]
    prometheus = {"namespace": kr.PROMETHEUS_NAMESPACE, "labels": {"app.kubernetes.io/name": "prometheus"}}
    ingress_controller = {"namespace": "ingress-nginx", "labels": {"app.kubernetes.io/name": "ingress-nginx"}}
    pipeline_step = {"namespace": ns, "labels": {"pipelines.kubeflow.org/v2_component": "true"}}
    for what, labels in _pods(objects):
        worker = {"namespace": ns, "labels": {**labels, kr.NODE_TYPE: "worker"}}
        assert kr.ingress_allowed(policies, ns, labels, prometheus, kr.METRICS_PORT), (what, "metrics scrape")
        assert kr.ingress_allowed(policies, ns, labels, worker, 6379), (what, "Ray node to node")
        if labels[kr.NODE_TYPE] == "head":
            assert kr.ingress_allowed(policies, ns, labels, pipeline_step, 8265), (what, "Jobs API from a step")
        if "RayService" in what:
            assert kr.ingress_allowed(policies, ns, labels, ingress_controller, kr.SERVE_PORT), (what, "Serve")


# --------------------------------------------------------------------------- 6. Ray token auth


@pytest.mark.parametrize("name,obj", RAY_OBJECTS, ids=RAY_IDS)
def test_every_ray_cluster_requires_the_ray_token(name, obj):
    # raycluster_types.go AuthOptions; common/pod.go SetContainerTokenAuthEnvVars puts RAY_AUTH_MODE=token
    # and RAY_AUTH_TOKEN (the Secret's auth_token) into every Ray container, the RayJob submitter included.
    from medfusion.orchestration import kuberay

    assert _cluster(obj).get("authOptions") == {"mode": "token", "secretName": RAY_AUTH_SECRET}
    assert kuberay.RAY_AUTH_SECRET == RAY_AUTH_SECRET


def test_the_ray_token_secret_has_the_key_kuberay_reads():
    (secret,) = ks.load_documents(BASE / "secret.ray-auth.template.yaml")
    assert secret["metadata"]["name"] == RAY_AUTH_SECRET
    assert (
        set(secret["stringData"]) == {RAY_AUTH_SECRET_KEY} and "REPLACE_ME" in secret["stringData"][RAY_AUTH_SECRET_KEY]
    )


# --------------------------------------------------------------------------------- RayJob deadlines


def test_rayjobs_have_deadlines_and_a_bounded_retry():
    # rayjob_controller.go checkActiveDeadlineAndUpdateStatusIfNeeded / checkPreRunningDeadline...:
    # Failed with DeadlineExceeded; checkBackoffLimitAndUpdateStatusIfNeeded: Retrying up to backoffLimit.
    jobs = [o for name, o in RAY_OBJECTS if o["kind"] == "RayJob"]
    assert jobs
    for job in jobs:
        spec = job["spec"]
        assert spec["activeDeadlineSeconds"] > 0 and spec["preRunningDeadlineSeconds"] > 0, job["metadata"]["name"]
        assert spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
        assert "backoffLimit" in spec and spec["submissionMode"] == "K8sJobMode"


# ------------------------------------------------------------------------------ 8. hardening gaps


def _serve_documents() -> list[tuple[str, dict]]:
    return [(name, yaml.safe_load(o["spec"]["serveConfigV2"])) for name, o in RAY_OBJECTS if o["kind"] == "RayService"]


SERVE_DOCS = _serve_documents()


@pytest.mark.parametrize("name,document", SERVE_DOCS, ids=[n for n, _ in SERVE_DOCS])
def test_serve_config_is_a_serve_deploy_schema_with_shutdown_and_health_checks(name, document):
    from ray.serve.schema import ServeDeploySchema

    from medfusion.config import ServeConfig
    from medfusion.loader import load_config

    ServeDeploySchema.model_validate(document)
    for app in document["applications"]:
        limits = load_config(ServeConfig, base=app["args"]).limits
        deployments = {d["name"]: d for d in app.get("deployments", [])}
        assert set(deployments) == {"MedFusionIngress", "MedFusionDeployment"}, name
        for deployment in deployments.values():
            # Serve's default graceful_shutdown_timeout_s is 20 s: a request that may run for
            # limits.request_timeout_s must be able to finish while its replica drains.
            assert deployment.get("graceful_shutdown_timeout_s", 20) > limits.request_timeout_s, (
                name,
                deployment["name"],
            )
            assert deployment.get("health_check_period_s") and deployment.get("health_check_timeout_s"), (
                name,
                deployment["name"],
            )
    assert ServeLimitsConfig().request_timeout_s == 30.0


def test_model_replicas_define_check_health():
    from medfusion.serve import app

    for deployment in (app.MedFusionDeployment, app.MedFusionService):
        assert callable(getattr(deployment.func_or_class, "check_health", None)), deployment.name


@pytest.mark.parametrize("target", OVERLAYS)
def test_serving_workers_have_a_disruption_budget(target):
    objects = _rendered(target)
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    serving = [kr.ray_pod_labels(service, "worker", g["groupName"]) for g in _cluster(service)["workerGroupSpecs"]]
    others = [labels for what, labels in _pods(objects) if "RayService" not in what]
    for labels in serving:
        (budget,) = [b for b in budgets if kr._selects(b["spec"]["selector"], labels)]
        # maxUnavailable, not minAvailable: a drain may take one replica at a time and never deadlocks.
        assert budget["spec"].get("maxUnavailable") == 1 and "minAvailable" not in budget["spec"]
    for labels in others:
        assert not any(kr._selects(b["spec"]["selector"], labels) for b in budgets), labels


def test_prod_serving_head_survives_a_restart_with_redis():
    (service,) = [o for o in kustomize(OVERLAYS["prod"]) if o["kind"] == "RayService"]
    ft = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"]
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "medfusion-redis", "key": "password"}
    (secret,) = ks.load_documents(BASE / "secret.redis.template.yaml")
    assert secret["metadata"]["name"] == "medfusion-redis" and set(secret["stringData"]) == {"password"}
    (dev,) = [o for o in kustomize(OVERLAYS["dev"]) if o["kind"] == "RayService"]
    assert "gcsFaultToleranceOptions" not in dev["spec"]["rayClusterConfig"], "dev runs without Redis"


# ------------------------------------------------------------ 9. node failures (tests/cluster measured)
# tests/cluster ran real Ray nodes with these settings and lost a worker node under training and under
# Serve load, and restarted a head with and without Redis (README "Node failures on Kubernetes"); every
# Ray object here is held to what those runs used.


def _head_env(obj: dict) -> dict[str, str | None]:
    container = _cluster(obj)["headGroupSpec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _deployments(document: dict) -> dict[str, dict]:
    (app,) = document["applications"]
    return {d["name"]: d for d in app.get("deployments", [])}


@pytest.mark.parametrize("name,obj", RAY_OBJECTS, ids=RAY_IDS)
def test_every_gcs_declares_a_lost_node_dead_within_seconds(name, obj):
    # The GCS, on the head, reads RAY_health_check_*: 3 missed 1-s checks (measured: DEAD 2-3 s after the
    # kill), not Ray's 5 missed 3-s checks with a 10-s timeout.
    from medfusion.orchestration.kuberay import GCS_HEALTH_CHECK_ENV

    env = _head_env(obj)
    assert {key: env.get(key) for key in GCS_HEALTH_CHECK_ENV} == GCS_HEALTH_CHECK_ENV, name


@pytest.mark.parametrize("name,obj", RAY_OBJECTS, ids=RAY_IDS)
def test_workers_outlive_a_head_restart_where_redis_keeps_the_cluster(name, obj):
    # kuberay_rules.worker_gcs_reconnect_timeout_s follows common/pod.go configureGCSFaultTolerance.
    for group in _cluster(obj).get("workerGroupSpecs", []):
        timeout = kr.worker_gcs_reconnect_timeout_s(obj, group["groupName"])
        if kr.gcs_fault_tolerant(obj):
            # Longer than a head pod takes to come back anywhere (tests/cluster: a 4-s restart, 30 s set).
            assert timeout == kr.DEFAULT_WORKER_GCS_RECONNECT_TIMEOUT_S, (name, group["groupName"])
        else:
            # Without Redis a restarted head is a new, empty cluster: the old workers can only exit (and
            # their pods be recreated), so they are not kept waiting past Ray's default.
            assert timeout == kr.RAY_GCS_RECONNECT_TIMEOUT_S, (name, group["groupName"])


SERVICES = [(name, o) for name, o in RAY_OBJECTS if o["kind"] == "RayService" and not name.startswith("generated")]


@pytest.mark.parametrize("name,document", SERVE_DOCS, ids=[n for n, _ in SERVE_DOCS])
def test_a_lost_node_takes_one_model_replica_at_most(name, document):
    from medfusion.orchestration.deploy import MODEL_DEPLOYMENT, MODEL_REPLICAS_PER_NODE

    assert document["proxy_location"] == "EveryNode", name  # a proxy in every pod of the Serve Service
    assert _deployments(document)[MODEL_DEPLOYMENT]["max_replicas_per_node"] == MODEL_REPLICAS_PER_NODE == 1, name


@pytest.mark.parametrize("name,service", SERVICES, ids=[n for n, _ in SERVICES])
def test_each_serving_worker_has_an_ingress_and_the_head_takes_no_traffic(name, service):
    # tests/cluster/test_serve_nodes.py: the ingress on the node of the proxy that takes the traffic (an
    # ingress lost under a request is a 500 from the proxy: 8 of 2,597 with it elsewhere); test_gcs_ft.py:
    # the ingress off the 0-CPU head, so that a head restart does not take it. Serve's proxy prefers the
    # ingress on its own node, so one ingress per worker and no traffic to the head's proxy
    # (kuberay_rules.head_pod_serves_traffic) give both.
    from medfusion.orchestration.deploy import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT

    cluster = _cluster(service)
    (group,) = cluster["workerGroupSpecs"]
    deployments = _deployments(yaml.safe_load(service["spec"]["serveConfigV2"]))
    ingress, model = deployments[INGRESS_DEPLOYMENT], deployments[MODEL_DEPLOYMENT]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert ingress["ray_actor_options"]["num_cpus"] > 0, "a 0-CPU ingress may land on the 0-CPU head"
    assert ingress["max_replicas_per_node"] == 1 and ingress["num_replicas"] == group["minReplicas"], name
    assert not kr.head_pod_serves_traffic(service), name
    autoscaling = model["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (group["minReplicas"], group["maxReplicas"])
    assert group["replicas"] == group["minReplicas"], name


def test_prod_keeps_a_model_replica_serving_through_a_lost_node_or_a_drain():
    # The Serve cluster test: 2 replicas on 2 nodes, one node lost under 16 clients, 0 failed requests.
    from medfusion.orchestration.deploy import MODEL_DEPLOYMENT

    objects = _rendered("prod")
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    (budget,) = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    model = _deployments(yaml.safe_load(service["spec"]["serveConfigV2"]))[MODEL_DEPLOYMENT]
    assert model["autoscaling_config"]["min_replicas"] >= 2
    # A lost pod takes max_replicas_per_node replicas; a drain evicts maxUnavailable pods at a time.
    for pods_at_once in (1, budget["spec"]["maxUnavailable"]):
        assert model["autoscaling_config"]["min_replicas"] - pods_at_once * model["max_replicas_per_node"] >= 1
    assert kr.gcs_fault_tolerant(service)
    (worker,) = _cluster(service)["workerGroupSpecs"]
    explicit = [
        e for e in worker["template"]["spec"]["containers"][0]["env"] if e["name"] == kr.GCS_RECONNECT_TIMEOUT_ENV
    ]
    assert explicit == [{"name": kr.GCS_RECONNECT_TIMEOUT_ENV, "value": "600"}], "set in the overlay, so it shows"


def test_rayservice_upgrades_by_a_new_cluster():
    # rayservice_controller.go shouldPrepareNewCluster: a rayClusterConfig change makes a new cluster only
    # when zero-downtime upgrades are on (isZeroDowntimeUpgradeEnabled): say so instead of relying on it.
    for name, obj in RAY_OBJECTS:
        if obj["kind"] == "RayService":
            assert obj["spec"]["upgradeStrategy"] == {"type": "NewCluster"}, name


def test_pipeline_role_grants_exactly_what_orchestration_calls():
    from medfusion.orchestration.kuberay import REQUIRED_RBAC

    (role,) = ks.load_documents(BASE / "role.pipeline.yaml")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == REQUIRED_RBAC


def test_an_overlay_can_pin_every_image_by_digest(tmp_path):
    digest = "sha256:" + "a" * 64
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(OVERLAYS["prod"].resolve(), tmp_path)],  # kustomize: relative only
                "images": [
                    {"name": "registry.example.com/ml/medfusion", "digest": digest},
                    {"name": "registry.example.com/ml/medfusion-gpu", "digest": digest},
                ],
            }
        )
    )
    images = set()
    for obj in _ray(kustomize(tmp_path)):
        cluster = _cluster(obj)
        templates = [
            cluster["headGroupSpec"]["template"],
            *(g["template"] for g in cluster.get("workerGroupSpecs", [])),
        ]
        images |= {c["image"] for t in templates for c in t["spec"]["containers"]}
    assert images and all(re.fullmatch(rf"registry\.example\.com/ml/medfusion(-gpu)?@{digest}", i) for i in images), (
        images
    )


# ------------------------------------------------------------------------------------- the README


def test_readme_platform_path_says_what_the_operator_needs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Platform engineer", 1)[1].split("\n## ", 1)[0]
    for needed in (
        "What the operator needs",
        "KubeRay v1.7.0",
        "kuberay-system",
        "NetworkPolicy",
        "medfusion-s3",
        "medfusion-serve-token",
        RAY_AUTH_SECRET,
        "medfusion-redis",
        "--build-arg DS_ACCELERATOR=cuda",
    ):
        assert needed in section, f"README's platform-engineer section does not mention {needed!r}"
    assert "DS_ACCELERATOR= " not in section and "DS_ACCELERATOR= " not in (ROOT / "Dockerfile").read_text()


def test_readme_says_which_node_failures_the_manifests_survive():
    readme = (ROOT / "README.md").read_text()
    platform = readme.split("### Platform engineer", 1)[1].split("\n## ", 1)[0]
    assert "#### Node failures on Kubernetes" in platform
    section = platform.split("#### Node failures on Kubernetes", 1)[1]
    for needed in (
        "RAY_health_check_period_ms",
        "gcsFaultToleranceOptions",
        "RAY_gcs_rpc_server_reconnect_timeout_s",
        "max_replicas_per_node",
        "excludeHeadPodFromServeSvc",
        "proxy_location",
        "Retry-After",
        "placement_strategy",
        "worker_wait_s",
        "max_failures",
        "PodDisruptionBudget",
        "pytest tests/cluster -s",
        "ray_nodes",
    ):
        assert needed in section, f"README's 'Node failures on Kubernetes' does not mention {needed!r}"


def test_secret_templates_are_not_applied():
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"])
    templates = {p.name for p in BASE.glob("secret.*.template.yaml")}
    assert {"secret.s3.template.yaml", "secret.serve-token.template.yaml", "secret.ray-auth.template.yaml"} <= templates
    assert not listed & templates


def _heads_that_run_sweeps() -> list[tuple[str, dict]]:
    """The long-lived RayCluster (sweeps run there through the Jobs API) and every generated cluster."""
    return [(name, obj) for name, obj in RAY_OBJECTS if obj["kind"] == "RayCluster" or name.startswith("generated:")]


@pytest.mark.parametrize("name,obj", _heads_that_run_sweeps(), ids=[n for n, _ in _heads_that_run_sweeps()])
def test_the_head_advertises_the_resource_that_keeps_trial_drivers_off_workers(name, obj):
    from medfusion.orchestration.kuberay import TRIAL_DRIVER_RESOURCE

    spec = _cluster(obj)
    assert kr.custom_resources(spec["headGroupSpec"]).get(TRIAL_DRIVER_RESOURCE, 0) >= 100, name
    for group in spec["workerGroupSpecs"]:
        assert TRIAL_DRIVER_RESOURCE not in kr.custom_resources(group), f"{name}: {group['groupName']}"
