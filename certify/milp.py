"""Complete verification: the exact mixed-integer program of a ReLU network over an input box.

Bounds (IBP, CROWN, alpha-CROWN) can only prove; an image they leave open may be robust or not. The program
(:mod:`certprune.certify.milp_encoding`) describes the network's outputs over the box exactly, and for each class
``j`` the property names (most threatening first) HiGHS (``scipy.optimize.milp``) minimises ``logit_y - logit_j``.
A property is **verified** when the solver's *proven* lower bound (its dual bound, not its incumbent) exceeds
:func:`certprune.certify.proof.milp_tolerance` for every such class, **falsified** when a solution's input,
clipped to the box and re-checked by a plain float forward pass, has some ``logit_j >= logit_y``, and **unknown** otherwise (time limit, or a
candidate the forward pass refutes, which is logged).

The box is any per-pixel ``[lower, upper]`` (a VNN-LIB property's, :mod:`certprune.certify.vnnlib`); the L-inf
functions (``x``, ``eps``) only build the clipped box ``x -+ eps`` and call the box ones.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from certprune.attacks import PGD
from certprune.certify import proof
from certprune.certify.milp_encoding import BoundsDisagree, Network, Program, network, output_bounds, program, \
    tightened_bounds
from certprune.boxes import input_box, spec_of
from certprune.lirpa import BoundedProxy

log = logging.getLogger("certprune")
# HiGHS's own feasibility tolerances (1e-6 .. 1e-7 by default) tightened to the proof rule's; scipy passes them on.
HIGHS_OPTIONS = {f"{kind}_feasibility_tolerance": proof.HIGHS_FEASIBILITY for kind in ("primal", "dual", "mip")}


@dataclass
class Outcome:
    """One property's answer. ``margin_lower_bound``: the proven lower bound of ``min_j logit_y - logit_j`` over the
    box (for a falsified property, the margin at its counterexample, which is at most 0)."""
    status: str  # "verified" | "falsified" | "unknown"
    margin_lower_bound: float
    counterexample: torch.Tensor | None = None
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


@contextlib.contextmanager
def _silent_stdout():
    """HiGHS prints some of its internal diagnostics (``HighsMipSolverData::...``) straight to the process's
    stdout, past Python and its ``disp`` option; they are not for the user, so file descriptor 1 points at
    /dev/null while it runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def solve(prog: Program, label: int, other: int, time_limit: float):
    """HiGHS on ``min logit_label - logit_other``; scipy's result (``mip_dual_bound`` is the proven bound)."""
    cost = np.zeros(len(prog.var_lower))
    cost[prog.logits.start + label], cost[prog.logits.start + other] = 1.0, -1.0
    with warnings.catch_warnings(), _silent_stdout():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns that it passes HIGHS_OPTIONS on verbatim
        return milp(cost, integrality=prog.integrality, bounds=Bounds(prog.var_lower, prog.var_upper),
                    constraints=LinearConstraint(prog.matrix, prog.row_lower, prog.row_upper),
                    options={"time_limit": max(time_limit, 0.01), "disp": False, "mip_rel_gap": 1e-4,
                             **HIGHS_OPTIONS})


def _others(label: int, others, num_classes: int) -> list[int]:
    return [j for j in range(num_classes) if j != label] if others is None else [int(j) for j in others]


