"""Training losses for randomized smoothing: Gaussian-noise augmentation and HYDRA's stability loss.

Both follow :mod:`certprune.losses.base`' protocol ``loss(model, x, y, epoch) -> (loss, metrics)`` and work in every
phase (pretrain, prune, finetune). The noise is drawn in pixel space from torch's global generator, which the
pipeline seeds and checkpoints, so a resumed run draws the noise an uninterrupted one would.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quantities import check_sigma
from .base import accuracy


def gaussian_noise(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x + delta`` with ``delta ~ N(0, sigma^2 I)``; not clipped to [0, 1], as the smoothed classifier sees it."""
    return x + sigma * torch.randn_like(x)


class GaussianLoss:
    """Cohen et al.'s training: cross-entropy on inputs with Gaussian noise of the certification's ``sigma``."""

    def __init__(self, sigma: float):
        self.sigma = check_sigma(sigma)

    def __call__(self, model, x, y, epoch):
        logits = model(gaussian_noise(x, self.sigma))
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits, y)}


class StabilityLoss:
    """HYDRA's stability training for smoothing: ``CE(f(x), y) + beta * KL(f(x + delta) || f(x))``.

    The KL term, between the softmax outputs on a noisy and the clean input (mean over the batch), pulls the
    noisy prediction towards the clean one; gradient flows through both. ``acc`` is the clean accuracy and
    ``noisy_acc`` the accuracy under noise.
    """

    def __init__(self, sigma: float, beta: float = 6.0):
        self.sigma = check_sigma(sigma)
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def __call__(self, model, x, y, epoch):
        logits = model(torch.cat([x, gaussian_noise(x, self.sigma)]))
        clean, noisy = logits[:len(x)], logits[len(x):]
        natural = F.cross_entropy(clean, y)
        # F.kl_div(input=log q, target=log p, log_target=True) is KL(p || q): here p = f(x + delta), q = f(x)
        kl = F.kl_div(F.log_softmax(clean, 1), F.log_softmax(noisy, 1), reduction="batchmean", log_target=True)
        loss = natural + self.beta * kl
        return loss, {"loss": loss.detach(), "acc": accuracy(clean, y), "noisy_acc": accuracy(noisy, y),
                      "natural_loss": natural.detach(), "kl": kl.detach()}
