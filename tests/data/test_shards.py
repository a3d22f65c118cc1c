"""Shards and manifest on the real S3 server, read back through Ray Data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import ray.data

from medfusion import storage
from medfusion.config import DataConfig, PrepareConfig, SynthConfig
from medfusion.data import dataset as dataset_module
from medfusion.data.backoff import IdleBackoff
from medfusion.data.batches import row_nbytes
from medfusion.data.dataset import (
    DatasetError,
    block_rows,
    iter_local_batches,
    open_dataset,
    stream_split,
    verify_dataset,
)
from medfusion.data.metadata import PREFETCH_ENV
from medfusion.data.prepare import run_prepare
from medfusion.data.shards import DatasetExistsError, assign_split

pytestmark = pytest.mark.integration

DATA = DataConfig(image_size=32, batch_size=16, max_report_tokens=32, max_findings_tokens=32)


def _prepare(uri, n=160, **kw):
    cfg = PrepareConfig(
        source="synthetic",
        output_uri=uri,
        shard_size_mb=0.05,
        synth=SynthConfig(num_samples=n, image_size=32, seed=3),
        **kw,
    )
    return run_prepare(cfg)


@pytest.fixture(scope="module")
def dataset(s3_store):
    uri = f"s3://{s3_store.state().bucket}/shards-module/ds"
    result = _prepare(uri)
    return uri, result


def test_manifest_counts_checksums_and_version(dataset):
    uri, result = dataset
    info = open_dataset(uri, verify=True)
    assert info.version == result.version and len(info.version) == 16
    assert sum(result.rows.values()) == 160
    assert all(result.rows[s] > 0 for s in ("train", "val", "test"))
    shards = [s for v in info.manifest["splits"].values() for s in v["shards"]]
    assert len(shards) > 3, "shard_size_mb=0.05 should give several shards"
    assert {s["path"].split("/")[0] for s in shards} == {"train", "val", "test"}
    assert all(s["path"].endswith(".parquet") and len(s["sha256"]) == 64 for s in shards)
    assert info.manifest["source"]["type"] == "synthetic"
    assert info.classes == SynthConfig().classes


def test_splits_are_by_patient(dataset):
    uri, _ = dataset
    info = open_dataset(uri)
    patients = {}
    for split in ("train", "val", "test"):
        for batch in iter_local_batches(info, split, DATA, extra_columns=("patient_id",)):
            for pid in batch["patient_id"]:
                patients.setdefault(pid, set()).add(split)
    assert all(len(s) == 1 for s in patients.values()), "a patient appears in two splits"


def test_tokenizer_is_built_from_the_training_split_only(s3_prefix):
    # Patients in val/test only: a word that occurs only there must map to <unk>.
    uri = s3_prefix + "/tok"
    _prepare(uri, n=120)
    info = open_dataset(uri)
    train_words = set()
    for batch in iter_local_batches(info, "train", DATA, extra_columns=("report", "findings")):
        for text in list(batch["report"]) + list(batch["findings"]):
            train_words.update(__import__("medfusion.data.tokenizer", fromlist=["x"]).split_words(str(text)))
    assert set(info.tokenizer.vocab[4:]) == train_words


def test_ray_data_streams_every_row_as_model_batches(dataset, ray_local):
    uri, result = dataset
    info = open_dataset(uri)
    seen = 0
    for batch in stream_split(info, "train", DATA).iter_batches(batch_size=16):
        assert (
            batch["image"].shape[1:] == (1, 32, 32) and batch["image"].dtype == np.uint8
        )  # grey levels: to_tensors normalizes
        assert batch["report_ids"].shape[1] == 32 and batch["labels"].shape[1] == len(info.classes)
        assert np.allclose(batch["labels"].sum(1), 1.0)
        assert set(np.unique(batch["has_box"])) <= {0.0, 1.0}
        seen += len(batch["image"])
    assert seen == result.rows["train"]


def test_ray_data_batches_hold_what_local_batches_hold(dataset, ray_local):
    """The fused read+decode tasks give every sample the arrays `iter_local_batches` gives it."""
    uri, _ = dataset
    info = open_dataset(uri)
    ds = stream_split(info, "train", DATA, extra_columns=("sample_id",))
    ray_rows, local_rows = {}, {}
    for rows, batches in (
        (ray_rows, ds.iter_batches(batch_size=DATA.batch_size)),
        (local_rows, iter_local_batches(info, "train", DATA, extra_columns=("sample_id",))),
    ):
        for batch in batches:
            for i, sample_id in enumerate(batch["sample_id"]):
                rows[str(sample_id)] = {k: batch[k][i] for k in ("image", "report_ids", "findings_ids", "class_boxes")}
    assert ray_rows.keys() == local_rows.keys()
    for sample_id, arrays in local_rows.items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(ray_rows[sample_id][key], value, err_msg=f"{sample_id} {key}")


def test_blocks_hold_block_rows_rounded_up_to_whole_batches(s3_prefix, ray_local, monkeypatch):
    uri = s3_prefix + "/blocks"
    cfg = PrepareConfig(
        source="synthetic",
        output_uri=uri,
        shard_size_mb=4.0,  # the whole train split in one shard: its blocks are the only cut
        synth=SynthConfig(num_samples=200, image_size=32, seed=3),
    )
    result = run_prepare(cfg)
    info = open_dataset(uri)
    assert len(info.shard_uris("train")) == 1
    data = DataConfig(image_size=32, batch_size=16, block_rows=40, max_report_tokens=32, max_findings_tokens=32)
    assert block_rows(info, "train", data) == 48  # 40 rounded up to 3 batches of 16
    sizes = [
        m.num_rows for bundle in stream_split(info, "train", data).iter_internal_ref_bundles() for m in bundle.metadata
    ]
    rows = result.rows["train"]
    assert sizes == [48] * (rows // 48) + ([rows % 48] if rows % 48 else []), sizes
    # Too many bytes for block_rows: as many whole batches as fit, and never less than one.
    row = dataset_module._row_bytes(info, "train", data)
    monkeypatch.setattr(dataset_module, "MAX_BLOCK_BYTES", int(row * 16 * 2.5))
    assert block_rows(info, "train", data) == 32
    monkeypatch.setattr(dataset_module, "MAX_BLOCK_BYTES", 1)
    assert block_rows(info, "train", data) == 16


BUDGET = 2 * 2**20
"""Object store bytes the held-back executor may use (`_coordinator_share_over_slow_consumers`)."""
MAX_RESTING_SHARE = 0.15
"""The most of a core the resting scheduling loop may use while it is held back."""


def _coordinator_share_over_slow_consumers(ds, batch_size: int) -> float:
    """The share of a core used by the SplitCoordinator (the actor that runs a streaming_split's
    executor, as for Ray Train's workers) from both consumers' first batch to their last, taking 0.2 s per batch:
    the decode tasks are far ahead of them, so the executor is held back by backpressure."""
    # A small object store budget, as a training epoch's decoded blocks fill a real one.
    ds.context.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=BUDGET)
    before = {p.pid for p in _coordinators()}
    parts = ds.streaming_split(2, equal=True)
    counts = [0, 0]
    started = threading.Barrier(3)

    def consume(i):
        for n, batch in enumerate(parts[i].iter_batches(batch_size=batch_size, prefetch_batches=0)):
            if n == 0:
                started.wait(timeout=120)
            counts[i] += len(batch["image"])
            time.sleep(0.2)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    started.wait(timeout=120)
    new = [p for p in _coordinators() if p.pid not in before]
    assert len(new) == 1, f"expected one new SplitCoordinator process, found {len(new)}"
    start, wall = sum(new[0].cpu_times()[:2]), time.monotonic()
    for t in threads:
        t.join(timeout=300)
    assert counts[0] == counts[1] > 10 * batch_size
    return (sum(new[0].cpu_times()[:2]) - start) / (time.monotonic() - wall)


def _coordinators() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if (p.info["cmdline"] or [""])[0].startswith("ray::SplitCoordinator"):
            found.append(p)
    return found


def test_the_scheduling_loop_rests_while_held_back(s3_prefix, ray_local):
    """Ray's streaming executor spins while backpressure holds it behind slow consumers
    (medfusion.data.backoff): stream_split's IdleBackoff makes it sleep instead."""
    uri = s3_prefix + "/backoff"
    synth = SynthConfig(num_samples=1200, image_size=128, seed=3)
    run_prepare(PrepareConfig(source="synthetic", output_uri=uri, shard_size_mb=1.0, synth=synth))
    info = open_dataset(uri)
    data = DataConfig(image_size=128, batch_size=16, block_rows=16, max_report_tokens=32, max_findings_tokens=32)
    # The decoded train split must far outgrow the 2 MiB object-store budget, or the executor decodes it
    # all, finishes and never waits on the consumers (at 32 px the whole split fit in it, and a CI run
    # measured no spin at all).
    assert info.rows("train") * row_nbytes(128, 32, 32, len(info.classes)) > 5 * BUDGET
    resting = _coordinator_share_over_slow_consumers(stream_split(info, "train", data), data.batch_size)
    spinning_ds = stream_split(info, "train", data)  # Ray's own loop: no rest
    spinning_ds.context.custom_execution_callback_classes = [
        c for c in spinning_ds.context.custom_execution_callback_classes if c is not IdleBackoff
    ]
    spinning = _coordinator_share_over_slow_consumers(spinning_ds, data.batch_size)
    # Alone, Ray's loop took 0.35-0.60 of a core here and the resting one 0.06-0.09. In a whole CI run,
    # where other processes share the cores, the spin got only 0.13 (resting 0.08): so a bound on the
    # resting share, which a loop without the rest exceeds whenever it has the CPU to spin on.
    share = f"coordinator's share of a core: resting {resting:.3f}, spinning {spinning:.3f}"
    assert resting < MAX_RESTING_SHARE and resting < spinning, share


# The thread of Ray's default metadata fetcher (ray/data/_internal/execution/metadata_fetcher.py).
PREFETCH_THREAD = "ray-data-metadata-prefetch"


@pytest.mark.parametrize("env, prefetch_thread", [(None, False), ("1", True)], ids=["default", "env-set"])
def test_blocks_are_handed_over_inline_unless_ray_is_told_otherwise(
    dataset, ray_local, monkeypatch, env, prefetch_thread
):
    """stream_split's executions emit each block as its task yields it (medfusion.data.metadata): no
    background metadata-fetch thread runs while they stream; an explicit
    RAY_DATA_METADATA_PREFETCH_ON_THREAD leaves Ray's own choice, and its thread."""
    if env is None:
        monkeypatch.delenv(PREFETCH_ENV, raising=False)
    else:
        monkeypatch.setenv(PREFETCH_ENV, env)
    uri, result = dataset
    seen, done = threading.Event(), threading.Event()

    def watch():  # the whole execution long: its threads end with it, before the last batches are read
        while not done.is_set():
            if any(t.name == PREFETCH_THREAD for t in threading.enumerate()):
                seen.set()
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rows = sum(
            len(batch["image"]) for batch in stream_split(open_dataset(uri), "train", DATA).iter_batches(batch_size=16)
        )
    finally:
        done.set()
        watcher.join(timeout=10)
    assert rows == result.rows["train"] and seen.is_set() == prefetch_thread


def test_ray_train_shards_split_the_rows(dataset, ray_local):
    uri, result = dataset
    ds = stream_split(open_dataset(uri), "train", DATA)
    parts = ds.streaming_split(2, equal=True)  # what Ray Train does per worker
    counts = [0, 0]

    def consume(i):  # split iterators are consumed concurrently, as Ray Train workers do
        counts[i] = sum(len(b["image"]) for b in parts[i].iter_batches(batch_size=16))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert counts[0] == counts[1] and sum(counts) == result.rows["train"] - result.rows["train"] % 2


def test_rerun_without_overwrite_is_refused_and_overwrite_replaces(s3_prefix):
    uri = s3_prefix + "/again"
    first = _prepare(uri, n=40)
    with pytest.raises(DatasetExistsError, match="already exists.*--overwrite"):
        _prepare(uri, n=40)
    second = _prepare(uri, n=60, overwrite=True)
    assert sum(second.rows.values()) == 60 and second.version != first.version
    assert len(storage.list_files(uri)) == 3 + sum(
        len(v["shards"]) for v in open_dataset(uri).manifest["splits"].values()
    )


def test_leftovers_of_an_interrupted_write_are_refused(s3_prefix):
    uri = s3_prefix + "/partial"
    storage.write_bytes(storage.join(uri, "train", "part-00000.parquet"), b"half")
    with pytest.raises(DatasetExistsError, match="no manifest.json"):
        _prepare(uri, n=20)
    with pytest.raises(DatasetError, match="no dataset here"):
        open_dataset(uri)


def test_corrupted_shard_is_reported_by_name(s3_prefix):
    uri = s3_prefix + "/corrupt"
    _prepare(uri, n=60)
    info = open_dataset(uri)
    victim = info.shard_uris("train")[0]
    data = bytearray(storage.read_bytes(victim))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(victim, bytes(data))
    with pytest.raises(DatasetError, match=r"shard .*train/part-00000\.parquet: sha256 mismatch \(expected"):
        verify_dataset(open_dataset(uri))


def test_split_assignment_is_stable():
    assert assign_split("P1", 0.1, 0.1, "s") == assign_split("P1", 0.1, 0.1, "s")
    splits = [assign_split(f"P{i}", 0.2, 0.1, "s") for i in range(5000)]
    assert abs(splits.count("val") / 5000 - 0.2) < 0.03 and abs(splits.count("test") / 5000 - 0.1) < 0.03


def test_cli_synth_and_inspect(s3_prefix):
    uri = s3_prefix + "/cli"
    cmd = [
        sys.executable,
        "-m",
        "medfusion.cli",
        "data",
        "synth",
        "--preset",
        "tiny",
        "--out",
        uri,
        "synth.num_samples=50",
        "shard_size_mb=0.05",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"dataset {uri}" in out.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    inspect = subprocess.run(
        [sys.executable, "-m", "medfusion.cli", "data", "inspect", uri, "--json"],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=300,
    )
    summary = json.loads(inspect.stdout)
    assert sum(s["rows"] for s in summary["splits"].values()) == 50 and summary["verified_shards"] >= 3
