"""The mask itself: scores, the exact count rule, straight-through top-k, phases, dense export.

A prunable weight (the ``weight`` of every ``Conv2d`` and ``Linear``) is reparametrised with
``torch.nn.utils.parametrize`` by :class:`TopKMask`, which owns a real-valued ``scores`` tensor of the weight's shape.
Reading ``layer.weight`` then yields ``original * mask`` where ``mask`` keeps the ``count`` weights with the largest
``|score|`` (HYDRA). How many a layer keeps is the allocation's business (:mod:`.allocation`): a fixed number
(``layerwise``: ``num_kept(k, n)``; ``erk``), or a number a shared :class:`Plan` recomputes from every layer's
current scores or learned rates (``global``, ``learned``). The mask is a straight-through estimate: its forward value
is 0/1, its backward is the identity, so every score gets gradient ``d loss / d effective_weight * original``.

Why a parametrization: the original weight keeps its Parameter identity (optimisers stay valid), the effective
weight is what every consumer sees (losses, attacks, certifiers, auto_LiRPA's proxy), and removing the
parametrization leaves a plain dense layer whose pruned entries are exactly 0.
"""
from __future__ import annotations

import abc

import contextlib
import copy
import math
from decimal import ROUND_CEILING, Decimal
from typing import Iterator, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

PRUNABLE = (nn.Conv2d, nn.Linear)
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
Phase = Literal["pretrain", "prune", "finetune"]
PHASES = ("pretrain", "prune", "finetune")


def check_k(k: float) -> float:
    """Return ``k`` as a float if it is a valid fraction of weights to keep, else raise ``ValueError``."""
    try:
        k = float(k)
    except (TypeError, ValueError):
        raise ValueError(f"k must be a number in (0, 1], got {k!r}") from None
    if not (0.0 < k <= 1.0):  # also rejects NaN
        raise ValueError(f"k must be in (0, 1] (the fraction of weights kept), got {k}")
    return k


def num_kept(k: float, n: int) -> int:
    """How many of a layer's ``n`` weights a fraction ``k`` keeps: ``ceil(k * n)``, at least 1.

    The product is taken in exact decimal arithmetic on ``k``'s shortest decimal form (``repr``), so
    ``k = 0.05`` of 100 weights keeps exactly 5, never 6 through float drift (``0.05 * 100 == 5.000000000000001``).
    """
    k = check_k(k)
    exact = (Decimal(repr(k)) * n).to_integral_value(rounding=ROUND_CEILING)
    return max(1, min(n, int(exact)))


class _TopKStraightThrough(torch.autograd.Function):
    """Forward: the 0/1 mask of the ``count`` largest entries of ``magnitude``. Backward: identity."""

    @staticmethod
    def forward(ctx, magnitude: torch.Tensor, count: int) -> torch.Tensor:
        flat = magnitude.flatten()
        mask = torch.zeros_like(flat)
        mask[flat.topk(count, sorted=False).indices] = 1.0
        return mask.view_as(magnitude)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor):
        return grad_mask, None


