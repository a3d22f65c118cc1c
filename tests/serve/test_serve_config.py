"""serve/serve_config.yaml is a test case: it validates, names a real builder, its args parse, it deploys."""

from __future__ import annotations

import copy
import importlib
import inspect
from pathlib import Path

import httpx
import pytest
import yaml
from serve_cases import multipart, png, replica_states, send_kwargs, wait_for

from medfusion.config import ServeAutoscalingConfig, ServeConfig
from medfusion.loader import load_config
from medfusion.serve.app import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT

CONFIG = Path(__file__).resolve().parents[2] / "serve" / "serve_config.yaml"


@pytest.fixture(scope="module")
def document() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def _builder(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_config_is_a_valid_serve_deploy_document(document):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(document)
    (app,) = schema.applications
    assert app.import_path == "medfusion.serve.app:build_app"
    builder = _builder(app.import_path)
    assert len(inspect.signature(builder).parameters) == 1  # what Serve requires of an app builder


def test_args_load_into_serve_config(document):
    (app,) = document["applications"]
    cfg = load_config(ServeConfig, base=app["args"])
    assert cfg.model.startswith("s3://") and cfg.limits.max_pixels == 40_000_000


def test_deployment_overrides_match_the_app(document):
    (app,) = document["applications"]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT}
    model = deployments[MODEL_DEPLOYMENT]
    autoscaling = load_config(ServeAutoscalingConfig, base=model["autoscaling_config"])  # same names, same checks
    assert autoscaling.max_replicas >= autoscaling.min_replicas >= 1
    args = load_config(ServeConfig, base=app["args"])
    assert model["max_ongoing_requests"] >= args.max_batch_size  # the next batch can fill while one runs


@pytest.mark.integration
def test_serve_deploy_of_the_file_answers(serve_url, document, tiny_export, token_file):
    """The `serve deploy` path: the controller imports import_path, calls it with args, applies overrides."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    local = copy.deepcopy(document)
    local.pop("http_options")  # the test's Serve already runs on its own loopback port
    (app,) = local["applications"]
    app["name"], app["route_prefix"] = "yaml", "/yaml"
    app["args"]["model"] = tiny_export.uri
    # The file requires auth: the token comes from a file here (a cluster sets the variable from a Secret).
    assert app["args"]["require_auth"] is True
    app["args"]["auth_token_file"] = token_file
    for deployment in app["deployments"]:  # the file's resources are for a cluster; this machine has 2 CPUs
        deployment["ray_actor_options"]["num_cpus"] = 0.25 if deployment["name"] == MODEL_DEPLOYMENT else 0
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(local))
    try:

        def running() -> bool:
            app = serve.status().applications.get("yaml")
            return bool(app) and app.status == "RUNNING"

        wait_for(running, 180, message="the YAML app RUNNING")
        assert replica_states("yaml") == {"RUNNING": 1}
        request = send_kwargs(multipart(png(), report="cough"))
        response = httpx.post(f"{serve_url}/yaml/v1/predict", timeout=60, **request)
        assert response.status_code == 200 and response.json()["model"]["version"] == tiny_export.version
    finally:
        serve.delete("yaml")
