"""AutoAttack (Croce & Hein, ICML 2020): the field's standard empirical robustness figure, as RobustBench ranks by.

Why this package. The standard version is APGD-CE (no restarts, 100 iterations), APGD-T (targeted DLR, 9 target
classes, 100 iterations), FAB-T (9 target classes, 100 iterations) and Square (5,000 queries, p_init 0.8), each run
only on the images every earlier attack failed on. Two maintained packages offer it:

* ``pyautoattack`` 0.2.0 (PyPI, the reference repository fra31/auto-attack packaged): its attack modules
  (autopgd_base, fab_pt, fab_base, square, fab_projections, other_utils) are the reference's at commit a392200 line
  for line, save the import paths, and its ``_set_version('standard')`` sets exactly the values above. Only the
  driver differs (keyword-only arguments, a ``logging`` logger instead of prints, an optional resume file). It has
  no dependencies, so installing it never moves the torch build the Makefile chose.
* ``torchattacks`` 3.5.1 ``AutoAttack``: it builds APGD, APGD-T and FAB with their default ``steps=10``, a tenth of
  the reference's 100 iterations, so its "standard" is weaker than the reference's. It also requires torchvision
  and pins ``requests~=2.25.1``; pip then replaces the CPU torch with a CUDA build to satisfy torchvision.

So certprune uses ``pyautoattack``. The settings it actually ran with are read back from the attack objects after
the run and returned under ``autoattack``, so a figure always says what produced it.

An image counts as robust when it is classified correctly unperturbed AND at the attack point (certprune evaluates
the model there itself, not trusting the package's labels), as for PGD (:mod:`certprune.certify.attack`). Every
returned point is re-checked to lie in the eps ball and the [0, 1] box (float slack 1e-6) before any figure is
computed: a point outside would make the figure meaningless, so that is an error, never a silent clip.
"""
from __future__ import annotations

import importlib.metadata
import time
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from certprune.attacks import eval_mode, parse_eps

PACKAGE = "pyautoattack"
NORMS = {"linf": "Linf", "l2": "L2"}  # certprune's names -> the package's
VERSIONS = ("standard", "plus")
REFERENCE_TARGETS = 9  # APGD-T and FAB-T target classes of the standard version
SLACK = 1e-6  # float32 rounding of x + delta, clipped, minus x


def load_package():
    """The AutoAttack package, or a one-line ValueError saying how to install it (it is an optional extra)."""
    try:
        import pyautoattack
    except ImportError:
        raise ValueError(f"AutoAttack needs the {PACKAGE} package: pip install certprune[attacks]") from None
    return pyautoattack


def check_settings(settings) -> tuple[str, float, str, int, int]:
    """``(norm, eps, version, batch_size, seed)`` from a settings object, or a one-line ValueError."""
    norm = str(getattr(settings, "norm", "linf")).lower()
    if norm not in NORMS:
        raise ValueError(f"AutoAttack supports the norms {' and '.join(NORMS)}, not {settings.norm!r}")
    eps = parse_eps(settings.eps)
    version = getattr(settings, "version", None) or "standard"
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; choose {' or '.join(VERSIONS)}")
    batch_size = getattr(settings, "batch_size", 500)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    seed = getattr(settings, "seed", None)
    return norm, eps, version, batch_size, 0 if seed is None else int(seed)


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return model(x[:1]).shape[1]


def check_adversarial(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> None:
    """Raise unless every ``x_adv[i]`` lies within ``eps`` of ``x[i]`` (``norm``) and in [0, 1], up to SLACK."""
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        raise RuntimeError(f"{PACKAGE} returned adversarial points of another shape or with NaN/inf values")
    delta = (x_adv.to(x.dtype) - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    flat = x_adv.flatten(1)
    outside = (size > eps * (1 + 1e-5) + SLACK) | (flat < -SLACK).any(1) | (flat > 1 + SLACK).any(1)
    if outside.any():
        raise RuntimeError(f"{PACKAGE} returned {int(outside.sum())} points outside the {norm} ball of radius {eps} "
                           f"or the [0, 1] box (largest distance {float(size.max()):.6g}); no figure recorded")


def _used(adversary, version: str, norm: str, eps: float, batch_size: int, seed: int) -> dict[str, Any]:
    """The settings the attacks ran with, read back from the attack objects (not restated from the defaults)."""
    apgd, apgd_t, fab, square = adversary.apgd, adversary.apgd_targeted, adversary.fab, adversary.square
    try:
        package_version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # the package's files without its metadata (a vendored copy)
        package_version = "unknown"
    return {"attack": "autoattack", "package": PACKAGE, "package_version": package_version,
            "version": version, "norm": norm, "eps": eps, "attacks": list(adversary.attacks_to_run),
            "apgd_ce": {"iterations": apgd.n_iter, "restarts": apgd.n_restarts, "rho": apgd.thr_decr},
            "apgd_t": {"iterations": apgd_t.n_iter, "restarts": apgd_t.n_restarts,
                       "target_classes": apgd_t.n_target_classes},
            "fab_t": {"iterations": fab.n_iter, "restarts": fab.n_restarts, "target_classes": fab.n_target_classes},
            "square": {"queries": square.n_queries, "p_init": square.p_init},
            "batch_size": batch_size, "seed": seed}


def attack_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Per image: classified correctly, and still correctly at AutoAttack's point (boolean vectors of ``len(x)``),
    the attack points themselves, and the settings used. The caller's torch random state is left as it was (the
    package reseeds the global generator with ``seed`` before each attack)."""
    norm, eps, version, batch_size, seed = check_settings(settings)
    package = load_package()
    if len(x) == 0:
        raise ValueError("no test images to attack")
    devices = [x.device] if x.device.type == "cuda" else []
    # Weights are constant during the attack: parametrized (masked) weights are computed once.
    with eval_mode(model), parametrize.cached(), torch.random.fork_rng(devices=devices):
        num_classes = _num_classes(model, x)
        if num_classes < 4:  # APGD-T's targeted DLR loss reads the 4 largest logits
            raise ValueError(f"AutoAttack needs a model with at least 4 classes, this one has {num_classes}")
        clean = _predict(model, x, batch_size) == y
        adversary = package.AutoAttack(model, eps=eps, norm=NORMS[norm], seed=seed, version=version,
                                       device=x.device)
        targets = min(REFERENCE_TARGETS, num_classes - 1)  # the reference's 9 with 10 or more classes
        adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = targets
        if eps == 0:
            x_adv = x.clone()
        else:
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
        x_adv = x_adv.to(x.device)
        check_adversarial(x, x_adv, eps, norm)
        robust = clean & (_predict(model, x_adv, batch_size) == y)
    return clean, robust, x_adv, _used(adversary, version, norm, eps, batch_size, seed)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings) -> dict[str, Any]:
    """The evaluator: ``clean_acc``, ``autoattack_acc``, ``autoattack_examples`` (images attacked), ``autoattack``
    (the settings actually used, package and version included) and ``seconds_autoattack`` of ``model`` on
    ``(x, y)``. ``settings`` is any object with ``norm`` (linf / l2), ``eps`` (a float; ``"8/255"`` is parsed
    too), ``batch_size``, ``seed`` and ``version`` ("standard")."""
    start = time.perf_counter()
    clean, robust, _, used = attack_examples(model, x, y, settings)
    return {"clean_acc": clean.float().mean().item(), "autoattack_acc": robust.float().mean().item(),
            "autoattack_examples": len(x), "autoattack": used,
            "seconds_autoattack": time.perf_counter() - start}