class _GivenStraightThrough(torch.autograd.Function):
    """Forward: a 0/1 mask chosen elsewhere (a global top-k). Backward: identity to ``magnitude``."""

    @staticmethod
    def forward(ctx, magnitude: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask.reshape(magnitude.shape).to(magnitude.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor):
        return grad_mask, None


class Plan(abc.ABC):
    """What a shared allocation provides to its masks (``global``, ``learned``); see :mod:`.allocation`."""

    @abc.abstractmethod
    def layer_mask(self, index: int) -> torch.Tensor:
        """Layer ``index``'s 0/1 mask under the shared allocation."""

    @abc.abstractmethod
    def layer_count(self, index: int) -> int:
        """How many weights layer ``index`` keeps."""


class TopKMask(nn.Module):
    """Parametrization ``weight -> weight * topk_mask(|scores|)``; ``k`` is the fraction of weights kept.

    ``count`` fixes how many this layer keeps (``erk``); without it, ``num_kept(k, n)`` (``layerwise``). A
    :class:`Plan` set by :func:`~certprune.masking.apply_masks` overrides both (``global``, ``learned``).
    """

    def __init__(self, scores: torch.Tensor, k: float, count: int | None = None):
        super().__init__()
        self.k = check_k(k)
        self.scores = nn.Parameter(scores.detach().clone())
        if count is not None and not 1 <= count <= self.size:
            raise ValueError(f"count must be in [1, {self.size}], got {count}")
        self.fixed_count = count
        self.plan: Plan | None = None  # a plain attribute: shared by several masks, owned by none of them
        self.index = 0

    @property
    def size(self) -> int:
        """How many units (weights here, channels for a channel mask) the mask chooses from."""
        return self.scores.numel()

    @property
    def kept_weights(self) -> int:
        return self.count

    def magnitude(self) -> torch.Tensor:
        """What the top-k ranks, one entry per unit."""
        return self.scores.abs()

    @property
    def count(self) -> int:
        if self.plan is not None:
            return self.plan.layer_count(self.index)
        return num_kept(self.k, self.size) if self.fixed_count is None else self.fixed_count

    def mask(self) -> torch.Tensor:
        if self.plan is not None:
            return self.plan.layer_mask(self.index)
        return _TopKStraightThrough.apply(self.magnitude(), self.count)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask()

    def extra_repr(self) -> str:
        return f"k={self.k}, kept={self.count}/{self.size}"


_CACHE = {"depth": 0, "generation": 0}


def cache_generation() -> int | None:
    """An id of the current :func:`cached` block (``None`` outside one): plans memoise their masks per block."""
    return _CACHE["generation"] if _CACHE["depth"] else None


@contextlib.contextmanager
def cached():
    """Context in which each mask and effective weight is computed once, however often it is read.

    A training step reads every effective weight at least twice (the forward pass, and the copy into auto_LiRPA's
    proxy), and each read would otherwise redo the layer's top-k (and a shared plan's global top-k once per
    layer). Scores and rates must not change inside the block.
    """
    with parametrize.cached():
        if _CACHE["depth"] == 0:
            _CACHE["generation"] += 1
        _CACHE["depth"] += 1
        try:
            yield
        finally:
            _CACHE["depth"] -= 1


def scaled_scores(weight: torch.Tensor) -> torch.Tensor:
    """HYDRA's scaled initialisation ``sqrt(6 / fan_in) * w / max|w|``: ranks like |w|, scaled like Kaiming."""
    fan_in = weight[0].numel()
    peak = weight.abs().max().clamp_min(torch.finfo(weight.dtype).tiny)
    return math.sqrt(6.0 / fan_in) * weight / peak


def prunable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every ``Conv2d`` / ``Linear`` in ``model``, by name; their weights are pruned, their biases are not."""
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE):
            yield name, module


def is_masked(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and isinstance(
        module.parametrizations.weight[0], TopKMask)


def mask_of(module: nn.Module) -> TopKMask:
    return module.parametrizations.weight[0]


def raw_weight(module: nn.Module) -> nn.Parameter:
    """The unmasked, stored weight of a layer (the Parameter an optimiser holds)."""
    return module.parametrizations.weight.original if is_masked(module) else module.weight


def masked_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every masked ``Conv2d`` / ``Linear`` (a channel mask also masks the norm layer after it: not listed here)."""
    for name, module in model.named_modules():
        if is_masked(module) and isinstance(module, PRUNABLE):
            yield name, module


def scores(model: nn.Module) -> list[nn.Parameter]:
    return [mask_of(m).scores for _, m in masked_layers(model)]


def rate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned per-layer rate logits (``allocation="learned"``; empty otherwise). They train with the scores
    in the prune phase; give them their own optimiser group if they should move at another learning rate."""
    return [mask_of(m).rate_logit for _, m in masked_layers(model) if hasattr(mask_of(m), "rate_logit")]


def allocation_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer name: (kept, total)}`` for every prunable layer: a masked layer's mask count, a plain layer's
    number of nonzero weights (so a baked model reports what it kept)."""
    counts = {}
    with torch.no_grad():
        for name, layer in prunable_layers(model):
            total = raw_weight(layer).numel()
            kept = mask_of(layer).kept_weights if is_masked(layer) else int(torch.count_nonzero(layer.weight))
            counts[name] = (int(kept), total)
    return counts


def _bake(layer: nn.Module, effective: dict[str, torch.Tensor]) -> None:
    """Turn a masked layer back into its plain class holding ``effective`` (its masked tensors, pruned entries 0).

    ``parametrize.remove_parametrizations`` deletes the ``weight`` property from the layer's generated class,
    which ``copy.deepcopy`` shares between copies, and so would break every copy of the model. Restoring the
    plain class per instance leaves the others intact.
    """
    requires_grad = {name: layer.parametrizations[name].original.requires_grad for name in effective}
    del layer._modules["parametrizations"]
    layer.__class__ = layer.__class__.__bases__[0]  # torch names it Parametrized<Class>(<Class>)
    for name, tensor in effective.items():
        setattr(layer, name, nn.Parameter(tensor, requires_grad=requires_grad[name]))


def remove_masks(model: nn.Module) -> nn.Module:
    """Bake every mask into its layer in place: plain layers whose pruned weights are exactly 0."""
    layers = [module for module in model.modules() if is_masked(module)]
    with torch.no_grad(), cached():  # every effective tensor first (a shared plan reads all layers' scores)
        effective = [{name: getattr(layer, name).detach().clone() for name in layer.parametrizations}
                     for layer in layers]
    for layer, tensors in zip(layers, effective):
        _bake(layer, tensors)
    return model


def dense_copy(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` with every mask baked in; ``model`` itself is untouched."""
    return remove_masks(copy.deepcopy(model))


def set_phase(model: nn.Module, phase: Phase, train_norm_in_prune: bool = True) -> None:
    """Choose what trains by toggling ``requires_grad`` only (Parameter objects never change).

    pretrain / finetune: weights, biases and norm layers train, scores and rates are frozen (finetune's mask is
    fixed). prune: only scores (and learned rates) train; weights and biases are frozen. Norm-layer affine
    parameters train too when ``train_norm_in_prune`` (HYDRA trains them).
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    score_ids = {id(s) for s in scores(model)} | {id(r) for r in rate_parameters(model)}
    if phase == "prune" and not score_ids:
        raise ValueError("the prune phase needs a masked model (apply_masks first)")
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters()}  # masked too
    for param in model.parameters():
        if id(param) in score_ids:
            param.requires_grad_(phase == "prune")
        elif phase == "prune":
            param.requires_grad_(train_norm_in_prune and id(param) in norm_ids)
        else:
            param.requires_grad_(True)


def sparsity(model: nn.Module) -> float:
    """Fraction of prunable weights that are exactly 0, measured from the live (effective) weights."""
    zeros = total = 0
    with torch.no_grad():
        for _, layer in prunable_layers(model):
            weight = layer.weight
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else 0.0
