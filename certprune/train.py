"""The one training loop, shared by every phase and every loss."""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, masking
from .data import batches
from .losses import Loss

log = logging.getLogger("certprune")
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number; training stops at once and the last good checkpoint stays."""


def fit(model: nn.Module, loss: Loss, optimizer: torch.optim.Optimizer, train_x: torch.Tensor,
        train_y: torch.Tensor, epochs: int, batch_size: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, generator: torch.Generator | None = None,
        start_epoch: int = 0, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
        desc: str = "train", augment: Augment | None = None) -> list[dict[str, float]]:
    """Train for epochs ``start_epoch .. epochs-1``; ``on_epoch_end(epoch, mean_metrics)`` follows each epoch
    (the pipeline checkpoints there). Returns the per-epoch mean metrics. ``augment(x, generator)`` transforms
    each batch, drawing from the same seeded generator as the shuffle, so a resumed epoch sees the same images.

    A loss that is not finite raises :class:`TrainingDiverged` before the step is taken (checked every batch on
    the CPU; on a GPU every 25 batches, to spare a device sync per batch, and before each epoch's checkpoint).

    Under torchrun, ``model`` is the DDP wrapper (:func:`certprune.distributed.wrap`): every rank draws the same
    shuffled order from ``generator`` and trains on its share of each batch (every world_size-th image)."""
    history = []
    steps = math.ceil(len(train_x) / batch_size)
    rank, world = distributed.rank(), distributed.world_size()
    for epoch in range(start_epoch, epochs):
        model.train()
        if world > 1 and generator is not None:  # each rank its own noise / random starts, resumable per epoch
            torch.manual_seed(generator.initial_seed() * 1009 + epoch * 101 + rank)
        totals: dict[str, float | torch.Tensor] = {}
        done = 0
        bar = tqdm(batches(train_x, train_y, batch_size, shuffle=True, generator=generator), total=steps,
                   desc=f"{desc} {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True,
                   disable=None if rank == 0 else True)
        for step, (x, y) in enumerate(bar):
            size = len(x)
            if augment is not None:  # the whole batch on every rank: their generators draw alike and stay in step
                x = augment(x, generator)
            if world > 1:  # this rank's share of the batch (model is DDP-wrapped: gradients are averaged)
                if size < world:
                    continue  # a last batch too small to share is skipped by every rank alike
                x, y = x[rank::world], y[rank::world]
            with masking.cached():
                value, metrics = loss(model, x, y, epoch + step / steps)
            if (x.device.type == "cpu" or step % 25 == 0) and not torch.isfinite(value.detach()):
                raise TrainingDiverged(f"{desc}: the loss became {float(value)} in epoch {epoch + 1}, batch "
                                       f"{step + 1}; stopped, the last finished epoch's checkpoint is kept "
                                       "(try a lower lr)")
            if world > 1:  # DDP averages over ranks: weigh each share so the gradient is the whole batch's mean
                value = value * (len(x) * world / size)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            done += 1
            for key, number in metrics.items():  # summed where they are (on the device): no sync per batch
                totals[key] = totals.get(key, 0.0) + (number.detach() if torch.is_tensor(number) else number)
            if not bar.disable and step % 25 == 0:  # reading a GPU's numbers waits for it: not every batch
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", acc=f"{float(metrics['acc']):.3f}")
        if "loss" in totals and not math.isfinite(float(totals["loss"])):
            raise TrainingDiverged(f"{desc}: the loss became {float(totals['loss'])} in epoch {epoch + 1}; stopped, "
                                   "the last finished epoch's checkpoint is kept (try a lower lr)")
        means = distributed.mean_across_ranks({key: float(total) / max(1, done) for key, total in totals.items()})
        means["lr"] = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        log.info("%s epoch %d/%d: %s", desc, epoch + 1, epochs, ", ".join(f"{k}={v:.4g}" for k, v in sorted(means.items())))
        history.append(means)
        if on_epoch_end is not None:
            on_epoch_end(epoch, means)
    return history
