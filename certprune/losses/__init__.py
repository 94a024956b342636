"""Training losses: small objects with one signature, ``loss(model, x, y, epoch) -> (loss, metrics)``.

``epoch`` is fractional training progress within the phase (epoch index + batch fraction), which is all the
schedules need. Trainers never branch on a loss's kind; a path registers its losses in :data:`LOSSES` here.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from .adversarial import PGDAdversarialLoss, TradesLoss
from .base import Loss, NaturalLoss, accuracy
from .bounds import BoundLoss, IBPLoss, robust_cross_entropy
from .expressive import CCIBPLoss, ExpIBPLoss, MTLIBPLoss, SABRLoss
from .noise import GaussianLoss, StabilityLoss

LOSSES: dict[str, Callable[..., Loss]] = {
    "natural": NaturalLoss,
    "ibp": IBPLoss,            # verifiable training
    "crown-ibp": BoundLoss,
    "sabr": SABRLoss,          # expressive: between the PGD loss and the IBP loss
    "mtl-ibp": MTLIBPLoss,
    "cc-ibp": CCIBPLoss,
    "exp-ibp": ExpIBPLoss,
    "pgd": PGDAdversarialLoss,  # empirical robustness
    "trades": TradesLoss,
    "gaussian": GaussianLoss,   # randomized smoothing
    "stability": StabilityLoss,
}


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


def check_loss(name: Any, params: dict[str, Any]) -> None:
    """Fail now, in one line, on a loss that could not be built (building one touches no model or data)."""
    try:
        make_loss(name, **params)
    except TypeError as error:  # a parameter of the wrong type deep in a constructor
        raise ValueError(f"loss {name!r}: {error}") from None


__all__ = ["LOSSES", "Loss", "BoundLoss", "IBPLoss", "NaturalLoss", "GaussianLoss", "StabilityLoss",
           "PGDAdversarialLoss", "TradesLoss", "SABRLoss", "MTLIBPLoss", "CCIBPLoss", "ExpIBPLoss", "accuracy",
           "check_loss", "make_loss", "robust_cross_entropy"]
