"""Training-time data augmentation on whole batches, on the batch's own device: random crop and horizontal flip.

Why batch-wise: certprune holds a data set as one in-memory tensor on the training device and slices batches from
it (:func:`certprune.data.batches`); torchvision's per-image PIL transforms would send every image through Python
and back to the host, which starves a GPU. Here one padded copy of the batch and one advanced-indexing gather do
every crop (each image's window of the padded batch, taken as a view), and one ``torch.where`` every flip.

Why an explicit generator: the random numbers (a crop offset pair and a flip bit per image) are drawn from the
``torch.Generator`` passed in, on that generator's device (the CPU for the pipeline's shuffling generator), and
only then moved to the batch's device. The same generator state therefore gives the same augmented batch on a CPU
and on a GPU, and a run resumed from a checkpoint that saved the generator's state draws the same crops as an
uninterrupted one.

The intended call, once per training batch before the loss (the training loop owns this)::

    augment = make_augment(config.augment, config.dataset)     # None when the list is empty
    for x, y in batches(...):
        if augment is not None:
            x = augment(x, generator)                           # the phase's checkpointed generator
        value, metrics = loss(model, x, y, epoch)

Under torchrun, augment the whole batch before a process takes its share (``x[rank::world]``): every process then
draws the same numbers and the shares together equal the single-process batch.

What HYDRA does (github.com/inspire-group/hydra, ``data/cifar.py`` and ``data/svhn.py``, lines 22-26 of each):
``RandomCrop(32, padding=4)`` (zero padding) then ``RandomHorizontalFlip()`` for CIFAR-10 *and* SVHN.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

PADDING = 4  # HYDRA's RandomCrop(32, padding=4); every robust-training baseline on CIFAR-10 uses the same
AUGMENTATIONS = ("crop", "flip")
# Mirrored handwritten digits are not digits any more (a flipped 2, 3, 5 or 7 is a glyph no test image shows), and
# HYDRA has no MNIST pipeline to follow (its data/__init__.py offers CIFAR10, CIFAR100, SVHN, imagenet). SVHN is
# not listed: HYDRA's data/svhn.py flips house numbers, and the paper configs follow it.
NO_FLIP = {"mnist": "handwritten digits", "mnist-embedded": "handwritten digits"}

Augment = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


def _draw(high: int, count: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``count`` integers in ``[0, high)`` from ``generator`` (on its own device), moved to ``device``."""
    source = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, high, (count,), generator=generator, device=source).to(device, non_blocking=True)


def random_crop(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = PADDING) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) zero-padded by ``padding`` on every side, then cut back to H x W at its own
    offset ``(dy, dx)``, each uniform on ``0 .. 2*padding`` (torchvision's RandomCrop with ``padding``).

    The offsets are drawn rows first, then columns, one per image, from ``generator``."""
    n, channels, height, width = x.shape
    dy = _draw(2 * padding + 1, n, generator, x.device)
    dx = _draw(2 * padding + 1, n, generator, x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    # every H x W window of every image, as a view (N, C, 2p+1, 2p+1, H, W); one indexing copies each image's own
    # window out whole (about 3x faster on a CPU than gathering pixel by pixel)
    windows = padded.unfold(2, height, 1).unfold(3, width, 1)
    return windows[torch.arange(n, device=x.device), :, dy, dx]


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of ``x`` mirrored left-right with probability 1/2 (one bit per image from ``generator``)."""
    chosen = _draw(2, len(x), generator, x.device).bool()
    return torch.where(chosen[:, None, None, None], x.flip(3), x)


_FUNCTIONS = {"crop": random_crop, "flip": random_flip}


class BatchAugment:
    """The augmentations of a config, applied in the order listed; ``augment(x, generator)``."""

    def __init__(self, names: list[str]):
        self.names = list(names)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"augmentation needs a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
        for name in self.names:
            x = _FUNCTIONS[name](x, generator)
        return x

    def __repr__(self) -> str:
        return f"BatchAugment({self.names})"


def make_augment(names: list[str] | None, dataset: str) -> Augment | None:
    """The batch augmentation for a config's ``augment`` list and data set; ``None`` for an empty list.

    Raises a one-line ``ValueError`` for an unknown or repeated name, and for ``flip`` on handwritten digits."""
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"augment must be a list of names from {', '.join(AUGMENTATIONS)}, got {names!r}")
    names = list(names)
    for name in names:
        if name not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")
        if names.count(name) > 1:
            raise ValueError(f"augmentation {name!r} is listed twice")
    if "flip" in names and dataset in NO_FLIP:
        raise ValueError(f"augmentation 'flip' makes no sense for {dataset} ({NO_FLIP[dataset]}: a mirrored digit is "
                         "not a digit); use augment: [crop]")
    return BatchAugment(names) if names else None
