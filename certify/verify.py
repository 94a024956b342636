"""Verified accuracy under an L-inf budget: a cascade of sound bounds (IBP, CROWN, alpha-CROWN) and, last, complete
verification (MILP, :mod:`certprune.certify.milp`), which also finds counterexamples.

An image counts as verified when a sound bound proves every margin ``logit_y - logit_j`` positive over the whole
eps box (clipped to [0, 1]); that implies it is also classified correctly. Every bound is sound, so an image is
verified when any requested method verifies it (``verified_acc``).

Full CROWN costs far more than IBP (about 20 s per 256 MNIST images for ``cnn-small`` on 2 CPU cores, against
0.1 s), alpha-CROWN more again and the MILP most, so the methods run as a cascade, cheapest first, each only on the
images that are classified correctly and still undecided. The first method's figure is then its own
(``verified_acc_<method>``); a later one reports only the images it added (``verified_extra_<method>``).
``cascade=False`` (in :func:`verify`) runs every bound on every image and reports ``verified_acc_<method>`` for each.

The gap between verified and true robust accuracy is the images no stage decides. The MILP closes it: each image it
reaches ends verified, falsified (a counterexample, re-checked by a float forward pass) or unknown (its time limit).
When no image is left unknown, :func:`evaluate` reports ``robust_acc_exact``.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from certprune import distributed
from certprune.boxes import input_box
from certprune.lirpa import METHODS, canonical_method
from certprune.quantities import parse_eps

from .cascade import COMPLETE, STAGES, Cascade, complete_stage



def method_key(method: str) -> str:
    return method.lower().replace("-", "_")


def verify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, methods=("IBP", "CROWN"),
           batch_size: int = 256, cascade: bool = True) -> dict[str, float]:
    """Clean accuracy and verified accuracy (union and per method) of ``model`` on ``(x, y)``."""
    correct, by_method = verify_examples(model, x, y, eps, methods, batch_size, cascade)
    verified = torch.zeros_like(correct)
    for proven in by_method.values():
        verified |= proven
    n = len(x)
    result = {"clean_acc": correct.float().mean().item(), "verified_acc": verified.float().mean().item(),
              "eps": eps, "verify_method": ("cascade " if cascade else "union ") + "+".join(by_method),
              "verified_examples": n}
    for position, (method, proven) in enumerate(by_method.items()):
        kind = "extra" if cascade and position > 0 else "acc"
        result[f"verified_{kind}_{method_key(method)}"] = proven.float().mean().item()
    return result


def _spelling(name) -> str:
    try:
        return complete_stage(name) or canonical_method(name)
    except ValueError:
        return "?"


def _canonical(methods, allowed) -> list[str]:
    """The methods' canonical spellings (case-insensitive), or a ValueError naming the unknown ones."""
    names = [_spelling(m) for m in methods]
    unknown = [str(m) for m, name in zip(methods, names) if name not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown verification method {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(allowed)}")
    return names


def ordered_methods(methods) -> list[str]:
    """The requested stages, canonically spelled, once each, in the cascade's order (:data:`STAGES`)."""
    return sorted(set(_canonical(list(methods), STAGES)), key=STAGES.index)


def verify_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, methods=("IBP", "CROWN"),
                    batch_size: int = 256, cascade: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per image: classified correctly, and proven by each method (boolean vectors of ``len(x)``, on the CPU).

    With ``cascade`` a method bounds only the images the methods before it left open (one :class:`Cascade`, as
    :func:`evaluate`); without, every method bounds every correctly classified image (a fresh cascade each), so each
    vector is that method's own figure. Under torchrun each process bounds its share of the images and the vectors
    are merged, so every process gets the single-process result."""
    methods = _canonical(list(methods), METHODS)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    model.eval()
    positions = distributed.shard(len(x), batch_size)
    n, x, y = len(x), x[positions], y[positions]
    with torch.no_grad():
        correct = torch.zeros(len(x), dtype=torch.bool)  # not torch.cat: a rank's share may be empty
        for start in range(0, len(x), batch_size):
            part = slice(start, start + batch_size)
            correct[part] = (model(x[part]).argmax(1) == y[part]).cpu()
    box = input_box(x, eps)
    shared = Cascade(model, *box, y) if cascade else None
    by_method = {}
    for method in methods:
        state = shared or Cascade(model, *box, y)
        todo = state.open(correct)
        if len(todo):
            state.bound(method, todo, batch_size)
        by_method[method] = state.stage == STAGES.index(method) + 1
    return (distributed.merge(correct, positions, n),
            {method: distributed.merge(proven, positions, n) for method, proven in by_method.items()})


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings) -> dict:
    """The evaluator: the cascade of ``settings.bound_methods`` (any of :data:`STAGES`, run in that order) at
    ``settings.eps``; ``settings`` also gives ``batch_size``, ``timeout`` (seconds per image, MILP),
    ``alpha_iterations`` and ``alpha_lr`` (and optionally ``milp_attack_steps``, the PGD steps that try each image
    before its MILP, 20; 0 for the MILP alone, as benchmarks/bench_milp.py --milp-only times it). Figures are fractions of ``len(x)``; ``_per_image`` (one dict per image,
    in the order of ``x``) and ``_counterexamples`` (falsified images' inputs, rows of ``_counterexample_index``)
    are for the caller to pop. Under torchrun each process decides its share and every process gets all of it."""
    eps = parse_eps(settings.eps)
    methods = ordered_methods(settings.bound_methods)
    model.eval()
    positions = distributed.shard(len(x), int(settings.batch_size))
    n, x, y = len(x), x[positions], y[positions]
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)]) if len(x) else torch.zeros(0, 1)
    prediction, correct = logits.argmax(1).cpu(), (logits.argmax(1) == y).cpu()
    cascade = Cascade(model, *input_box(x, eps), y, None, input_box(x, eps, outward=False))
    figures: dict = {"eps": eps, "verify_method": "cascade " + "+".join(methods), "verified_examples": n}
    complete_seconds = torch.zeros(len(x), dtype=torch.float64)  # per image: the complete stages share its timeout
    for method in methods:
        todo = cascade.open(correct)  # a misclassified image is neither verified nor falsified: it is not robust
        started = time.perf_counter()
        if method in COMPLETE:
            before = cascade.seconds.clone()
            cascade.complete(method, todo, float(settings.timeout) - complete_seconds,
                             getattr(settings, "milp_attack_steps", 20))
            complete_seconds += cascade.seconds - before
        elif len(todo):
            cascade.bound(method, todo, int(settings.batch_size), "MILP" in methods, settings.alpha_iterations,
                          settings.alpha_lr)
        spent = time.perf_counter() - started
        if method not in COMPLETE and len(todo):
            cascade.seconds[todo] += spent / len(todo)
        figures[f"seconds_{method_key(method)}"] = distributed.mean_across_ranks({"s": spent})["s"]
    return _summary(figures, methods, cascade, prediction, y, positions, n)


def figures_of(rows: list[dict], methods: list[str]) -> dict[str, float]:
    """The verification figures of per-image ``rows`` (fractions of all of them): the union, each stage's share, and
    ``robust_acc_exact`` when no correctly classified image is left undecided. One definition for a single call
    and for a run's TSV lines."""
    n = len(rows)
    frac = lambda test: sum(1 for row in rows if test(row)) / n if n else 0.0  # noqa: E731
    correct = lambda row: row["prediction"] == row["label"]  # noqa: E731
    unknown = lambda row: correct(row) and not row["verified_by"] and not row["falsified"]  # noqa: E731
    figures = {"clean_acc": frac(correct), "verified_acc": frac(lambda row: bool(row["verified_by"])),
               "falsified_acc": frac(lambda row: row["falsified"]), "unknown_acc": frac(unknown)}
    figures["decided_fraction"] = 1.0 - figures["unknown_acc"]
    figures["predicted_classes"] = len({row["prediction"] for row in rows})  # 1: a constant output, training collapsed
    figures["falsified_by_attack_acc"] = frac(lambda row: row["falsified_by"] == "PGD")
    for position, method in enumerate(methods):
        kind = "acc" if position == 0 else "extra"
        figures[f"verified_{kind}_{method_key(method)}"] = frac(lambda row: row["verified_by"] == method)
    if not any(unknown(row) for row in rows):
        figures["robust_acc_exact"] = figures["verified_acc"]
    return figures


def _summary(figures, methods, cascade, prediction, y, positions, n) -> dict:
    """Merge the ranks' shares and turn the per-image state into figures and records."""
    merge = lambda values: distributed.merge(values, positions, n)  # noqa: E731
    stage, falsified = merge(cascade.stage), merge(cascade.falsified)
    by = merge(torch.tensor([STAGES.index(by) + 1 if by in STAGES else 0 for by in cascade.falsified_by]))
    margin, seconds, prediction, label = (merge(cascade.margin), merge(cascade.seconds), merge(prediction),
                                          merge(y.cpu()))
    flat = cascade.counterexamples.flatten(1)
    if not isinstance(positions, slice):  # one exact merge of every pixel: positions of image p are p*D .. p*D+D-1
        width = flat.shape[1]
        flat = distributed.merge(flat.flatten(), (positions[:, None] * width + torch.arange(width)).flatten(),
                                 n * width).view(n, width)
    figures["_per_image"] = [
        {"index": i, "label": int(label[i]), "prediction": int(prediction[i]),
         "verified_by": STAGES[int(stage[i]) - 1] if stage[i] > 0 else "", "falsified": bool(falsified[i]),
         "falsified_by": (STAGES[int(by[i]) - 1] if by[i] > 0 else "PGD") if falsified[i] else "",
         "margin_lower_bound": float(margin[i]) if torch.isfinite(margin[i]) else None,
         "seconds": float(seconds[i])} for i in range(n)]
    figures.update(figures_of(figures["_per_image"], methods))
    index = torch.nonzero(falsified).flatten()
    figures["_counterexamples"] = flat[index].view(len(index), *cascade.counterexamples.shape[1:])
    figures["_counterexample_index"] = index.tolist()
    return figures
