"""Empirical robustness: clean and PGD (robust) accuracy of a model on a test set.

An image counts as robust when the model classifies it correctly both unperturbed and at the adversarial point the
attack found (best of its restarts), so robust accuracy never exceeds clean accuracy. It is an upper bound on the
true robust accuracy (a stronger attack can only lower it), unlike the verified accuracy of certify.verify.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from certprune.attacks import PGD, eval_mode, parse_eps
from certprune.data import batches


def attack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: PGD,
                    batch_size: int = 500) -> dict[str, Any]:
    """``clean_acc``, ``pgd_acc`` (robust accuracy under ``attack``), the number of images and the attack's
    settings (``attack``: norm, eps, steps, step size, restarts, objective, start)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if len(x) == 0:
        raise ValueError("no test images to attack")
    clean, robust = [], []
    with eval_mode(model):
        for xb, yb in tqdm(batches(x, y, batch_size), total=-(-len(x) // batch_size), desc="pgd", leave=False,
                           disable=None):
            with torch.no_grad():
                correct = model(xb).argmax(1) == yb
            x_adv = attack.perturb(model, xb, yb)
            with torch.no_grad():
                robust.append(correct & (model(x_adv).argmax(1) == yb))
            clean.append(correct)
    clean_t, robust_t = torch.cat(clean), torch.cat(robust)
    return {"clean_acc": clean_t.float().mean().item(), "pgd_acc": robust_t.float().mean().item(),
            "attack_examples": len(x), "attack": attack.describe()}


def make_attack(settings, default_eps) -> PGD:
    """A :class:`PGD` from an ``AttackConfig``-like object; its eps falls back to ``default_eps``."""
    eps = settings.eps if settings.eps is not None else default_eps
    if eps is None:
        raise ValueError("the attack needs an eps (none in the attack section or the training loss)")
    return PGD(parse_eps(eps), settings.norm, settings.steps, settings.step_size, settings.restarts,
               settings.objective)


def evaluate_attack(model: nn.Module, config, data, run_dir: Path | None = None) -> dict[str, Any]:
    """The pipeline's evaluation (``config.attack``; nothing when that section is absent)."""
    settings = config.attack
    if settings is None:
        return {}
    attack = make_attack(settings, config.loss.get("eps"))
    x, y = data.test_x, data.test_y
    if settings.max_examples is not None:
        x, y = x[:settings.max_examples], y[:settings.max_examples]
    return attack_accuracy(model, x, y, attack, settings.batch_size)
