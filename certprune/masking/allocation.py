"""How many weights each layer keeps: ``layerwise``, ``global``, ``erk`` and ``learned`` allocations.

Totals, exactly (``N`` the number of prunable weights, ``L`` the number of prunable layers, ``n_l`` a layer's):

- ``layerwise`` (HYDRA's default): each layer keeps ``num_kept(k, n_l)``; the total is their sum.
- ``global``, ``erk``, ``learned``: ``K = num_kept(k, N)`` in total, and every layer keeps at least 1 (so
  ``K >= L`` is required) and at most ``n_l``.

``erk`` and ``learned`` share one rule from real-valued layer counts to integers. Real counts
``c_l = clip(lam * n_l * exp(a_l), 1, n_l)``, with ``lam`` solved exactly so that ``sum c_l = K`` (water-filling:
a layer that would exceed ``n_l`` is dense, one below 1 keeps 1, and the rest is shared again, as RigL does for
dense layers). Integers by largest remainder: every layer gets ``floor(c_l)``, and the ``K - sum floor(c_l)`` units
left go to the largest fractional parts (ties to the earlier layer). ``erk`` has ``exp(a_l)`` the
Erdős–Rényi-kernel density ``sum(shape_l) / prod(shape_l)`` (Evci et al. 2020, RigL: ``(n_in + n_out + kh + kw) /
(n_in n_out kh kw)`` for a conv); ``learned`` trains the logits ``a_l``, starting from ERK's.
"""
from __future__ import annotations

import abc

import math
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from .channel import CHANNEL_SCORES, WeightL1ChannelMask, channel_groups, channel_mask
from .core import Plan, TopKMask, _GivenStraightThrough, cache_generation, check_k, is_masked, num_kept, \
    prunable_layers, scaled_scores

ALLOCATIONS = ("layerwise", "global", "erk", "learned")
INITS = ("scaled", "magnitude")
GRANULARITIES = ("weight", "channel")
CHANNEL_ALLOCATIONS = ("layerwise", "global")  # erk and learned are rules over weight shapes
Allocation = Literal["layerwise", "global", "erk", "learned"]
Granularity = Literal["weight", "channel"]
RATE_TEMPERATURE = 0.05  # width of the learned rates' soft boundary, as a fraction of the layer's kept count


def erk_logits(shapes: list[tuple[int, ...]]) -> torch.Tensor:
    """Log of each layer's raw ERK density ``sum(shape) / prod(shape)`` (float32, as the learned logits)."""
    return torch.tensor([math.log(sum(s) / math.prod(s)) for s in shapes], dtype=torch.float32)


def fill(logits: torch.Tensor, sizes: list[int], budget: int) -> torch.Tensor:
    """Real counts ``c_l = clip(lam * n_l * exp(a_l), 1, n_l)`` summing to ``budget`` (float64, differentiable
    in ``logits``: the unclipped layers share what the clipped ones leave as ``softmax(a_l + log n_l)``)."""
    n = torch.tensor(sizes, dtype=torch.float64, device=logits.device)
    log_mass = logits.to(torch.float64) + n.log()
    if not len(sizes) <= budget <= sum(sizes):
        raise ValueError(f"a budget of {budget} weights cannot give each of {len(sizes)} layers one to {sizes}")
    masses = log_mass.detach().tolist()
    low = [-m for m in masses]  # log lam at which layer l reaches 1 ...
    high = [math.log(s) - m for s, m in zip(sizes, masses)]  # ... and n_l
    points = sorted(set(low + high))

    def total(t: float) -> float:
        return sum(min(max(math.exp(t + m), 1.0), s) for m, s in zip(masses, sizes))

    index = next((i for i, t in enumerate(points) if total(t) >= budget), len(points))
    left = points[index - 1] if index > 0 else points[0] - 1.0
    right = points[index] if index < len(points) else points[-1] + 1.0
    t = (left + right) / 2  # the clipped / free split is the same on the whole interval holding the solution
    floor = torch.tensor([t < point for point in low], device=logits.device)
    dense = torch.tensor([t > point for point in high], device=logits.device)
    free = ~(floor | dense)
    counts = torch.where(dense, n, torch.ones_like(n))
    if bool(free.any()):
        rest = budget - float(counts[~free].sum())
        shares = torch.softmax(log_mass.masked_fill(~free, -math.inf), 0)
        counts = torch.where(free, rest * shares, counts)
    return counts + 0.0 * log_mass  # every logit in the graph (zero gradient when clipped): DDP sees all used


