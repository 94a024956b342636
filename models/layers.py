"""Small layers shared by the model definitions."""
from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the model's first layer, so that eps is measured in pixel space.

    A negative std is a valid (decreasing) affine map; a zero, infinite or NaN statistic is refused: no verifier can
    bound through it, and a NaN would pass through every comparison as "not violated"."""

    def __init__(self, mean, std):
        super().__init__()
        mean, std = (torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all())
                and bool(torch.isfinite(1 / std).all())):  # 1 / 0 is inf
            raise ValueError(f"Normalize needs finite means and finite non-zero stds (with finite inverses), got mean "
                             f"{mean.flatten().tolist()} and std {std.flatten().tolist()}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

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
