"""The in-process training loop of the quick fits (`medfusion bench serve`'s cached export, and the
tests' test_fit and test_quality): no Ray, no engine, no data pipeline; tensors already in memory."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def train_epochs(
    model: torch.nn.Module,
    train: Mapping[str, torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> list[float]:
    """Shuffled mini-batch epochs over the tensors of `train`, with the training loop's gradient
    clipping (1.0) and a schedule step per batch. Returns the mean loss of each epoch."""
    rows = len(train["image"])
    epoch_losses = []
    for _ in range(epochs):
        model.train()
        order, losses = torch.randperm(rows), []
        for start in range(0, rows, batch_size):
            batch = {k: v[order[start : start + batch_size]] for k, v in train.items()}
            total, _ = model.loss(batch, model(batch))
            optimizer.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(total.item())
        epoch_losses.append(sum(losses) / len(losses))
    return epoch_losses
