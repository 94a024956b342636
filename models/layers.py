"""Small layers shared by the model definitions."""
from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the model's first layer, so that eps is measured in pixel space."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def normalize(in_channels: int, mean, std) -> Normalize:
    """Default statistics 0.5 / 0.5 per channel keep inputs roughly centred whatever the data set."""
    mean = [0.5] * in_channels if mean is None else mean
    std = [0.5] * in_channels if std is None else std
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} entries, got {len(mean)}/{len(std)}")
    return Normalize(mean, std)


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1
