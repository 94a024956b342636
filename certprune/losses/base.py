"""What every training loss shares: its call signature, the per-batch accuracy it reports, and plain cross-entropy.

The registry (:mod:`certprune.losses`) imports each path's module; no path module imports the registry.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class Loss(Protocol):
    """``model`` may be a DistributedDataParallel wrapper (torchrun); metrics are floats or 0-dim tensors, which
    the training loop sums where they are (no host round-trip per batch)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 epoch: float) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]: ...


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of ``logits`` whose argmax is ``y``, as a 0-dim tensor on their device (``float()`` it to read)."""
    return (logits.argmax(1) == y).float().mean().detach()


class NaturalLoss:
    """Plain cross-entropy on clean inputs."""

    def __call__(self, model, x, y, epoch):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits, y)}
