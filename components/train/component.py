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
    epochs: int = 10,
    lr: float = 1e-3,
    num_workers: int = 2,
    use_gpu: bool = False,
    fusions: list = ["gated"],
    ray_address: str = "",
    image: str = "",
    cluster: dict = {},
) -> str:
    """Train on the dataset (Ray Train + DeepSpeed); return the exported model's URI.

    Args:
        dataset: the prepare step's Dataset artifact.
        model: the artifact; metadata `uri` names the export folder, its file holds the TrainResult.
        metrics: the best epoch's validation value and the test metrics of the best model.
        storage_uri: where the run folder is written (path or s3://).
        preset: size preset filling `model` and `data` (tiny, small, base; empty: none).
        config: further TrainConfig fields (strategy, zero_stage, precision...).
        epochs: training epochs (tune: the most a trial runs).
        lr: peak learning rate.
        num_workers: Ray Train workers.
        use_gpu: one GPU per Ray Train worker.
        fusions: the fusion strategy to train (tune: those the sweep compares).
        ray_address: empty, http://HEAD:8265 or kuberay (medfusion.orchestration).
        image: image of the step, and of the RayJob's pods unless cluster names one.
        cluster: KubeRayOptions fields of the RayJob's cluster (the pipeline's kuberay parameter).
    """
    from medfusion.orchestration import artifacts, kuberay, pipeline, stages

    values = {
        **pipeline.training_values(
            config, epochs=epochs, lr=lr, num_workers=num_workers, use_gpu=use_gpu, fusions=fusions
        ),
        "dataset_uri": artifacts.artifact_uri(dataset),
        "storage_uri": storage_uri,
        "preset": preset,
    }
    result = stages.run_stage(
        "train", values, ray_address, kuberay=kuberay.kuberay_options(image=image, overrides=cluster)
    )
    artifacts.record_artifact(model, result["model_uri"], result)
    artifacts.log_result_metrics(metrics, result)
    return result["model_uri"]
