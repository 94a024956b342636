"""Weight initialisations for certified training."""
from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("default", "ibp")


def ibp_init(model: nn.Module) -> nn.Module:
    """Shi et al. (2021)'s IBP initialisation: every ``Conv2d`` / ``Linear`` weight but the last layer's drawn from
    ``N(0, 2 pi / fan_in^2)``; biases keep torch's. Why: an interval of width ``d`` per input leaves a layer with
    expected width ``fan_in * E|w| * d = fan_in * std * sqrt(2 / pi) * d = 2 d``, and the ReLU after it halves that
    when about half the units are active, so IBP bounds keep their size through the network at the start of training.
    Kaiming's ``std = sqrt(2 / fan_in)`` instead multiplies the width by about ``sqrt(fan_in)`` per layer, so IBP
    training starts from exploded bounds. Returns ``model``, initialised in place."""
    layers = [module for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for layer in layers[:-1]:
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
    return model


def initialise(model: nn.Module, init: str) -> nn.Module:
    """``model`` under the named initialisation (:data:`INITS`; ``default`` leaves torch's)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    return ibp_init(model) if init == "ibp" else model
