"""Writes ``tiny.npz`` beside this file: 300 training and 100 test MNIST digits shrunk to 7x7, as uint8 NHWC.

The digits are certprune's own embedded MNIST (no download), averaged over 4x4 blocks: small enough to keep in the
repository (a few KB) and to train on in a second, real enough that a trained network's accuracy means something.
Run ``python tests/data/make_tiny.py`` to regenerate it; the result is the same bit for bit.
"""
from pathlib import Path

import numpy as np
import torch

from certprune.data import load_dataset

TRAIN, TEST = 300, 100


def shrink(images: torch.Tensor) -> np.ndarray:
    """(N, 1, 28, 28) in [0, 1] -> (N, 7, 7, 1) uint8."""
    small = torch.nn.functional.avg_pool2d(images, 4)
    return (small * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main() -> None:
    data = load_dataset("mnist-embedded")
    np.savez_compressed(Path(__file__).with_name("tiny.npz"),
                        x_train=shrink(data.train_x[:TRAIN]), y_train=data.train_y[:TRAIN].numpy().astype(np.uint8),
                        x_test=shrink(data.test_x[:TEST]), y_test=data.test_y[:TEST].numpy().astype(np.uint8))


if __name__ == "__main__":
    main()
