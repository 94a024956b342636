"""The one training loop, shared by every phase and every loss."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import masking
from .config import PhaseConfig
from .data import batches
from .losses import Loss


def make_optimizer(params, phase: PhaseConfig) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ValueError("nothing to train in this phase (no parameter requires grad)")
    if phase.optimizer == "adam":
        return torch.optim.Adam(params, lr=phase.lr, weight_decay=phase.weight_decay)
    if phase.optimizer == "sgd":
        return torch.optim.SGD(params, lr=phase.lr, momentum=phase.momentum, weight_decay=phase.weight_decay)
    raise ValueError(f"unknown optimizer {phase.optimizer!r}; choose adam or sgd")


def make_scheduler(optimizer: torch.optim.Optimizer, phase: PhaseConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule: cosine to 0 over the phase (HYDRA's choice), or constant."""
    if phase.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: 0.5 * (1 + math.cos(math.pi * epoch / max(1, phase.epochs))))
    if phase.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    raise ValueError(f"unknown lr schedule {phase.schedule!r}; choose cosine or constant")


def fit(model: nn.Module, loss: Loss, optimizer: torch.optim.Optimizer, train_x: torch.Tensor,
        train_y: torch.Tensor, epochs: int, batch_size: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, generator: torch.Generator | None = None,
        start_epoch: int = 0, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
        desc: str = "train") -> list[dict[str, float]]:
    """Train for epochs ``start_epoch .. epochs-1``; ``on_epoch_end(epoch, mean_metrics)`` follows each epoch
    (the pipeline checkpoints there). Returns the per-epoch mean metrics."""
    history = []
    steps = math.ceil(len(train_x) / batch_size)
    for epoch in range(start_epoch, epochs):
        model.train()
        totals: dict[str, float] = {}
        bar = tqdm(batches(train_x, train_y, batch_size, shuffle=True, generator=generator), total=steps,
                   desc=f"{desc} {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True, disable=None)
        for step, (x, y) in enumerate(bar):
            with masking.cached():
                value, metrics = loss(model, x, y, epoch + step / steps)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            for key, number in metrics.items():
                totals[key] = totals.get(key, 0.0) + number
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.3f}")
        means = {key: total / steps for key, total in totals.items()}
        means["lr"] = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(means.items())))
        history.append(means)
        if on_epoch_end is not None:
            on_epoch_end(epoch, means)
    return history
