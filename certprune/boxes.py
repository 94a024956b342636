"""Boxes and properties as plain tensors, with no bound engine behind them: the L-inf box of an image rounded
outward (for proofs) or inward (for counterexamples), its image through a leading normalisation, and the spec rows
``e_label - e_j`` whose positive lower bounds prove a classification robust. Every verifier and certified loss shares
these; importing them loads no auto_LiRPA."""
from __future__ import annotations

import math

import torch
from torch import nn


def margin_spec(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Spec matrix ``C`` with rows ``e_y - e_j`` for every ``j != y``: shape ``(B, num_classes - 1, num_classes)``.

    A lower bound > 0 on every row proves the true class beats all others.
    """
    eye = torch.eye(num_classes, device=labels.device)
    spec = eye[labels].unsqueeze(1) - eye.unsqueeze(0)  # (B, C, C): row j is e_y - e_j
    keep = eye[labels] == 0  # drop the row j == y
    return spec[keep].view(len(labels), num_classes - 1, num_classes)


def spec_of(labels: torch.Tensor, others, num_classes: int) -> torch.Tensor:
    """The rows ``e_label - e_j`` for ``j`` in each property's ``others`` (None: :func:`margin_spec`), padded to the
    longest by repeating a property's first row (the minimum over rows is unchanged)."""
    if others is None:
        return margin_spec(labels, num_classes)
    eye, width = torch.eye(num_classes, device=labels.device), max(len(o) for o in others)
    rows = [eye[int(label)] - eye[list(o) + [o[0]] * (width - len(o))] for label, o in zip(labels, others)]
    return torch.stack(rows)


def input_box(x: torch.Tensor, eps: float, lower: float = 0.0, upper: float = 1.0, outward: bool = True):
    """The L-inf ball of radius ``eps`` around ``x`` clipped to the valid pixel domain ``[lower, upper]``, in
    ``x``'s dtype. ``x - eps`` rounds to the nearest float, which can lie inside the real ball by half an ulp: a
    proof needs the box rounded ``outward`` (never narrower than the real one), a counterexample a point of the box
    rounded inward (never outside it)."""
    exact_low, exact_up = ((x.double() + shift).clamp(lower, upper) for shift in (-eps, eps))
    low, up = exact_low.to(x.dtype), exact_up.to(x.dtype)
    if outward:
        low = torch.where(low > exact_low, torch.nextafter(low, torch.full_like(low, -math.inf)), low)
        up = torch.where(up < exact_up, torch.nextafter(up, torch.full_like(up, math.inf)), up)
    else:
        low = torch.where(low < exact_low, torch.nextafter(low, torch.full_like(low, math.inf)), low)
        up = torch.where(up > exact_up, torch.nextafter(up, torch.full_like(up, -math.inf)), up)
    return low, up


def normalized_box(normalize: nn.Module, lower: torch.Tensor, upper: torch.Tensor):
    """The smallest float box that contains ``normalize``'s image of ``[lower, upper]``: the per-channel map
    ``(x - mean) / std`` is evaluated in float64, its two ends ordered (a negative std reverses them), then rounded
    one float step outward, so the mapped box never loses a point of the exact one to rounding."""
    if isinstance(normalize, nn.Identity):
        return lower, upper
    ends = [(end.double() - normalize.mean.double()) / normalize.std.double() for end in (lower, upper)]
    low, up = torch.minimum(*ends), torch.maximum(*ends)
    return (torch.nextafter(low.to(lower.dtype), torch.full_like(lower, -math.inf)),
            torch.nextafter(up.to(upper.dtype), torch.full_like(upper, math.inf)))
