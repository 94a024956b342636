"""Model registry: a name maps to a factory ``(in_channels, image_size, num_classes) -> nn.Module``.

Every model starts with :class:`Normalize`, so it maps images in [0, 1] to logits and perturbation budgets are in
pixel space. The certified-training CNNs (:data:`VERIFIABLE`) are ``nn.Sequential`` of plain layers, which
auto_LiRPA bounds exactly; the batch-norm networks of the empirical-robustness path (VGG16-BN, WRN-28-4, ResNet-18)
are for PGD / TRADES training and attack evaluation.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .cnn import cnn_7layer, cnn_large, cnn_small
from .init import WEIGHT_INITS, ibp_init, initialise
from .layers import Normalize
from .resnet import cohen_resnet110, resnet18
from .vgg import vgg16_bn
from .wrn import wrn_28_4

MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn-small": cnn_small,
    "cnn-large": cnn_large,
    "cnn-7layer": cnn_7layer,
    "vgg16-bn": vgg16_bn,
    "wrn-28-4": wrn_28_4,
    "resnet-18": resnet18,
    "cohen-resnet110": cohen_resnet110,
}
# Plain ReLU Sequentials that IBP / CROWN bound exactly (certprune.lirpa); the others have batch norm and branches.
VERIFIABLE = ("cnn-small", "cnn-large", "cnn-7layer")


def register(name: str, factory: Callable[..., nn.Module]) -> None:
    MODELS[name] = factory


def create_model(name: str, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 mean=None, std=None) -> nn.Module:
    """Build a registered model for inputs of shape ``(in_channels, image_size, image_size)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](in_channels=in_channels, image_size=image_size, num_classes=num_classes, mean=mean, std=std)


__all__ = ["MODELS", "VERIFIABLE", "WEIGHT_INITS", "Normalize", "create_model", "ibp_init", "initialise", "register"]
