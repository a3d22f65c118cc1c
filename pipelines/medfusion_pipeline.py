"""The medfusion Kubeflow pipeline (KFP v2):

    prepare-data ─▶ tune (use_tune) | train ─▶ evaluate ─▶ quality-gate ─▶ [passed] deploy ─▶ smoke-test

Every step is a component of ``medfusion.components`` calling a medfusion stage function; where Ray
runs is the ``ray_address`` parameter (medfusion.orchestration.stages: embedded, Ray Jobs API or
KubeRay). Its parameters are the fields of ``medfusion.orchestration.pipeline.PipelineConfig``, with
the same defaults; ``medfusion.pipelines.run`` runs it here (kfp.local) or submits it to a KFP server.
``medfusion_pipeline.yaml`` next to this file is its compiled form (tests/pipelines keep it current):

    python -m medfusion.pipelines.medfusion_pipeline [OUT.yaml]

Train and tune hand their model to evaluate as a URI through ``dsl.OneOf``: a OneOf over artifacts
is what KFP would take, but ``kfp.local`` (2.17) cannot resolve artifact OneOfs yet, and the local run
is how this pipeline is tested. The Model artifacts (with their lineage) are still outputs of both.
"""

# No `from __future__ import annotations`: KFP reads the parameter annotations as types.

import sys
from typing import NamedTuple

from kfp import compiler, dsl

from medfusion.components.deploy.component import deploy
from medfusion.components.evaluate.component import evaluate
from medfusion.components.prepare_data.component import prepare_data
from medfusion.components.quality_gate.component import quality_gate
from medfusion.components.smoke_test.component import smoke_test
from medfusion.components.train.component import train
from medfusion.components.tune.component import tune
from medfusion.orchestration.kuberay import DEFAULT_IMAGE
from medfusion.registry import DEFAULT_REGISTRY_URI

PIPELINE_NAME = "medfusion"
# Retries absorb transient failures (object storage, a preempted node, a Ray worker lost); a failure
# that a retry cannot fix (a bad config) fails fast anyway, because configs are validated first.
STAGE_RETRIES = 2
DEPLOY_RETRIES = 1
SMOKE_RETRIES = 2


def _step(task: dsl.PipelineTask, image: str, name: str, *, cache: bool, retries: int) -> dsl.PipelineTask:
    """Image, caching and retries of one step, set deliberately for each."""
    task.set_display_name(name)
    task.set_container_image(image)
    task.set_caching_options(enable_caching=cache)
    task.set_cpu_request("500m").set_memory_request("1G")
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="30s", backoff_factor=2.0)
    return task


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Prepare, train or tune, evaluate, gate, deploy and smoke-test the medfusion model on Ray.",
)
def medfusion_pipeline(
    source: str = "synthetic",
    source_uri: str = "",
    dataset_uri: str = "s3://medfusion/datasets/pipeline",
    storage_uri: str = "s3://medfusion/runs",
    registry_uri: str = DEFAULT_REGISTRY_URI,
    model_name: str = "medfusion",
    preset: str = "tiny",
    prepare_config: dict = {},
    train_config: dict = {},
    use_tune: bool = False,
    search_space: dict = {},
    tune_config: dict = {},
    evaluate_config: dict = {},
    gates: dict = {"accuracy": 0.0},
    serve_config: dict = {},
    ray_address: str = "",
    namespace: str = "",
    image: str = DEFAULT_IMAGE,
    serve_url: str = "",
) -> NamedTuple("PipelineOutputs", deployable=bool, metrics=dict):
    ray = {"ray_address": ray_address, "namespace": namespace, "image": image}

    # Cached: the same source and config give the same dataset (and a rerun into an existing
    # dataset_uri is refused unless prepare_config.overwrite).
    prepared = _step(
        prepare_data(
            output_uri=dataset_uri, source=source, source_uri=source_uri, preset=preset, config=prepare_config, **ray
        ),
        image,
        "prepare-data",
        cache=True,
        retries=STAGE_RETRIES,
    )
    dataset = prepared.outputs["dataset"]

    # Cached: the expensive steps; change a parameter (or submit without caching) to retrain.
    with dsl.If(use_tune == True, name="use-tune"):  # noqa: E712 - a KFP condition, not a Python test
        tuned = _step(
            tune(
                dataset=dataset,
                storage_uri=storage_uri,
                search_space=search_space,
                preset=preset,
                config=tune_config,
                **ray,
            ),
            image,
            "tune",
            cache=True,
            retries=STAGE_RETRIES,
        )
    with dsl.Else(name="train-once"):
        trained = _step(
            train(dataset=dataset, storage_uri=storage_uri, preset=preset, config=train_config, **ray),
            image,
            "train",
            cache=True,
            retries=STAGE_RETRIES,
        )
    model_uri = dsl.OneOf(tuned.outputs["Output"], trained.outputs["Output"])

    evaluated = _step(
        evaluate(model_uri=model_uri, dataset=dataset, config=evaluate_config, **ray),
        image,
        "evaluate",
        cache=True,
        retries=STAGE_RETRIES,
    )
    # Not cached: a gate decision is cheap and must reflect the thresholds of this run.
    gate = _step(
        quality_gate(metrics=evaluated.outputs["Output"], gates=gates), image, "quality-gate", cache=False, retries=0
    )

    with dsl.If(gate.outputs["Output"] == True, name="quality-gate-passed"):  # noqa: E712
        # Never cached: deploying changes the world (the registry, a Serve app, a RayService).
        deployed = _step(
            deploy(
                model_uri=model_uri,
                registry_uri=registry_uri,
                model_name=model_name,
                serve_config=serve_config,
                serve_url=serve_url,
                **ray,
            ),
            image,
            "deploy",
            cache=False,
            retries=DEPLOY_RETRIES,
        )
        # Never cached: it checks the live application (retries cover a slow first start).
        _step(
            smoke_test(
                dataset=dataset,
                serve_config_uri=deployed.outputs["serve_config_uri"],
                url=deployed.outputs["url"],
                ray_address=ray_address,
            ),
            image,
            "smoke-test",
            cache=False,
            retries=SMOKE_RETRIES,
        )

    outputs = NamedTuple("PipelineOutputs", deployable=bool, metrics=dict)
    return outputs(deployable=gate.outputs["Output"], metrics=evaluated.outputs["Output"])


def compile_pipeline(package_path: str) -> str:
    """Compile the pipeline to `package_path` (YAML); return the path."""
    compiler.Compiler().compile(medfusion_pipeline, package_path=package_path)
    return package_path


if __name__ == "__main__":
    from pathlib import Path

    print(compile_pipeline(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_suffix(".yaml"))))
