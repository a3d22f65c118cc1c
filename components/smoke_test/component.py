"""KFP component: smoke-test the deployed application (medfusion.orchestration.deploy.run_smoke_test)."""

from kfp import dsl
from kfp.dsl import Dataset, Input

from medfusion.orchestration.kuberay import DEFAULT_IMAGE


# token_env's default is medfusion.config.SERVE_TOKEN_ENV written out: KFP ships the function's source,
# signature included, to run it in the step, where a module constant named in a default is undefined.
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
    from medfusion.orchestration import artifacts, deploy

    return deploy.run_smoke_test(ray_address, url, serve_config_uri, artifacts.artifact_uri(dataset), token_env)
