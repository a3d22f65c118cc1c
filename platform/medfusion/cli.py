"""The `medfusion` command line: thin wrappers that build a config and call a stage function.

Every command that takes a config accepts ``--config FILE`` (YAML, partial) and dotted
``KEY=VALUE`` overrides; ``--help`` lists every key with its default and meaning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any

from medfusion import config as C
from medfusion.bench.ingest import IngestBenchConfig
from medfusion.bench.serve import ServeBenchConfig
from medfusion.bench.train import TrainBenchConfig
from medfusion.bench.tune import TuneBenchConfig
from medfusion.loader import apply_preset, field_docs, load_config
from medfusion.store import DEFAULT_ROOT
from medfusion.tuning.config import TuneConfig


def _fields_help(cls: type, prefix: str = "") -> list[str]:
    """One line per (nested) field: `key (default): doc`."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(_fields_help(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {prefix}{f.name} = {default!r}\n      {docs.get(f.name, '')}")
    return lines


def _config_parser(sub, name: str, cls: type, help_text: str, presets: bool = True) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (override with KEY=VALUE):\n" + "\n".join(_fields_help(cls)),
    )
    parser.add_argument("--config", help="YAML file of settings (partial; overrides go on top)")
    if presets:
        parser.add_argument("--preset", choices=C.PRESETS, help="size preset applied before --config")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. synth.num_samples=1000"
    )
    return parser


def _load(
    cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None, sections: tuple[str, ...] = ()
) -> Any:
    values = apply_preset(getattr(args, "preset", None) or "", dict(base or {}), sections)
    return load_config(cls, args.config, args.overrides, base=values)


def _use_local_store_env(root: str) -> None:
    """Point S3 clients at the local store when no AWS endpoint is configured and it is running."""
    if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ACCESS_KEY_ID"):
        return
    from medfusion.store import Store

    state = Store(root).running()
    if state:
        os.environ.update(state.env())


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------


def cmd_store(args: argparse.Namespace) -> int:
    from medfusion.store import Store, export_lines

    store = Store(args.root)
    if args.action == "up":
        state = store.up(s3_port=args.port)
        print(
            f"# SeaweedFS S3 at {state.endpoint} (pid {state.pid}, data {state.data_dir}, bucket s3://{state.bucket})"
        )
        print(export_lines(state.env()))
    elif args.action == "down":
        stopped = store.down()
        print("stopped" if stopped else "not running")
    else:
        state = store.running()
        if not state:
            print("not running")
            return 1
        print(
            json.dumps(
                {"endpoint": state.endpoint, "pid": state.pid, "bucket": state.bucket, "data_dir": state.data_dir},
                indent=2,
            )
        )
    return 0


def _prepare(args: argparse.Namespace, base: dict[str, Any]) -> int:
    from medfusion.data.prepare import run_prepare

    if args.out:
        base["output_uri"] = args.out
    if args.overwrite:
        base["overwrite"] = True
    cfg = _load(C.PrepareConfig, args, base, sections=("synth",))
    _use_local_store_env(args.store_root)
    result = run_prepare(cfg, show_progress=True)
    print(result.summary())
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    return _prepare(args, {"source": "synthetic"})


