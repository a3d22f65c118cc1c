"""KFP component: smoke-test the deployed application (medfusion.orchestration.run_smoke_test)."""

from kfp import dsl
from kfp.dsl import Dataset, Input

from medfusion.orchestration import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def smoke_test(
    dataset: Input[Dataset],
    serve_config_uri: str,
    url: str = "",
    ray_address: str = "",
    token_env: str = "MEDFUSION_SERVE_TOKEN",
) -> dict:
    """Call the application like a client (readiness, model info, auth, one prediction of a test
    sample); return the prediction. Embedded: the app of `serve_config_uri` runs for the test only.

    Args:
        dataset: the prepare step's Dataset artifact (the request is its first test sample).
        serve_config_uri: deploy's Serve config document.
        url: deploy's URL (cluster targets).
        ray_address: empty, http://HEAD:8265 or kuberay.
        token_env: environment variable holding the bearer token (cluster targets).
    """
    from medfusion import orchestration

    return orchestration.run_smoke_test(ray_address, url, serve_config_uri, orchestration.artifact_uri(dataset), token_env)
