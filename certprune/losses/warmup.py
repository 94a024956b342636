"""Shi et al. (2021)'s warm-up regularisers for IBP training ("Fast certified robust training with short warmup").

Early in the eps ramp, IBP bounds of a freshly initialised network either explode layer by layer or collapse as
ReLUs go all active or all inactive, and training then needs a long ramp to recover. Shi et al. add two penalties
over the ramp, both on the interval bounds of every ReLU's input:
- *tightness*: a layer's mean half-width must not grow past ``1 / tol`` times the input box's
  (``relu(tol - w_0 / w_i) / tol``);
- *ReLU balance*: the active and the inactive units' centres should be of like mean and like spread
  (``relu(tol - min(r, 1 / r)) / tol`` for the ratio ``r`` of their means and of their summed squared deviations;
  a layer without active or inactive units gives no finite ratio and adds nothing, as in their code).
Each is averaged over the ReLU layers; their sum, weighted by ``weight * (1 - eps_now / eps)``, joins the loss, so it
fades out as eps reaches its target. This follows the authors' ``compute_reg`` (``regularization.py`` of De Palma et
al.'s expressive-losses code, which carries it), with its defaults: weight 0.5, tol 0.5.

The intervals come from interval arithmetic in torch on the model's own (effective, masked) layers, so the gradient
reaches weights and HYDRA's scores; they equal auto_LiRPA's IBP bounds of the same layers (a test holds them to it).
They steer training only and prove nothing; proofs stay with :mod:`certprune.lirpa`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import Normalize


def relu_input_intervals(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor):
    """Interval bounds of the box ``[lower, upper]`` (pixel space) at the input of every ReLU of a plain sequential
    network: ``(input half-width, [(lower, upper) per ReLU])``, the half-width being the box's after a leading
    :class:`~certprune.models.Normalize` (the space the first layer sees, as in Shi et al.'s normalised inputs)."""
    from ..distributed import unwrap

    model = unwrap(model)
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"the warm-up regularisers bound plain nn.Sequential networks, not {type(model).__name__}")
    centre, radius = (upper + lower) / 2, (upper - lower) / 2
    input_radius, intervals = radius, []
    for index, layer in enumerate(model):
        if isinstance(layer, Normalize):
            centre, radius = layer(centre), radius / layer.std.abs()
            input_radius = radius if index == 0 else input_radius
        elif isinstance(layer, nn.Linear):
            centre, radius = F.linear(centre, layer.weight, layer.bias), F.linear(radius, layer.weight.abs())
        elif isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros":
            centre = F.conv2d(centre, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                              layer.groups)
            radius = F.conv2d(radius, layer.weight.abs(), None, layer.stride, layer.padding, layer.dilation,
                              layer.groups)
        elif isinstance(layer, nn.ReLU):
            low, up = centre - radius, centre + radius
            intervals.append((low, up))
            low, up = low.relu(), up.relu()
            centre, radius = (up + low) / 2, (up - low) / 2
        elif isinstance(layer, nn.Flatten):
            centre, radius = layer(centre), layer(radius)
        else:
            raise ValueError(f"the warm-up regularisers cannot bound a {type(layer).__name__} layer")
    return input_radius, intervals


def warmup_regulariser(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, tol: float) -> torch.Tensor:
    """Shi et al.'s tightness + ReLU-balance penalty over the box ``[lower, upper]`` (unweighted; see the module)."""
    input_radius, intervals = relu_input_intervals(model, lower, upper)
    if not intervals:
        return lower.new_zeros(())
    width_0 = input_radius.mean()
    tightness = balance = lower.new_zeros(())
    for low, up in intervals:
        centre, width = (up + low) / 2, ((up - low) / 2).mean()
        tightness = tightness + F.relu(tol - width_0 / width.clamp(min=1e-12)) / tol
        active, inactive = (low > 0).float(), (up < 0).float()
        deviation = (centre - centre.mean()) ** 2
        ratios = ((centre * active).mean() / -(centre * inactive).mean(),
                  (deviation * active).sum() / (deviation * inactive).sum())
        ratios = [torch.min(ratio, 1 / ratio.clamp(min=1e-12)) for ratio in ratios]
        layer = sum(F.relu(tol - ratio) for ratio in ratios) / tol
        if torch.isfinite(layer):
            balance = balance + layer
    return (tightness + balance) / len(intervals)
