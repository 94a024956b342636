"""Certified training losses (IBP, CROWN-IBP): cross-entropy of the worst-case logits a sound bound implies.

eps, beta and kappa follow one ramp (:mod:`certprune.schedules`); auto_LiRPA is reached only through
:mod:`certprune.lirpa`, loaded when the first bound is needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..boxes import input_box, margin_spec
from ..quantities import parse_eps
from ..schedules import Interpolate, Ramp
from .base import accuracy


def robust_cross_entropy(margin_lower: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the worst-case logits implied by margin lower bounds (the true class's logit is 0)."""
    worst_logits = torch.cat([torch.zeros_like(margin_lower[:, :1]), -margin_lower], dim=1)
    return F.cross_entropy(worst_logits, torch.zeros(len(worst_logits), dtype=torch.long, device=worst_logits.device))


class Bounded:
    """What a loss that bounds its model keeps: one :class:`~certprune.lirpa.BoundedProxy`, rebuilt only when the
    model it follows changes (building one traces the network), and Shi et al.'s warm-up regularisers
    (:mod:`certprune.losses.warmup`), which it adds with weight ``warmup_reg * (1 - eps_now / eps)``: on during the
    eps ramp, gone at full eps. Off (``warmup_reg = 0``) by default; Shi et al. and De Palma et al. use 0.5 (with
    ``warmup_tol`` 0.5) from the IBP initialisation (``weight_init: ibp``)."""

    _proxy = None
    warmup_reg, warmup_tol = 0.0, 0.5

    def set_warmup(self, warmup_reg: float, warmup_tol: float) -> None:
        if isinstance(warmup_reg, bool) or not isinstance(warmup_reg, (int, float)) or not warmup_reg >= 0:
            raise ValueError(f"warmup_reg must be a number >= 0, got {warmup_reg!r}")
        if isinstance(warmup_tol, bool) or not isinstance(warmup_tol, (int, float)) or not 0 < warmup_tol < 1e9:
            raise ValueError(f"warmup_tol must be a finite number > 0, got {warmup_tol!r}")
        self.warmup_reg, self.warmup_tol = float(warmup_reg), float(warmup_tol)

    def add_warmup(self, loss: torch.Tensor, model: nn.Module, x: torch.Tensor, eps: float, target_eps: float,
                   metrics: dict) -> torch.Tensor:
        """``loss`` plus the weighted regularisers over the eps box (recorded as ``warmup_reg``, when switched on)."""
        if self.warmup_reg == 0:
            return loss
        from .warmup import warmup_regulariser

        weight = self.warmup_reg * (1 - eps / target_eps)
        metrics["warmup_reg"] = 0.0
        if weight <= 0:
            return loss
        regulariser = warmup_regulariser(model, *input_box(x, eps), self.warmup_tol)
        metrics["warmup_reg"] = regulariser.detach()
        return loss + weight * regulariser

    def proxy(self, model: nn.Module, x: torch.Tensor):
        from ..distributed import unwrap
        from ..lirpa import BoundedProxy  # auto_LiRPA loads only when a bound is needed

        model = unwrap(model)  # the proxy reads the layers themselves; gradients still reach DDP's hooks
        if self._proxy is None or self._proxy.model is not model:
            self._proxy = BoundedProxy(model, x)
        return self._proxy

    def ibp_margins(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor,
                    upper: torch.Tensor) -> torch.Tensor:
        """IBP lower bounds on ``logit_y - logit_j`` (``j != y``) over the per-pixel box ``[lower, upper]``, which
        need not be centred at ``x`` (SABR's small box); differentiable towards weights and scores."""
        proxy = self.proxy(model, x)
        return proxy.box_spec_bounds(lower, upper, margin_spec(y, proxy.num_classes), ["IBP"])[0]


class BoundLoss(Bounded):
    """IBP / CROWN-IBP certified training: ``kappa * CE(f(x)) + (1 - kappa) * CE(-margin_lower_bound)``.

    The margin lower bound mixes CROWN-IBP and IBP bounds as ``beta * crown_ibp + (1 - beta) * ibp``; an IBP loss
    is the case ``beta = 0``, and when beta is 0 the expensive CROWN-IBP pass is skipped. eps, beta and kappa follow
    one ramp (``ramp_start``, ``ramp_epochs``); a phase that starts at full eps uses ``ramp_epochs = 0``.
    ``warmup_reg``, ``warmup_tol``: Shi et al.'s warm-up regularisers (see :class:`Bounded`).
    """

    def __init__(self, eps: float, ramp_start: float = 0.0, ramp_epochs: float = 0.0, kappa_start: float = 1.0,
                 kappa_end: float = 0.0, beta_start: float = 1.0, beta_end: float = 0.0, warmup_reg: float = 0.0,
                 warmup_tol: float = 0.5):
        eps = parse_eps(eps)
        ramp = Ramp(ramp_start, ramp_epochs)
        self.eps = Interpolate(0.0, eps, ramp)
        self.kappa = Interpolate(kappa_start, kappa_end, ramp)
        self.beta = Interpolate(beta_start, beta_end, ramp)
        self.set_warmup(warmup_reg, warmup_tol)

    def __call__(self, model, x, y, epoch):
        eps, kappa, beta = self.eps(epoch), self.kappa(epoch), self.beta(epoch)
        logits = model(x)
        natural = F.cross_entropy(logits, y)
        metrics = {"acc": accuracy(logits, y), "eps": eps, "kappa": kappa, "beta": beta}
        if eps == 0 or kappa == 1:
            metrics["loss"] = natural.detach()
            return natural, metrics
        proxy = self.proxy(model, x)
        if beta > 0:
            ibp, crown_ibp = proxy.margin_lower_bounds_many(x, y, eps, ["IBP", "CROWN-IBP"])
            lower = beta * crown_ibp + (1 - beta) * ibp
        else:
            lower = proxy.margin_lower_bounds(x, y, eps, "IBP")
        robust = robust_cross_entropy(lower)
        loss = robust if kappa == 0 else kappa * natural + (1 - kappa) * robust
        loss = self.add_warmup(loss, model, x, eps, self.eps.end, metrics)
        metrics.update(loss=loss.detach(), robust_loss=robust.detach(),
                       verified_acc=(lower.min(1).values > 0).float().mean().detach())
        return loss, metrics


class IBPLoss(BoundLoss):
    """IBP certified training (Gowal et al. 2018): a :class:`BoundLoss` that never uses CROWN-IBP."""

    def __init__(self, eps: float, ramp_start: float = 0.0, ramp_epochs: float = 0.0, kappa_start: float = 1.0,
                 kappa_end: float = 0.5, warmup_reg: float = 0.0, warmup_tol: float = 0.5):
        super().__init__(eps, ramp_start, ramp_epochs, kappa_start, kappa_end, 0.0, 0.0, warmup_reg, warmup_tol)