def largest_remainder(real: list[float], sizes: list[int], budget: int) -> list[int]:
    """Integers within ``[1, n_l]`` summing to ``budget``: floors, then the units left to the largest remainders."""
    counts = [min(s, max(1, math.floor(c))) for c, s in zip(real, sizes)]
    order = sorted(range(len(real)), key=lambda i: (-(real[i] - math.floor(real[i])), i))
    while sum(counts) < budget:  # at most L rounds (more only if the real counts drifted by a float error)
        for i in order:
            if sum(counts) < budget and counts[i] < sizes[i]:
                counts[i] += 1
    while sum(counts) > budget:
        for i in reversed(order):
            if sum(counts) > budget and counts[i] > 1:
                counts[i] -= 1
    return counts


def erk_counts(shapes: list[tuple[int, ...]], k: float) -> list[int]:
    """How many weights each layer of these shapes keeps under ERK at total fraction ``k`` (see module doc)."""
    sizes = [math.prod(s) for s in shapes]
    budget = num_kept(k, sum(sizes))
    return largest_remainder(fill(erk_logits(shapes), sizes, budget).tolist(), sizes, budget)


class _RankedTopK(torch.autograd.Function):
    """Forward: the 0/1 mask of the ``count`` largest of ``magnitude``. Backward: identity to ``magnitude``, and
    to the real-valued count ``c`` the weighted mean of ``d loss / d mask`` over the entries ranked near ``c``
    (the loss's change per extra kept weight), weights ``sigmoid'((c - rank - 1/2) / T)``, ``T = max(1, 0.05 c)``."""

    @staticmethod
    def forward(ctx, magnitude: torch.Tensor, real_count: torch.Tensor, count: int) -> torch.Tensor:
        flat = magnitude.flatten()
        order = flat.sort(descending=True, stable=True).indices
        mask = torch.zeros_like(flat)
        mask[order[:count]] = 1.0
        ctx.save_for_backward(order, real_count)
        return mask.view_as(magnitude)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor):
        order, real_count = ctx.saved_tensors
        c = real_count.to(torch.float64)
        temperature = torch.clamp(RATE_TEMPERATURE * c, min=1.0)
        ranks = torch.arange(order.numel(), device=order.device, dtype=torch.float64)
        z = torch.sigmoid((c - ranks - 0.5) / temperature)
        kernel = z * (1 - z)
        grad_sorted = grad_mask.flatten()[order].to(torch.float64)
        grad_count = (kernel * grad_sorted).sum() / kernel.sum().clamp_min(1e-300)
        return grad_mask, grad_count.to(real_count.dtype), None


class _SharedPlan(Plan):
    """A plan over all masks of one model, memoised per :func:`~certprune.masking.cached` block."""

    def __init__(self, masks: list[TopKMask], budget: int):
        self.masks, self.budget = masks, budget
        self.sizes = [m.size for m in masks]
        self._memo: tuple[int, object] | None = None
        for index, mask in enumerate(masks):
            mask.plan, mask.index = self, index

    def __getstate__(self):  # copies and pickles leave the memo (it may hold an autograd graph) behind
        return {**self.__dict__, "_memo": None}

    def _result(self):
        generation = cache_generation()
        if generation is not None and self._memo is not None and self._memo[0] == generation:
            return self._memo[1]
        result = self.compute()
        self._memo = (generation, result) if generation is not None else None
        return result

    @abc.abstractmethod
    def compute(self):
        """The allocation itself (counts and masks of every layer), memoised by :meth:`_result`."""