def verify_box(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, label: int, others=None,
               time_limit: float = 10.0, net: Network | None = None, relu_bounds=None,
               margin_bounds=None, inner=None) -> Outcome:
    """Decide "``logit_label > logit_j`` for every ``j`` in ``others`` (all other classes when None) everywhere in
    the box ``[lower, upper]``" (each shaped like one input) exactly. ``relu_bounds``: sound bounds of each ReLU's
    input from another stage; ``margin_bounds``: sound lower bounds per class of ``others``, in its order (skips
    those already proven and solves the most threatening class first, so a counterexample usually comes from the
    first program). ``inner``: the box a counterexample must lie in, when ``[lower, upper]`` is a real box rounded
    outward (default: the same box)."""
    started = time.perf_counter()
    net = net or network(model, lower[None])
    x_lower, x_upper = (b.detach().cpu().double().flatten().numpy() for b in (lower, upper))
    try:
        bounds = tightened_bounds(net, x_lower, x_upper, relu_bounds)
    except BoundsDisagree as error:
        log.warning("MILP left a property unknown: %s", error)
        return Outcome("unknown", float("-inf"), None, time.perf_counter() - started, {"why": "bounds disagree"})
    out_low, out_up = output_bounds(net, bounds)
    classes = _others(label, others, len(out_low))
    given = {} if margin_bounds is None else dict(zip(classes, proof.finite_or_worst(
        torch.as_tensor(margin_bounds, dtype=torch.float64).cpu()).tolist()))
    proven = {j: max(given.get(j, -np.inf), out_low[label] - out_up[j]) for j in classes}
    prog, why = program(net, x_lower, x_upper, bounds), "unknown"
    tolerance = proof.milp_tolerance(prog.var_lower, prog.var_upper)
    for j in sorted((j for j in classes if not proven[j] > tolerance), key=proven.get):
        remaining = time_limit - (time.perf_counter() - started)
        if remaining <= 0:
            why = "timeout"
            break
        result = solve(prog, label, j, remaining)
        dual = getattr(result, "mip_dual_bound", None)  # None when no ReLU is unstable: then an LP, exact when solved
        dual = result.fun if dual is None and result.status == 0 and not prog.stats["binaries"] else dual
        if result.status in (0, 1) and proof.usable(dual):
            proven[j] = max(proven[j], float(dual))
        if proven[j] > tolerance:
            continue
        if result.x is not None and result.fun is not None and result.fun <= 0:  # a tie violates "label beats j"
            candidate = torch.tensor(result.x[:len(x_lower)], dtype=lower.dtype).view_as(lower)
            checked = check_box(model, *(inner or (lower, upper)), label, classes, candidate)
            if checked is not None:
                return Outcome("falsified", checked[0], checked[1], time.perf_counter() - started, prog.stats)
            log.warning("MILP counterexample for class %d (margin %.3g) fails the float forward check; image left "
                        "unknown", j, result.fun)
        why = "timeout" if result.status == 1 else "unknown"
        break
    else:
        return Outcome("verified", min(proven.values()), None, time.perf_counter() - started, prog.stats)
    return Outcome("unknown", min(proven.values()), None, time.perf_counter() - started, {**prog.stats, "why": why})


def verify_image(model: nn.Module, x: torch.Tensor, label: int, eps: float, time_limit: float = 10.0,
                 net: Network | None = None, relu_bounds=None, margin_bounds=None) -> Outcome:
    """:func:`verify_box` on the image ``x`` (C, H, W): its L-inf ball clipped to [0, 1], every other class."""
    return verify_box(model, *input_box(x, eps), label, None, time_limit, net, relu_bounds, margin_bounds,
                      input_box(x, eps, outward=False))


def check_box(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, label: int, others,
              candidate: torch.Tensor):
    """``(margin, input)`` when ``candidate``, clipped into the box, lies in it and some ``logit_j`` (``j`` in
    ``others``; None: every other class) is ``>= logit_label`` in a plain float forward pass (``margin =
    logit_label - max_j logit_j <= 0``); else None. The only way a property becomes falsified."""
    candidate = torch.minimum(torch.maximum(candidate.to(lower.device, lower.dtype), lower), upper)
    inside = bool(((candidate >= lower) & (candidate <= upper)).all())
    with torch.no_grad():
        logits = model(candidate[None])[0].float()
    classes = _others(label, others, len(logits))
    margin = float(logits[label] - logits[classes].max())
    return (margin, candidate) if inside and margin <= 0 else None


def check_counterexample(model: nn.Module, x: torch.Tensor, label: int, eps: float, candidate: torch.Tensor):
    """:func:`check_box` on the clipped L-inf ball of ``x``, every other class."""
    return check_box(model, *input_box(x, eps, outward=False), label, None, candidate)


