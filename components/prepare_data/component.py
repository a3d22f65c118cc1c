"""KFP component: the prepare stage (medfusion.data.prepare.run_prepare) -> a Dataset artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from medfusion.orchestration.kuberay import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def prepare_data(
    dataset: Output[Dataset],
    output_uri: str,
    source: str = "synthetic",
    source_uri: str = "",
    preset: str = "",
    config: dict = {},
    ray_address: str = "",
    image: str = "",
    cluster: dict = {},
) -> str:
    """Write the dataset (Parquet shards + manifest.json) to `output_uri`; return that URI.

    Args:
        dataset: the artifact; its metadata `uri` names the dataset root, its file holds the PrepareResult.
        output_uri: dataset root to write (path or s3://).
        source: synthetic, manifest or iu_xray.
        source_uri: the manifest file or the IU X-Ray folder.
        preset: size preset filling `synth` (tiny, small, base; empty: none).
        config: further PrepareConfig fields.
        ray_address: empty, http://HEAD:8265 or kuberay (medfusion.orchestration).
        image: image of the step, and of the RayJob's pods unless cluster names one.
        cluster: KubeRayOptions fields of the RayJob's cluster (the pipeline's kuberay parameter).
    """
    from medfusion.orchestration import artifacts, kuberay, stages

    values = {**config, "source": source, "source_uri": source_uri, "output_uri": output_uri, "preset": preset}
    result = stages.run_stage(
        "prepare", values, ray_address, kuberay=kuberay.kuberay_options(image=image, overrides=cluster)
    )
    artifacts.record_artifact(dataset, result["dataset_uri"], result)
    return result["dataset_uri"]
