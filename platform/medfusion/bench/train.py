"""`medfusion bench train`: Ray Train + DeepSpeed vs a plain PyTorch loop, same model, data and batch size.

One run measures, on a synthetic dataset streamed from the local S3 store:

(a) Ray Train + DeepSpeed with one worker, once per ZeRO stage in `zero_stages`: the production
    training loop (`train_loop_per_worker` in benchmark mode: no validation, no checkpoints),
    streaming its shard through Ray Data, as in `medfusion train`.
(b) A plain single-process PyTorch loop (AdamW, same clipping) on the same shards, fed by a
    prefetching `torch.utils.data.DataLoader`: `loader_workers` processes read and decode shards
    while the loop trains (pinned memory on cuda), as Ray Data prefetches for (a). What "the same
    training without Ray" costs: a/b (`ray_vs_plain_prefetch`) is the headline ratio.
(b') The same loop over batches decoded into memory (and moved to the device) before timing: the
    compute ceiling, so a/b' (`ray_vs_plain_in_memory`) prices everything Ray Train, DeepSpeed and
    streaming add (on a small machine, mostly the cores the preprocessing takes from training).
(c) Ray Train + DeepSpeed with `workers` workers (global samples/s; needs that many GPUs on cuda).

Weights have the same dtype in every variant. On cuda DeepSpeed's bf16 mode holds the model's
parameters in bf16 (fp32 buffers) and steps AdamW on fp32 master copies; the plain loop does the
same (no autocast over fp32 weights). On cpu all variants train in fp32.

Each variant runs `warmup_steps` untimed steps, then `steps` timed ones, once per round (`rounds`);
the plain loops and the Ray variants take turns going first, and Ray is started for its turn and
stopped after it (unless it was running before), so the plain loops never share the cores with an
idle Ray. Every figure is the median round's (by samples/s), with the range over the rounds. Step
time includes the wait for the next batch; the data-wait share is that wait over the step time.
Peak memory is the training process's peak RSS on CPU, `torch.cuda.max_memory_allocated` on GPU.
Every process uses `threads` torch threads, so on a small machine the variants compete for the same
cores as they would in use.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from medfusion.bench.record import ratio_terms, ratios_of
from medfusion.config import (
    PRESETS,
    DataConfig,
    ModelConfig,
    PrepareConfig,
    SplitConfig,
    SynthConfig,
    TrainConfig,
    check,
)
from medfusion.loader import preset_values


@dataclass
class TrainBenchConfig:
    """`medfusion bench train`: Ray Train + DeepSpeed vs a plain PyTorch loop on the same model and data."""

    device: str = "cpu"
    """cpu, or cuda (one GPU per worker; peak GPU memory is reported)."""
    zero_stages: list[int] = field(default_factory=lambda: [2])
    """ZeRO stages measured with one Ray Train worker, one row each (e.g. 0,1,2,3)."""
    preset: str = ""
    """Model and data size preset; empty means tiny on cpu, small on cuda."""
    samples: int = 768
    """Training images generated for the benchmark dataset."""
    batch_size: int = 0
    """Batch size of every variant; 0 takes the preset's data.batch_size."""
    steps: int = 24
    """Optimizer steps timed per variant (after warmup_steps)."""
    rounds: int = 3
    """Rounds, each running every variant once, the plain loops and the Ray variants in alternating
    order (a slow minute of a shared machine then falls on both sides). Each figure is the median
    round's, with the range of samples/s over the rounds: single runs of 24 steps differ by 10-20%."""
    warmup_steps: int = 4
    """Steps run before timing starts (worker start-up, first batches, allocator)."""
    workers: int = 2
    """Workers of the multi-worker variant (c); 0 skips it (it also needs that many GPUs on cuda)."""
    threads: int = 1
    """Torch intra-op threads of every training process (the same for all variants)."""
    loader_workers: int = 0
    """DataLoader worker processes of the plain loop (b); 0 = one per core the training process does
    not use (1 to 8)."""
    data_uri: str = ""
    """Dataset root for the benchmark shards (default: s3://medfusion/bench/train on the local store)."""

    def __post_init__(self) -> None:
        check(self.device in ("cpu", "cuda"), "device", f"must be cpu or cuda, got {self.device!r}")
        check(
            bool(self.zero_stages) and all(s in (0, 1, 2, 3) for s in self.zero_stages),
            "zero_stages",
            f"must be a list of 0-3, got {self.zero_stages}",
        )
        check(
            not self.preset or self.preset in PRESETS,
            "preset",
            f"must be one of {', '.join(PRESETS)} or empty, got {self.preset!r}",
        )
        check(self.samples >= 64, "samples", f"must be >= 64, got {self.samples}")
        check(self.batch_size >= 0, "batch_size", f"must be >= 0 (0 = the preset's), got {self.batch_size}")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        check(self.loader_workers >= 0, "loader_workers", f"must be >= 0 (0 = automatic), got {self.loader_workers}")

    def resolved_loader_workers(self) -> int:
        """`loader_workers`, with 0 resolved to the cores left to decoding (at least 1, at most 8)."""
        return self.loader_workers or min(8, max(1, (os.cpu_count() or 1) - self.threads))


