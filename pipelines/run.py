"""Run the pipeline here with kfp.local, or submit it to a Kubeflow Pipelines server.

What ``medfusion pipeline run --local``, ``medfusion pipeline submit`` and ``medfusion demo`` call. It
lives beside the pipeline, not in the library: it imports the pipeline function, a wrapper the
library never imports. Its config is `medfusion.orchestration.pipeline.PipelineConfig`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfusion import storage
from medfusion.config import ConfigError
from medfusion.orchestration.pipeline import PipelineConfig
from medfusion.orchestration.stages import ray_target


@dataclass
class LocalRun:
    """A finished kfp.local run of the pipeline."""

    outputs: dict[str, Any]
    """The pipeline's outputs: ``deployable`` and evaluate's ``metrics``."""
    run_dir: str
    """The run's folder under the pipeline root (every step's artifacts and executor output)."""
    deployed_to: str
    """The registry folder of the deployed model; empty when the quality gate blocked deploy."""


@dataclass
class SubmittedRun:
    """A run submitted to a Kubeflow Pipelines server."""

    run_id: str
    url: str
    """The run's page in the Kubeflow Pipelines UI."""


def run_pipeline_local(cfg: PipelineConfig, pipeline_root: str, enable_caching: bool = True) -> LocalRun:
    """Run the whole pipeline here with kfp.local (each step a subprocess of this interpreter, Ray
    embedded in the steps that need it).

    Object storage is reached through this process's AWS_* environment, which the steps inherit.

    Args:
        cfg: the pipeline's parameters.
        pipeline_root: folder of every step's artifacts.
        enable_caching: reuse the outputs of a step that already ran with the same inputs.

    Returns:
        The pipeline's outputs and where every step's outputs are.
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
            # Resource settings and image names mean nothing to the local runner.
            warnings.simplefilter("ignore")
            run = medfusion_pipeline(**cfg.arguments())
    finally:
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
    new = sorted(set(root.glob("medfusion-*")) - before)
    outputs = dict(run.outputs)
    deployed_to = storage.join(cfg.registry_uri, cfg.model_name) if outputs.get("deployable") else ""
    return LocalRun(outputs=outputs, run_dir=str(new[-1]) if new else "", deployed_to=deployed_to)


def submit_pipeline(
    cfg: PipelineConfig,
    host: str,
    *,
    namespace: str = "",
    experiment: str = "medfusion",
    run_name: str = "",
    service_account: str = "",
    existing_token: str = "",
    cookies: str = "",
    ssl_ca_cert: str = "",
    enable_caching: bool | None = None,
    allow_embedded: bool = False,
) -> SubmittedRun:
    """Submit a run of the pipeline to the Kubeflow Pipelines API at `host`.

    Auth is kfp.Client's: `existing_token` (a bearer token), `cookies` (e.g. an OIDC session cookie),
    or none (in-cluster service account credentials or an open endpoint).

    Args:
        cfg: the pipeline's parameters (the run's arguments).
        host: the KFP API endpoint, e.g. ``https://kubeflow.example.com/pipeline``.
        namespace: the Kubeflow profile namespace (multi-user installs).
        experiment: the experiment the run belongs to.
        run_name: the run's name (default: KFP's).
        service_account: the steps' service account.
        existing_token: a bearer token for the API.
        cookies: cookies for the API (e.g. an OIDC session).
        ssl_ca_cert: a CA bundle for the API's TLS certificate.
        enable_caching: override every step's caching (None: the pipeline's own settings).
        allow_embedded: submit with an empty ``ray_address`` all the same (Ray inside each step's pod).

    Returns:
        The run's id and URL.

    Raises:
        ConfigError: an empty ``ray_address`` without `allow_embedded`.
        ConnectionError: the API cannot be reached or refuses the request (naming `host`).
    """
    if ray_target(cfg.ray_address) == "embedded" and not allow_embedded:
        raise ConfigError(
            "ray_address: empty runs Ray Train and Tune inside each step's pod (500m CPU, 1G, no GPU) on the "
            "KFP server; set ray_address=kuberay or http://HEAD:8265 (or call submit_pipeline with "
            "allow_embedded=True if that is what you want)"
        )
    import kfp
    import urllib3
    from kfp_server_api.exceptions import ApiException

    from medfusion.pipelines.medfusion_pipeline import medfusion_pipeline

    try:
        client = kfp.Client(
            host=host,
            namespace=namespace or "kubeflow",
            existing_token=existing_token or None,
            cookies=cookies or None,
            ssl_ca_cert=ssl_ca_cert or None,
        )
        result = client.create_run_from_pipeline_func(
            medfusion_pipeline,
            arguments=cfg.arguments(),
            run_name=run_name or None,
            experiment_name=experiment,
            namespace=namespace or None,
            service_account=service_account or None,
            enable_caching=enable_caching,
        )
    except urllib3.exceptions.HTTPError as err:
        reason = getattr(err, "reason", None) or err
        raise ConnectionError(f"--host {host}: cannot reach the Kubeflow Pipelines API ({reason})") from None
    except ApiException as err:
        hint = " (check --existing-token / --cookies and --namespace)" if err.status in (401, 403) else ""
        raise ConnectionError(
            f"--host {host}: the Kubeflow Pipelines API answered {err.status} {err.reason}{hint}"
        ) from None
    return SubmittedRun(run_id=result.run_id, url=f"{host.rstrip('/')}/#/runs/details/{result.run_id}")