class GlobalPlan(_SharedPlan):
    """One top-``K`` over every layer's comparable scores ``|scores| * scale`` (each layer's best one reserved)."""

    def compute(self) -> list[torch.Tensor]:
        with torch.no_grad():
            parts = [(m.magnitude() * m.scale).flatten() for m in self.masks]
            values = torch.cat(parts)
            offsets = torch.tensor([0] + self.sizes, device=values.device).cumsum(0)
            best = torch.stack([p.argmax() for p in parts]) + offsets[:-1]
            values[best] = math.inf  # at least one per layer
            keep = torch.zeros_like(values)
            keep[values.topk(self.budget, sorted=False).indices] = 1.0
            return list(keep.split(self.sizes))

    def layer_mask(self, index: int) -> torch.Tensor:
        return _GivenStraightThrough.apply(self.masks[index].magnitude(), self._result()[index])

    def layer_count(self, index: int) -> int:
        return int(self._result()[index].sum())


class LearnedPlan(_SharedPlan):
    """Per-layer counts from the learned logits (:func:`fill`, then :func:`largest_remainder`), each layer's top."""

    def compute(self) -> tuple[torch.Tensor, list[int]]:
        logits = torch.stack([m.rate_logit for m in self.masks])
        real = fill(logits, self.sizes, self.budget)
        return real, largest_remainder(real.detach().tolist(), self.sizes, self.budget)

    def layer_mask(self, index: int) -> torch.Tensor:
        real, counts = self._result()
        return _RankedTopK.apply(self.masks[index].scores.abs(), real[index], counts[index])

    def layer_count(self, index: int) -> int:
        return self._result()[1][index]