def _settings(cfg: TrainBenchConfig) -> tuple[str, ModelConfig, DataConfig]:
    preset = cfg.preset or ("small" if cfg.device == "cuda" else "tiny")
    data_values = preset_values(preset, "data")
    if cfg.batch_size:
        data_values["batch_size"] = cfg.batch_size
    return preset, ModelConfig(**preset_values(preset, "model")), DataConfig(**data_values)


def make_dataset(uri: str, samples: int, image_size: int, val: float = 0.0, seed: int = 3) -> None:
    """A synthetic dataset at `uri` (generated with `seed`): everything in train (the split that is
    streamed), or `val` of it held out for validation (what a sweep ranks trials on)."""
    from medfusion.data.prepare import run_prepare

    run_prepare(
        PrepareConfig(
            source="synthetic",
            output_uri=uri,
            overwrite=True,
            shard_size_mb=4.0,  # several shards, so Ray Data reads in parallel
            synth=SynthConfig(num_samples=samples, image_size=image_size, seed=seed),
            split=SplitConfig(val=val, test=0.0),
        )
    )


class _ShardBatches:
    """Full model batches of the train split, decoded in the DataLoader's worker processes: each
    worker reads every k-th shard, carries a shard's remainder into the next, and cycles until the
    loop stops asking (so every batch has `batch_size` rows, as the Ray path's)."""

    def __init__(self, info: Any, data_cfg: DataConfig) -> None:
        from medfusion.data.dataset import collate_kwargs

        self.uris = info.shard_uris("train")
        self.columns = info.model_columns
        self.kwargs = collate_kwargs(info, data_cfg)
        self.batch_size = data_cfg.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import pyarrow as pa
        import torch.utils.data

        from medfusion.data.batches import collate
        from medfusion.data.dataset import read_shard

        worker = torch.utils.data.get_worker_info()
        index, count = (worker.id, worker.num_workers) if worker else (0, 1)
        mine = self.uris[index::count]
        pending = None
        while mine:
            for uri in mine:
                table = read_shard(uri, self.columns)
                pending = table if pending is None else pa.concat_tables([pending, table])
                while pending.num_rows >= self.batch_size:
                    yield collate(pending.slice(0, self.batch_size).to_pydict(), **self.kwargs)
                    pending = pending.slice(self.batch_size)


