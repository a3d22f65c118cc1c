"""Every manifest in k8s/ parses, validates strictly against its schema (the KubeRay v1.7.0 CRDs,
Kubernetes core types), names the pinned Ray and real import paths, and is hardened; the overlays too,
as `kubectl kustomize` renders them (render.py). What KubeRay does with them: test_cluster_behaviour.py."""

from __future__ import annotations

import copy
import importlib
import re
import shlex
from pathlib import Path

import kuberay_schemas as ks
import pytest
import tomllib
import yaml
from render import kustomize

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BASE = K8S / "base"
MANIFESTS = sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
# Paths where the RayService's serveConfigV2 may differ from serve/serve_config.yaml: replicas on GPUs;
# the model from the registry (what a pipeline deploy published last, so `kubectl apply -k` keeps it);
# shutdown longer than the request timeout and health checks (serve/serve_config.yaml has Serve's defaults);
# the placement that lets a node fail (two of each, one per node, the ingress off the head: README "Node
# failures on Kubernetes"; serve/serve_config.yaml also deploys onto a one-node Ray).
_LIFECYCLE = ("graceful_shutdown_timeout_s", "health_check_period_s", "health_check_timeout_s")
SERVE_CONFIG_K8S_ONLY = {
    ("applications", 0, "deployments", 1, "ray_actor_options", "num_gpus"),
    ("applications", 0, "args", "model"),
    ("applications", 0, "args", "registry_uri"),
    *(("applications", 0, "deployments", i, field) for i in (0, 1) for field in _LIFECYCLE),
    *(("applications", 0, "deployments", i, "max_replicas_per_node") for i in (0, 1)),
    ("applications", 0, "deployments", 0, "num_replicas"),
    ("applications", 0, "deployments", 0, "ray_actor_options", "num_cpus"),
    ("applications", 0, "deployments", 1, "autoscaling_config", "min_replicas"),
}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_ray() -> str:
    (pin,) = [d for d in _pyproject()["project"]["dependencies"] if re.match(r"ray(\[|=)", d)]
    return pin.split("==")[1]


def _docs(path: Path) -> list[dict]:
    return ks.load_documents(path)


def _base_objects() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in MANIFESTS for doc in _docs(p)]


def _overlay_objects() -> list[tuple[str, dict]]:
    return [(f"overlays/{o.name}:{d['kind']}/{d['metadata']['name']}", d) for o in OVERLAYS for d in kustomize(o)]


def _all_objects() -> list[tuple[str, dict]]:
    return _base_objects() + _overlay_objects()


def _cluster_specs(obj: dict) -> list[dict]:
    if obj["kind"] not in RAY_KINDS:
        return []
    field = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[obj["kind"]]
    return [obj["spec"][field] if field else obj["spec"]]


def _pod_templates(obj: dict) -> list[dict]:
    templates = []
    for cluster in _cluster_specs(obj):
        templates.append(cluster["headGroupSpec"]["template"])
        templates.extend(group["template"] for group in cluster.get("workerGroupSpecs", []))
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        templates.append(obj["spec"]["submitterPodTemplate"])
    return templates


# ---------------------------------------------------------------------------------------- parsing


def test_there_are_manifests_and_overlays():
    kinds = {doc["kind"] for _, doc in _base_objects()}
    assert {"RayCluster", "RayJob", "RayService", "ServiceAccount", "Role", "RoleBinding", "Secret"} <= kinds
    assert {o.name for o in OVERLAYS} == {"dev", "prod"}


@pytest.mark.parametrize(
    "path",
    MANIFESTS + [BASE / "kustomization.yaml"] + [o / "kustomization.yaml" for o in OVERLAYS],
    ids=lambda p: str(p.relative_to(K8S)),
)
def test_every_file_parses_without_duplicate_keys(path):
    docs = _docs(path)
    assert docs, f"{path}: no YAML document"
    for doc in docs:
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), (
            f"{path}: apiVersion and kind are required"
        )
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), f"{path}: metadata.name is required"
            assert "status" not in doc, f"{path}: a manifest never sets status"


