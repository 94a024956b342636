"""When a computed number proves a property: the one rule every verification stage obeys (docs/guarantees.md).

A property says ``logit_label - logit_j > 0`` for every ``j`` it names, everywhere in a box. A stage proves it when
each margin's computed lower bound is **finite** and **above the stage's tolerance**, a tolerance larger than the
rounding error of the arithmetic that produced the bound:

- Bound stages (IBP, CROWN-IBP, CROWN, alpha-CROWN) compute in float64 (the model's float32 weights convert
  exactly) over the box rounded outward, so their rounding error is about ``n * 2**-53`` times the magnitude of the
  sums involved (``n`` terms per sum). :data:`BOUND_TOLERANCE` is 1e-6: for the 784-256x6 networks the same bounds
  computed in float32 and float64 differ by at most 2.5e-7 of their magnitude (up to 1.4e4 for IBP), which puts the
  float64 error near 1e-11, five orders below it.
- The MILP runs HiGHS with its feasibility tolerances tightened to :data:`HIGHS_FEASIBILITY`. Its dual bound then
  errs by at most about that tolerance times the sum of the variables' ranges (a reduced cost off by ``t`` moves a
  bounded LP's objective by at most ``t * (upper - lower)`` per variable); :func:`milp_tolerance` adds that to
  :data:`MILP_TOLERANCE`, the margin under which a bound is too close to 0 to mean anything.
- NaN and infinite bounds never prove: ``nan > 0`` is False, but ``max(nan, x)`` is NaN and would hide a real
  bound, so :func:`finite_or_worst` turns them into ``-inf`` before any bound is combined with another.
- A bound above the margin the network computes at a point of the box is impossible; it means a stage is wrong, and
  it proves nothing (:func:`consistent`).
"""
from __future__ import annotations

import numpy as np
import torch

BOUND_TOLERANCE = 1e-6
MILP_TOLERANCE = 1e-4
HIGHS_FEASIBILITY = 1e-9
# A float32 forward pass at a point may sit below the exact margin by float32 rounding; a bound may exceed the
# computed margin by this much (relative to the logits' size) before it counts as inconsistent.
FORWARD_SLACK = 1e-4


def finite_or_worst(bounds: torch.Tensor) -> torch.Tensor:
    """``bounds`` with every NaN or infinite entry replaced by ``-inf``, the bound that proves nothing."""
    return torch.where(torch.isfinite(bounds), bounds, torch.full_like(bounds, float("-inf")))


def proves(lower_bounds: torch.Tensor) -> torch.Tensor:
    """Per row of margin lower bounds ``(N, rows)``: True when every bound proves its margin positive."""
    return (finite_or_worst(lower_bounds) > BOUND_TOLERANCE).all(-1)


def consistent(lower_bounds: torch.Tensor, margins_at_point: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Per row: False when some lower bound exceeds the margin the network computes at a point of the box by more
    than float32 forward rounding can explain, which only a wrong bound can do."""
    slack = FORWARD_SLACK * (1 + logit_scale)
    return (lower_bounds.double() <= margins_at_point.double() + slack.double()[:, None]).all(-1)


def milp_tolerance(var_lower: np.ndarray, var_upper: np.ndarray) -> float:
    """The margin a MILP dual bound must exceed: :data:`MILP_TOLERANCE` plus HiGHS's feasibility tolerance times
    the sum of the variables' ranges (every variable of the encoding has finite bounds)."""
    ranges = np.asarray(var_upper, dtype=float) - np.asarray(var_lower, dtype=float)
    return MILP_TOLERANCE + HIGHS_FEASIBILITY * float(np.sum(ranges[np.isfinite(ranges)]))


def usable(dual_bound) -> bool:
    """A solver's objective value or dual bound that is a finite number (None and NaN are not)."""
    return dual_bound is not None and bool(np.isfinite(dual_bound))
