"""`medfusion bench ingest`: the Ray Data pipeline vs a plain PyTorch DataLoader vs the decode ceiling.

All three do the same work per sample (PNG decode, resize, normalize, tokenize: `collate`) on the
same shards in the local S3 store, in one run, with the same number of decode processes
(`loader_workers`: Ray is started with that many CPUs):

(a) Ray Data: `stream_split` (`read_parquet` + `map_batches(preprocess_rows)`), streamed with `iter_batches`.
(b) A `torch.utils.data.DataLoader` with `loader_workers` persistent processes, each reading whole shards.
(c) The decode ceiling: a tight `collate` loop over shard rows already in memory, times processes.

The data: generated synthetic shards, or an existing dataset (`dataset_uri`, e.g. a `data ingest`
of real radiographs) whose split is streamed as many times over as it takes to reach `samples`.
The bench runs `rounds` rounds, each both pipelines in alternating order (a slow minute of a shared
machine then falls on both sides). In a round each pipeline is built once and run 1 + `passes` times,
as a training run does epochs: the first (cold) pass includes Ray's worker start and imports; the
throughput reported is the median of all rounds' warm passes, with their range (one pass of 2000
samples is about a second on 2 cores, and single passes differ by 20%, more than the gap measured).
Memory (round 0): peak RSS of the driver and every process it started (Ray's raylet and workers
included), in passes of their own streaming N and then 4N samples (the sampler's CPU stays out of the
throughput); bounded streaming keeps the two close.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from medfusion import storage
from medfusion.bench.record import ratio_terms, ratios_of
from medfusion.config import SPLITS, DataConfig, PrepareConfig, SplitConfig, SynthConfig, check


@dataclass
class IngestBenchConfig:
    """`medfusion bench ingest`: Ray Data vs a plain DataLoader vs the decode ceiling."""

    samples: int = 2000
    """N: samples streamed per pass (the RSS check also streams 4N); with dataset_uri, the split's
    rows times the passes over it that reach N."""
    data_uri: str = ""
    """Dataset root to write the synthetic shards to (default: s3://medfusion/bench/ingest on the local store)."""
    dataset_uri: str = ""
    """Bench this existing dataset (`data ingest`/`data synth` output) instead of generating synthetic shards."""
    split: str = "train"
    """dataset_uri: the split streamed."""
    batch_size: int = 64
    """Batch size of both pipelines."""
    image_size: int = 128
    """Model image side (and the stored side of the synthetic shards)."""
    loader_workers: int = 2
    """Decode processes of each pipeline: the DataLoader's workers, Ray's CPUs."""
    shard_size_mb: float = 8.0
    """Shard size of the generated dataset (small so that there are several shards to parallelize)."""
    rounds: int = 3
    """Rounds, each running both pipelines from cold (Ray started anew), in alternating order, so that
    a slow minute of a shared machine falls on both sides."""
    passes: int = 3
    """Warm passes of N samples per pipeline and round, after its cold one. Throughput and first
    batches are medians over the rounds' passes (a pass of 2000 samples takes about a second on 2
    cores, and single passes of one pipeline differ by 20%)."""

    def __post_init__(self) -> None:
        check(self.samples >= 64, "samples", f"must be >= 64, got {self.samples}")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.loader_workers >= 1, "loader_workers", f"must be >= 1, got {self.loader_workers}")
        check(self.passes >= 1, "passes", f"must be >= 1, got {self.passes}")
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(self.split in SPLITS, "split", f"must be one of {', '.join(SPLITS)}, got {self.split!r}")


class _RssSampler:
    """Peak resident memory of this process and all its descendants, sampled every 200 ms."""

    def __init__(self) -> None:
        import psutil

        self._root = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.2)

    def __enter__(self) -> _RssSampler:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _make_dataset(uri: str, samples: int, cfg: IngestBenchConfig) -> None:
    from medfusion.data.prepare import run_prepare

    prepare = PrepareConfig(
        source="synthetic",
        output_uri=uri,
        overwrite=True,
        shard_size_mb=cfg.shard_size_mb,
        synth=SynthConfig(num_samples=samples, image_size=cfg.image_size, seed=1),
        split=SplitConfig(val=0.0, test=0.0),  # every sample in one split: the one streamed
    )
    run_prepare(prepare, show_progress=True)


def _repeated(info, split: str, times: int):
    """`info` with `split` listing its shards `times` over: N and 4N samples from one dataset."""
    manifest = copy.deepcopy(info.manifest)
    entry = manifest["splits"][split]
    entry["shards"] = entry["shards"] * times
    entry["rows"] = entry["rows"] * times
    return dataclasses.replace(info, manifest=manifest)