def test_duplicate_keys_are_errors():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'rayVersion'"):
        ks.load_yaml_documents("spec:\n  rayVersion: '1'\n  rayVersion: '2'\n")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_file_names_follow_kuberay_samples(path):
    # <kind>.<purpose>.yaml, and secret templates <kind>.<purpose>.template.yaml
    (doc,) = _docs(path)
    kind, _, rest = path.name.partition(".")
    assert kind == doc["kind"].lower(), f"{path.name}: starts with {kind!r}, holds a {doc['kind']}"
    assert re.fullmatch(r"[a-z0-9-]+(\.template)?\.yaml", rest), f"{path.name}: not <kind>.<purpose>.yaml"
    assert rest.endswith(".template.yaml") == (doc["kind"] == "Secret"), f"{path.name}: only Secrets are templates"


# ------------------------------------------------------------------------------- versions, images


def test_ray_version_is_pinned_once():
    assert pinned_ray() == "2.60.0"
    versions = {(name, c["rayVersion"]) for name, obj in _all_objects() for c in _cluster_specs(obj)}
    assert versions and all(v == pinned_ray() for _, v in versions), versions
    from medfusion.orchestration.kuberay import KubeRayOptions

    assert KubeRayOptions().ray_version == pinned_ray()


def test_images_are_the_project_images_at_the_project_version():
    version = _pyproject()["project"]["version"]
    for name, obj in _base_objects():
        for template in _pod_templates(obj):
            for container in template["spec"]["containers"]:
                assert container["image"] in (f"medfusion:{version}", f"medfusion-gpu:{version}"), (
                    name,
                    container["image"],
                )
    from medfusion import __version__
    from medfusion.orchestration.kuberay import DEFAULT_IMAGE

    assert DEFAULT_IMAGE == f"medfusion:{version}" and __version__ == version


def test_gpu_groups_use_the_gpu_image_and_request_gpus():
    for name, obj in _base_objects():
        for cluster in _cluster_specs(obj):
            for group in cluster.get("workerGroupSpecs", []):
                (container,) = group["template"]["spec"]["containers"]
                gpus = container["resources"]["limits"].get("nvidia.com/gpu")
                assert (group["groupName"] == "gpu") == bool(gpus) == container["image"].startswith("medfusion-gpu:"), (
                    name,
                    group["groupName"],
                )


# ------------------------------------------------------------------------------ strict validation


@pytest.mark.parametrize("name,obj", _all_objects(), ids=[n for n, _ in _all_objects()])
def test_strict_schema_validation(name, obj):
    assert ks.errors(obj) == [], f"{name} is invalid"


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda o: o["spec"]["headGroupSpec"].update(bogus=1), "'bogus' was unexpected"),
        (lambda o: o["spec"]["workerGroupSpecs"][0].update(numOfWorkers=2), "'numOfWorkers' was unexpected"),
        (
            lambda o: o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="x"),
            "'imagePullPolicyy' was unexpected",
        ),
        (
            lambda o: o["spec"]["headGroupSpec"]["template"]["spec"].update(securityContex={}),
            "'securityContex' was unexpected",
        ),
        (lambda o: o["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "0 is not of type 'string'"),
        (lambda o: o["spec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
        (lambda o: o["spec"]["autoscalerOptions"].update(upscalingMode="Fast"), "'Fast' is not one of"),
        (lambda o: o["metadata"].update(labelz={}), "'labelz' was unexpected"),
        (lambda o: o.update(apiVersion="ray.io/v1alpha1"), "'ray.io/v1' was expected"),
    ],
    ids=[
        "ray-field",
        "worker-field",
        "container-field",
        "pod-field",
        "ray-start-param-type",
        "required",
        "enum",
        "metadata",
        "api-version",
    ],
)
def test_strict_validation_catches_what_kubectl_would(mutate, expected):
    (obj,) = _docs(BASE / "raycluster.medfusion.yaml")
    obj = copy.deepcopy(obj)
    mutate(obj)
    found = ks.errors(obj)
    assert any(expected in e for e in found), found


def test_strict_validation_of_rayjob_and_rayservice_specific_fields():
    (job,) = _docs(BASE / "rayjob.train.yaml")
    job["spec"]["activeDeadlineSecond"] = 60  # a typo of a real field
    del job["spec"]["rayClusterSpec"]["headGroupSpec"]
    found = ks.errors(job)
    assert any("'headGroupSpec' is a required property" in e for e in found), found
    assert any("'activeDeadlineSecond' was unexpected" in e for e in found), found
    (service,) = _docs(BASE / "rayservice.medfusion.yaml")
    service["spec"]["serveConfigV2"] = {"applications": []}
    assert any("is not of type 'string'" in e for e in ks.errors(service))


@pytest.mark.parametrize(
    "doc,expected",
    [
        (
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "a"}, "automountToken": False},
            "'automountToken' was unexpected",
        ),
        (
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "a"},
                "subjects": [{"kind": "ServiceAccount", "name": "a"}],
            },
            "'roleRef' is a required property",
        ),
        (
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "a"},
                "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"]}],
            },
            "'verbs' is a required property",
        ),
        (
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"}, "stringdata": {}},
            "'stringdata' was unexpected",
        ),
    ],
    ids=["serviceaccount", "rolebinding", "role", "secret"],
)
def test_core_objects_are_validated_strictly(doc, expected):
    assert any(expected in e for e in ks.errors(doc)), ks.errors(doc)


