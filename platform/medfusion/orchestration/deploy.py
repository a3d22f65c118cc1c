"""Deploy and smoke test: publish a model to the registry, run its Serve application where
``ray_address`` says, and call it like a client.

The application is named by its Serve ``import_path`` (`SERVE_IMPORT_PATH`, the wrapper in
``medfusion.serve``) in a Serve config document written beside the published version; the cluster
targets deploy that document (Serve's REST API, or a KubeRay RayService), the embedded target builds
it from the same import path for the length of the smoke test.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from medfusion import storage
from medfusion.config import SERVE_TOKEN_ENV, ConfigError
from medfusion.orchestration.jobs import JobError, auth_headers
from medfusion.orchestration.kuberay import (
    SERVE_PORT,
    KubeRayOptions,
    apply_rayservice,
    check_resource_name,
    rayservice_manifest,
)
from medfusion.orchestration.stages import import_path_target, ray_target

SERVE_IMPORT_PATH = "medfusion.serve.app:build_app"
DEPLOYMENTS_DIR = "_deployments"  # <registry>/<name>/_deployments/<version>/: never a valid version name
# The deployments the application of SERVE_IMPORT_PATH has (serve/app.py names them): the ingress exists
# only with ingress_replicas >= 1; with 0 the model deployment answers HTTP itself.
INGRESS_DEPLOYMENT = "MedFusionIngress"
MODEL_DEPLOYMENT = "MedFusionDeployment"
# A draining replica keeps this long past the app's own request timeout to finish what it holds
# (Serve's default graceful_shutdown_timeout_s, 20 s, is below the 30 s request timeout).
SHUTDOWN_MARGIN_S = 15.0
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# One model replica per Ray node: a lost node takes one replica, and the others keep serving (the
# ingress retries a request lost with its replica on another). On a one-node cluster the model
# deployment then runs one replica whatever its autoscaling_config says.
MODEL_REPLICAS_PER_NODE = 1


def serve_config_document(
    args: Mapping[str, Any], app_name: str = "medfusion", route_prefix: str = "/"
) -> dict[str, Any]:
    """A Serve config (the format of serve/serve_config.yaml) for one application with these args.

    Args:
        args: the application's ServeConfig fields (validated here).
        app_name: the Serve application's name.
        route_prefix: the URL prefix the application answers under.

    Returns:
        The document, with `SERVE_IMPORT_PATH` as the application's ``import_path``.

    Raises:
        ConfigError: a value of `args` is invalid (naming the field).
    """
    from medfusion.serving.settings import serve_config

    cfg = serve_config(args)  # validate (ConfigError names the field)
    lifecycle = {
        "graceful_shutdown_timeout_s": cfg.limits.request_timeout_s + SHUTDOWN_MARGIN_S,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
    }
    names = [INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT] if cfg.ingress_replicas else [MODEL_DEPLOYMENT]
    app = {
        "name": app_name,
        "route_prefix": route_prefix,
        "import_path": SERVE_IMPORT_PATH,
        "args": dict(args),
        # Only what build_app does not derive from args: shutdown and health checks of every deployment,
        # and the model replicas' spread over nodes.
        "deployments": [
            {
                "name": name,
                **lifecycle,
                **({"max_replicas_per_node": MODEL_REPLICAS_PER_NODE} if name == MODEL_DEPLOYMENT else {}),
            }
            for name in names
        ],
    }
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [app],
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


def deploy(
    model_uri: str,
    registry_uri: str,
    model_name: str,
    serve_args: Mapping[str, Any],
    ray_address: str = "",
    *,
    serve_url: str = "",
    kuberay: KubeRayOptions | None = None,
    out: TextIO | None = None,
) -> DeployResult:
    """Register the model (medfusion.registry) and deploy the Serve application where `ray_address` says.

    - embedded: publish and write the Serve config only (`serve_embedded` brings it up for the smoke
      test; nothing started in a pipeline step outlives it);
    - Jobs API: ``PUT /api/serve/applications/`` on that cluster's dashboard (what ``serve deploy``
      does), then wait until the application is RUNNING;
    - kuberay: patch the Serve args (the model) of the RayService ``model_name``, or create it.

    Args:
        model_uri: the approved export folder.
        registry_uri: the model registry root.
        model_name: the published model's name, also the application's and the RayService's.
        serve_args: the application's ServeConfig fields (``model`` is set here).
        ray_address: empty, ``http://HEAD:8265`` or ``kuberay``.
        serve_url: where the application answers (Jobs API target; default: the head's port 8000).
        kuberay: the RayService's cluster (``kuberay`` only).
        out: where progress lines go (stdout).

    Returns:
        The published model, the Serve config document's URI and the application's URL.

    Raises:
        JobError: the application did not come up on the cluster.
    """
    import yaml

    from medfusion import registry

    target = ray_target(ray_address)
    if target == "kuberay":
        check_resource_name("RayService", model_name, "model_name")

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


def _deploy_serve_rest(
    address: str, document: dict[str, Any], app_name: str, serve_url: str, out: TextIO, timeout_s: float = 900.0
) -> str:
    import httpx

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
            raise JobError(
                f"Serve application {app_name!r} on {base}: {status or 'missing'}: "
                f"{apps.get(app_name, {}).get('message', '')}"
            )
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
    prediction for `request`, and (when a token is set) a 401 without it.

    Args:
        url: the application's base URL.
        request: a ``POST /v1/predict`` body (`sample_request`).
        token: the bearer token the application requires; empty: none.
        timeout_s: how long to wait for ``/readyz``.

    Returns:
        The prediction without its attention maps (the step's output, printed by the KFP runner: a
        few lines, not pages).

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
    checks = [
        ("GET /healthz", httpx.get(f"{url}/healthz", timeout=30), 200),
        ("GET /v1/model", httpx.get(f"{url}/v1/model", headers=headers, timeout=30), 200),
    ]
    if token:
        checks.append(
            ("POST /v1/predict without token", httpx.post(f"{url}/v1/predict", json=dict(request), timeout=60), 401)
        )
    predict = httpx.post(f"{url}/v1/predict", json=dict(request), headers=headers, timeout=120)
    checks.append(("POST /v1/predict", predict, 200))
    for what, response, expected in checks:
        if response.status_code != expected:
            raise JobError(
                f"smoke test {url}: {what} answered {response.status_code}, expected {expected}: {response.text[:300]}"
            )
    prediction = predict.json()
    missing = [k for k in ("labels", "box", "findings") if k not in prediction]
    if missing or not prediction["labels"]:
        raise JobError(f"smoke test {url}: POST /v1/predict lacks {missing or ['labels']}: {str(prediction)[:300]}")
    return {k: v for k, v in prediction.items() if not k.endswith("_attention")}


@contextmanager
def serve_embedded(serve_config_uri: str) -> Iterator[tuple[str, str]]:
    """Run the application of a Serve config document on an embedded Ray, on 127.0.0.1, with a fresh
    bearer token; shut it all down afterwards.

    The application is built from the document's ``import_path`` and ``args``, as ``serve deploy``
    builds it: the library names the Serve app (`medfusion.serve`) only by that string.

    Args:
        serve_config_uri: the Serve config document (`deploy` writes it).

    Yields:
        The application's URL and its bearer token.
    """
    import secrets

    import ray
    import yaml
    from ray import serve

    from medfusion.serving.settings import serve_config
    from medfusion.store import free_port

    app = yaml.safe_load(storage.read_text(serve_config_uri))["applications"][0]
    cfg = serve_config(app["args"])
    token = secrets.token_hex(16)
    os.environ[cfg.auth_token_env] = token  # before Ray starts: its workers inherit the environment
    # address="local": a bare ray.init() would attach to whatever cluster `ray start` last started on
    # this machine (/tmp/ray/ray_current_cluster), someone else's or long gone.
    ray.init(address="local", include_dashboard=False, configure_logging=False)
    try:
        port = free_port()
        route_prefix = app.get("route_prefix", "/")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        application = import_path_target(app["import_path"])(app["args"])
        serve.run(application, name=app["name"], route_prefix=route_prefix, blocking=False)
        yield f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}", token
    finally:
        serve.shutdown()
        ray.shutdown()


def run_smoke_test(
    ray_address: str, url: str, serve_config_uri: str, dataset_uri: str, token_env: str = SERVE_TOKEN_ENV
) -> dict[str, Any]:
    """Smoke-test a deployed application with the first test sample of the dataset it was trained on.

    Embedded target: the application of `serve_config_uri` is started on an embedded Ray for the test
    and stopped after it. Otherwise `url` is called, with the bearer token from `token_env`.

    Args:
        ray_address: empty, ``http://HEAD:8265`` or ``kuberay``.
        url: deploy's URL (cluster targets).
        serve_config_uri: deploy's Serve config document.
        dataset_uri: the dataset whose first test sample is the request.
        token_env: the environment variable holding the bearer token (cluster targets).

    Returns:
        The prediction (`smoke_test`).

    Raises:
        ConfigError: a cluster target without `url`.
        JobError: the application answered wrong or never became ready.
    """
    request = sample_request(dataset_uri)
    if ray_target(ray_address) == "embedded":
        with serve_embedded(serve_config_uri) as (local_url, token):
            return smoke_test(local_url, request, token)
    if not url:
        raise ConfigError("url: required to smoke-test a deployment on a cluster (deploy's output)")
    return smoke_test(url, request, os.environ.get(token_env, ""))
