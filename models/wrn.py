"""Wide residual networks (Zagoruyko and Komodakis 2016) with pre-activation blocks and batch norm: WRN-28-4,
the HYDRA paper's second architecture (about 5.8M weights)."""
from __future__ import annotations

from torch import nn

from .layers import normalize


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)

    def forward(self, x):
        out = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu(self.bn2(self.conv1(out))))
        return out + skip


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int, mean=None, std=None):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = normalize(in_channels, mean, std)
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        groups, planes = [], widths[0]
        for index, width in enumerate(widths[1:]):
            stride = 1 if index == 0 else 2
            groups += [WideBlock(planes if b == 0 else width, width, stride if b == 0 else 1) for b in range(blocks)]
            planes = width
        self.blocks = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        out = self.blocks(self.conv(self.normalize(x)))
        return self.fc(self.pool(self.relu(self.bn(out))).flatten(1))


def wrn_28_4(in_channels=3, image_size=32, num_classes=10, mean=None, std=None) -> WideResNet:
    """WRN-28-4 (any image size: the last feature map is average-pooled to 1x1)."""
    return WideResNet(28, 4, in_channels, num_classes, mean, std)

