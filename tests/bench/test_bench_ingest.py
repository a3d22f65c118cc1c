"""`medfusion bench ingest` runs all three pipelines and ends with the benchmark JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from bench_invariants import check_counts, check_ratios

pytestmark = pytest.mark.integration

PASS_COUNTS = [
    "ray_data_samples",
    "ray_data_cold_samples",
    "ray_data_rss_n_samples",
    "dataloader_samples",
    "dataloader_cold_samples",
]


def _bench(*settings: str) -> tuple[dict, str]:
    out = subprocess.run(
        [sys.executable, "-m", "medfusion.cli", "bench", "ingest", "image_size=32", "batch_size=16", *settings],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


def test_bench_ingest_prints_its_json(s3_prefix):
    result, stdout = _bench("--samples", "64", f"data_uri={s3_prefix}/bench", "shard_size_mb=0.05", "passes=3")
    assert result["bench"] == "ingest" and result["config"]["samples"] == 64
    assert result["config"]["decode_processes"] == result["config"]["loader_workers"]
    assert result["dataset"]["uri"] == f"{s3_prefix}/bench/n64" and result["dataset"]["source"] == "synthetic"
    assert result["dataset"]["rows"] == 64 and result["dataset"]["passes_per_n"] == 1
    figures = result["figures"]
    for name in (
        "ray_data_samples_per_s",
        "dataloader_samples_per_s",
        "decode_ceiling_samples_per_s",
        "ray_data_first_batch_s",
        "ray_data_cold_first_batch_s",
        "dataloader_first_batch_s",
        "dataloader_cold_first_batch_s",
        "ray_data_peak_rss_n",
        "ray_data_peak_rss_4n",
    ):
        assert figures[name]["value"] > 0, name
    assert result["ratio_of"] == {
        "ray_data_vs_dataloader": ["ray_data_samples_per_s", "dataloader_samples_per_s"],
        "ray_data_vs_decode_ceiling": ["ray_data_samples_per_s", "decode_ceiling_samples_per_s"],
        "rss_4n_vs_n": ["ray_data_peak_rss_4n", "ray_data_peak_rss_n"],
    }
    for name in ("ray_data_samples_per_s", "dataloader_samples_per_s"):  # the median of the warm passes
        low, high = figures[name]["range"]
        assert low <= figures[name]["value"] <= high, (name, figures[name])
    check_ratios(result)
    # every pass (cold and warm) read all 64 samples (the decode ceiling reads at most 1000), the 4N run 256
    check_counts(figures, [*PASS_COUNTS, "decode_ceiling_samples"], 64)
    check_counts(figures, ["ray_data_4n_samples"], 4 * 64)
    assert "(b) DataLoader" in stdout and "cold first s" in stdout  # the human-readable table precedes the JSON


def test_bench_ingest_on_an_existing_dataset(s3_prefix, synthetic_dataset):
    uri = synthetic_dataset(f"{s3_prefix}/given", samples=60, image_size=32)
    result, _ = _bench("--samples", "100", f"dataset_uri={uri}", "split=train")
    dataset = result["dataset"]
    assert dataset["uri"] == uri and dataset["split"] == "train"
    # the split is streamed as many times over as it takes to reach 100 samples
    n = dataset["rows"] * dataset["passes_per_n"]
    assert dataset["passes_per_n"] == -(-100 // dataset["rows"]) and n >= 100
    check_ratios(result)
    check_counts(result["figures"], PASS_COUNTS, n)
    check_counts(result["figures"], ["ray_data_4n_samples"], 4 * n)
