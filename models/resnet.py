"""CIFAR-style ResNets with batch norm (He et al. 2016): ResNet-18 (four stages of two basic blocks, 64 to 512
channels, about 11M weights) and Cohen et al.'s ResNet-110."""
from __future__ import annotations

from torch import nn

from .layers import normalize


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A 3x3 stem of ``widths[0]`` channels (no max-pool), stages of basic blocks (``widths``, ``blocks_per_stage``;
    every stage after the first halves the resolution), global average pooling: any image size."""

    def __init__(self, widths, blocks_per_stage, in_channels: int, num_classes: int, mean=None, std=None):
        super().__init__()
        self.normalize = normalize(in_channels, mean, std)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        stages, planes = [], widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks_per_stage)):
            for b in range(count):
                stages.append(BasicBlock(planes, width, 2 if index > 0 and b == 0 else 1))
                planes = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(self.normalize(x)))).flatten(1))


def resnet18(in_channels=3, image_size=32, num_classes=10, mean=None, std=None) -> ResNet:
    """ResNet-18 for CIFAR-size inputs."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), in_channels, num_classes, mean, std)


# Cohen et al.'s CIFAR-10 ResNet-110 (randomized smoothing, 2019; their archs/cifar_resnet.py): He et al.'s CIFAR
# ResNet of depth 6n + 2 = 110, three stages of 18 basic blocks (16, 32, 64 channels), about 1.7M weights.
COHEN_CIFAR_MEAN, COHEN_CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def cohen_resnet110(in_channels=3, image_size=32, num_classes=10, mean=None, std=None) -> ResNet:
    """Cohen et al.'s ResNet-110 for CIFAR-10 (the base classifier of their randomized-smoothing results)."""
    if in_channels == 3 and mean is None and std is None:  # the statistics Cohen et al. normalise with
        mean, std = COHEN_CIFAR_MEAN, COHEN_CIFAR_STD
    return ResNet((16, 32, 64), (18, 18, 18), in_channels, num_classes, mean, std)
