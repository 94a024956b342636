"""What every training loss shares: its call signature and the per-batch accuracy it reports.

Kept apart from :mod:`certprune.losses` (which registers the losses of every path) so that each path's module can
be imported on its own without an import cycle.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Loss(Protocol):
    """``model`` may be a DistributedDataParallel wrapper (torchrun); metrics are floats or 0-dim tensors, which
    the training loop sums where they are (no host round-trip per batch)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 epoch: float) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]: ...


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of ``logits`` whose argmax is ``y``, as a 0-dim tensor on their device (``float()`` it to read)."""
    return (logits.argmax(1) == y).float().mean().detach()
