"""Training losses: small objects with one signature, ``loss(model, x, y, epoch) -> (loss, metrics)``.

``epoch`` is fractional training progress within the phase (epoch index + batch fraction), which is all the
schedules need. Trainers never branch on a loss's kind; new losses register in :data:`LOSSES`.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .loss_protocol import Loss, accuracy
from .schedules import Interpolate, Ramp


class NaturalLoss:
    """Plain cross-entropy on clean inputs."""

    def __call__(self, model, x, y, epoch):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits, y)}


def robust_cross_entropy(margin_lower: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the worst-case logits implied by margin lower bounds (the true class's logit is 0)."""
    worst_logits = torch.cat([torch.zeros_like(margin_lower[:, :1]), -margin_lower], dim=1)
    return F.cross_entropy(worst_logits, torch.zeros(len(worst_logits), dtype=torch.long, device=worst_logits.device))


class BoundLoss:
    """IBP / CROWN-IBP certified training: ``kappa * CE(f(x)) + (1 - kappa) * CE(-margin_lower_bound)``.

    The margin lower bound mixes CROWN-IBP and IBP bounds as ``beta * crown_ibp + (1 - beta) * ibp``; an IBP loss
    is the case ``beta = 0``, and when beta is 0 the expensive CROWN-IBP pass is skipped. eps, beta and kappa follow
    one ramp (``ramp_start``, ``ramp_epochs``); a phase that starts at full eps uses ``ramp_epochs = 0``.
    """

    def __init__(self, eps: float, ramp_start: float = 0.0, ramp_epochs: float = 0.0, kappa_start: float = 1.0,
                 kappa_end: float = 0.0, beta_start: float = 1.0, beta_end: float = 0.0):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        ramp = Ramp(ramp_start, ramp_epochs)
        self.eps = Interpolate(0.0, eps, ramp)
        self.kappa = Interpolate(kappa_start, kappa_end, ramp)
        self.beta = Interpolate(beta_start, beta_end, ramp)
        self._proxy = None

    def proxy(self, model: nn.Module, x: torch.Tensor):
        from .distributed import unwrap
        from .lirpa import BoundedProxy  # auto_LiRPA loads only when a bound is needed

        model = unwrap(model)  # the proxy reads the layers themselves; gradients still reach DDP's hooks
        if self._proxy is None or self._proxy.model is not model:
            self._proxy = BoundedProxy(model, x)
        return self._proxy

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
        metrics.update(loss=loss.detach(), robust_loss=robust.detach(),
                       verified_acc=(lower.min(1).values > 0).float().mean().detach())
        return loss, metrics


class IBPLoss(BoundLoss):
    """IBP certified training (Gowal et al. 2018): a :class:`BoundLoss` that never uses CROWN-IBP."""

    def __init__(self, eps: float, ramp_start: float = 0.0, ramp_epochs: float = 0.0, kappa_start: float = 1.0,
                 kappa_end: float = 0.5):
        super().__init__(eps, ramp_start, ramp_epochs, kappa_start, kappa_end, beta_start=0.0, beta_end=0.0)


LOSSES: dict[str, Callable[..., Loss]] = {
    "natural": NaturalLoss,
    "ibp": IBPLoss,
    "crown-ibp": BoundLoss,
}
# Other certification paths register their losses below (one line each).
from .losses_adversarial import PGDAdversarialLoss, TradesLoss  # noqa: E402  (empirical robustness)
LOSSES.update({"pgd": PGDAdversarialLoss, "trades": TradesLoss})
from .losses_noise import GaussianLoss, StabilityLoss  # noqa: E402  (randomized smoothing)
LOSSES.update({"gaussian": GaussianLoss, "stability": StabilityLoss})


def make_loss(name: str, **params) -> Loss:
    """Build a registered loss; unknown names and parameters are errors, not silently ignored."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(sorted(LOSSES))}")
    factory = LOSSES[name]
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} takes no parameter {', '.join(unknown)}; it takes {', '.join(accepted) or 'none'}")
    missing = [key for key, p in accepted.items() if p.default is inspect.Parameter.empty and key not in params]
    if missing:
        raise ValueError(f"loss {name!r} needs {', '.join(missing)} (e.g. --set loss.{missing[0]}=...)")
    return factory(**params)
