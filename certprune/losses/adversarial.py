"""Empirical-robustness training losses on the masked core: PGD adversarial training and TRADES.

Both follow the loss protocol of :mod:`certprune.losses` (``loss(model, x, y, epoch) -> (loss, metrics)``) and so
train in every phase: pretrain (weights), prune (HYDRA's scores) and finetune. The attack runs in eval mode (batch
norm neither uses nor updates batch statistics while attacking, see :mod:`certprune.attacks`); the training forward
pass then runs in the model's own mode.

eps may ramp from 0 like the certified losses' (``ramp_start``, ``ramp_epochs``; the default is full eps from the
start); the attack's step size then scales with it, so the number of steps to cross the ball stays the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGD, eval_mode
from ..quantities import parse_eps
from .base import accuracy
from ..schedules import Interpolate, Ramp


class _Adversarial:
    """What both losses share: an eps schedule and a PGD attack rebuilt at the scheduled eps."""

    start = "uniform"

    def __init__(self, eps, norm: str = "linf", steps: int = 10, step_size=None, restarts: int = 1,
                 ramp_start: float = 0.0, ramp_epochs: float = 0.0):
        eps = parse_eps(eps)
        self.attack = PGD(eps, norm, steps, step_size, restarts, start=self.start)  # validates every setting
        self.eps = Interpolate(0.0, eps, Ramp(ramp_start, ramp_epochs))

    def attack_at(self, epoch: float) -> PGD:
        eps = self.eps(epoch)
        full = self.attack
        if eps == full.eps:
            return full
        step_size = full.step_size * eps / full.eps if full.eps > 0 else 0.0
        return PGD(eps, full.norm, full.steps, step_size, full.restarts, full.objective, full.start)


class PGDAdversarialLoss(_Adversarial):
    """Madry et al.'s adversarial training: cross-entropy on PGD examples (random start in the eps ball).

    ``acc`` is the batch's clean accuracy (an eval-mode forward pass without gradient), ``adv_acc`` its accuracy on
    the PGD examples used for training.
    """

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: float):
        attack = self.attack_at(epoch)
        x_adv = attack.perturb(model, x, y)
        with eval_mode(model), torch.no_grad():
            clean_acc = accuracy(model(x), y)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": clean_acc, "adv_acc": accuracy(logits, y), "eps": attack.eps}


class TradesLoss(_Adversarial):
    """TRADES (Zhang et al. 2019): ``CE(f(x), y) + beta * KL(p(x) || p(x'))``, ``x'`` maximising that KL by PGD
    from ``x + 0.001 * N(0, 1)``. The HYDRA reference code's "adv" trainer. ``beta = 0`` is plain cross-entropy
    (and skips the attack)."""

    start = "normal"

    def __init__(self, eps, beta: float = 6.0, norm: str = "linf", steps: int = 10, step_size=None,
                 restarts: int = 1, ramp_start: float = 0.0, ramp_epochs: float = 0.0):
        super().__init__(eps, norm, steps, step_size, restarts, ramp_start, ramp_epochs)
        beta = float(beta)
        if not beta >= 0:
            raise ValueError(f"TRADES beta must be >= 0, got {beta}")
        self.beta = beta

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: float):
        attack = self.attack_at(epoch)
        if self.beta == 0 or attack.eps == 0:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            return loss, {"loss": loss.detach(), "acc": accuracy(logits, y), "eps": attack.eps, "robust_loss": 0.0}
        with eval_mode(model), torch.no_grad():
            clean_probs = F.softmax(model(x), dim=1)

        def divergence(adv_logits, _y):  # per-example KL(p(x) || p(x')), the quantity the attack maximises
            return F.kl_div(F.log_softmax(adv_logits, dim=1), clean_probs, reduction="none").sum(1)

        x_adv = attack.perturb(model, x, y, objective=divergence)
        logits = model(x)
        natural = F.cross_entropy(logits, y)
        robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        loss = natural + self.beta * robust
        return loss, {"loss": loss.detach(), "acc": accuracy(logits, y), "robust_loss": robust.detach(),
                      "eps": attack.eps}