# --------------------------------------------------------------------------------------- kustomize


@pytest.mark.parametrize("folder", [BASE, *OVERLAYS], ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomizations_build_with_kubectl(folder):
    # kustomize's own load rules (no files outside the folder, no cycles) are kubectl's to enforce.
    objects = kustomize(folder)
    assert objects and all(o.get("kind") and o.get("metadata", {}).get("name") for o in objects)


def test_base_lists_every_standing_manifest():
    (base,) = _docs(BASE / "kustomization.yaml")
    listed = set(base["resources"])
    for path in MANIFESTS:
        standing = not path.name.endswith(".template.yaml") and not path.name.startswith("rayjob.")
        assert (path.name in listed) == standing, (
            f"{path.name}: {'missing from' if standing else 'must not be in'} kustomization.yaml"
        )


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlays_set_namespace_and_bind_the_pipeline_account_there(overlay):
    (k,) = _docs(overlay / "kustomization.yaml")
    objects = kustomize(overlay)
    assert {o["metadata"]["namespace"] for o in objects} == {k["namespace"]}
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "medfusion-pipeline", "namespace": k["namespace"]}
    ]


def test_prod_overlay_points_both_images_at_the_registry():
    images = {
        c["image"]
        for o in kustomize(K8S / "overlays" / "prod")
        for t in _pod_templates(o)
        for c in t["spec"]["containers"]
    }
    assert images == {"registry.example.com/ml/medfusion:0.1.0", "registry.example.com/ml/medfusion-gpu:0.1.0"}


# ---------------------------------------------------------------------------------------- hardening


@pytest.mark.parametrize(
    "name,obj",
    [(n, o) for n, o in _all_objects() if o["kind"] in RAY_KINDS],
    ids=[n for n, o in _all_objects() if o["kind"] in RAY_KINDS],
)
def test_pods_are_hardened(name, obj):
    for template in _pod_templates(obj):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "medfusion-ray", name
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, container["name"], bound)
    for cluster in _cluster_specs(obj):
        assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP", (
            f"{name}: the dashboard/Jobs API must stay inside the cluster"
        )
        assert not cluster["headGroupSpec"].get("enableIngress"), name
        if "autoscalerOptions" in cluster:
            assert {"requests", "limits"} <= set(cluster["autoscalerOptions"]["resources"]), name


def test_no_service_is_exposed_outside_the_cluster():
    for name, obj in _all_objects():
        services = [obj] if obj["kind"] == "Service" else []
        services += [
            c["headGroupSpec"]["headService"] for c in _cluster_specs(obj) if "headService" in c["headGroupSpec"]
        ]
        services += (
            [obj["spec"]["serveService"]] if obj["kind"] == "RayService" and "serveService" in obj["spec"] else []
        )
        for service in services:
            assert service.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", name


def test_credentials_come_from_secrets_only():
    for name, obj in _base_objects():
        for template in _pod_templates(obj):
            for container in template["spec"]["containers"]:
                if container["name"] == "ray-job-submitter":
                    continue
                assert {"secretRef": {"name": "medfusion-s3"}} in container.get("envFrom", []), (
                    name,
                    container["name"],
                )
                for var in container.get("env", []):
                    assert not re.search(r"SECRET|TOKEN|PASSWORD|KEY", var["name"]) or "valueFrom" in var, (
                        name,
                        var["name"],
                    )
        if obj["kind"] == "Secret":
            assert name.endswith(".template.yaml") and all(
                "REPLACE_ME" in v or v.startswith(("https://", "us-")) for v in obj["stringData"].values()
            ), name


