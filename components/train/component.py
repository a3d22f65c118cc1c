"""KFP component: the train stage (medfusion.train.run_train) -> Model and Metrics artifacts."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from medfusion.orchestration.kuberay import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    storage_uri: str,
    preset: str = "",
    config: dict = {},
    ray_address: str = "",
    namespace: str = "",
    image: str = "",
) -> str:
    """Train on the dataset (Ray Train + DeepSpeed); return the exported model's URI.

    Args:
        dataset: the prepare step's Dataset artifact.
        model: the artifact; metadata `uri` names the export folder, its file holds the TrainResult.
        metrics: the best epoch's validation value and the test metrics of the best model.
        storage_uri: where the run folder is written (path or s3://).
        preset: size preset filling `model` and `data` (tiny, small, base; empty: none).
        config: further TrainConfig fields (epochs, num_workers, strategy, zero_stage...).
        ray_address: empty, http://HEAD:8265 or kuberay (medfusion.orchestration).
        namespace: namespace of the RayJob (kuberay).
        image: image of the RayJob's pods (kuberay).
    """
    from medfusion.orchestration import artifacts, kuberay, stages

    values = {**config, "dataset_uri": artifacts.artifact_uri(dataset), "storage_uri": storage_uri, "preset": preset}
    result = stages.run_stage("train", values, ray_address, kuberay=kuberay.kuberay_options(namespace, image))
    artifacts.record_artifact(model, result["model_uri"], result)
    artifacts.log_result_metrics(metrics, result)
    return result["model_uri"]