def _crown_bounds(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, spec: torch.Tensor,
                  batch_size: int = 64):
    """CROWN's ReLU input bounds ``[(lower, upper) (N, ...)]`` and spec lower bounds ``(N, rows)`` over the boxes."""
    proxy = BoundedProxy(model, lower[:1])
    parts = [proxy.box_relu_bounds(lower[i:i + batch_size], upper[i:i + batch_size], spec[i:i + batch_size])
             for i in range(0, len(lower), batch_size)]
    relus = [tuple(torch.cat([p[1][k][side] for p in parts]) for side in (0, 1)) for k in range(len(parts[0][1]))]
    return relus, torch.cat([p[0] for p in parts])


class BoxCoordinates(nn.Module):
    """``model(lower + z (upper - lower))``: PGD over ``z`` in the eps-0.5 ball around 0.5 (which is [0, 1]) searches
    exactly the per-pixel box, whatever its shape."""

    def __init__(self, model: nn.Module, lower: torch.Tensor, upper: torch.Tensor):
        super().__init__()
        self.model, self.lower, self.width = model, lower, upper - lower

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(self.lower + z * self.width)


def _attack(model, lower, upper, labels, spec, steps):
    """PGD's points in the boxes (margin objective over each property's classes), or None when ``steps`` is 0."""
    if not steps:
        return None
    threat = (spec < 0).any(1)  # (N, classes): the classes j of each property

    def objective(logits, y):
        return logits.masked_fill(~threat, float("-inf")).max(1).values - logits.gather(1, y[:, None]).squeeze(1)

    z = PGD(0.5, steps=steps, objective="margin").perturb(BoxCoordinates(model, lower, upper),
                                                          torch.full_like(lower, 0.5), labels, objective)
    return lower + z * (upper - lower)


def decide_box(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor, others=None,
               time_limit: float = 10.0, relu_bounds=None, margin_bounds=None,
               attack_steps: int = 20, inner=None) -> list[Outcome]:
    """An :class:`Outcome` per box (``lower``, ``upper``: ``(N, *input)``; ``others``: per property, the classes
    its label must beat, None for all). A PGD attack inside each box runs first: its counterexamples, re-checked like
    the MILP's, end a property at a fraction of a program's cost. Without ``relu_bounds`` (per ReLU, ``(lower,
    upper)`` over all boxes), CROWN's are computed; ``margin_bounds`` rows follow ``others``. ``inner``: the boxes
    counterexamples must lie in, when ``lower, upper`` are real boxes rounded outward (default: the same)."""
    inner_lower, inner_upper = inner or (lower, upper)
    if not len(lower):
        return []
    net = network(model, lower[:1])
    with torch.no_grad():
        spec = spec_of(labels, others, int(model(lower[:1]).shape[-1]))
    if relu_bounds is None:
        relu_bounds, margin_bounds = _crown_bounds(model, lower, upper, spec)
    started = time.perf_counter()
    adversarial = _attack(model, lower, upper, labels, spec, attack_steps)
    share, outcomes = (time.perf_counter() - started) / len(lower), []
    for i in range(len(lower)):
        label, classes = int(labels[i]), None if others is None else others[i]
        found = adversarial is not None and check_box(model, inner_lower[i], inner_upper[i], label, classes,
                                                      adversarial[i])
        if found:
            outcomes.append(Outcome("falsified", found[0], found[1], share, {"by": "PGD"}))
            continue
        outcome = verify_box(model, lower[i], upper[i], label, classes, time_limit, net,
                             [(low[i], up[i]) for low, up in relu_bounds],
                             None if margin_bounds is None else margin_bounds[i], (inner_lower[i], inner_upper[i]))
        outcome.seconds += share
        outcomes.append(outcome)
    return outcomes


def decide(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, time_limit: float = 10.0,
           relu_bounds=None, margin_bounds=None, attack_steps: int = 20) -> list[Outcome]:
    """:func:`decide_box` on the images ``x`` (those the model classifies correctly): each one's L-inf ball clipped
    to [0, 1], every other class."""
    lower, upper = input_box(x, eps)
    return decide_box(model, lower, upper, y, None, time_limit, relu_bounds, margin_bounds, attack_steps,
                      input_box(x, eps, outward=False))
