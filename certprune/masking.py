"""The masked-layer core: the only place that knows how a pruning mask is made.

A prunable weight (the ``weight`` of every ``Conv2d`` and ``Linear``) is reparametrised with
``torch.nn.utils.parametrize`` by :class:`TopKMask`, which owns a real-valued ``scores`` tensor of the weight's shape.
Reading ``layer.weight`` then yields ``original * mask`` where ``mask`` keeps the ``num_kept(k, n)`` weights with the
largest ``|score|`` (HYDRA). The mask is a straight-through estimate: its forward value is 0/1, its backward is the
identity, so every score gets gradient ``d loss / d effective_weight * original``.

Why a parametrization: the original weight keeps its Parameter identity (optimisers stay valid), the effective
weight is what every consumer sees (losses, attacks, certifiers, auto_LiRPA's proxy), and removing the
parametrization leaves a plain dense layer whose pruned entries are exactly 0.
"""
from __future__ import annotations

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


class TopKMask(nn.Module):
    """Parametrization ``weight -> weight * topk_mask(|scores|)`` with ``k`` the fraction of weights kept."""

    def __init__(self, scores: torch.Tensor, k: float):
        super().__init__()
        self.k = check_k(k)
        self.scores = nn.Parameter(scores.detach().clone())

    @property
    def count(self) -> int:
        return num_kept(self.k, self.scores.numel())

    def mask(self) -> torch.Tensor:
        return _TopKStraightThrough.apply(self.scores.abs(), self.count)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask()

    def extra_repr(self) -> str:
        return f"k={self.k}, kept={self.count}/{self.scores.numel()}"


def cached():
    """Context in which each mask and effective weight is computed once, however often it is read.

    A training step reads every effective weight at least twice (the forward pass, and the copy into auto_LiRPA's
    proxy), and each read would otherwise redo the layer's top-k.
    """
    return parametrize.cached()


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


def apply_masks(model: nn.Module, k: float, init: Literal["scaled", "magnitude"] = "scaled") -> nn.Module:
    """Attach a :class:`TopKMask` to every prunable layer (layer-wise k, HYDRA's default); returns ``model``.

    ``init="scaled"`` is HYDRA's score initialisation; ``"magnitude"`` sets ``scores = |w|``. Both rank weights
    by magnitude, so before any score training the mask is exactly least-weight-magnitude (LWM) pruning.
    """
    k = check_k(k)
    layers = list(prunable_layers(model))
    if not layers:
        raise ValueError("model has no Conv2d or Linear layer to prune")
    for _, layer in layers:
        if is_masked(layer):
            raise ValueError("model is already masked; call remove_masks first")
        weight = layer.weight.detach()
        scores = scaled_scores(weight) if init == "scaled" else weight.abs()
        parametrize.register_parametrization(layer, "weight", TopKMask(scores, k))
    return model


def masked_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if is_masked(module):
            yield name, module


def scores(model: nn.Module) -> list[nn.Parameter]:
    return [mask_of(m).scores for _, m in masked_layers(model)]


def _bake(layer: nn.Module) -> None:
    """Turn a masked layer back into its plain class holding the effective weight (pruned entries exactly 0).

    ``parametrize.remove_parametrizations`` deletes the ``weight`` property from the layer's generated class,
    which ``copy.deepcopy`` shares between copies, and so would break every copy of the model. Restoring the
    plain class per instance leaves the others intact.
    """
    effective = layer.weight.detach().clone()
    requires_grad = raw_weight(layer).requires_grad
    del layer._modules["parametrizations"]
    layer.__class__ = layer.__class__.__bases__[0]  # torch names it Parametrized<Class>(<Class>)
    layer.weight = nn.Parameter(effective, requires_grad=requires_grad)


def remove_masks(model: nn.Module) -> nn.Module:
    """Bake every mask into its layer in place: plain layers whose pruned weights are exactly 0."""
    for _, layer in list(masked_layers(model)):
        _bake(layer)
    return model


def dense_copy(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` with every mask baked in; ``model`` itself is untouched."""
    return remove_masks(copy.deepcopy(model))


def set_phase(model: nn.Module, phase: Phase, train_norm_in_prune: bool = True) -> None:
    """Choose what trains by toggling ``requires_grad`` only (Parameter objects never change).

    pretrain / finetune: weights, biases and norm layers train, scores are frozen (finetune's mask is fixed).
    prune: only scores train; weights and biases are frozen. Norm-layer affine parameters train too when
    ``train_norm_in_prune`` (HYDRA trains them).
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    score_ids = {id(s) for s in scores(model)}
    if phase == "prune" and not score_ids:
        raise ValueError("the prune phase needs a masked model (apply_masks first)")
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
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
