"""The small certified-training CNNs used by HYDRA's verifiable-training experiments (and auto_LiRPA's cnn-7layer)."""
from __future__ import annotations

from torch import nn

from .layers import conv_out, normalize


def _convnet(convs, fcs, in_channels, image_size, num_classes, mean, std) -> nn.Sequential:
    """``convs``: (out_channels, kernel, stride, padding) per conv; ``fcs``: hidden widths; ReLU after each."""
    layers: list[nn.Module] = [normalize(in_channels, mean, std)]
    channels, size = in_channels, image_size
    for out_channels, kernel, stride, padding in convs:
        layers += [nn.Conv2d(channels, out_channels, kernel, stride, padding), nn.ReLU()]
        channels, size = out_channels, conv_out(size, kernel, stride, padding)
        if size < 1:
            raise ValueError(f"image size {image_size} is too small for this architecture")
    layers.append(nn.Flatten())
    width = channels * size * size
    for hidden in fcs:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn_small(in_channels=1, image_size=28, num_classes=10, mean=None, std=None) -> nn.Sequential:
    """conv16 k4 s2, conv32 k4 s2, fc100, fc (Gowal et al.'s / HYDRA's small verifiable CNN)."""
    return _convnet([(16, 4, 2, 1), (32, 4, 2, 1)], [100], in_channels, image_size, num_classes, mean, std)


def cnn_large(in_channels=1, image_size=28, num_classes=10, mean=None, std=None) -> nn.Sequential:
    """conv32, conv32, conv64, conv64, fc512, fc512, fc (Gowal et al.'s / HYDRA's large verifiable CNN)."""
    convs = [(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)]
    return _convnet(convs, [512, 512], in_channels, image_size, num_classes, mean, std)


def cnn_7layer(in_channels=1, image_size=28, num_classes=10, mean=None, std=None) -> nn.Sequential:
    """auto_LiRPA's cnn_7layer: five 3x3 convs (64, 64, 128 s2, 128, 128), fc512, fc."""
    convs = [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)]
    return _convnet(convs, [512], in_channels, image_size, num_classes, mean, std)
