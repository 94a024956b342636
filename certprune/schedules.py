"""Schedules of certified training, as functions of training progress measured in (fractional) epochs.

CROWN-IBP (Zhang et al. 2020) ramps eps from 0 to its target, and with the same ramp moves the CROWN/IBP mixing
weight beta (1 -> 0) and the natural-loss weight kappa (1 -> 0, or 1 -> 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ramp:
    """Linear progress from 0 (before ``start`` epochs) to 1 (after ``start + length`` epochs)."""

    start: float = 0.0
    length: float = 0.0

    def __call__(self, epoch: float) -> float:
        if self.length <= 0:
            return 1.0 if epoch >= self.start else 0.0
        return min(1.0, max(0.0, (epoch - self.start) / self.length))


@dataclass(frozen=True)
class Interpolate:
    """A value moving from ``begin`` to ``end`` as ``ramp`` goes 0 -> 1."""

    begin: float
    end: float
    ramp: Ramp

    def __call__(self, epoch: float) -> float:
        return self.begin + (self.end - self.begin) * self.ramp(epoch)