def _stream(batches, start: float) -> dict[str, float]:
    """Drain `batches`: samples, seconds and time to the first batch, all from `start`."""
    first = None
    count = 0
    for batch in batches:
        if first is None:
            first = time.perf_counter() - start
        count += len(batch["image"])
    elapsed = time.perf_counter() - start
    return {"samples": count, "seconds": elapsed, "first_batch_s": first or elapsed}


def _ray_data(info, split: str, data_cfg: DataConfig, passes: int) -> list[dict[str, float]]:
    """`passes` passes over one `stream_split` pipeline (built in the first)."""
    from medfusion.data.dataset import stream_split

    results = []
    ds = None
    for _ in range(passes):
        start = time.perf_counter()
        ds = ds if ds is not None else stream_split(info, split, data_cfg)
        results.append(
            _stream(ds.iter_batches(batch_size=data_cfg.batch_size, prefetch_batches=data_cfg.columns_prefetch), start)
        )
    return results


def _ray_data_peak_rss(info, split: str, data_cfg: DataConfig) -> dict[str, float]:
    """A pass of its own with the RSS sampler, so that no throughput pass pays for the sampling (a
    thread in the consumer's process that walks Ray's whole process tree every 200 ms)."""
    with _RssSampler() as rss:
        (result,) = _ray_data(info, split, data_cfg, passes=1)
    return {**result, "peak_rss": rss.peak}


class _ShardStream:
    """An IterableDataset over shard URIs: each DataLoader worker takes every k-th shard."""

    def __init__(self, info, split: str, data_cfg: DataConfig) -> None:
        from medfusion.data.dataset import collate_kwargs

        self.uris = info.shard_uris(split)
        self.kwargs = collate_kwargs(info, data_cfg)
        self.batch_size = data_cfg.batch_size

    def __iter__(self):
        import pyarrow.parquet as pq
        import torch.utils.data

        from medfusion.data.batches import collate
        from medfusion.data.dataset import MODEL_COLUMNS

        worker = torch.utils.data.get_worker_info()
        index, count = (worker.id, worker.num_workers) if worker else (0, 1)
        for uri in self.uris[index::count]:
            fs, path = storage.filesystem(uri)
            for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(
                batch_size=self.batch_size, columns=MODEL_COLUMNS
            ):
                yield collate(batch.to_pydict(), **self.kwargs)


def _dataloader(info, split: str, data_cfg: DataConfig, workers: int, passes: int) -> list[dict[str, float]]:
    """`passes` passes (epochs) over one DataLoader, built in the first."""
    import torch.utils.data

    class _Iterable(torch.utils.data.IterableDataset):
        def __init__(self, stream: _ShardStream) -> None:
            self.stream = stream

        def __iter__(self):
            return iter(self.stream)

    results = []
    loader = None
    for _ in range(passes):
        start = time.perf_counter()
        loader = (
            loader
            if loader is not None
            # Persistent workers: the strongest plain baseline, its decode processes kept from pass
            # to pass as Ray keeps its workers (without, each warm pass would start them anew).
            else torch.utils.data.DataLoader(
                _Iterable(_ShardStream(info, split, data_cfg)),
                batch_size=None,
                num_workers=workers,
                prefetch_factor=2,
                persistent_workers=True,
            )
        )
        results.append(_stream(loader, start))
    return results


def _ray_round(
    info_n, info_4n, split: str, data_cfg: DataConfig, cfg: IngestBenchConfig, rss: bool
) -> tuple[list[dict[str, float]], dict[str, float] | None, dict[str, float] | None]:
    """One round of (a): a new local Ray, its cold pass and `cfg.passes` warm ones, and with `rss` the
    N and 4N passes under the RSS sampler."""
    import ray

    from medfusion.data.dataset import quiet_ray_data

    # address="local": a new embedded Ray even when `ray start` left a cluster on this machine. As
    # many CPUs as the DataLoader has workers: the same number of decode processes on each side.
    ray.init(
        address="local",
        num_cpus=cfg.loader_workers,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        ignore_reinit_error=True,
    )
    quiet_ray_data()
    try:
        passes = _ray_data(info_n, split, data_cfg, passes=1 + cfg.passes)
        if not rss:
            return passes, None, None
        return passes, _ray_data_peak_rss(info_n, split, data_cfg), _ray_data_peak_rss(info_4n, split, data_cfg)
    finally:
        ray.shutdown()


