"""Projected gradient descent (PGD) attacks under L-inf and L2 budgets, in pixel space ([0, 1] images).

One small class, :class:`PGD`, serves adversarial training (:mod:`certprune.losses.adversarial`) and evaluation
(:mod:`certprune.certify.attack`). Every iterate stays inside the eps ball around the clean image *and* inside
the [0, 1] pixel box: a step is projected onto the ball first, then clipped to the box, and clipping only moves a
coordinate of the perturbation towards 0, so the result lies in both sets.

The attack runs with the whole model in eval mode, so batch-norm layers use (and never update) their running
statistics, and it restores every module's train/eval flag afterwards, also when the forward pass raises. Gradients
are taken with respect to the perturbation only (``torch.autograd.grad``), so no parameter's ``.grad`` is touched.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .quantities import parse_eps

NORMS = ("linf", "l2")
OBJECTIVES = ("ce", "margin")
STARTS = ("uniform", "normal", "zero")
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-example value to maximise


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode; restore each module's own flag on exit, even after an error."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def margin_objective(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j - z_y`` per example (Carlini-Wagner's margin): positive iff the example is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.max(1).values - true


def ce_objective(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _per_example_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """The L-p norm of each example, shaped to broadcast over ``t``."""
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.dim() - 1)))


@dataclass
class PGD:
    """PGD with ``steps`` steps of size ``step_size`` inside an ``eps`` ball (``norm`` linf or l2), best of
    ``restarts`` random starts.

    ``step_size`` defaults to ``2.5 * eps / steps`` (Madry et al.). ``objective`` is maximised: ``"ce"``
    (cross-entropy) or ``"margin"`` (largest wrong logit minus true logit); :meth:`perturb` also takes a callable.
    ``start``: ``"uniform"`` in the ball, ``"normal"`` (``0.001 * N(0, 1)``, TRADES's start) or ``"zero"``.
    Among restarts, each example keeps a perturbation that misclassifies it if any restart found one, and among
    those (or among all, if none did) the one of highest objective.
    """

    eps: float
    norm: str = "linf"
    steps: int = 10
    step_size: float | None = None
    restarts: int = 1
    objective: str = "ce"
    start: str = "uniform"

    def __post_init__(self):
        self.eps = parse_eps(self.eps)
        if self.norm not in NORMS:
            raise ValueError(f"unknown attack norm {self.norm!r}; choose linf or l2")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown attack objective {self.objective!r}; choose ce or margin")
        if self.start not in STARTS:
            raise ValueError(f"unknown attack start {self.start!r}; choose from {', '.join(STARTS)}")
        for name in ("steps", "restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"attack {name} must be a positive integer, got {value!r}")
        if self.step_size is None:
            self.step_size = 2.5 * self.eps / self.steps
        else:
            self.step_size = parse_eps(self.step_size, "attack step size")
            if self.step_size == 0 and self.eps > 0:
                raise ValueError("attack step size must be > 0")

    def describe(self) -> dict:
        """The settings as plain values (what ``metrics.json`` records as ``attack``)."""
        return {**asdict(self), "attack": "pgd"}

    # -- geometry -------------------------------------------------------------------------------------------------
    def _project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Onto the eps ball, then onto the pixel box ``0 <= x + delta <= 1``."""
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = _per_example_norm(delta, 2)
            delta = delta * (self.eps / norms.clamp_min(1e-12)).clamp(max=1.0)
        return (x + delta).clamp(0.0, 1.0) - x

    def _initial(self, x: torch.Tensor) -> torch.Tensor:
        if self.start == "zero" or self.eps == 0:
            return torch.zeros_like(x)
        if self.start == "normal":
            return self._project(x, 0.001 * torch.randn_like(x))
        if self.norm == "linf":
            return self._project(x, torch.empty_like(x).uniform_(-self.eps, self.eps))
        direction = torch.randn_like(x)
        direction = direction / _per_example_norm(direction, 2).clamp_min(1e-12)
        radius = torch.rand(len(x), device=x.device) ** (1.0 / x[0].numel())  # uniform in the ball's volume
        return self._project(x, self.eps * radius.view(-1, *([1] * (x.dim() - 1))) * direction)

    def _step(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return self.step_size * grad.sign()
        return self.step_size * grad / _per_example_norm(grad, 2).clamp_min(1e-12)

    # -- the attack -----------------------------------------------------------------------------------------------
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                objective: Objective | None = None) -> torch.Tensor:
        """Adversarial images for ``(x, y)`` (detached), within the budget and in [0, 1]."""
        if objective is None:
            objective = ce_objective if self.objective == "ce" else margin_objective
        x = x.detach()
        if self.eps == 0:
            return x.clone()
        # The weights are constant during an attack, so parametrized weights (masked layers) are computed once.
        with eval_mode(model), torch.enable_grad(), parametrize.cached():
            best = x.clone()
            best_value = torch.full((len(x),), float("-inf"), device=x.device)
            best_fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
            for _ in range(self.restarts):
                delta = self._initial(x)
                for _ in range(self.steps):
                    delta.requires_grad_(True)
                    value = objective(model(x + delta), y)
                    grad, = torch.autograd.grad(value.sum(), delta)
                    delta = self._project(x, delta.detach() + self._step(grad))
                with torch.no_grad():
                    logits = model(x + delta)
                    value = objective(logits, y)
                    fooled = logits.argmax(1) != y
                    better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (value > best_value))
                    best[better] = (x + delta)[better]
                    best_value = torch.where(better, value, best_value)
                    best_fooled |= fooled
        return best.detach()

    __call__ = perturb
