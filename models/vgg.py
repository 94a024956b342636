"""CIFAR-style VGG16 with batch norm (the HYDRA paper's VGG16): 13 3x3 convs, a 2x2 average pool, fc256, fc256, fc.

Max-pools halve the feature map while it is at least 2 pixels wide, so the same network takes 32x32 (CIFAR-10,
SVHN) and smaller images (28x28 MNIST-like, or 16x16 in tests).
"""
from __future__ import annotations

from torch import nn

from .layers import normalize

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg(plan, in_channels, image_size, num_classes, mean, std, width: int = 256) -> nn.Sequential:
    layers: list[nn.Module] = [normalize(in_channels, mean, std)]
    channels, size = in_channels, image_size
    for item in plan:
        if item == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            continue
        layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
        channels = item
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(),
               nn.Linear(channels * 4, width), nn.ReLU(inplace=True),
               nn.Linear(width, width), nn.ReLU(inplace=True),
               nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def vgg16_bn(in_channels=3, image_size=32, num_classes=10, mean=None, std=None) -> nn.Sequential:
    """VGG16-BN for CIFAR-size inputs (about 15M weights)."""
    return _vgg(VGG16, in_channels, image_size, num_classes, mean, std)
