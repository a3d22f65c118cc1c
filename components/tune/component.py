"""KFP component: the tune stage (medfusion.tune.run_tune) -> the best Model, the leaderboard, Metrics.

``run_tune(TuneConfig) -> TuneResult``: the dataset URI, the run storage and the search space in,
``model_uri`` (the best trial's export), ``leaderboard_uri`` (leaderboard.json) and ``best_metrics`` out.
The pipeline runs it only with ``use_tune=true``.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from medfusion.orchestration.kuberay import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def tune(
    dataset: Input[Dataset],
    model: Output[Model],
    leaderboard: Output[Markdown],
    metrics: Output[Metrics],
    storage_uri: str,
    search_space: dict,
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
    """Run the sweep (Ray Tune); return the best trial's exported model URI.

    Args:
        dataset: the prepare step's Dataset artifact.
        model: the best trial's export (metadata `uri`), its file the TuneResult.
        leaderboard: every trial's result, best first.
        metrics: the best trial's metrics.
        storage_uri: where the sweep's folders are written (path or s3://).
        search_space: the search space (TuneConfig.search_space).
        preset: size preset filling `model` and `data`.
        config: further TuneConfig fields.
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
        **pipeline.tuning_values(
            config, search_space, epochs=epochs, lr=lr, num_workers=num_workers, use_gpu=use_gpu, fusions=fusions
        ),
        "dataset_uri": artifacts.artifact_uri(dataset),
        "storage_uri": storage_uri,
        "preset": preset,
    }
    result = stages.run_stage(
        "tune", values, ray_address, kuberay=kuberay.kuberay_options(image=image, overrides=cluster)
    )
    artifacts.record_artifact(model, result["model_uri"], result)
    artifacts.write_leaderboard(leaderboard, result["leaderboard_uri"])
    artifacts.log_result_metrics(metrics, result)
    return result["model_uri"]