def test_rayservice_token_comes_from_a_secret_on_every_node():
    (service,) = _docs(BASE / "rayservice.medfusion.yaml")
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    for template in _pod_templates(service):
        (container,) = template["spec"]["containers"]
        (token,) = [v for v in container["env"] if v["name"] == app["args"]["auth_token_env"]]
        assert token["valueFrom"]["secretKeyRef"] == {"name": "medfusion-serve-token", "key": "token"}


def test_role_grants_what_orchestration_calls():
    from medfusion.orchestration.kuberay import REQUIRED_RBAC

    (role,) = _docs(BASE / "role.pipeline.yaml")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    for key, verbs in REQUIRED_RBAC.items():
        assert verbs <= granted.get(key, set()), (
            f"role.pipeline.yaml lacks {sorted(verbs - granted.get(key, set()))} on {key}"
        )
    assert not any(resource == "secrets" for _, resource in granted), "the pipeline needs no access to Secrets"


# ----------------------------------------------------------------------- what the manifests name


def _serve_documents() -> list[tuple[str, dict]]:
    return [
        (name, yaml.safe_load(obj["spec"]["serveConfigV2"]))
        for name, obj in _all_objects()
        if obj["kind"] == "RayService"
    ]


@pytest.mark.parametrize("name,document", _serve_documents(), ids=[n for n, _ in _serve_documents()])
def test_serve_config_v2_is_a_valid_serve_config(name, document):
    from ray.serve.schema import ServeDeploySchema

    from medfusion.config import ServeConfig
    from medfusion.loader import load_config

    ServeDeploySchema.model_validate(document) if hasattr(
        ServeDeploySchema, "model_validate"
    ) else ServeDeploySchema.parse_obj(document)
    for app in document["applications"]:
        assert app["import_path"] == "medfusion.serve.app:build_app", name
        load_config(ServeConfig, base=app["args"])  # every arg is a ServeConfig field with a valid value
        assert {d["name"] for d in app.get("deployments", [])} <= {"MedFusionIngress", "MedFusionDeployment"}, name


def _diff(a, b, path=()):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _diff(a.get(key), b.get(key), (*path, key))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _diff(x, y, (*path, i))
    elif a != b:
        yield path


def test_rayservice_embeds_the_serve_config_of_serve():
    (service,) = _docs(BASE / "rayservice.medfusion.yaml")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    own = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    differences = set(_diff(embedded, own))
    assert differences == SERVE_CONFIG_K8S_ONLY, (
        "k8s/base/rayservice.medfusion.yaml's serveConfigV2 and serve/serve_config.yaml differ at "
        f"{sorted(differences - SERVE_CONFIG_K8S_ONLY)} (expected only {sorted(SERVE_CONFIG_K8S_ONLY)}): "
        "copy serve/serve_config.yaml into serveConfigV2, keeping num_gpus"
    )


@pytest.mark.parametrize("name,document", _serve_documents(), ids=[n for n, _ in _serve_documents()])
def test_serve_import_path_resolves_to_a_callable(name, document):
    for app in document["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr, None)), f"{name}: {app['import_path']}"


def test_rayjob_entrypoint_is_a_real_train_command():
    from medfusion.config import TrainConfig
    from medfusion.loader import load_config

    (job,) = _docs(BASE / "rayjob.train.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["medfusion", "train"]
    cfg = load_config(TrainConfig, overrides=argv[2:])
    assert cfg.use_gpu and cfg.ray_address == ""
    gpus = sum(g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpus == cfg.num_workers, "one GPU worker pod per Ray Train worker"
    # What tests/cluster/test_train_nodes.py ran: one worker per node, so a lost pod takes one worker and
    # the run resumes from its checkpoint on the pod KubeRay recreates, or fails after worker_wait_s.
    assert cfg.placement_strategy == "STRICT_SPREAD" and cfg.max_failures >= 1
    assert cfg.worker_wait_s < job["spec"]["activeDeadlineSeconds"]
