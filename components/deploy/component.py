"""KFP component: deploy (medfusion.orchestration.deploy.deploy): publish the model, deploy the Serve app."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Model, Output

from medfusion.orchestration.kuberay import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def deploy(
    model_uri: str,
    published: Output[Model],
    registry_uri: str,
    model_name: str = "medfusion",
    serve_config: dict = {},
    ray_address: str = "",
    image: str = "",
    serve_url: str = "",
    cluster: dict = {},
) -> NamedTuple("DeployOutputs", url=str, model_uri=str, serve_config_uri=str):
    """Publish the export to the registry and deploy it (embedded: config only; Jobs API: Serve REST
    API; kuberay: a RayService).

    Args:
        model_uri: the approved export folder.
        published: the published model (metadata `uri`), its file the DeployResult.
        registry_uri: model registry root.
        model_name: published model and application name.
        serve_config: ServeConfig fields of the application (model is set here).
        ray_address: empty, http://HEAD:8265 or kuberay (medfusion.orchestration).
        image: image of the step, and of a new RayService's pods unless cluster names one.
        serve_url: where the application answers (Jobs API target; default: the head's port 8000).
        cluster: KubeRayOptions fields (the pipeline's kuberay): the RayService's namespace, its cluster if created.

    Returns:
        url (empty when embedded), model_uri (the published export), serve_config_uri.
    """
    import dataclasses
    from collections import namedtuple

    from medfusion.orchestration import artifacts, kuberay
    from medfusion.orchestration import deploy as deployment

    result = deployment.deploy(
        model_uri,
        registry_uri,
        model_name,
        serve_config,
        ray_address,
        serve_url=serve_url,
        kuberay=kuberay.kuberay_options(image=image, overrides=cluster),
    )
    artifacts.record_artifact(published, result.model_uri, dataclasses.asdict(result))
    return namedtuple("DeployOutputs", ["url", "model_uri", "serve_config_uri"])(
        result.url, result.model_uri, result.serve_config_uri
    )
