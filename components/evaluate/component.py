"""KFP component: the evaluate stage (medfusion.evaluate.run_evaluate) -> Metrics, the confusion
matrix (ClassificationMetrics) and the HTML report."""

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Output

from medfusion.orchestration.kuberay import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def evaluate(
    model_uri: str,
    dataset: Input[Dataset],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    report: Output[HTML],
    split: str = "test",
    config: dict = {},
    ray_address: str = "",
    image: str = "",
    cluster: dict = {},
) -> dict:
    """Evaluate the exported model on one split; return its headline metrics (what the gate reads).

    Args:
        model_uri: the export folder (train's or tune's output; a URI rather than a Model artifact,
            because it comes from one of two branches through dsl.OneOf).
        dataset: the prepare step's Dataset artifact.
        metrics: headline metrics (accuracy, macro_f1, mean_iou, bleu4, rouge_l...).
        classification: the confusion matrix.
        report: report.html with every metric and plot.
        split: train, val or test.
        config: further EvaluateConfig fields (engine, limit, batch_size...).
        ray_address: empty, http://HEAD:8265 or kuberay (medfusion.orchestration).
        image: image of the step, and of the RayJob's pods unless cluster names one.
        cluster: KubeRayOptions fields of the RayJob's cluster (the pipeline's kuberay parameter).
    """
    from medfusion.orchestration import artifacts, kuberay, stages

    values = {**config, "model_uri": model_uri, "data_uri": artifacts.artifact_uri(dataset), "split": split}
    result = stages.run_stage(
        "evaluate", values, ray_address, kuberay=kuberay.kuberay_options(image=image, overrides=cluster)
    )
    return artifacts.log_evaluation(result, metrics, classification, report)