def cmd_data_ingest(args: argparse.Namespace) -> int:
    return _prepare(args, {"source": args.source, "source_uri": args.input})


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from medfusion.data.dataset import open_dataset, summarize, text_length_lines, verify_dataset

    _use_local_store_env(args.store_root)
    info = open_dataset(args.uri)
    summary = summarize(info)
    if not args.no_verify:
        shards = sum(len(v["shards"]) for v in info.manifest["splits"].values())
        with tqdm(total=shards, desc="verify sha256", unit="shard", file=sys.stderr) as bar:
            summary["verified_shards"] = verify_dataset(info, progress=bar)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"dataset {summary['uri']}  version {summary['version']}  created {summary['created_at']}")
    print(
        f"source {summary['source'].get('type')}  classes {len(summary['classes'])}  vocab {summary['vocab_size']}  "
        f"multi-label {summary['multi_label']}  rejected rows {summary['rejected']}"
    )
    classes = summary["classes"]
    width = max(len(c) for c in classes + ["class"])
    splits = list(summary["splits"])
    print(f"{'class':<{width}}  " + "  ".join(f"{s:>7}" for s in splits))
    for name in classes:
        print(
            f"{name:<{width}}  " + "  ".join(f"{summary['splits'][s]['class_counts'].get(name, 0):>7}" for s in splits)
        )
    print(f"{'rows':<{width}}  " + "  ".join(f"{summary['splits'][s]['rows']:>7}" for s in splits))
    print(f"{'shards':<{width}}  " + "  ".join(f"{summary['splits'][s]['shards']:>7}" for s in splits))
    for key, shown in (("boxes", "boxes"), ("with_report", "with note"), ("with_findings", "w/ findings")):
        counts = [summary["splits"][s].get(key) for s in splits]
        if all(c is not None for c in counts):
            print(f"{shown:<{width}}  " + "  ".join(f"{c:>7}" for c in counts))
    for line in text_length_lines(summary):
        print(line)
    if "verified_shards" in summary:
        print(f"checksums: {summary['verified_shards']} shards verified")
    return 0


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    from medfusion.bench.ingest import run_ingest_bench

    base: dict[str, Any] = {}
    if args.samples:
        base["samples"] = args.samples
    cfg = _load(IngestBenchConfig, args, base)
    _use_local_store_env(args.store_root)
    result = run_ingest_bench(cfg, store_root=args.store_root)
    print(json.dumps(result))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from medfusion.train import load_train_config, run_train

    overrides = list(args.overrides) + ([f"dataset_uri={args.data}"] if args.data else [])
    cfg = load_train_config(args.config, overrides, preset=args.preset, resume=args.resume)
    _use_local_store_env(args.store_root)
    print(run_train(cfg).summary())
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from medfusion.tune import load_tune_config, run_tune

    given = {
        "dataset_uri": args.data,
        "search_space_file": args.search_space,
        "name": args.name,
        "seeds": None if args.seeds is None else str(args.seeds),
    }
    overrides = list(args.overrides) + [f"{key}={value}" for key, value in given.items() if value]
    _use_local_store_env(args.store_root)  # --resume reads the sweep's saved config from the store
    cfg = load_tune_config(args.config, overrides, preset=args.preset, resume=args.resume)
    print(run_tune(cfg).summary())
    return 0


def _trial_settings_help() -> list[str]:
    """`medfusion tune --help`: the train.* settings a sweep's trials share (TrainConfig's, minus tune's own)."""
    from medfusion.tuning.space import NOT_TRAIN_SETTINGS, TRIAL_DEFAULTS

    hidden = tuple(f"  train.{key}{end}" for key in NOT_TRAIN_SETTINGS for end in (" ", "."))
    lines = []
    for line in _fields_help(C.TrainConfig, "train."):
        key = line.split(" = ", 1)[0].strip().removeprefix("train.")
        if key in TRIAL_DEFAULTS:  # tune's own default for its trials
            line = f"  train.{key} = {TRIAL_DEFAULTS[key]!r}" + line[line.index("\n") :]
        if not line.startswith(hidden):
            lines.append(line)
    return lines


def cmd_bench_train(args: argparse.Namespace) -> int:
    from medfusion.bench.train import run_train_bench

    base: dict[str, Any] = {}
    if args.device:
        base["device"] = args.device
    if args.zero:
        base["zero_stages"] = [int(z) for z in args.zero.split(",")]
    cfg = _load(TrainBenchConfig, args, base)
    _use_local_store_env(args.store_root)
    print(json.dumps(run_train_bench(cfg, store_root=args.store_root)))
    return 0


