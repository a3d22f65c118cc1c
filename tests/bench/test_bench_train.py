"""`medfusion bench train` runs its variants end to end (tiny sizes: speeds are not asserted,
only what holds on any machine)."""

from __future__ import annotations

import json

import pytest
from bench_invariants import check_counts, check_ratios

from medfusion.bench.train import TrainBenchConfig, run_train_bench
from medfusion.config import ConfigError
from medfusion.loader import load_config


@pytest.mark.integration
def test_bench_train_measures_every_variant(s3_prefix, ray_local, capsys):
    cfg = TrainBenchConfig(
        samples=96, steps=2, warmup_steps=1, workers=2, zero_stages=[0, 3], data_uri=f"{s3_prefix}/bench"
    )
    result = run_train_bench(cfg)
    table = capsys.readouterr().out
    assert (
        "(b) plain PyTorch" in table
        and "(b') plain PyTorch" in table
        and "ZeRO-0, 1 worker" in table
        and "ZeRO-3, 1 worker" in table
        and "2 workers" in table
    )
    assert result["bench"] == "train" and json.loads(json.dumps(result)) == result
    figures = result["figures"]
    for name in (
        "plain_torch_samples_per_s",
        "ray_deepspeed_zero0_1w_samples_per_s",
        "ray_deepspeed_zero3_1w_samples_per_s",
        "ray_deepspeed_2w_samples_per_s",
        "ray_deepspeed_zero0_1w_peak_memory",
        "ray_deepspeed_zero3_1w_step_time",
    ):
        assert figures[name]["value"] > 0, name
    assert 0 <= figures["ray_deepspeed_zero0_1w_data_wait_share"]["value"] <= 1
    # the 1-worker headline ratios are of the first ZeRO stage measured
    assert result["ratio_of"] == {
        "ray_deepspeed_1w_vs_plain_torch": ["ray_deepspeed_zero0_1w_samples_per_s", "plain_torch_samples_per_s"],
        "ray_deepspeed_1w_vs_plain_torch_in_memory": [
            "ray_deepspeed_zero0_1w_samples_per_s",
            "plain_torch_in_memory_samples_per_s",
        ],
        "ray_deepspeed_2w_vs_1w": ["ray_deepspeed_2w_samples_per_s", "ray_deepspeed_zero0_1w_samples_per_s"],
    }
    check_ratios(result)
    # every variant timed the same `steps` full batches per worker
    per_worker = cfg.steps * result["config"]["batch_size"]
    check_counts(
        figures,
        [
            "plain_torch_samples",
            "plain_torch_in_memory_samples",
            "ray_deepspeed_zero0_1w_samples",
            "ray_deepspeed_zero3_1w_samples",
        ],
        per_worker,
    )
    check_counts(figures, ["ray_deepspeed_2w_samples"], cfg.workers * per_worker)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["device=tpu"], "device: must be cpu or cuda"),
        (["zero_stages=0,4"], "zero_stages: must be a list of 0-3"),
        (["steps=0"], "steps: must be >= 1"),
    ],
)
def test_bench_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainBenchConfig, overrides=overrides)


def test_cuda_without_a_gpu_says_so(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device=cuda: no CUDA GPU"):
        run_train_bench(TrainBenchConfig(device="cuda", zero_stages=[0, 1, 2, 3]))
