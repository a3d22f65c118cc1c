"""Where a stage runs: one string, ``ray_address``, picks the target (the same value for every step
of a pipeline run, and `TrainConfig.ray_address` for ``medfusion train``):

    ""                   embedded: the stage function runs in this process, which starts a local Ray
                         when the stage needs one (what ``kfp.local`` and ``medfusion pipeline run
                         --local`` use)
    "http://HEAD:8265"   Ray Jobs API (`medfusion.orchestration.jobs`): the stage runs as a Ray job on
                         that cluster; its logs are streamed here
    "kuberay"            KubeRay (`medfusion.orchestration.kuberay`): a RayJob custom resource (with its
                         own Ray cluster) is created in the namespace, followed until it ends, and deleted

A stage run remotely runs ``python -m medfusion.orchestration STAGE`` (`main`) on the cluster: the
same stage function, with the same config, writing its result as JSON to a result URI in object
storage that both sides reach; this process reads it back, so a caller gets the same result dict
whichever the target.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import importlib
import json
import shlex
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from medfusion import storage
from medfusion.config import KUBERAY, ConfigError
from medfusion.loader import apply_preset, load_config
from medfusion.orchestration import jobs
from medfusion.orchestration.kuberay import KubeRayOptions, rayjob_manifest, run_rayjob

ENTRYPOINT_MODULE = "medfusion.orchestration"
RESULTS_DIR = "_results"


@dataclass(frozen=True)
class Stage:
    """A stage function and its config class, by import path (imported only when run)."""

    function: str
    config: str
    preset_sections: tuple[str, ...] = ()
    """Config sections that a ``preset`` key fills from medfusion/configs/presets (as the CLI's --preset)."""
    job_env: str = ""
    """A function of the stage's config returning the environment its remote job needs beyond storage
    credentials (by import path; empty: none)."""


STAGES: dict[str, Stage] = {
    "prepare": Stage("medfusion.data.prepare:run_prepare", "medfusion.config:PrepareConfig", ("synth",)),
    "train": Stage(
        "medfusion.train:run_train",
        "medfusion.config:TrainConfig",
        ("model", "data"),
        job_env="medfusion.training.runtime:worker_env",
    ),
    "tune": Stage("medfusion.tune:run_tune", "medfusion.tuning.config:TuneConfig", ("model", "data")),
    "evaluate": Stage("medfusion.evaluate:run_evaluate", "medfusion.config:EvaluateConfig"),
}


def import_path_target(path: str) -> Any:
    """The object an import path ``package.module:name`` names (the format of a Serve ``import_path``)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def ray_target(ray_address: str) -> str:
    """``embedded``, ``jobs`` or ``kuberay`` for a `ray_address` value (ConfigError otherwise)."""
    if not ray_address:
        return "embedded"
    if ray_address == KUBERAY:
        return "kuberay"
    if ray_address.startswith(("http://", "https://")):
        return "jobs"
    raise ConfigError(
        f"ray_address: must be empty (embedded Ray), the Ray dashboard URL http://HEAD:8265 (Jobs API) "
        f"or {KUBERAY!r} (a RayJob per stage), got {ray_address!r}"
    )


def build_config(stage: str, values: Mapping[str, Any]) -> Any:
    """The stage's typed config from plain values; a ``preset`` key fills the preset's sections first."""
    if stage not in STAGES:
        raise ConfigError(f"stage: must be one of {', '.join(STAGES)}, got {stage!r}")
    spec = STAGES[stage]
    values = dict(values)
    values = apply_preset(values.pop("preset", ""), values, spec.preset_sections)
    if stage == "train":
        values["ray_address"] = ""  # the caller's target decides where it runs, not TrainConfig's own
    if stage == "tune":
        # The pipeline registers in its deploy step, after the quality gate: a sweep's winner must not
        # become <name>:latest before it has passed.
        values["register"] = False
    return load_config(import_path_target(spec.config), base=values)


def _plain(result: Any) -> dict[str, Any]:
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)


def run_stage(
    stage: str,
    values: Mapping[str, Any],
    ray_address: str = "",
    *,
    result_root: str = "",
    kuberay: KubeRayOptions | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Run one stage where `ray_address` says; return its result as a dict (URIs and numbers).

    Args:
        stage: a key of STAGES.
        values: the stage config's fields (partial; validated here, before anything is submitted).
        ray_address: empty, ``http://HEAD:8265`` or ``kuberay`` (see the module docstring).
        result_root: object-storage folder for the result JSON of a remote run (default: ``_results``
            next to the stage's output URI).
        kuberay: cluster shape and images of the RayJob (``kuberay`` only).
        out: where a remote job's logs are streamed (stdout).

    Returns:
        The stage result's fields (a dataclass result as `dataclasses.asdict` gives it).

    Raises:
        ConfigError: a config value or `ray_address` is invalid.
        JobError: the remote job failed, was stopped, or could not be submitted.
    """
    cfg = build_config(stage, values)
    target = ray_target(ray_address)
    spec = STAGES[stage]
    if target == "embedded":
        return _plain(import_path_target(spec.function)(cfg))
    result_uri = storage.join(result_root or _default_result_root(cfg), f"{stage}-{uuid.uuid4().hex[:10]}.json")
    entrypoint = stage_entrypoint(stage, dataclasses.asdict(cfg), result_uri)
    if target == "jobs":
        run_name = getattr(cfg, "name", "")
        env = jobs.job_env(import_path_target(spec.job_env)(cfg) if spec.job_env else {})
        metadata = {"medfusion_stage": stage, "medfusion_run": run_name}
        jobs.submit_job(ray_address, entrypoint, _job_name(stage, run_name), env=env, metadata=metadata, out=out)
    else:
        opts = kuberay or KubeRayOptions()
        run_rayjob(rayjob_manifest(_job_name(stage), entrypoint, opts), opts, out=out)
    return json.loads(storage.read_text(result_uri))


def _job_name(stage: str, run_name: str = "") -> str:
    """A fresh job name; a Ray job's carries the run's name, a RayJob's stays a short Kubernetes name."""
    suffix = uuid.uuid4().hex[:6]
    return f"medfusion-{stage}-{run_name}-{suffix}" if run_name else f"medfusion-{stage}-{suffix}"


def _default_result_root(cfg: Any) -> str:
    """``_results`` beside the stage's output (never inside a dataset, whose folder is checked)."""
    for attr, beside in (("output_uri", True), ("storage_uri", False), ("model_uri", True)):
        uri = getattr(cfg, attr, "").rstrip("/")
        if uri:
            return storage.join(storage.parent(uri) if beside else uri, RESULTS_DIR)
    raise ConfigError("result_root: required for a remote run when the config names no output location")


def stage_entrypoint(stage: str, values: Mapping[str, Any], result_uri: str) -> str:
    """The shell command a remote run executes: `main` with the config as base64 JSON."""
    payload = base64.urlsafe_b64encode(json.dumps(values).encode()).decode()
    argv = ("python", "-m", ENTRYPOINT_MODULE, stage, "--config-b64", payload, "--result-uri", result_uri)
    return " ".join(shlex.quote(a) for a in argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m medfusion.orchestration STAGE``: run one stage embedded on the cluster this job
    landed on and write its result JSON.

    Args:
        argv: the command line after the program name (default: sys.argv[1:]).

    Returns:
        The exit status: 0, or 2 when the stage failed (the error is printed to stderr).
    """
    parser = argparse.ArgumentParser(prog=f"python -m {ENTRYPOINT_MODULE}")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--config-b64", required=True, help="the stage config as urlsafe-base64 JSON")
    parser.add_argument("--result-uri", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    values = json.loads(base64.urlsafe_b64decode(args.config_b64.encode()))
    try:
        result = run_stage(args.stage, values)
    except (ConfigError, RuntimeError, OSError, ValueError) as err:
        print(f"medfusion: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    storage.write_text(args.result_uri, json.dumps(result, default=str))
    print(f"[medfusion] {args.stage} result: {args.result_uri}")
    return 0
