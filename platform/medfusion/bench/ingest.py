"""`medfusion bench ingest`: the Ray Data pipeline vs a plain PyTorch DataLoader vs the decode ceiling.

All three do the same work per sample (PNG decode, resize, normalize, tokenize: `collate`) on the
same shards in the local S3 store, in one run:

(a) Ray Data: `read_parquet` + `map_batches(preprocess_rows)`, streamed with `iter_batches`.
(b) A `torch.utils.data.DataLoader` with `loader_workers` processes, each reading whole shards.
(c) The decode ceiling: a tight `preprocess` loop over image bytes already in memory, times cores.

Memory: peak RSS of the driver and every process it started (Ray's raylet and workers included),
streaming N and then 4N samples; bounded streaming keeps the two close.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from medfusion import storage
from medfusion.bench.record import ratio_terms, ratios_of
from medfusion.config import DataConfig, PrepareConfig, SplitConfig, SynthConfig, check


@dataclass
class IngestBenchConfig:
    """`medfusion bench ingest`: Ray Data vs a plain DataLoader vs the decode ceiling."""

    samples: int = 2000
    """N: samples in the dataset measured (the RSS check also streams 4N)."""
    data_uri: str = ""
    """Dataset root to write the benchmark shards to (default: s3://medfusion/bench/ingest on the local store)."""
    batch_size: int = 64
    """Batch size of both pipelines."""
    image_size: int = 128
    """Stored and model image side."""
    loader_workers: int = 2
    """Worker processes of the baseline DataLoader."""
    shard_size_mb: float = 8.0
    """Shard size of the generated dataset (small so that there are several shards to parallelize)."""

    def __post_init__(self) -> None:
        check(self.samples >= 64, "samples", f"must be >= 64, got {self.samples}")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


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


def _ray_data(info, data_cfg: DataConfig) -> dict[str, float]:
    from medfusion.data.dataset import stream_split

    start = time.perf_counter()
    first = None
    count = 0
    with _RssSampler() as rss:
        ds = stream_split(info, "train", data_cfg)
        for batch in ds.iter_batches(batch_size=data_cfg.batch_size, prefetch_batches=data_cfg.columns_prefetch):
            if first is None:
                first = time.perf_counter() - start
            count += len(batch["image"])
    elapsed = time.perf_counter() - start
    return {"samples": count, "seconds": elapsed, "first_batch_s": first or elapsed, "peak_rss": rss.peak}


class _ShardStream:
    """An IterableDataset over shard URIs: each DataLoader worker takes every k-th shard."""

    def __init__(self, info, data_cfg: DataConfig) -> None:
        from medfusion.data.dataset import collate_kwargs

        self.uris = info.shard_uris("train")
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


def _dataloader(info, data_cfg: DataConfig, workers: int) -> dict[str, float]:
    import torch.utils.data

    class _Iterable(torch.utils.data.IterableDataset):
        def __init__(self, stream: _ShardStream) -> None:
            self.stream = stream

        def __iter__(self):
            return iter(self.stream)

    loader = torch.utils.data.DataLoader(
        _Iterable(_ShardStream(info, data_cfg)), batch_size=None, num_workers=workers, prefetch_factor=2
    )
    start = time.perf_counter()
    first = None
    count = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        count += len(batch["image"])
    elapsed = time.perf_counter() - start
    return {"samples": count, "seconds": elapsed, "first_batch_s": first or elapsed}


def _decode_ceiling(info, data_cfg: DataConfig, limit: int) -> dict[str, float]:
    import pyarrow.parquet as pq

    from medfusion.data.batches import collate
    from medfusion.data.dataset import MODEL_COLUMNS, collate_kwargs

    rows: dict[str, list] = {c: [] for c in MODEL_COLUMNS}
    for uri in info.shard_uris("train"):
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


def run_ingest_bench(cfg: IngestBenchConfig, store_root: str | None = None) -> dict[str, Any]:
    """Run the three measurements and return the benchmark JSON object (DESIGN.md)."""
    import ray

    from medfusion.data.dataset import open_dataset, quiet_ray_data

    started_store = None
    if not cfg.data_uri and not os.environ.get("AWS_ENDPOINT_URL"):
        from medfusion.store import DEFAULT_ROOT, Store

        store = Store(store_root or DEFAULT_ROOT)
        started_store = None if store.running() else store
        os.environ.update(store.up().env())
    base_uri = cfg.data_uri or "s3://medfusion/bench/ingest"
    cores = os.cpu_count() or 1
    data_cfg = DataConfig(image_size=cfg.image_size, batch_size=cfg.batch_size)

    uris = {n: f"{base_uri}/n{n}" for n in (cfg.samples, 4 * cfg.samples)}
    for n, uri in uris.items():
        _make_dataset(uri, n, cfg)
    info_n, info_4n = open_dataset(uris[cfg.samples]), open_dataset(uris[4 * cfg.samples])

    # address="local": a new embedded Ray even when `ray start` left a cluster on this machine.
    ray.init(
        address="local",
        num_cpus=cores,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        ignore_reinit_error=True,
    )
    quiet_ray_data()
    try:
        ray_data_warm = _ray_data(info_n, data_cfg)  # warm-up: worker start, imports
        ray_data = _ray_data(info_n, data_cfg)
        ray_data_4n = _ray_data(info_4n, data_cfg)
    finally:
        ray.shutdown()
    with _RssSampler():
        loader = _dataloader(info_n, data_cfg, cfg.loader_workers)
    ceiling_one_core = _decode_ceiling(info_n, data_cfg, limit=min(cfg.samples, 1000))

    a = ray_data["samples"] / ray_data["seconds"]
    b = loader["samples"] / loader["seconds"]
    c = ceiling_one_core["samples"] / ceiling_one_core["seconds"] * cores
    mib = 2**20
    figures = {
        "ray_data_samples_per_s": {"value": round(a, 1), "unit": "samples/s"},
        "dataloader_samples_per_s": {"value": round(b, 1), "unit": "samples/s"},
        "decode_ceiling_samples_per_s": {"value": round(c, 1), "unit": "samples/s"},
        "ray_data_first_batch_s": {"value": round(ray_data["first_batch_s"], 3), "unit": "s"},
        "ray_data_cold_first_batch_s": {"value": round(ray_data_warm["first_batch_s"], 3), "unit": "s"},
        "dataloader_first_batch_s": {"value": round(loader["first_batch_s"], 3), "unit": "s"},
        "ray_data_peak_rss_n": {"value": round(ray_data["peak_rss"] / mib, 1), "unit": "MiB"},
        "ray_data_peak_rss_4n": {"value": round(ray_data_4n["peak_rss"] / mib, 1), "unit": "MiB"},
        # What each pipeline read: (a) and (b) the same N samples, (c) at most 1000 of them.
        "ray_data_samples": {"value": ray_data["samples"], "unit": "samples"},
        "ray_data_4n_samples": {"value": ray_data_4n["samples"], "unit": "samples"},
        "dataloader_samples": {"value": loader["samples"], "unit": "samples"},
        "decode_ceiling_samples": {"value": ceiling_one_core["samples"], "unit": "samples"},
    }
    terms = {
        "ray_data_vs_dataloader": ("ray_data_samples_per_s", "dataloader_samples_per_s"),
        "ray_data_vs_decode_ceiling": ("ray_data_samples_per_s", "decode_ceiling_samples_per_s"),
        "rss_4n_vs_n": ("ray_data_peak_rss_4n", "ray_data_peak_rss_n"),
    }
    ratios = ratios_of(figures, terms)
    print(f"{'pipeline':<28}{'samples/s':>12}{'first batch s':>15}{'peak RSS MiB':>14}")
    print(f"{'(a) Ray Data':<28}{a:>12.1f}{ray_data['first_batch_s']:>15.3f}{ray_data['peak_rss'] / mib:>14.1f}")
    print(
        f"{'(a) Ray Data, 4N':<28}{ray_data_4n['samples'] / ray_data_4n['seconds']:>12.1f}"
        f"{ray_data_4n['first_batch_s']:>15.3f}{ray_data_4n['peak_rss'] / mib:>14.1f}"
    )
    print(f"{f'(b) DataLoader x{cfg.loader_workers}':<28}{b:>12.1f}{loader['first_batch_s']:>15.3f}{'':>14}")
    print(f"{f'(c) decode ceiling x{cores}':<28}{c:>12.1f}")
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    if started_store is not None:
        started_store.down()
    return {
        "bench": "ingest",
        "config": {**asdict(cfg), "cores": cores},
        "figures": figures,
        "ratios": ratios,
        "ratio_of": ratio_terms(terms),
    }