def _warm(passes: list[dict[str, float]]) -> dict[str, Any]:
    """The passes' median throughput and first batch, the throughput's range, and the fewest samples
    any pass read (every pass reads all N)."""
    rates = [p["samples"] / p["seconds"] for p in passes]
    return {
        "samples_per_s": statistics.median(rates),
        "range": [round(min(rates), 1), round(max(rates), 1)],
        "first_batch_s": statistics.median(p["first_batch_s"] for p in passes),
        "samples": min(p["samples"] for p in passes),
    }


def _decode_ceiling(info, split: str, data_cfg: DataConfig, limit: int) -> dict[str, float]:
    import pyarrow.parquet as pq

    from medfusion.data.batches import collate
    from medfusion.data.dataset import MODEL_COLUMNS, collate_kwargs

    rows: dict[str, list] = {c: [] for c in MODEL_COLUMNS}
    for uri in info.shard_uris(split):
        fs, path = storage.filesystem(uri)
        table = pq.read_table(path, columns=MODEL_COLUMNS, filesystem=fs).to_pydict()
        for c in MODEL_COLUMNS:
            rows[c].extend(table[c])
        if len(rows["image"]) >= limit:
            break
    rows = {c: v[:limit] for c, v in rows.items()}
    kwargs = collate_kwargs(info, data_cfg)
    n = len(rows["image"])
    start = time.perf_counter()
    for i in range(0, n, data_cfg.batch_size):
        collate({c: v[i : i + data_cfg.batch_size] for c, v in rows.items()}, **kwargs)
    elapsed = time.perf_counter() - start
    return {"samples": n, "seconds": elapsed}


def _datasets(cfg: IngestBenchConfig):
    """(N-sample info, 4N-sample info, split, the `dataset` field of the record)."""
    from medfusion.data.dataset import open_dataset

    if cfg.dataset_uri:
        base, split = open_dataset(cfg.dataset_uri), cfg.split
        if not base.rows(split):
            raise ValueError(f"dataset_uri: {cfg.dataset_uri} has no rows in split {split!r}")
        repeats = math.ceil(cfg.samples / base.rows(split))
        described = {"uri": cfg.dataset_uri, "source": base.manifest.get("source", {}).get("type")}
    else:
        base_uri = cfg.data_uri or "s3://medfusion/bench/ingest"
        uri = f"{base_uri}/n{cfg.samples}"
        _make_dataset(uri, cfg.samples, cfg)
        base, split, repeats = open_dataset(uri), "train", 1
        described = {"uri": uri, "source": "synthetic"}
    described.update(
        version=base.version,
        split=split,
        rows=base.rows(split),
        shards=len(base.shard_uris(split)),
        passes_per_n=repeats,
    )
    return _repeated(base, split, repeats), _repeated(base, split, 4 * repeats), split, described


