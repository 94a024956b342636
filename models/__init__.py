"""Model registry: a name maps to a factory ``(in_channels, image_size, num_classes) -> nn.Module``.

Every model starts with :class:`Normalize`, so it maps images in [0, 1] to logits and perturbation budgets are in
pixel space. Models are ``nn.Sequential`` of plain layers, which auto_LiRPA bounds exactly.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .cnn import cnn_7layer, cnn_large, cnn_small
from .layers import Normalize

MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn-small": cnn_small,
    "cnn-large": cnn_large,
    "cnn-7layer": cnn_7layer,
}


def register(name: str, factory: Callable[..., nn.Module]) -> None:
    MODELS[name] = factory


def create_model(name: str, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 mean=None, std=None) -> nn.Module:
    """Build a registered model for inputs of shape ``(in_channels, image_size, image_size)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](in_channels=in_channels, image_size=image_size, num_classes=num_classes, mean=mean, std=std)


__all__ = ["MODELS", "Normalize", "create_model", "register"]
