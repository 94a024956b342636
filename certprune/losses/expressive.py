"""Expressive certified-training losses: SABR, MTL-IBP, CC-IBP and Exp-IBP.

De Palma et al. (ICLR 2024) call a family of losses *expressive* when one parameter in [0, 1] moves it from the
adversarial loss (cross-entropy at a PGD point) to the IBP loss over the whole eps box. They show that SABR (Müller
et al., ICLR 2023), which bounds a small box around the PGD point, is one, and that mixing the two ends directly
(MTL-IBP, CC-IBP, Exp-IBP) does as well. Why it helps: the IBP loss over-approximates the worst case so much that
training under it costs clean and PGD accuracy; a loss between the ends keeps more of both while still pulling up
the bounds a verifier needs.

What they share, so that each is the bound losses' sibling in every phase (pretrain, HYDRA's scores, fine-tune):
- eps ramps from 0 as the bound losses' does (``ramp_start``, ``ramp_epochs``); at eps 0 the loss is plain
  cross-entropy, without attack or bound;
- the attack is :class:`certprune.attacks.PGD` (L-inf, cross-entropy, uniform random start drawn from torch's global
  generator, which the pipeline seeds and checkpoints), run in eval mode at the scheduled eps, its step size scaled
  with eps as PGD training's is (``steps``; ``step_size`` defaults to ``2.5 * eps / steps``);
- the bounds are IBP through :mod:`certprune.lirpa`, so their gradient reaches weights and scores alike;
- ``warmup_reg``, ``warmup_tol``: Shi et al.'s warm-up regularisers, as for the bound losses (off by default; De
  Palma et al.'s recipes use them, from the IBP initialisation);
- ``acc`` is the batch's clean accuracy (eval mode, no gradient), as PGD training reports it.

The mixing parameter has no default: the published values differ by orders of magnitude between data sets, eps and
verifiers (De Palma et al.'s MNIST eps 0.1 recipes, trained at eps 0.2 and verified by branch and bound: alpha 0.01
for MTL-IBP, 0.1 for CC-IBP), and certprune verifies with IBP and CROWN, which favour values nearer the IBP end.
"""
from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import eval_mode
from ..boxes import input_box
from .adversarial import _Adversarial
from .base import accuracy
from .bounds import Bounded, robust_cross_entropy


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logit_y - logit_j`` for every ``j != y``, in the row order of the bounds' margins
    (:func:`certprune.boxes.margin_spec`): a point's exact margins, and ``robust_cross_entropy`` of them is its
    cross-entropy."""
    others = ~F.one_hot(y, logits.shape[1]).bool()
    return (logits.gather(1, y[:, None]) - logits)[others].view(len(y), -1)


def small_box(point: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
              radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SABR's box: half-width ``radius`` around ``point``, its centre moved per pixel just far enough for the box to
    fit in ``[lower, upper]`` (the eps box clipped to the data range), and cut to that box where it is narrower than
    ``2 * radius`` (next to the data range's edge). The cut keeps it inside the eps box even there; re-centring alone
    (as De Palma et al.'s code does) lets it out past ``x - eps`` for pixels within ``2 * radius - eps`` of 1."""
    centre = torch.clamp(point, lower + radius, upper - radius)
    return (centre - radius).maximum(lower), (centre + radius).minimum(upper)


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class _AttackThenBound(_Adversarial, Bounded, abc.ABC):
    """The eps ramp, the PGD attack at the scheduled eps, the bounded proxy; subclasses say what to bound and how
    to mix (:meth:`robust`)."""

    def __init__(self, eps, steps: int, step_size, ramp_start: float, ramp_epochs: float, warmup_reg: float,
                 warmup_tol: float):
        super().__init__(eps, "linf", steps, step_size, 1, ramp_start, ramp_epochs)
        self.set_warmup(warmup_reg, warmup_tol)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: float):
        attack = self.attack_at(epoch)
        if attack.eps == 0:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            return loss, {"loss": loss.detach(), "acc": accuracy(logits, y), "eps": 0.0}
        x_adv = attack.perturb(model, x, y)
        with eval_mode(model), torch.no_grad():
            clean_acc = accuracy(model(x), y)
        loss, metrics = self.robust(model, x, y, x_adv, attack.eps)
        loss = self.add_warmup(loss, model, x, attack.eps, self.eps.end, metrics)
        return loss, {"loss": loss.detach(), "acc": clean_acc, "eps": attack.eps, **metrics}

    @abc.abstractmethod
    def robust(self, model, x, y, x_adv, eps) -> tuple[torch.Tensor, dict]:
        """The loss and its metrics from the PGD point ``x_adv`` and the eps box of ``x``."""

    def eps_box(self, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return input_box(x, eps)  # the box the bound losses and the verifier bound: clipped to [0, 1], outward


class SABRLoss(_AttackThenBound):
    """SABR (Müller et al., ICLR 2023): cross-entropy of the IBP worst-case logits over a small box, half-width
    ``lam * eps``, around the PGD point inside the eps box (:func:`small_box`). ``lam = 1`` is the IBP loss over
    the whole box; ``lam = 0`` is cross-entropy at the PGD point. 8 PGD steps by default, as CTRAIN's SABR has."""

    def __init__(self, eps, lam, steps: int = 8, step_size=None, ramp_start: float = 0.0, ramp_epochs: float = 0.0,
                 warmup_reg: float = 0.0, warmup_tol: float = 0.5):
        super().__init__(eps, steps, step_size, ramp_start, ramp_epochs, warmup_reg, warmup_tol)
        self.lam = _fraction(lam, "SABR lam (the small box's size relative to eps)")

    def robust(self, model, x, y, x_adv, eps):
        lower = self.ibp_margins(model, x, y, *small_box(x_adv, *self.eps_box(x, eps), self.lam * eps))
        # a bound over the small box proves nothing about the eps box: no verified_acc here
        return robust_cross_entropy(lower), {}


class _Mixed(_AttackThenBound):
    """IBP over the whole eps box and the PGD point's logits, mixed by ``alpha`` (1: the IBP loss, 0: the PGD loss).
    De Palma et al. attack with one step (of a size that reaches the box's corners, as ``2.5 * eps`` does)."""

    def __init__(self, eps, alpha, steps: int = 1, step_size=None, ramp_start: float = 0.0,
                 ramp_epochs: float = 0.0, warmup_reg: float = 0.0, warmup_tol: float = 0.5):
        super().__init__(eps, steps, step_size, ramp_start, ramp_epochs, warmup_reg, warmup_tol)
        self.alpha = _fraction(alpha, f"{type(self).__name__} alpha")

    def robust(self, model, x, y, x_adv, eps):
        adv_logits = model(x_adv)
        lower = self.ibp_margins(model, x, y, *self.eps_box(x, eps))
        loss = self.mix(lower, margins(adv_logits, y))
        return loss, {"adv_acc": accuracy(adv_logits, y), "robust_loss": robust_cross_entropy(lower).detach(),
                      "verified_acc": (lower.min(1).values > 0).float().mean().detach()}

    @abc.abstractmethod
    def mix(self, ibp_lower: torch.Tensor, adv_margins: torch.Tensor) -> torch.Tensor:
        """The loss of IBP's margin lower bounds and the PGD point's margins, mixed by ``alpha``."""


class MTLIBPLoss(_Mixed):
    """MTL-IBP (De Palma et al., ICLR 2024): ``alpha * CE(IBP worst-case logits) + (1 - alpha) * CE(f(x_adv))``."""

    def mix(self, ibp_lower, adv_margins):
        return self.alpha * robust_cross_entropy(ibp_lower) + (1 - self.alpha) * robust_cross_entropy(adv_margins)


class CCIBPLoss(_Mixed):
    """CC-IBP (De Palma et al., ICLR 2024): cross-entropy of the convex combination of the margins,
    ``alpha * IBP lower bounds + (1 - alpha) * margins at x_adv``: worst-case logits of a point between the two."""

    def mix(self, ibp_lower, adv_margins):
        return robust_cross_entropy(self.alpha * ibp_lower + (1 - self.alpha) * adv_margins)


class ExpIBPLoss(_Mixed):
    """Exp-IBP (De Palma et al., ICLR 2024): ``CE(IBP worst-case logits) ** alpha * CE(f(x_adv)) ** (1 - alpha)``,
    each cross-entropy the batch's mean, as in the authors' code (``train.py``)."""

    def mix(self, ibp_lower, adv_margins):
        return robust_cross_entropy(ibp_lower) ** self.alpha * robust_cross_entropy(adv_margins) ** (1 - self.alpha)
