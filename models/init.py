"""Weight initialisations for certified training."""
from __future__ import annotations

import math

import torch
from torch import nn

WEIGHT_INITS = ("default", "ibp")


def ibp_init(model: nn.Module) -> nn.Module:
    """Shi et al. (2021)'s IBP initialisation: every ``Conv2d`` / ``Linear`` weight but the last layer's drawn from
    ``N(0, 2 pi / fan_in^2)``; biases keep torch's. Why: an interval of width ``d`` per input leaves a layer with
    expected width ``fan_in * E|w| * d = fan_in * std * sqrt(2 / pi) * d = 2 d``, and the ReLU after it halves that
    when about half the units are active, so IBP bounds keep their size through the network at the start of training.
    Torch's default, ``U(-1 / sqrt(fan_in), 1 / sqrt(fan_in))``, multiplies the width by about ``sqrt(fan_in) / 4`` per
    layer and ReLU instead, so IBP training would start from exploded bounds. Plain feed-forward networks only: Shi et
    al. also halve the weights after a residual addition, which this does not do. Returns ``model``, changed in place."""
    layers = [module for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for layer in layers[:-1]:
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
    return model


def initialise(model: nn.Module, weight_init: str) -> nn.Module:
    """``model`` under the named initialisation (:data:`WEIGHT_INITS`; ``default`` leaves torch's)."""
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"unknown weight_init {weight_init!r}; choose from {', '.join(WEIGHT_INITS)}")
    return ibp_init(model) if weight_init == "ibp" else model
