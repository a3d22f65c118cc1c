"""The Ray Serve application: an HTTP ingress and a batched model deployment.

    proxy ──HTTP──▶ MedFusionIngress (FastAPI: auth, limits, parsing)  ──handle──▶ MedFusionModel
                    medfusion.serving.create_api                                 @serve.batch over
                                                                                 medfusion.serving.ModelRunner

`build_app` is what a Serve config file's ``import_path`` names (``medfusion.serve.app:build_app``,
see ``serve/medfusion.serve.yaml``); its ``args`` are the fields of ``medfusion.config.ServeConfig``.
All logic lives in ``medfusion.serving``; the classes below only adapt it to Serve.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from medfusion import serving
from medfusion.config import ServeConfig

MODEL_DEPLOYMENT = "MedFusionModel"
INGRESS_DEPLOYMENT = "MedFusionIngress"


@serve.deployment(name=MODEL_DEPLOYMENT)
class MedFusionModel:
    """One replica: the exported model, answering dynamic batches (size and wait from ServeConfig)."""

    def __init__(self, uri: str, args: dict[str, Any]) -> None:
        self.runner = serving.ModelRunner.load(uri, args, metrics=serving.ServeMetrics())
        self.predict_batch.set_max_batch_size(int(args["max_batch_size"]))
        self.predict_batch.set_batch_wait_timeout_s(float(args["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def predict_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self.runner.predict(items)

    async def predict(self, item: dict[str, Any]) -> dict[str, Any]:
        return await self.predict_batch(item)

    def info(self) -> dict[str, Any]:
        return self.runner.info

    def ready(self) -> bool:
        return True  # a replica takes calls only once __init__ (the model load) has returned


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class MedFusionIngress:
    """The HTTP front door; the FastAPI app is built per replica, where the token is readable."""

    def __init__(self, model: DeploymentHandle, args: dict[str, Any]) -> None:
        settings = serving.ApiSettings.from_ingress_args(args, echo_request_id=False)  # the proxy sets X-Request-ID
        backend = serving.HandleBackend(model, retry_after_s=settings.limits.retry_after_s)
        self.api = serving.create_api(backend, settings, metrics=serving.ServeMetrics())

    def __serve_build_asgi_app__(self) -> Any:
        return self.api


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    """The application for `args` (ServeConfig fields; ``model`` is required).

    ``model`` is an export URI (path or s3://) or a registry ``NAME[:VERSION]``, resolved here, once,
    so that a new version is a config update (Serve rolls the model replicas over without dropping
    requests) rather than a moving alias under running replicas.
    """
    cfg = serving.serve_config(args)
    uri = serving.resolve_model_uri(cfg.model, cfg.registry_uri)
    model = MedFusionModel.options(**serving.model_deployment_options(cfg)).bind(uri, serving.model_args(cfg))
    return MedFusionIngress.options(**serving.ingress_deployment_options(cfg)).bind(model, serving.ingress_args(cfg))
