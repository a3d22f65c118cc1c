"""Training engines: one small interface over DeepSpeed (ZeRO stage 0-3) and plain PyTorch DDP.

The training loop only calls `train_step`, `forward`, `save`, `load` and `full_state_dict`, so the
strategy is a config value (`TrainConfig.strategy`), never a code change. Both engines use AdamW,
the same warmup + cosine/linear/constant learning-rate schedule (a `LambdaLR` stepped once per
optimizer step), gradient accumulation over micro-batches and gradient-norm clipping.

- DeepSpeed: `deepspeed.initialize` with a client AdamW and schedule; ZeRO partitions optimizer
  states (1), gradients (2) and parameters (3). A checkpoint is DeepSpeed's own folder, written by
  every rank (ZeRO shards are per rank). bf16/fp16 are DeepSpeed's mixed precision.
- DDP: `ray.train.torch.prepare_model`; `no_sync` between accumulation boundaries; autocast for
  bf16/fp16 (with a GradScaler for fp16). Replicas are identical, so rank 0 writes the checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from medfusion.config import TrainConfig
from medfusion.models import MedFusionModel, to_tensors

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
DDP_FILE = "ddp_state.pt"


def warmup_schedule(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per optimizer step: linear warmup to 1, then cosine/linear decay to 0, or constant.

    A plain function on purpose: LambdaLR leaves functions out of its state_dict, so a resumed run
    follows the schedule of its current config (e.g. more epochs) from the restored step.
    """
    total_steps = max(total_steps, warmup_steps + 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def resolve_precision(cfg: TrainConfig) -> str:
    """fp32, bf16 or fp16: `auto` is bf16 on GPU and fp32 on CPU."""
    if cfg.precision == "auto":
        return "bf16" if cfg.use_gpu else "fp32"
    return cfg.precision


def device_for(cfg: TrainConfig) -> torch.device:
    if cfg.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def float_outputs(out: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Floating model outputs in fp32 (integer ones as they are).

    Losses are computed in fp32 whatever the compute precision: bf16 cross-entropy and GIoU lose too much.
    """
    return {k: v.float() if torch.is_floating_point(v) else v for k, v in out.items()}


def _cpu_fp32(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # Floating tensors to fp32 (bf16/fp16 training); integer buffers (BatchNorm counters) stay as they are.
    return {
        k: (v.detach().float() if torch.is_floating_point(v) else v.detach()).cpu().clone() for k, v in state.items()
    }


class Engine(Protocol):
    """What the training loop needs from a strategy (DeepSpeedEngine and DDPEngine have it)."""

    module: MedFusionModel
    """The bare model (unwrapped), for its loss and decoder."""
    device: torch.device

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored by `load`)."""

    @property
    def lr(self) -> float:
        """The current learning rate."""

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Forward and backward of one micro-batch; an optimizer step at each accumulation boundary.
        Returns the detached loss parts."""

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Outputs in fp32 (call under torch.no_grad() for validation)."""

    def train(self, mode: bool = True) -> None:
        """Training mode on or off (dropout, modality dropout)."""

    def save(self, folder: str, client_state: dict[str, Any]) -> None:
        """Write this rank's part of the checkpoint under `folder` (every rank calls it)."""

    def load(self, folder: str) -> dict[str, Any]:
        """Restore weights, optimizer, schedule and step from `folder`; return the client state."""

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's weights on CPU in fp32. A collective under ZeRO-3: every rank calls it."""


class DeepSpeedEngine:
    """DeepSpeed's engine (ZeRO stage from the config) behind the Engine interface."""

    def __init__(self, model: MedFusionModel, cfg: TrainConfig, total_steps: int) -> None:
        import deepspeed

        self.cfg = cfg
        self.precision = resolve_precision(cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = warmup_schedule(cfg.lr_schedule, cfg.warmup_steps, total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=self.deepspeed_config(cfg, self.precision),
        )
        self.module = self.engine.module
        self.device = self.engine.device

    @staticmethod
    def deepspeed_config(cfg: TrainConfig, precision: str) -> dict[str, Any]:
        """The DeepSpeed config dict a TrainConfig maps to (train_batch_size is derived by DeepSpeed)."""
        ds: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "zero_optimization": {"stage": cfg.zero_stage},
            # The client optimizer is torch AdamW: DeepSpeed's fused Adam needs a CUDA build.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        if cfg.clip > 0:
            ds["gradient_clipping"] = cfg.clip
        if precision == "bf16":
            ds["bf16"] = {"enabled": True}
        elif precision == "fp16":
            ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 500}
        return ds

    @property
    def global_step(self) -> int:
        return int(self.engine.global_steps)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return float_outputs(self.engine(batch))

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        tensors = to_tensors(batch, self.device)
        total, parts = self.module.loss(tensors, self.forward(tensors))
        self.engine.backward(total)
        self.engine.step()  # DeepSpeed steps the optimizer only at accumulation boundaries
        return parts

    def save(self, folder: str, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(os.path.join(folder, DEEPSPEED_DIR), tag=DEEPSPEED_TAG, client_state=client_state)

    def load(self, folder: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(os.path.join(folder, DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint (tag {DEEPSPEED_TAG!r}) to resume from")
        return dict(client_state or {})

    def full_state_dict(self) -> dict[str, Tensor]:
        import deepspeed

        params = list(self.module.parameters())
        gather = deepspeed.zero.GatheredParameters(params) if self.cfg.zero_stage == 3 else contextlib.nullcontext()
        with gather:
            return _cpu_fp32(self.module.state_dict())


class DDPEngine:
    """PyTorch DDP (through Ray Train's prepare_model) behind the Engine interface."""

    def __init__(self, model: MedFusionModel, cfg: TrainConfig, total_steps: int) -> None:
        import ray.train.torch

        self.cfg = cfg
        self.precision = resolve_precision(cfg)
        self.device = device_for(cfg)
        self.wrapped = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
        self.module = getattr(self.wrapped, "module", self.wrapped)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_schedule(cfg.lr_schedule, cfg.warmup_steps, total_steps)
        )
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16")
        self.micro_step = 0
        self.step_count = 0

    @property
    def global_step(self) -> int:
        return self.step_count

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train(self, mode: bool = True) -> None:
        self.wrapped.train(mode)

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        with self._autocast():
            return float_outputs(self.wrapped(batch))

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        tensors = to_tensors(batch, self.device)
        self.micro_step += 1
        boundary = self.micro_step % self.cfg.grad_accum == 0
        sync = contextlib.nullcontext() if boundary or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
        with sync:
            total, parts = self.module.loss(tensors, self.forward(tensors))
            self.scaler.scale(total / self.cfg.grad_accum).backward()
        if boundary:
            if self.cfg.clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step_count += 1
        return parts

    def save(self, folder: str, client_state: dict[str, Any]) -> None:
        import ray.train

        if ray.train.get_context().get_world_rank() != 0:
            return  # DDP replicas are identical
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step_count,
            "client_state": client_state,
        }
        torch.save(state, os.path.join(folder, DDP_FILE))

    def load(self, folder: str) -> dict[str, Any]:
        path = Path(folder) / DDP_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {DDP_FILE} to resume from")
        # Tensors, numbers and strings only: weights_only loading is enough and runs no code.
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step_count = int(state["step"])
        self.micro_step = self.step_count * self.cfg.grad_accum
        return dict(state["client_state"])

    def full_state_dict(self) -> dict[str, Tensor]:
        return _cpu_fp32(self.module.state_dict())


def build_engine(model: MedFusionModel, cfg: TrainConfig, total_steps: int) -> Engine:
    """The engine of `cfg.strategy`, with the schedule spanning `total_steps` optimizer steps."""
    if cfg.strategy == "deepspeed":
        return DeepSpeedEngine(model, cfg, total_steps)
    return DDPEngine(model, cfg, total_steps)
