"""A user's own networks, as certprune meets them: a file that defines modules and factories returning them.

For 7x7 one-channel images in [0, 1] with 10 classes, as ``tiny.npz`` holds (see ``make_tiny.py``).
"""
import torch
from torch import nn


class TinyCNN(nn.Module):
    """A small CNN written as a user would: layers as attributes, the order in ``forward``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.hidden = nn.Linear(8 * 7 * 7, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.out(torch.relu(self.hidden(x.flatten(1))))


class Residual(nn.Module):
    """A tiny residual network: a stem, one block whose output is added to its input, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.block(x))
        return self.head(x.flatten(1))


def make():
    return TinyCNN()


def make_residual():
    return Residual()
