"""The pipeline as a real Kubeflow Pipelines backend and the KubeRay operator (v1.7.0) run it.

- Secrets reach the step pods only through the compiled platform spec (kfp-kubernetes
  ``use_secret_as_env``): KFP's driver turns each ``secretAsEnv`` entry into an ``env.valueFrom
  .secretKeyRef`` of the step's container (backend/src/v2/driver: ``extendPodSpecPatch``).
- deploy on ``ray_address=kuberay`` patches only ``spec.serveConfigV2`` of a RayService that exists
  (rayservice_controller.go: a serveConfigV2 change is applied in place by reconcileServe ->
  updateServeDeployment, while any rayClusterConfig change makes shouldPrepareNewCluster build a new
  cluster) and creates a complete one otherwise; it waits for the patched generation.
- A RayJob is finished when its jobDeploymentStatus is (rayjob_types.go IsJobDeploymentTerminal), not
  when jobStatus first reads FAILED: with backoffLimit, checkBackoffLimitAndUpdateStatusIfNeeded
  (rayjob_controller.go) moves it to Retrying.
- Typed parameters a platform engineer reads in the KFP UI, a real quality gate, and no silent
  embedded run on a cluster.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from pipeline_gates import untrained_metrics

from medfusion.config import SERVE_TOKEN_ENV, ConfigError, TrainConfig
from medfusion.loader import load_config
from medfusion.orchestration import deploy, kuberay, stages
from medfusion.orchestration.gate import quality_gate
from medfusion.orchestration.jobs import JobError
from medfusion.orchestration.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "pipelines" / "medfusion_pipeline.yaml"
# (Secret, ((key, environment variable), ...)), as the compiled platform spec names them.
S3 = (
    "medfusion-s3",
    tuple((k, k) for k in sorted(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"))),
)
RAY_TOKEN = ("medfusion-ray-auth", (("auth_token", "RAY_AUTH_TOKEN"),))  # KubeRay's key; the env Ray reads
SERVE_TOKEN = ("medfusion-serve-token", (("token", SERVE_TOKEN_ENV),))
# Which Secrets each step's pod needs: storage for every step that reads or writes S3, the Ray token
# for every step that may call a Ray dashboard (Jobs API, Serve REST API), the serve token for the
# client-side smoke test.
STEP_SECRETS = {
    "prepare-data": {S3, RAY_TOKEN},
    "train": {S3, RAY_TOKEN},
    "tune": {S3, RAY_TOKEN},
    "evaluate": {S3, RAY_TOKEN},
    "quality-gate": set(),
    "deploy": {S3, RAY_TOKEN},
    "smoke-test": {S3, SERVE_TOKEN},
}


def _documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(COMPILED.read_text()) if d]


def _pipeline_spec() -> dict:
    return _documents()[0]


def _tasks(spec: dict) -> dict[str, dict]:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def _secrets_by_step() -> dict[str, set]:
    spec, *platform = _documents()
    executors = platform[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if platform else {}
    found = {}
    for name, task in _tasks(spec).items():
        if name not in STEP_SECRETS:
            continue
        label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        entries = executors.get(label, {}).get("secretAsEnv", [])
        found[name] = {
            (
                e["secretNameParameter"]["runtimeValue"]["constant"],
                tuple(sorted((m["secretKey"], m["envVar"]) for m in e["keyToEnv"])),
            )
            for e in entries
        }
    return found


# ------------------------------------------------------------------- 3. Secrets in the step pods


def test_kfp_kubernetes_is_pinned_for_the_pinned_kfp():
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    pins = {r.name: r for r in deps}
    (kfp_version,) = [s.version for s in pins["kfp"].specifier]
    (ext,) = [s for s in pins["kfp-kubernetes"].specifier]
    assert ext.operator == "==", "kfp-kubernetes is pinned exactly"
    # kfp-kubernetes declares the kfp it works with: the pinned kfp must satisfy it.
    (needs,) = [Requirement(r) for r in importlib.metadata.requires("kfp-kubernetes") if Requirement(r).name == "kfp"]
    assert needs.specifier.contains(kfp_version) and importlib.metadata.version("kfp-kubernetes") == ext.version


@pytest.mark.parametrize("step", STEP_SECRETS)
def test_each_step_pod_gets_exactly_the_secrets_it_needs(step):
    assert _secrets_by_step()[step] == STEP_SECRETS[step]


def test_secret_names_and_keys_are_the_ones_k8s_creates():
    for (name, keys), template in (
        (S3, "secret.s3.template.yaml"),
        (RAY_TOKEN, "secret.ray-auth.template.yaml"),
        (SERVE_TOKEN, "secret.serve-token.template.yaml"),
    ):
        (secret,) = yaml.safe_load_all((ROOT / "k8s" / "base" / template).read_text())
        assert secret["metadata"]["name"] == name and set(secret["stringData"]) == {k for k, _ in keys}, template
    assert (kuberay.S3_SECRET, kuberay.RAY_AUTH_SECRET, kuberay.SERVE_TOKEN_SECRET) == (
        S3[0],
        RAY_TOKEN[0],
        SERVE_TOKEN[0],
    )


def test_the_jobs_api_client_sends_the_token_the_secret_maps(monkeypatch):
    # KFP maps the Secret's auth_token to RAY_AUTH_TOKEN; Ray's dashboard reads "Authorization: Bearer"
    # (ray/_private/authentication/http_token_authentication.py), KubeRay sends "x-ray-authorization".
    import ray.job_submission

    from medfusion.orchestration import jobs

    seen = {}

    class FakeClient:
        def __init__(self, address, headers=None, **_):
            seen["headers"] = headers

        def submit_job(self, **kwargs):
            return kwargs["submission_id"]

        async def tail_job_logs(self, job_id):
            yield "done\n"

        def get_job_status(self, job_id):
            return type("S", (), {"value": "SUCCEEDED"})()

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t\n")
    jobs.submit_job("http://medfusion-cluster-head-svc:8265", "true", "j1", out=io.StringIO())
    assert seen["headers"] == {"Authorization": "Bearer s3cr3t"}


# ------------------------------------------------------ 5. deploy vs the hand-managed RayService


class FakeApi:
    """CustomObjectsApi over one RayService (the controller's status moves after each read)."""

    def __init__(self, existing: dict | None, statuses: list[dict]):
        self.existing, self.statuses, self.calls = existing, list(statuses), []

    def get_namespaced_custom_object(self, **kw):
        from kubernetes.client.exceptions import ApiException

        if self.existing is None:
            raise ApiException(status=404)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {**self.existing, "status": status}

    def patch_namespaced_custom_object(self, **kw):
        self.calls.append(("patch", kw["plural"], kw["name"], kw["body"]))
        self.existing = {**self.existing, "metadata": {**self.existing["metadata"], "generation": 4}}
        return self.existing

    def create_namespaced_custom_object(self, **kw):
        self.calls.append(("create", kw["plural"], kw["body"]["metadata"]["name"], kw["body"]))
        self.existing = {**kw["body"], "metadata": {**kw["body"]["metadata"], "generation": 1}}
        return self.existing

    def delete_namespaced_custom_object(self, **kw):
        self.calls.append(("delete", kw["plural"], kw["name"], None))


def _ready(generation: int, app_status: str = "RUNNING") -> dict:
    return {
        "observedGeneration": generation,
        "conditions": [{"type": "Ready", "status": "True"}],
        "activeServiceStatus": {"applicationStatuses": {"medfusion": {"status": app_status}}},
    }


OPTS = kuberay.KubeRayOptions(poll_s=0.01, timeout_s=5)


def _hand_managed() -> dict:
    (service,) = yaml.safe_load_all((ROOT / "k8s" / "base" / "rayservice.medfusion.yaml").read_text())
    service["metadata"]["generation"] = 3
    return service


def _use(monkeypatch, api):
    monkeypatch.setattr(kuberay, "_kube", lambda opts: (api, None, "team-a"))


def test_deploy_patches_only_the_serve_config_of_an_existing_rayservice(monkeypatch):
    existing = _hand_managed()
    before = yaml.safe_load(existing["spec"]["serveConfigV2"])
    # Ready at the old generation first: apply must not take that for the new model being served.
    api = FakeApi(existing, [_ready(3), _ready(3), _ready(4, "DEPLOYING"), _ready(4)])
    _use(monkeypatch, api)
    document = deploy.serve_config_document({"model": "s3://b/registry/medfusion/sha-2"}, app_name="medfusion")
    url = kuberay.apply_rayservice(kuberay.rayservice_manifest("medfusion", document, OPTS), OPTS, out=io.StringIO())
    assert url == "http://medfusion-serve-svc.team-a.svc.cluster.local:8000"
    ((verb, plural, name, body),) = api.calls
    assert (verb, plural, name) == ("patch", "rayservices", "medfusion")
    assert set(body) == {"spec"} and set(body["spec"]) == {"serveConfigV2"}, "rayClusterConfig would make a new cluster"
    after = yaml.safe_load(body["spec"]["serveConfigV2"])
    assert after["applications"][0]["args"]["model"] == "s3://b/registry/medfusion/sha-2"
    after["applications"][0]["args"]["model"] = before["applications"][0]["args"]["model"]
    assert after == before, "everything but the model (GPUs, autoscaling, limits) stays as k8s/ set it"
    assert api.statuses == [_ready(4)], "returned only once the patched generation was RUNNING"


def test_deploy_refuses_to_add_an_application_to_someone_elses_rayservice(monkeypatch):
    api = FakeApi(_hand_managed(), [_ready(3)])
    _use(monkeypatch, api)
    document = deploy.serve_config_document({"model": "s3://b/m"}, app_name="other")
    with pytest.raises(JobError, match="has no Serve application 'other'"):
        kuberay.apply_rayservice(kuberay.rayservice_manifest("medfusion", document, OPTS), OPTS, out=io.StringIO())
    assert api.calls == []


def test_a_new_rayservice_is_created_from_a_complete_parameterised_spec(monkeypatch):
    opts = dataclasses.replace(OPTS, gpu_workers=1, max_gpu_workers=3, cpu_workers=1, max_cpu_workers=2)
    api = FakeApi(None, [_ready(1)])
    _use(monkeypatch, api)
    document = deploy.serve_config_document({"model": "s3://b/m", "num_gpus": 1}, app_name="medfusion")
    kuberay.apply_rayservice(kuberay.rayservice_manifest("medfusion", document, opts), opts, out=io.StringIO())
    ((verb, _, _, body),) = api.calls
    assert verb == "create"
    cluster = body["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    groups = {g["groupName"]: (g["minReplicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]}
    assert groups == {"gpu": (1, 3), "cpu": (1, 2)}
    assert body["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in [
        {k: p[k] for k in ("name", "containerPort")} for p in head["ports"]
    ]
    for group in cluster["workerGroupSpecs"]:
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "serve", "the PDB selects it"


