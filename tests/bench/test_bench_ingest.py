"""`medfusion bench ingest` runs all three pipelines and ends with the benchmark JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from bench_invariants import check_counts, check_ratios

pytestmark = pytest.mark.integration


def test_bench_ingest_prints_its_json(s3_prefix):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medfusion.cli",
            "bench",
            "ingest",
            "--samples",
            "64",
            f"data_uri={s3_prefix}/bench",
            "image_size=32",
            "batch_size=16",
            "shard_size_mb=0.05",
        ],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "ingest" and result["config"]["samples"] == 64
    figures = result["figures"]
    for name in (
        "ray_data_samples_per_s",
        "dataloader_samples_per_s",
        "decode_ceiling_samples_per_s",
        "ray_data_first_batch_s",
        "ray_data_peak_rss_n",
        "ray_data_peak_rss_4n",
    ):
        assert figures[name]["value"] > 0, name
    assert result["ratio_of"] == {
        "ray_data_vs_dataloader": ["ray_data_samples_per_s", "dataloader_samples_per_s"],
        "ray_data_vs_decode_ceiling": ["ray_data_samples_per_s", "decode_ceiling_samples_per_s"],
        "rss_4n_vs_n": ["ray_data_peak_rss_4n", "ray_data_peak_rss_n"],
    }
    check_ratios(result)
    # every pipeline read all 64 samples (the decode ceiling reads at most 1000), the 4N run 256
    check_counts(figures, ["ray_data_samples", "dataloader_samples", "decode_ceiling_samples"], 64)
    check_counts(figures, ["ray_data_4n_samples"], 4 * 64)
    assert "(b) DataLoader" in out.stdout  # the human-readable table precedes the JSON
