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
        samples=96,
        steps=2,
        warmup_steps=1,
        rounds=2,  # both orders: plain loops first, then Ray first
        workers=2,
        zero_stages=[0, 3],
        loader_workers=1,
        data_uri=f"{s3_prefix}/bench",
    )
    result = run_train_bench(cfg)
    table = capsys.readouterr().out
    assert (
        "(b) plain PyTorch loop, DataLoader x1" in table
        and "(b') plain PyTorch" in table
        and "ZeRO-0, 1 worker" in table
        and "ZeRO-3, 1 worker" in table
        and "2 workers" in table
    )
    assert result["bench"] == "train" and json.loads(json.dumps(result)) == result
    figures = result["figures"]
    rates = (
        "plain_torch_prefetch_samples_per_s",
        "plain_torch_in_memory_samples_per_s",
        "ray_deepspeed_zero0_1w_samples_per_s",
        "ray_deepspeed_zero3_1w_samples_per_s",
        "ray_deepspeed_2w_samples_per_s",
    )
    for name in (*rates, "ray_deepspeed_zero0_1w_peak_memory", "ray_deepspeed_zero3_1w_step_time"):
        assert figures[name]["value"] > 0, name
    for name in rates:  # the lower middle of 2 rounds is the slower one
        low, high = figures[name]["range"]
        assert low == figures[name]["value"] <= high, (name, figures[name])
    assert 0 <= figures["ray_deepspeed_zero0_1w_data_wait_share"]["value"] <= 1
    assert 0 <= figures["plain_torch_prefetch_data_wait_share"]["value"] <= 1
    # on cpu every variant trains fp32 weights (bf16 weights, fp32 master copies, on cuda)
    assert (result["config"]["precision"], result["config"]["loader_workers"]) == ("fp32", 1)
    # the 1-worker headline ratios are of the first ZeRO stage measured
    assert result["ratio_of"] == {
        "ray_vs_plain_prefetch": ["ray_deepspeed_zero0_1w_samples_per_s", "plain_torch_prefetch_samples_per_s"],
        "ray_vs_plain_in_memory": [
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
            "plain_torch_prefetch_samples",
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
        (["rounds=0"], "rounds: must be >= 1"),
        (["loader_workers=-1"], "loader_workers: must be >= 0"),
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


def test_plain_loop_holds_bf16_weights_with_fp32_master_copies():
    """DeepSpeed's bf16 mode, as the plain baseline reproduces it: bf16 parameters, fp32 buffers,
    fp32 master copies equal to the initial weights."""
    import torch

    from medfusion.bench.train import _bf16_with_fp32_master

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    initial = [p.detach().clone() for p in model.parameters()]
    master = _bf16_with_fp32_master(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model[1].running_mean.dtype == torch.float32
    assert [m.dtype for m in master] == [torch.float32] * len(initial)
    assert all(torch.equal(m, p) for m, p in zip(master, initial))


def test_shard_batches_are_full_batches_however_the_rows_divide(tmp_path):
    """The DataLoader stream yields only full batches, carrying a shard's remainder into the next
    shard or pass, so the plain loop times as many samples per step as the Ray path."""
    from medfusion.bench.train import _ShardBatches, make_dataset
    from medfusion.config import DataConfig
    from medfusion.data.dataset import open_dataset

    make_dataset(str(tmp_path / "data"), 80, 32)
    info = open_dataset(str(tmp_path / "data"))
    stream = iter(_ShardBatches(info, DataConfig(image_size=32, batch_size=24)))
    batches = [next(stream) for _ in range(7)]  # 7 x 24 > 80 rows: the stream cycles
    assert [len(b["image"]) for b in batches] == [24] * 7