def test_a_stage_rayjob_gets_the_gpus_the_options_ask_for():
    opts = kuberay.kuberay_options(
        image="reg/medfusion@sha256:" + "1" * 64, overrides={"gpu_workers": 2, "cpu_workers": 0}
    )
    job = kuberay.rayjob_manifest("medfusion-train-0a1b2c", "python -c pass", opts)
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert (
        group["groupName"] == "gpu"
        and group["replicas"] == 2
        and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    )
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].endswith(
        "1" * 64
    )


def test_kuberay_options_are_one_typed_pipeline_parameter():
    spec = _pipeline_spec()
    parameter = spec["root"]["inputDefinitions"]["parameters"]["kuberay"]
    assert parameter["parameterType"] == "STRUCT"
    assert parameter["defaultValue"] == dataclasses.asdict(PipelineConfig().kuberay)
    assert isinstance(PipelineConfig().kuberay, kuberay.KubeRayOptions)
    assert load_config(PipelineConfig, overrides=["kuberay.gpu_workers=2"]).kuberay.gpu_workers == 2
    with pytest.raises(ConfigError, match="gpu_workers"):
        load_config(PipelineConfig, overrides=["kuberay.gpu_workers=-1"])
    # Each Ray step's component takes it as its `cluster` input.
    wired = {
        name
        for name, task in _tasks(spec).items()
        if task.get("inputs", {}).get("parameters", {}).get("cluster", {}).get("componentInputParameter")
        in ("kuberay", "pipelinechannel--kuberay")
    }
    assert {"prepare-data", "train", "tune", "evaluate", "deploy"} <= wired


