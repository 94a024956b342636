"""Attack evaluation (empirical robustness, not a certificate): clean and PGD (robust) accuracy on a test set.

An image counts as robust when the model classifies it correctly both unperturbed and at the adversarial point the
attack found (best of its restarts), so robust accuracy never exceeds clean accuracy. It is an upper bound on the
true robust accuracy (a stronger attack can only lower it), unlike the verified accuracy of certify.verify.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from certprune import distributed
from certprune.attacks import PGD, eval_mode, parse_eps


def attack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: PGD,
                    batch_size: int = 500, seed: int | None = None) -> dict[str, Any]:
    """``clean_acc``, ``pgd_acc`` (robust accuracy under ``attack``), the number of images and the attack's
    settings (``attack``: norm, eps, steps, step size, restarts, objective, start). See :func:`attack_examples`."""
    clean_t, robust_t = attack_examples(model, x, y, attack, batch_size, seed)
    return {"clean_acc": clean_t.float().mean().item(), "pgd_acc": robust_t.float().mean().item(),
            "attack_examples": len(x), "attack": attack.describe()}


def attack_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: PGD, batch_size: int = 500,
                    seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: classified correctly, and still correctly under the attack (boolean vectors of ``len(x)``).

    With a ``seed``, the random starts of batch ``b`` (images ``b * batch_size ...``) are drawn from torch's
    generator seeded by ``(seed, b)`` (the caller's generator state is restored afterwards). Under torchrun each
    process attacks every world_size-th batch and the vectors are merged: with a seed, the single-process result.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if len(x) == 0:
        raise ValueError("no test images to attack")
    positions = distributed.shard(len(x), batch_size)
    n, x, y = len(x), x[positions], y[positions]
    first = torch.arange(n)[positions][::batch_size].tolist()  # each local batch's first image in the whole set
    clean = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    robust = torch.zeros_like(clean)
    devices = [x.device] if x.device.type == "cuda" else []
    rng = torch.random.fork_rng(devices=devices) if seed is not None else contextlib.nullcontext()
    with eval_mode(model), rng:
        for number, start in enumerate(tqdm(range(0, len(x), batch_size), desc="pgd", leave=False, disable=None)):
            part = slice(start, start + batch_size)
            xb, yb = x[part], y[part]
            if seed is not None:
                torch.manual_seed(int(seed) * 1_000_003 + first[number] // batch_size)
            with torch.no_grad():
                clean[part] = model(xb).argmax(1) == yb
            x_adv = attack.perturb(model, xb, yb)
            with torch.no_grad():
                robust[part] = clean[part] & (model(x_adv).argmax(1) == yb)
    return distributed.merge(clean, positions, n), distributed.merge(robust, positions, n)


def make_attack(settings) -> PGD:
    """A :class:`PGD` from validated attack settings (eps already filled in from the run's loss)."""
    return PGD(parse_eps(settings.eps), settings.norm, settings.steps, settings.step_size, settings.restarts,
               settings.objective)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings) -> dict[str, Any]:
    """The evaluator: ``pgd_acc`` of ``model`` on ``(x, y)`` under the attack ``settings`` describe."""
    return attack_accuracy(model, x, y, make_attack(settings), settings.batch_size, seed=settings.seed)