def apply_masks(model: nn.Module, k: float, init: Literal["scaled", "magnitude"] = "scaled",
                allocation: Allocation = "layerwise", granularity: Granularity = "weight",
                channel_scores: str = "channel") -> nn.Module:
    """Attach a :class:`TopKMask` to every prunable layer; returns ``model``. Totals: see the module doc.

    ``init="scaled"`` is HYDRA's score initialisation; ``"magnitude"`` sets ``scores = |w|``. Both rank weights
    by magnitude, so before any score training the mask is least-weight-magnitude (LWM) pruning under the same
    allocation, for ``global`` too.

    ``global`` ranks ``|scores| * scale`` over all layers, ``scale`` a fixed per-layer buffer set so that both inits
    compare ``|w| / max|w|`` at the start: ``1 / sqrt(6 / fan_in)`` for ``scaled`` scores, ``1 / max|w|`` for
    ``magnitude`` ones. Dividing by ``max|w|`` removes each layer's arbitrary scale (a ReLU network computes the same
    function when one layer is multiplied by c and the next divided by c, yet raw global magnitude would prune it
    differently); HYDRA's init does that already. Its Kaiming factor ``sqrt(6 / fan_in)`` is there for the
    optimiser (scores on the scale of the layer's weights), not for ranking across layers: kept in the ranking, it
    favours small fan-in layers by ``sqrt`` of the fan-in ratio and, on ``cnn-small`` at k = 0.01, leaves fc1 (156,800
    weights) nothing but its one reserved weight. So a layer's comparable score is its score in units of its
    initial maximum. The scale is fixed, not recomputed from the current scores, so that the mask stays a top-k over
    the current scores and a layer whose scores grow during score training gains weights (the counts move).

    ``learned`` gives each mask a ``rate_logit`` (see :func:`~certprune.masking.rate_parameters`) that trains with
    the scores in the prune phase through :class:`_RankedTopK`; every forward keeps exactly ``K``.

    ``granularity="channel"`` masks whole output channels instead (:mod:`.channel`: every layer but the last, the
    units counted are channels, scores start from filter L1 norms); ``layerwise`` and ``global`` apply to it.
    ``channel_scores="weight-l1"`` keeps HYDRA's per-weight scores there and ranks each channel by their L1 norm
    (:class:`~.channel.WeightL1ChannelMask`); its ``global`` scale is ``1 / max(initial channel norm)``, so that it
    too compares ``norm / max(norm)`` at the start.
    """
    k = check_k(k)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    if init not in INITS:
        raise ValueError(f"unknown score init {init!r}; choose from {', '.join(INITS)}")
    check_granularity(granularity, allocation, channel_scores=channel_scores)
    layers = [layer for _, layer in prunable_layers(model)]
    if not layers:
        raise ValueError("model has no Conv2d or Linear layer to prune")
    if any(is_masked(layer) for layer in layers):
        raise ValueError("model is already masked; call remove_masks first")
    groups = channel_groups(model) if granularity == "channel" else []
    weights = [layer.weight.detach() for layer in ([g.layer for g in groups] if groups else layers)]
    sizes = [w.shape[0] if groups else w.numel() for w in weights]
    budget = num_kept(k, sum(sizes))
    if allocation != "layerwise" and budget < len(sizes):
        raise ValueError(f"k = {k} keeps {budget} {granularity}s, fewer than the {len(sizes)} layers (one each at "
                         "least)")
    if groups:
        masks: list[TopKMask] = [channel_mask(w, k, init, channel_scores) for w in weights]
        targets = [group.tensors() for group in groups]
    else:
        counts = erk_counts([tuple(w.shape) for w in weights], k) if allocation == "erk" else [None] * len(layers)
        masks = [TopKMask(scaled_scores(w) if init == "scaled" else w.abs(), k, count)
                 for w, count in zip(weights, counts)]
        targets = [[(layer, "weight")] for layer in layers]
    if allocation == "global":
        for mask, w in zip(masks, weights):
            magnitude = max(float(mask.magnitude().detach().max()), 1e-30)
            per_weight = isinstance(mask, WeightL1ChannelMask)  # scaled scores, but its peak is a channel norm
            factor = 1.0 / (math.sqrt(6.0 / w[0].numel()) if init == "scaled" and not per_weight else magnitude)
            mask.register_buffer("scale", torch.tensor(factor, dtype=w.dtype, device=w.device))
        GlobalPlan(masks, budget)
    elif allocation == "learned":
        for mask, logit in zip(masks, erk_logits([tuple(w.shape) for w in weights])):
            mask.rate_logit = nn.Parameter(logit.to(weights[0].device))
        LearnedPlan(masks, budget)
    for tensors, mask in zip(targets, masks):
        for module, name in tensors:
            parametrize.register_parametrization(module, name, mask)
    return model


def check_granularity(granularity: str, allocation: str = "layerwise", model: nn.Module | None = None,
                      channel_scores: str = "channel") -> None:
    """A one-line ``ValueError`` for an unknown granularity, an allocation that does not apply to it, channel scores
    that are unknown or without channels, or a ``model`` whose channels cannot be pruned
    (:func:`~.channel.channel_groups`)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown prune granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}")
    if channel_scores not in CHANNEL_SCORES:
        raise ValueError(f"unknown prune channel_scores {channel_scores!r}; choose from {', '.join(CHANNEL_SCORES)}")
    if channel_scores != "channel" and granularity != "channel":
        raise ValueError(f"prune channel_scores {channel_scores} ranks channels; it needs granularity channel, "
                         f"not {granularity}")
    if granularity == "channel" and allocation not in CHANNEL_ALLOCATIONS:
        raise ValueError(f"allocation {allocation} shares weights, not channels; channel granularity takes "
                         f"{' or '.join(CHANNEL_ALLOCATIONS)}")
    if granularity == "channel" and model is not None:
        channel_groups(model)