# ----------------------------------------------------------------------- RayJob status (rayjob_types.go)


def _job(api, name="medfusion-train-1"):
    return kuberay.run_rayjob(kuberay.rayjob_manifest(name, "python -c pass", OPTS), OPTS, out=io.StringIO())


def test_a_retrying_rayjob_is_followed_to_its_retry(monkeypatch):
    api = FakeApi(
        {"metadata": {"name": "medfusion-train-1"}},
        [
            {"jobStatus": "FAILED", "jobDeploymentStatus": "Retrying"},
            {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"},
            {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"},
        ],
    )
    _use(monkeypatch, api)
    monkeypatch.setattr(kuberay, "_follow_submitter_logs", lambda *a: True)
    assert _job(api)["jobDeploymentStatus"] == "Complete"
    assert [c[0] for c in api.calls] == ["create", "delete"]


def test_a_rayjob_past_its_deadline_names_the_reason(monkeypatch):
    failed = {"jobStatus": "RUNNING", "jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded", "message": "late"}
    api = FakeApi({"metadata": {"name": "medfusion-train-1"}}, [failed])
    _use(monkeypatch, api)
    monkeypatch.setattr(kuberay, "_follow_submitter_logs", lambda *a: True)
    with pytest.raises(JobError, match="DeadlineExceeded"):
        _job(api)


def test_rayjob_deadlines_come_from_the_options():
    opts = kuberay.KubeRayOptions(timeout_s=7200, pre_running_timeout_s=900, backoff_limit=1)
    spec = kuberay.rayjob_manifest("medfusion-train-1", "python -c pass", opts)["spec"]
    assert (spec["activeDeadlineSeconds"], spec["preRunningDeadlineSeconds"], spec["backoffLimit"]) == (7200, 900, 1)


# -------------------------------------------------------------------------------- 7. defaults


def test_the_default_quality_gate_is_a_real_bar():
    gates = PipelineConfig().gates
    blocked = quality_gate(untrained_metrics(), gates)  # a `tiny` model that learned nothing
    assert gates and not blocked.passed, blocked.summary()
    assert _pipeline_spec()["root"]["inputDefinitions"]["parameters"]["gates"]["defaultValue"] == gates


@pytest.mark.parametrize(
    "name,kfp_type",
    [
        ("epochs", "NUMBER_INTEGER"),
        ("lr", "NUMBER_DOUBLE"),
        ("num_workers", "NUMBER_INTEGER"),
        ("use_gpu", "BOOLEAN"),
        ("fusions", "LIST"),
    ],
)
def test_training_settings_are_typed_parameters(name, kfp_type):
    parameter = _pipeline_spec()["root"]["inputDefinitions"]["parameters"][name]
    assert parameter["parameterType"] == kfp_type
    default = getattr(PipelineConfig(), name)
    assert parameter["defaultValue"] == default
    if name != "fusions":
        assert default == getattr(TrainConfig(), name), "the same default as medfusion train"


def test_typed_settings_reach_train_and_tune():
    from medfusion.orchestration.pipeline import training_values, tuning_values

    typed = {"epochs": 3, "lr": 3e-4, "num_workers": 1, "use_gpu": True}
    train = stages.build_config("train", {**training_values({}, fusions=["concat"], **typed), "dataset_uri": "d"})
    assert (train.epochs, train.lr, train.num_workers, train.use_gpu, train.model.fusion) == (
        3,
        3e-4,
        1,
        True,
        "concat",
    )
    values = tuning_values({}, {}, fusions=["concat", "gated"], **typed)
    tune = stages.build_config("tune", {**values, "dataset_uri": "d"})
    assert {k: tune.train[k] for k in typed} == typed
    assert tune.search_space["model.fusion"] == ["concat", "gated"]


def test_settings_given_in_the_dicts_move_into_the_typed_parameters():
    cfg = PipelineConfig(
        use_tune=True,
        train_config={"epochs": 3, "zero_stage": 1},
        search_space={"model.fusion": ["concat", "gated"], "lr": [1e-3]},
    )
    assert cfg.epochs == 3 and cfg.train_config == {"zero_stage": 1}
    assert cfg.fusions == ["concat", "gated"] and cfg.search_space == {"lr": [1e-3]}
    with pytest.raises(ConfigError, match=r"train_config\.epochs: .*epochs"):
        PipelineConfig(epochs=5, train_config={"epochs": 3})


def test_a_rayservice_name_kuberay_rejects_is_refused_up_front():
    # validation.go ValidateRayServiceMetadata: DNS-1035, at most 47 characters.
    with pytest.raises(ConfigError, match="model_name"):
        PipelineConfig(ray_address="kuberay", model_name="Med_Fusion")
    PipelineConfig(ray_address="", model_name="Med_Fusion")  # a registry name only: no RayService


def test_submit_refuses_an_embedded_run_unless_asked(monkeypatch):
    import kfp

    from medfusion.pipelines.run import submit_pipeline

    class FakeClient:
        def __init__(self, **kwargs):
            pass

        def create_run_from_pipeline_func(self, func, **kwargs):
            return type("Result", (), {"run_id": "r1"})()

    monkeypatch.setattr(kfp, "Client", FakeClient)
    with pytest.raises(ConfigError, match=r"ray_address: empty .*allow_embedded"):
        submit_pipeline(PipelineConfig(), "https://kfp.example.com/pipeline")
    assert submit_pipeline(PipelineConfig(), "https://kfp.example.com/pipeline", allow_embedded=True).run_id == "r1"
    assert submit_pipeline(PipelineConfig(ray_address="kuberay"), "https://kfp.example.com/pipeline").run_id == "r1"


def test_the_cli_refuses_an_embedded_submit_unless_given_allow_embedded(monkeypatch, capsys):
    import kfp

    from medfusion.cli import main

    submitted = []

    class FakeClient:
        def __init__(self, **kwargs):
            pass

        def create_run_from_pipeline_func(self, func, **kwargs):
            submitted.append(kwargs)
            return type("Result", (), {"run_id": "r1"})()

    monkeypatch.setattr(kfp, "Client", FakeClient)
    host = ["pipeline", "submit", "--host", "https://kfp.example.com/pipeline"]
    assert main(host) == 2
    assert "allow_embedded" in capsys.readouterr().err and not submitted
    assert main([*host, "--allow-embedded"]) == 0
    assert "submitted run r1" in capsys.readouterr().out and len(submitted) == 1
