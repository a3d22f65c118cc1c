"""The Ray Serve application: an HTTP ingress and a batched model deployment.

    proxy ──HTTP──▶ MedFusionIngress                ──handle──▶ MedFusionDeployment
                    (FastAPI: auth, limits, parsing)               (@serve.batch over
                    medfusion.serving.api.create_api               medfusion.serving.runtime.ModelRunner)

or, with ``ingress_replicas=0``, one deployment (``MedFusionService``, deployed under the model
deployment's name) that is both: the FastAPI app over its own batched model.

`build_app` is what a Serve config file's ``import_path`` names (``medfusion.serve.app:build_app``,
see ``serve/serve_config.yaml``); its ``args`` are the fields of ``medfusion.config.ServeConfig``.
`serve_forever` runs it on the embedded Ray for ``medfusion serve``. `proxy_callback` is what
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names so that Serve's HTTP proxy times out request
headers (`medfusion.serving.header_timeout`). All logic lives in ``medfusion.serving``; the classes
below only adapt it to Serve.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from medfusion.config import ServeConfig
from medfusion.serving import header_timeout
from medfusion.serving.api import create_api
from medfusion.serving.runtime import BatchPacer, HandleBackend, ModelRunner, ServeMetrics
from medfusion.serving.settings import (
    ApiSettings,
    export_serve_environment,
    ingress_args,
    ingress_deployment_options,
    model_args,
    model_deployment_options,
    resolve_served_model_uri,
    serve_config,
)

# Not "MedFusionModel": that is the nn.Module (medfusion.models), and replica names, logs and the
# `deployments` of a Serve config would read as if they were it.
MODEL_DEPLOYMENT = "MedFusionDeployment"
INGRESS_DEPLOYMENT = "MedFusionIngress"


def proxy_callback() -> list:
    """Run by Serve in each HTTP proxy process when RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names it.

    Installs the request-header timeout (MEDFUSION_HEADER_TIMEOUT_S, default 10 s) into the proxy's
    uvicorn, which has none of its own; adds no middleware.
    """
    header_timeout.install(header_timeout.timeout_from_env())
    return []


class _BatchedModel:
    """The exported model answering dynamic batches: the model side of both layouts.

    A batch holds at most ServeConfig's max_batch_size and waits at most its batch_wait_timeout_s;
    within those, ``BatchPacer`` sizes it to the load (a lone request runs at once).
    """

    def __init__(self, uri: str, args: dict[str, Any]) -> None:
        self.runner = ModelRunner.load(uri, args, metrics=ServeMetrics())
        self.pacer = BatchPacer(int(args["max_batch_size"]), float(args["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def predict_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self.runner.predict(items)

    async def predict(self, item: dict[str, Any]) -> dict[str, Any]:
        size, wait_s = self.pacer.arrive()
        try:
            # @serve.batch reads both when this request is the first of a batch, right after it is queued.
            self.predict_batch.set_max_batch_size(size)
            self.predict_batch.set_batch_wait_timeout_s(wait_s)
            return await self.predict_batch(item)
        finally:
            self.pacer.leave()

    async def info(self) -> dict[str, Any]:
        return self.runner.info

    async def ready(self) -> bool:
        return True  # a replica takes calls only once __init__ (the model load) has returned

    def check_health(self) -> None:
        """Serve's periodic health check (health_check_period_s): a replica whose model cannot answer
        fails it, and Serve replaces the replica."""
        self.runner.check_health()

    async def readiness(self) -> str:
        return "ready"  # the combined layout's API asks its own replica, which has loaded the model


@serve.deployment(name=MODEL_DEPLOYMENT)
class MedFusionDeployment(_BatchedModel):
    """A model replica behind the ingress (the split layout, ``ingress_replicas >= 1``)."""


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class MedFusionIngress:
    """The HTTP front door; the FastAPI app is built per replica, where the token is readable."""

    def __init__(self, model: DeploymentHandle, args: dict[str, Any]) -> None:
        settings = ApiSettings.from_ingress_args(args, echo_request_id=False)  # the proxy sets X-Request-ID
        backend = HandleBackend(model, retry_after_s=settings.limits.retry_after_s)
        self.api = create_api(backend, settings, metrics=ServeMetrics())

    def __serve_build_asgi_app__(self) -> Any:
        return self.api


@serve.deployment(name=MODEL_DEPLOYMENT)
@serve.ingress()
class MedFusionService(_BatchedModel):
    """A model replica that answers HTTP itself (the combined layout, ``ingress_replicas=0``).

    One Ray hop fewer per request than the split layout; it is its own backend for the API.
    """

    def __init__(self, uri: str, model_args: dict[str, Any], ingress_args: dict[str, Any]) -> None:
        super().__init__(uri, model_args)
        settings = ApiSettings.from_ingress_args(ingress_args, echo_request_id=False)
        self.api = create_api(self, settings, metrics=ServeMetrics())

    def __serve_build_asgi_app__(self) -> Any:
        return self.api


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    """The application for `args` (ServeConfig fields; ``model`` is required).

    ``model`` is an export URI (path or s3://) or a registry ``NAME[:VERSION]``, resolved here, once,
    so that a new version is a config update (Serve rolls the model replicas over without dropping
    requests) rather than a moving alias under running replicas.

    With ``ingress_replicas >= 1`` (the default) an ingress deployment parses requests and calls the
    model deployment, retrying once on another replica when one dies under a request; with
    ``ingress_replicas=0`` the model replicas answer HTTP themselves: one Ray hop fewer per request
    (serve/README.md has the measured difference), without that retry.
    """
    cfg = serve_config(args)
    uri = resolve_served_model_uri(cfg.model, cfg.registry_uri)
    options = model_deployment_options(cfg)
    if cfg.ingress_replicas == 0:
        return MedFusionService.options(**options).bind(uri, model_args(cfg), ingress_args(cfg))
    model = MedFusionDeployment.options(**options).bind(uri, model_args(cfg))
    return MedFusionIngress.options(**ingress_deployment_options(cfg)).bind(model, ingress_args(cfg))


def serve_forever(
    cfg: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    app_name: str = "medfusion",
    route_prefix: str = "/",
    request_timeout_s: float | None = None,
    block: bool = True,
) -> str:
    """Run the application on Ray (embedded unless RAY_ADDRESS points at a cluster); return its URL.

    Args:
        cfg: the application's settings (``model`` is required).
        host: the address the HTTP proxy binds.
        port: the port the HTTP proxy listens on.
        app_name: the Serve application's name.
        route_prefix: the URL prefix the application answers under.
        request_timeout_s: the proxy's own deadline (408); Serve's default when None.
        block: print the URL and wait until Ctrl-C (or SIGTERM), then shut Serve (and a Ray it
            started) down; without it, return as soon as the application is deployed.

    Returns:
        The application's base URL.
    """
    started_ray = not ray.is_initialized()
    if started_ray:
        # Serve reads these from the environment Ray starts with (a cluster's image sets them).
        export_serve_environment()
        # address="local": the embedded Ray, never a cluster some `ray start` left on this machine.
        ray.init(address="local", include_dashboard=False, configure_logging=False)
    http_options: dict[str, Any] = {"host": host, "port": port}
    if request_timeout_s:
        http_options["request_timeout_s"] = request_timeout_s
    serve.start(http_options=http_options)
    serve.run(build_app(cfg), name=app_name, route_prefix=route_prefix, blocking=False)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    if not block:
        return url
    print(f"medfusion serving {cfg.model} at {url}  (POST {url}/v1/predict, docs {url}/docs); Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop shuts down as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    return url


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