def _plain_batches(info: Any, data_cfg: DataConfig, device: Any, args: dict[str, Any], count: int) -> Iterator[Any]:
    """`count` model batches on `device`: decoded into memory beforehand (`in_memory`), or streamed
    through a prefetching DataLoader with `loader_workers` processes."""
    import torch.utils.data

    from medfusion.data.dataset import iter_local_batches
    from medfusion.models import to_tensors

    if args["in_memory"]:
        cached = [
            to_tensors(b, device)
            for b in iter_local_batches(info, "train", data_cfg, limit=count * data_cfg.batch_size)
        ]
        yield from (cached[i % len(cached)] for i in range(count))
        return

    class Stream(torch.utils.data.IterableDataset):  # local: torch is not imported with this module
        def __iter__(self) -> Iterator[dict[str, Any]]:
            return iter(_ShardBatches(info, data_cfg))

    workers = args["loader_workers"]
    loader = torch.utils.data.DataLoader(
        Stream(),
        batch_size=None,  # the stream yields whole batches
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    for served, batch in enumerate(loader):
        if served >= count:
            return
        yield to_tensors(batch, device)


def _bf16_with_fp32_master(model: Any) -> list[Any]:
    """DeepSpeed's bf16 mode on the plain model: parameters cast to bf16 in place (buffers stay fp32),
    returned with fp32 master copies for the optimizer."""
    import torch

    master = []
    for param in model.parameters():
        master.append(torch.nn.Parameter(param.detach().clone().float()))
        param.data = param.data.to(torch.bfloat16)
    return master


def run_baseline(args: dict[str, Any]) -> dict[str, float]:
    """(b), in a fresh process: a plain PyTorch loop over a prefetching DataLoader (`in_memory`
    false) or over batches decoded before timing (the compute ceiling). With `precision` bf16 it
    holds bf16 weights and steps fp32 master weights, as DeepSpeed's bf16 mode does."""
    import torch

    from medfusion.data.dataset import open_dataset
    from medfusion.models import build_model
    from medfusion.training.engine import float_outputs

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    device = torch.device(args["device"])
    info = open_dataset(args["dataset_uri"])
    model_cfg, data_cfg = ModelConfig(**args["model"]), DataConfig(**args["data"])
    total = args["warmup_steps"] + args["steps"]
    model = build_model(model_cfg, len(info.tokenizer), len(info.classes)).to(device).train()
    params = list(model.parameters())
    bf16 = args["precision"] == "bf16"
    master = _bf16_with_fp32_master(model) if bf16 else params
    optimizer = torch.optim.AdamW(master, lr=1e-3, weight_decay=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = data_wait = 0.0
    samples = 0
    batches = _plain_batches(info, data_cfg, device, args, total)
    for step in range(total):
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        out = float_outputs(model(batch))
        loss, _ = model.loss(batch, out)
        loss.backward()
        if bf16:
            for weight, copy in zip(params, master):
                copy.grad = None if weight.grad is None else weight.grad.float()
        torch.nn.utils.clip_grad_norm_(master, args["clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if bf16:
            with torch.no_grad():
                for weight, copy in zip(params, master):
                    weight.copy_(copy)
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args["warmup_steps"]:
            timed += time.perf_counter() - start
            data_wait += fetched - start
            samples += len(batch["image"])
    batches.close()  # stops the DataLoader's workers
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "samples": samples,
        "seconds": timed,
        "data_wait_s": data_wait,
        "steps": args["steps"],
        "peak_memory_mib": peak,
    }


def _in_fresh_process(args: dict[str, Any]) -> dict[str, float]:
    """Run `run_baseline` in a new interpreter: its peak memory is its own, not this driver's."""
    code = (
        "import json, sys; from medfusion.bench.train import run_baseline; "
        "print(json.dumps(run_baseline(json.loads(sys.argv[1]))))"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"plain PyTorch baseline failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ray_variant(cfg: TrainBenchConfig, train: TrainConfig, info: Any) -> dict[str, float]:
    """(a)/(c): the production training loop in benchmark mode; global samples/s over all workers."""
    from medfusion.training.loop import TrainJob
    from medfusion.training.run import fit

    total = cfg.warmup_steps + cfg.steps
    job = TrainJob(
        train=asdict(train),
        run_uri=os.path.join(train.storage_uri, train.name),
        steps_per_epoch=total,
        micro_batches_per_epoch=total,
        threads=cfg.threads,
        bench={"warmup_steps": cfg.warmup_steps, "steps": cfg.steps},
    )
    out = fit(train, info, job)
    world = int(out["world_size"])
    return {
        "samples": out["timed_samples"] * world,  # every rank runs the same number of equal batches
        "seconds": out["timed_s"],
        "data_wait_s": out["data_wait_s"],
        "steps": cfg.steps,
        "peak_memory_mib": out["peak_memory_mib"],
    }


def _median_round(name: str, rounds: list[dict[str, float]]) -> dict[str, Any]:
    """The row of the round with the median samples/s (the lower middle one of an even count), and
    the range of samples/s over all rounds."""
    rows = sorted((_row(name, stats) for stats in rounds), key=lambda r: r["samples_per_s"])
    row = rows[(len(rows) - 1) // 2]
    return {**row, "range": [round(rows[0]["samples_per_s"], 2), round(rows[-1]["samples_per_s"], 2)]}


def _row(name: str, stats: dict[str, float]) -> dict[str, Any]:
    seconds = max(stats["seconds"], 1e-9)
    return {
        "name": name,
        "samples": stats["samples"],
        "samples_per_s": stats["samples"] / seconds,
        "step_time_ms": 1000 * seconds / max(stats["steps"], 1),
        "data_wait_share": stats["data_wait_s"] / seconds,
        "peak_memory_mib": stats["peak_memory_mib"],
    }


def run_train_bench(cfg: TrainBenchConfig, store_root: str | None = None) -> dict[str, Any]:
    """Run the variants, print a table, return the benchmark JSON object (DESIGN.md)."""
    import ray

    from medfusion.data.dataset import open_dataset

    use_gpu = cfg.device == "cuda"
    if use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda: no CUDA GPU is visible to this process")
        gpus = torch.cuda.device_count()
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before any DeepSpeed import, here and in workers
        gpus = 0
    started_store = None
    if not cfg.data_uri and not os.environ.get("AWS_ENDPOINT_URL"):
        from medfusion.store import DEFAULT_ROOT, Store

        store = Store(store_root or DEFAULT_ROOT)
        started_store = None if store.running() else store
        os.environ.update(store.up().env())
    preset, model_cfg, data_cfg = _settings(cfg)
    multi = cfg.workers >= 2 and (not use_gpu or gpus >= cfg.workers)
    widest = cfg.workers if multi else 1
    # Enough rows that the widest variant never runs out within one epoch.
    samples = max(cfg.samples, (cfg.warmup_steps + cfg.steps + 1) * data_cfg.batch_size * widest)
    data_uri = cfg.data_uri or "s3://medfusion/bench/train"
    make_dataset(data_uri, samples, data_cfg.image_size)
    info = open_dataset(data_uri)
    precision = "bf16" if use_gpu else "fp32"

    args = {
        "dataset_uri": data_uri,
        "model": asdict(model_cfg),
        "data": asdict(data_cfg),
        "threads": cfg.threads,
        "device": "cuda" if use_gpu else "cpu",
        "precision": precision,
        "clip": 1.0,
        "warmup_steps": cfg.warmup_steps,
        "steps": cfg.steps,
        # a worker without a shard of its own would only start up
        "loader_workers": min(cfg.resolved_loader_workers(), len(info.shard_uris("train"))),
    }
    storage_dir = tempfile.mkdtemp(prefix="medfusion-bench-train-")

    def train_cfg(workers: int, stage: int, reserve: float) -> TrainConfig:
        return TrainConfig(
            dataset_uri=data_uri,
            storage_uri=storage_dir,
            name=f"bench-{uuid.uuid4().hex[:8]}",
            model=model_cfg,
            data=data_cfg,
            epochs=1,
            zero_stage=stage,
            precision=precision,
            clip=1.0,
            num_workers=workers,
            cpus_per_worker=reserve,
            use_gpu=use_gpu,
            max_failures=0,
            shuffle_buffer=0,
            evaluate=False,
        )

    def plain_turn() -> dict[str, dict[str, float]]:
        return {
            "baseline": _in_fresh_process({**args, "in_memory": False}),
            "ceiling": _in_fresh_process({**args, "in_memory": True}),
        }

    def ray_turn() -> dict[str, dict[str, float]]:
        started_ray = False
        if not ray.is_initialized():
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, widest * cfg.threads + 1),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            started_ray = True
        # Ray Data's read/preprocess tasks need a free CPU; on a Ray that is already running with too
        # few, the workers reserve none and share the cores.
        reserve = float(cfg.threads) if ray.cluster_resources().get("CPU", 0) >= widest * cfg.threads + 1 else 0.0
        try:
            turn = {f"zero{s}": _ray_variant(cfg, train_cfg(1, s, reserve), info) for s in cfg.zero_stages}
            if multi:
                turn["two"] = _ray_variant(cfg, train_cfg(cfg.workers, cfg.zero_stages[0], reserve), info)
            return turn
        finally:
            if started_ray:
                ray.shutdown()

    measured: dict[str, list[dict[str, float]]] = {}
    try:
        for index in range(cfg.rounds):
            turns = (plain_turn, ray_turn) if index % 2 == 0 else (ray_turn, plain_turn)
            for turn in turns:
                for key, stats in turn().items():
                    measured.setdefault(key, []).append(stats)
    finally:
        shutil.rmtree(storage_dir, ignore_errors=True)  # benchmark runs write no checkpoints; only Ray's markers
        if started_store is not None:
            started_store.down()
    baseline = _median_round(f"(b) plain PyTorch loop, DataLoader x{args['loader_workers']}", measured["baseline"])
    ceiling = _median_round("(b') plain PyTorch loop, batches in memory", measured["ceiling"])
    stages = [
        _median_round(f"(a) Ray Train + DeepSpeed ZeRO-{s}, 1 worker", measured[f"zero{s}"]) for s in cfg.zero_stages
    ]
    two = (
        _median_round(f"(c) Ray Train + DeepSpeed ZeRO-{cfg.zero_stages[0]}, {cfg.workers} workers", measured["two"])
        if multi
        else None
    )

    memory_unit = "MiB (GPU, max allocated)" if use_gpu else "MiB (peak RSS)"
    rows = [baseline, ceiling, *stages, *([two] if two else [])]
    print(
        f"{'variant':<44}{'samples/s':>11}{'range':>16}{'step ms':>10}{'data wait':>11}"
        f"{'peak ' + ('GPU' if use_gpu else 'RSS') + ' MiB':>15}"
    )
    for r in rows:
        print(
            f"{r['name']:<44}{r['samples_per_s']:>11.1f}{'[{:.0f}, {:.0f}]'.format(*r['range']):>16}"
            f"{r['step_time_ms']:>10.1f}"
            f"{100 * r['data_wait_share']:>10.1f}%{r['peak_memory_mib']:>15.1f}"
        )

    figures: dict[str, dict[str, Any]] = {
        "plain_torch_prefetch_samples_per_s": {
            "value": round(baseline["samples_per_s"], 2),
            "unit": "samples/s",
            "range": baseline["range"],
        },
        "plain_torch_prefetch_samples": {"value": baseline["samples"], "unit": "samples"},
        "plain_torch_prefetch_peak_memory": {"value": round(baseline["peak_memory_mib"], 1), "unit": memory_unit},
        "plain_torch_prefetch_step_time": {"value": round(baseline["step_time_ms"], 2), "unit": "ms"},
        "plain_torch_prefetch_data_wait_share": {
            "value": round(baseline["data_wait_share"], 4),
            "unit": "fraction",
        },
        "plain_torch_in_memory_samples_per_s": {
            "value": round(ceiling["samples_per_s"], 2),
            "unit": "samples/s",
            "range": ceiling["range"],
        },
        "plain_torch_in_memory_samples": {"value": ceiling["samples"], "unit": "samples"},
        "plain_torch_in_memory_peak_memory": {"value": round(ceiling["peak_memory_mib"], 1), "unit": memory_unit},
        "plain_torch_in_memory_step_time": {"value": round(ceiling["step_time_ms"], 2), "unit": "ms"},
    }
    for stage, row in zip(cfg.zero_stages, stages):
        figures[f"ray_deepspeed_zero{stage}_1w_samples_per_s"] = {
            "value": round(row["samples_per_s"], 2),
            "unit": "samples/s",
            "range": row["range"],
        }
        figures[f"ray_deepspeed_zero{stage}_1w_samples"] = {"value": row["samples"], "unit": "samples"}
        figures[f"ray_deepspeed_zero{stage}_1w_step_time"] = {"value": round(row["step_time_ms"], 2), "unit": "ms"}
        figures[f"ray_deepspeed_zero{stage}_1w_peak_memory"] = {
            "value": round(row["peak_memory_mib"], 1),
            "unit": memory_unit,
        }
        figures[f"ray_deepspeed_zero{stage}_1w_data_wait_share"] = {
            "value": round(row["data_wait_share"], 4),
            "unit": "fraction",
        }
    one_worker = f"ray_deepspeed_zero{cfg.zero_stages[0]}_1w_samples_per_s"
    terms = {
        "ray_vs_plain_prefetch": (one_worker, "plain_torch_prefetch_samples_per_s"),
        "ray_vs_plain_in_memory": (one_worker, "plain_torch_in_memory_samples_per_s"),
    }
    if two is not None:
        figures[f"ray_deepspeed_{cfg.workers}w_samples_per_s"] = {
            "value": round(two["samples_per_s"], 2),
            "unit": "samples/s",
            "range": two["range"],
        }
        figures[f"ray_deepspeed_{cfg.workers}w_samples"] = {"value": two["samples"], "unit": "samples"}
        figures[f"ray_deepspeed_{cfg.workers}w_step_time"] = {"value": round(two["step_time_ms"], 2), "unit": "ms"}
        figures[f"ray_deepspeed_{cfg.workers}w_peak_memory"] = {
            "value": round(two["peak_memory_mib"], 1),
            "unit": memory_unit,
        }
        figures[f"ray_deepspeed_{cfg.workers}w_data_wait_share"] = {
            "value": round(two["data_wait_share"], 4),
            "unit": "fraction",
        }
        terms[f"ray_deepspeed_{cfg.workers}w_vs_1w"] = (f"ray_deepspeed_{cfg.workers}w_samples_per_s", one_worker)
    elif cfg.workers >= 2:
        print(f"(c) skipped: {cfg.workers} workers need {cfg.workers} GPUs, {gpus} visible")
    ratios = ratios_of(figures, terms)
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    config = {
        **asdict(cfg),
        "preset": preset,
        "batch_size": data_cfg.batch_size,
        "image_size": data_cfg.image_size,
        "samples": samples,
        "precision": precision,
        "loader_workers": args["loader_workers"],
        "cores": os.cpu_count(),
        "gpus": gpus,
    }
    return {"bench": "train", "config": config, "figures": figures, "ratios": ratios, "ratio_of": ratio_terms(terms)}