def run_ingest_bench(cfg: IngestBenchConfig, store_root: str | None = None) -> dict[str, Any]:
    """Run the three measurements and return the benchmark JSON object (DESIGN.md)."""
    started_store = None
    if not cfg.data_uri and not os.environ.get("AWS_ENDPOINT_URL"):
        from medfusion.store import DEFAULT_ROOT, Store

        store = Store(store_root or DEFAULT_ROOT)
        started_store = None if store.running() else store
        os.environ.update(store.up().env())
    processes = cfg.loader_workers
    data_cfg = DataConfig(image_size=cfg.image_size, batch_size=cfg.batch_size)
    info_n, info_4n, split, dataset = _datasets(cfg)

    ray_passes: list[list[dict[str, float]]] = []
    loader_passes: list[list[dict[str, float]]] = []
    ray_data_n = ray_data_4n = None
    for index in range(cfg.rounds):
        for side in ("ray", "loader") if index % 2 == 0 else ("loader", "ray"):
            if side == "loader":
                loader_passes.append(_dataloader(info_n, split, data_cfg, processes, passes=1 + cfg.passes))
                continue
            passes, rss_n, rss_4n = _ray_round(info_n, info_4n, split, data_cfg, cfg, rss=index == 0)
            ray_passes.append(passes)
            ray_data_n, ray_data_4n = rss_n or ray_data_n, rss_4n or ray_data_4n
    assert ray_data_n is not None and ray_data_4n is not None  # measured in round 0
    ray_cold, loader_cold = _warm([p[0] for p in ray_passes]), _warm([p[0] for p in loader_passes])
    ray_data, loader = _warm([p for r in ray_passes for p in r[1:]]), _warm([p for r in loader_passes for p in r[1:]])
    ceiling_one = _decode_ceiling(info_n, split, data_cfg, limit=min(info_n.rows(split), 1000))

    a, b = ray_data["samples_per_s"], loader["samples_per_s"]
    c = ceiling_one["samples"] / ceiling_one["seconds"] * processes
    mib = 2**20
    figures = {
        # Medians of the warm passes, with their range.
        "ray_data_samples_per_s": {"value": round(a, 1), "unit": "samples/s", "range": ray_data["range"]},
        "dataloader_samples_per_s": {"value": round(b, 1), "unit": "samples/s", "range": loader["range"]},
        "decode_ceiling_samples_per_s": {"value": round(c, 1), "unit": "samples/s"},
        "ray_data_first_batch_s": {"value": round(ray_data["first_batch_s"], 3), "unit": "s"},
        "ray_data_cold_first_batch_s": {"value": round(ray_cold["first_batch_s"], 3), "unit": "s"},
        "dataloader_first_batch_s": {"value": round(loader["first_batch_s"], 3), "unit": "s"},
        "dataloader_cold_first_batch_s": {"value": round(loader_cold["first_batch_s"], 3), "unit": "s"},
        "ray_data_cold_samples_per_s": {"value": round(ray_cold["samples_per_s"], 1), "unit": "samples/s"},
        "dataloader_cold_samples_per_s": {"value": round(loader_cold["samples_per_s"], 1), "unit": "samples/s"},
        "ray_data_peak_rss_n": {"value": round(ray_data_n["peak_rss"] / mib, 1), "unit": "MiB"},
        "ray_data_peak_rss_4n": {"value": round(ray_data_4n["peak_rss"] / mib, 1), "unit": "MiB"},
        # What each pass read: (a) and (b) the same N samples cold and in every warm pass (and (a) N and
        # 4N for the RSS), (c) at most 1000 of them.
        "ray_data_samples": {"value": ray_data["samples"], "unit": "samples"},
        "ray_data_cold_samples": {"value": ray_cold["samples"], "unit": "samples"},
        "ray_data_rss_n_samples": {"value": ray_data_n["samples"], "unit": "samples"},
        "ray_data_4n_samples": {"value": ray_data_4n["samples"], "unit": "samples"},
        "dataloader_samples": {"value": loader["samples"], "unit": "samples"},
        "dataloader_cold_samples": {"value": loader_cold["samples"], "unit": "samples"},
        "decode_ceiling_samples": {"value": ceiling_one["samples"], "unit": "samples"},
    }
    terms = {
        "ray_data_vs_dataloader": ("ray_data_samples_per_s", "dataloader_samples_per_s"),
        "ray_data_vs_decode_ceiling": ("ray_data_samples_per_s", "decode_ceiling_samples_per_s"),
        "rss_4n_vs_n": ("ray_data_peak_rss_4n", "ray_data_peak_rss_n"),
    }
    ratios = ratios_of(figures, terms)
    print(
        f"dataset {dataset['uri']} ({dataset['source']}), split {split}: {info_n.rows(split)} samples per pass; "
        f"medians of {cfg.rounds} rounds: cold passes, and {cfg.passes} warm passes per round [range]"
    )
    print(f"{'pipeline':<28}{'samples/s':>12}{'range':>18}{'cold first s':>14}{'warm first s':>14}{'peak RSS MiB':>14}")
    spread = {name: "[{:.0f}, {:.0f}]".format(*side["range"]) for name, side in (("a", ray_data), ("b", loader))}
    print(
        f"{'(a) Ray Data':<28}{a:>12.1f}{spread['a']:>18}"
        f"{ray_cold['first_batch_s']:>14.3f}"
        f"{ray_data['first_batch_s']:>14.3f}{ray_data_n['peak_rss'] / mib:>14.1f}"
    )
    print(
        f"{'(a) Ray Data, 4N':<28}{ray_data_4n['samples'] / ray_data_4n['seconds']:>12.1f}{'':>18}{'':>14}"
        f"{ray_data_4n['first_batch_s']:>14.3f}{ray_data_4n['peak_rss'] / mib:>14.1f}"
    )
    print(
        f"{f'(b) DataLoader x{processes}':<28}{b:>12.1f}{spread['b']:>18}"
        f"{loader_cold['first_batch_s']:>14.3f}"
        f"{loader['first_batch_s']:>14.3f}"
    )
    print(f"{f'(c) decode ceiling x{processes}':<28}{c:>12.1f}")
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    if started_store is not None:
        started_store.down()
    return {
        "bench": "ingest",
        "config": {**asdict(cfg), "cores": os.cpu_count() or 1, "decode_processes": processes},
        "dataset": dataset,
        "figures": figures,
        "ratios": ratios,
        "ratio_of": ratio_terms(terms),
    }