def cmd_bench_tune(args: argparse.Namespace) -> int:
    from medfusion.bench.tune import run_tune_bench

    cfg = _load(TuneBenchConfig, args)
    _use_local_store_env(args.store_root)
    print(json.dumps(run_tune_bench(cfg, store_root=args.store_root)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medfusion.evaluate import run_evaluate

    given = {"model_uri": args.model, "data_uri": args.data, "output_uri": args.out, "split": args.split}
    cfg = _load(C.EvaluateConfig, args, {key: value for key, value in given.items() if value})
    _use_local_store_env(args.store_root)
    result = run_evaluate(cfg)
    print(result.summary())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from medfusion.serve.app import serve_forever
    from medfusion.serving.settings import check_auth

    cfg = _load(C.ServeConfig, args, {"model": args.model} if args.model else {})
    # Before Ray starts: require_auth without a token is an error (exit 2), an empty token a warning.
    check_auth(cfg, warn=lambda warning: print(f"medfusion: warning: {warning}", file=sys.stderr))
    _use_local_store_env(args.store_root)
    serve_forever(cfg, host=args.host, port=args.port, app_name=args.name, route_prefix=args.route_prefix)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from medfusion.bench.serve import run_serve_bench

    cfg = _load(ServeBenchConfig, args, {"model": args.model} if args.model else {})
    _use_local_store_env(args.store_root)
    result = run_serve_bench(cfg)
    print(json.dumps(result))
    return 0


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    from medfusion.orchestration.pipeline import PipelineConfig
    from medfusion.pipelines.run import run_pipeline_local

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    _use_local_store_env(args.store_root)
    result = run_pipeline_local(cfg, args.pipeline_root, enable_caching=not args.no_cache)
    print(json.dumps(result.outputs, indent=2, default=str))
    print(f"step outputs (artifacts, logs' executor files): {result.run_dir}")
    print(f"deployed: {result.deployed_to}" if result.deployed_to else "deploy: blocked by the quality gate")
    return 0


def cmd_pipeline_compile(args: argparse.Namespace) -> int:
    from medfusion.pipelines.medfusion_pipeline import compile_pipeline

    print(f"compiled pipeline: {compile_pipeline(args.output)}")
    return 0


def cmd_pipeline_submit(args: argparse.Namespace) -> int:
    from medfusion.orchestration.pipeline import PipelineConfig
    from medfusion.pipelines.run import submit_pipeline

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    submitted = submit_pipeline(
        cfg,
        args.host,
        namespace=args.namespace,
        experiment=args.experiment,
        run_name=args.run_name,
        service_account=args.service_account,
        existing_token=args.token,
        cookies=args.cookies,
        ssl_ca_cert=args.ssl_ca_cert,
        enable_caching=False if args.no_cache else None,
        allow_embedded=args.allow_embedded,
    )
    print(f"submitted run {submitted.run_id}: {submitted.url}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from medfusion import registry

    _use_local_store_env(args.store_root)
    print(registry.format_table(registry.list_versions(args.registry, args.name)))
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    from medfusion import registry

    _use_local_store_env(args.store_root)
    print(registry.describe(registry.get_version(args.registry, args.ref)))
    return 0


def cmd_models_register(args: argparse.Namespace) -> int:
    from medfusion import registry

    _use_local_store_env(args.store_root)
    registered = registry.register(
        args.export, args.registry, args.name, version=args.version, set_latest=not args.no_latest
    )
    print(f"registered {registered.ref} at {registered.uri}{' (latest)' if registered.is_latest else ''}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from medfusion.demo import DemoConfig, run_demo

    cfg = load_config(DemoConfig, args.config, args.overrides, base={"store_root": args.store_root})
    run_demo(cfg)
    return 0


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfusion", description="Train and serve a multimodal medical model on Ray.")
    parser.add_argument(
        "--store-root",
        default=os.environ.get("MEDFUSION_STORE_ROOT", DEFAULT_ROOT),
        help="folder of the local S3 store's data and state (default: %(default)s)",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    store = groups.add_parser("store", help="the embedded S3 object store (SeaweedFS on 127.0.0.1)")
    store_sub = store.add_subparsers(dest="action", required=True)
    up = store_sub.add_parser("up", help="start it (or reuse the running one) and print the env to export")
    up.add_argument("--port", type=int, default=0, help="S3 port (default: a free port)")
    store_sub.add_parser("down", help="stop exactly the process `up` started")
    store_sub.add_parser("status", help="print the endpoint when running (exit 1 when not)")
    for p in store_sub.choices.values():
        p.set_defaults(func=cmd_store, root=None)
    store.set_defaults(func=cmd_store)

    data = groups.add_parser("data", help="make, ingest and inspect datasets")
    data_sub = data.add_subparsers(dest="action", required=True)
    synth = _config_parser(data_sub, "synth", C.PrepareConfig, "generate a synthetic dataset into shards")
    synth.add_argument("--out", help="dataset root to write (path or s3://...); same as output_uri=")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    synth.set_defaults(func=cmd_data_synth)
    ingest = _config_parser(
        data_sub,
        "ingest",
        C.PrepareConfig,
        "ingest a generic manifest (CSV/JSONL), an IU X-Ray folder, or NIH ChestX-ray14's box list",
        presets=False,
    )
    ingest.add_argument("--source", choices=["manifest", "iu_xray", "nih"], required=True, help="source layout")
    ingest.add_argument(
        "--input", required=True, help="the manifest file, the IU X-Ray folder, or the NIH folder (or its box CSV)"
    )
    ingest.add_argument("--out", help="dataset root to write (path or s3://...)")
    ingest.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    ingest.set_defaults(func=cmd_data_ingest)
    inspect_ = data_sub.add_parser("inspect", help="counts per split and class; verifies shard checksums")
    inspect_.add_argument("uri", help="dataset root")
    inspect_.add_argument("--no-verify", action="store_true", help="skip reading every shard for its sha256")
    inspect_.add_argument("--json", action="store_true", help="print JSON")
    inspect_.set_defaults(func=cmd_data_inspect)

    bench = groups.add_parser("bench", help="benchmarks: this system vs its plain baseline, JSON on the last line")
    bench_sub = bench.add_subparsers(dest="action", required=True)
    bi = _config_parser(
        bench_sub, "ingest", IngestBenchConfig, "Ray Data vs a PyTorch DataLoader vs the decode ceiling", presets=False
    )
    bi.add_argument("--samples", type=int, help="N (same as samples=N)")
    bi.set_defaults(func=cmd_bench_ingest)
    bsv = _config_parser(
        bench_sub,
        "serve",
        ServeBenchConfig,
        "Ray Serve (batched) vs plain FastAPI/uvicorn vs the offline model",
        presets=False,
    )
    bsv.add_argument(
        "--model",
        help="export to serve, path or s3:// (default: an untrained export of preset=, tiny unless set); "
        "same as model=",
    )
    bsv.set_defaults(func=cmd_bench_serve)
    srv = _config_parser(
        groups,
        "serve",
        C.ServeConfig,
        "serve a model over HTTP with Ray Serve on the embedded Ray (Ctrl-C stops)",
        presets=False,
    )
    srv.add_argument(
        "--model", help="export folder (path or s3://), or NAME[:VERSION] from the registry; same as model="
    )
    srv.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default: %(default)s; 0.0.0.0 for all)"
    )
    srv.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    srv.add_argument("--name", default="medfusion", help="Serve application name (default: %(default)s)")
    srv.add_argument("--route-prefix", default="/", help="URL prefix of the application (default: %(default)s)")
    srv.set_defaults(func=cmd_serve)
    train = _config_parser(
        groups, "train", C.TrainConfig, "train with Ray Train + DeepSpeed (or DDP), streaming the dataset from S3"
    )
    train.add_argument("--data", help="dataset root (path or s3://); same as dataset_uri=")
    train.add_argument("--resume", help="a run folder (path or s3://) to continue from its newest checkpoint")
    train.set_defaults(func=cmd_train)
    tune = _config_parser(
        groups,
        "tune",
        TuneConfig,
        "sweep hyperparameters and fusion strategies with Ray Tune (every trial a Ray Train + DeepSpeed run)",
    )
    tune.epilog += "\n\ntrial training settings (train.KEY=VALUE; also search-space keys):\n" + "\n".join(
        _trial_settings_help()
    )
    tune.add_argument("--data", help="dataset root (path or s3://); same as dataset_uri=")
    tune.add_argument(
        "--search-space", metavar="FILE", help="search-space YAML (path or s3://); same as search_space_file="
    )
    tune.add_argument("--name", help="sweep name (its folder under storage_uri); same as name=")
    tune.add_argument("--seeds", type=int, help="ablation seeds per variant (0 skips the ablation); same as seeds=")
    tune.add_argument(
        "--resume", action="store_true", help="continue the interrupted sweep <storage_uri>/<name> from its saved state"
    )
    tune.set_defaults(func=cmd_tune)
    btr = _config_parser(
        bench_sub,
        "train",
        TrainBenchConfig,
        "Ray Train + DeepSpeed vs a plain PyTorch loop (samples/s, memory)",
        presets=False,
    )
    btr.add_argument("--device", choices=["cpu", "cuda"], help="same as device=")
    btr.add_argument("--zero", help="ZeRO stages to measure, e.g. 0,1,2,3; same as zero_stages=")
    btr.set_defaults(func=cmd_bench_train)
    btu = _config_parser(
        bench_sub,
        "tune",
        TuneBenchConfig,
        "ASHA vs random vs grid search; Ray Tune vs a process pool (no-op trials)",
        presets=False,
    )
    btu.set_defaults(func=cmd_bench_tune)

    evaluate = _config_parser(
        groups,
        "evaluate",
        C.EvaluateConfig,
        "score an exported model on a dataset split: metrics.json, plots, report.html",
        presets=False,
    )
    evaluate.add_argument("--model", help="export folder of the model (path or s3://); same as model_uri=")
    evaluate.add_argument("--data", help="dataset root (path or s3://); same as data_uri=")
    evaluate.add_argument("--out", help="output folder (default: eval-<split> next to the model); same as output_uri=")
    evaluate.add_argument("--split", help="train, val or test (default: test); same as split=")
    evaluate.set_defaults(func=cmd_evaluate)

    from medfusion.orchestration.pipeline import PipelineConfig

    pipeline = groups.add_parser("pipeline", help="the Kubeflow pipeline: run it here, compile it, submit it")
    pipeline_sub = pipeline.add_subparsers(dest="action", required=True)
    prun = _config_parser(
        pipeline_sub, "run", PipelineConfig, "run the whole pipeline here with kfp.local (embedded Ray)", presets=False
    )
    prun.add_argument(
        "--local",
        action="store_true",
        required=True,
        help="kfp.local's SubprocessRunner (the only way `run` runs; use `submit` for a KFP server)",
    )
    prun.add_argument(
        "--pipeline-root", default=".medfusion/pipeline", help="folder of every step's artifacts (default: %(default)s)"
    )
    prun.add_argument("--no-cache", action="store_true", help="rerun every step instead of reusing cached outputs")
    prun.set_defaults(func=cmd_pipeline_run)
    pcompile = pipeline_sub.add_parser("compile", help="compile the pipeline to KFP YAML")
    pcompile.add_argument(
        "--output", default="medfusion_pipeline.yaml", help="YAML file to write (default: %(default)s)"
    )
    pcompile.set_defaults(func=cmd_pipeline_compile)
    psubmit = _config_parser(
        pipeline_sub, "submit", PipelineConfig, "submit a run to a Kubeflow Pipelines server", presets=False
    )
    psubmit.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    psubmit.add_argument("--namespace", default="", help="Kubeflow profile namespace (multi-user installs)")
    psubmit.add_argument("--experiment", default="medfusion", help="experiment name (default: %(default)s)")
    psubmit.add_argument("--run-name", default="", help="run name (default: KFP's)")
    psubmit.add_argument(
        "--service-account",
        default="",
        help="service account of the steps; medfusion-pipeline for ray_address=kuberay (k8s/)",
    )
    psubmit.add_argument("--token", default=os.environ.get("KFP_TOKEN", ""), help="bearer token (default: $KFP_TOKEN)")
    psubmit.add_argument(
        "--cookies",
        default=os.environ.get("KFP_COOKIES", ""),
        help="session cookies, e.g. authservice_session=... (default: $KFP_COOKIES)",
    )
    psubmit.add_argument("--ssl-ca-cert", default="", help="CA bundle of the endpoint's TLS certificate")
    psubmit.add_argument("--no-cache", action="store_true", help="disable KFP's step caching for this run")
    psubmit.add_argument(
        "--allow-embedded",
        action="store_true",
        help="accept an empty ray_address: Ray Train runs inside each step's pod (small CPU runs only)",
    )
    psubmit.set_defaults(func=cmd_pipeline_submit)

    from medfusion.registry import DEFAULT_REGISTRY_URI, REGISTRY_ENV

    models = groups.add_parser("models", help="the model registry: list, show and register model versions")
    models_sub = models.add_subparsers(dest="action", required=True)
    registry_help = f"registry root, path or s3://... (default: ${REGISTRY_ENV} or {DEFAULT_REGISTRY_URI})"
    mlist = models_sub.add_parser("list", help="registered versions, newest first (* marks latest)")
    mlist.add_argument("--name", default="", help="only this model's versions")
    mlist.set_defaults(func=cmd_models_list)
    mshow = models_sub.add_parser("show", help="a version's model card and URIs")
    mshow.add_argument("ref", metavar="NAME[:VERSION]", help="model reference (VERSION defaults to latest)")
    mshow.set_defaults(func=cmd_models_show)
    mregister = models_sub.add_parser("register", help="copy an export into the registry as an immutable version")
    mregister.add_argument("export", metavar="EXPORT_URI", help="export folder (path or s3://...)")
    mregister.add_argument("--name", required=True, help="model name")
    mregister.add_argument("--version", default="", help="explicit version (default: sha-<content hash>)")
    mregister.add_argument("--no-latest", action="store_true", help="do not point NAME:latest at this version")
    mregister.set_defaults(func=cmd_models_register)
    for p in models_sub.choices.values():
        p.add_argument("--registry", default=os.environ.get(REGISTRY_ENV, DEFAULT_REGISTRY_URI), help=registry_help)

    from medfusion.demo import DemoConfig

    demo = _config_parser(
        groups, "demo", DemoConfig, "the main job end to end on the embedded local store and Ray", presets=False
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, KEY=VALUE overrides gathered from wherever they stand."""
    parser = build_parser()
    # KEY=VALUE overrides may sit on both sides of options (`tune a=1 --seeds 3 b=2`): argparse takes
    # only the first run of them as the positional, so the rest come back unknown and join it here.
    args, unknown = parser.parse_known_args(argv)
    late = [arg for arg in unknown if "=" in arg and not arg.startswith("-")]
    if late and isinstance(getattr(args, "overrides", None), list):
        args.overrides += late
        unknown = [arg for arg in unknown if arg not in late]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if getattr(args, "root", "unset") is None:
        args.root = args.store_root
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (C.ConfigError, ValueError, FileNotFoundError, FileExistsError, OSError, RuntimeError) as err:
        # Errors users can act on: one line, no traceback (MEDFUSION_DEBUG=1 shows it).
        if os.environ.get("MEDFUSION_DEBUG"):
            raise
        print(f"medfusion: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
