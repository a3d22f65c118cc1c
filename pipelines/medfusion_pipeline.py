"""The medfusion Kubeflow pipeline (KFP v2):

    prepare-data ─▶ tune (use_tune) | train ─▶ evaluate ─▶ quality-gate ─▶ [passed] deploy ─▶ smoke-test

Every step is a component of ``medfusion.components`` calling a medfusion stage function; where Ray
runs is the ``ray_address`` parameter (medfusion.orchestration.stages: embedded, Ray Jobs API or
KubeRay), the clusters of KubeRay the typed ``kuberay`` parameter. Its parameters are the fields of
``medfusion.orchestration.pipeline.PipelineConfig``, with the same defaults; ``medfusion.pipelines.run``
runs it here (kfp.local) or submits it to a KFP server.

On a KFP server a step pod gets credentials only from Kubernetes Secrets that its platform spec names
(kfp-kubernetes ``use_secret_as_env``, the Secrets of k8s/base/secret.*.template.yaml): object storage
for every step that reads or writes it, the Ray token for every step that may call a Ray dashboard, the
inference API's token for the smoke test. kfp.local ignores them (the steps inherit this environment).
``medfusion_pipeline.yaml`` next to this file is its compiled form (tests/pipelines keep it current):

    python -m medfusion.pipelines.medfusion_pipeline [OUT.yaml]

Train and tune hand their model to evaluate as a URI through ``dsl.OneOf``: a OneOf over artifacts
is what KFP would take, but ``kfp.local`` (2.17) cannot resolve artifact OneOfs yet, and the local run
is how this pipeline is tested. The Model artifacts (with their lineage) are still outputs of both.
"""

# No `from __future__ import annotations`: KFP reads the parameter annotations as types.

import dataclasses
import sys
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes

from medfusion.components.deploy.component import deploy
from medfusion.components.evaluate.component import evaluate
from medfusion.components.prepare_data.component import prepare_data
from medfusion.components.quality_gate.component import quality_gate
from medfusion.components.smoke_test.component import smoke_test
from medfusion.components.train.component import train
from medfusion.components.tune.component import tune
from medfusion.config import SERVE_TOKEN_ENV, TrainConfig
from medfusion.orchestration.kuberay import (
    DEFAULT_IMAGE,
    RAY_AUTH_SECRET,
    RAY_AUTH_SECRET_KEY,
    RAY_AUTH_TOKEN_ENV,
    S3_SECRET,
    S3_SECRET_KEYS,
    SERVE_TOKEN_SECRET,
    SERVE_TOKEN_SECRET_KEY,
    KubeRayOptions,
)
from medfusion.orchestration.pipeline import DEFAULT_GATES
from medfusion.registry import DEFAULT_REGISTRY_URI

PIPELINE_NAME = "medfusion"
# Retries absorb transient failures (object storage, a preempted node, a Ray worker lost); a failure
# that a retry cannot fix (a bad config) fails fast anyway, because configs are validated first.
STAGE_RETRIES = 2
DEPLOY_RETRIES = 1
SMOKE_RETRIES = 2
# The `kuberay` parameter's default: every KubeRayOptions field, so that the KFP UI shows them all.
KUBERAY_DEFAULTS = dataclasses.asdict(KubeRayOptions())
# (Secret, {key: environment variable}) of each Secret a step pod may get.
S3 = (S3_SECRET, {key: key for key in S3_SECRET_KEYS})
RAY_TOKEN = (RAY_AUTH_SECRET, {RAY_AUTH_SECRET_KEY: RAY_AUTH_TOKEN_ENV})
SERVE_TOKEN = (SERVE_TOKEN_SECRET, {SERVE_TOKEN_SECRET_KEY: SERVE_TOKEN_ENV})


def _step(
    task: dsl.PipelineTask,
    image: str,
    name: str,
    *,
    cache: bool,
    retries: int,
    secrets: tuple[tuple[str, dict[str, str]], ...] = (),
) -> dsl.PipelineTask:
    """Image, caching, retries and the Secrets of one step, set deliberately for each."""
    for secret, key_to_env in secrets:
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=key_to_env)
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
    epochs: int = TrainConfig.epochs,
    lr: float = TrainConfig.lr,
    num_workers: int = TrainConfig.num_workers,
    use_gpu: bool = TrainConfig.use_gpu,
    fusions: list = ["gated"],
    prepare_config: dict = {},
    train_config: dict = {},
    use_tune: bool = False,
    search_space: dict = {},
    tune_config: dict = {},
    evaluate_config: dict = {},
    gates: dict = DEFAULT_GATES,
    serve_config: dict = {},
    ray_address: str = "",
    kuberay: dict = KUBERAY_DEFAULTS,
    image: str = DEFAULT_IMAGE,
    serve_url: str = "",
) -> NamedTuple("PipelineOutputs", deployable=bool, metrics=dict):
    ray = {"ray_address": ray_address, "cluster": kuberay, "image": image}
    training = {"epochs": epochs, "lr": lr, "num_workers": num_workers, "use_gpu": use_gpu, "fusions": fusions}

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
        secrets=(S3, RAY_TOKEN),
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
                **training,
                **ray,
            ),
            image,
            "tune",
            cache=True,
            retries=STAGE_RETRIES,
            secrets=(S3, RAY_TOKEN),
        )
    with dsl.Else(name="train-once"):
        trained = _step(
            train(dataset=dataset, storage_uri=storage_uri, preset=preset, config=train_config, **training, **ray),
            image,
            "train",
            cache=True,
            retries=STAGE_RETRIES,
            secrets=(S3, RAY_TOKEN),
        )
    model_uri = dsl.OneOf(tuned.outputs["Output"], trained.outputs["Output"])

    evaluated = _step(
        evaluate(model_uri=model_uri, dataset=dataset, config=evaluate_config, **ray),
        image,
        "evaluate",
        cache=True,
        retries=STAGE_RETRIES,
        secrets=(S3, RAY_TOKEN),
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
            secrets=(S3, RAY_TOKEN),
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
            secrets=(S3, SERVE_TOKEN),
        )

    outputs = NamedTuple("PipelineOutputs", deployable=bool, metrics=dict)
    return outputs(deployable=gate.outputs["Output"], metrics=evaluated.outputs["Output"])


def _sorted_literal(value: object) -> object:
    return {k: _sorted_literal(value[k]) for k in sorted(value)} if isinstance(value, dict) else value


def compile_pipeline(package_path: str) -> str:
    """Compile the pipeline to `package_path` (YAML); return the path.

    The same pipeline gives the same bytes: KFP's header comment prints a dict default (``kuberay``) in
    protobuf map order, which differs from run to run, so those defaults are printed with sorted keys.
    """
    import ast
    import re
    from pathlib import Path

    compiler.Compiler().compile(medfusion_pipeline, package_path=package_path)
    path = Path(package_path)
    lines = path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        found = re.fullmatch(r"(#\s+\w+: dict \[Default: )(\{.*\})(\]\n?)", line)
        if found:
            head, literal, tail = found.groups()
            lines[i] = f"{head}{_sorted_literal(ast.literal_eval(literal))}{tail}"
        elif not line.startswith("#"):
            break  # the header comment is over
    path.write_text("".join(lines))
    return package_path


if __name__ == "__main__":
    from pathlib import Path

    print(compile_pipeline(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_suffix(".yaml"))))
