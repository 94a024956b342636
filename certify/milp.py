"""Complete verification: the exact mixed-integer program of a ReLU network over the clipped L-inf box.

Bounds (IBP, CROWN, alpha-CROWN) can only prove; an image they leave open may be robust or not. For a plain
``nn.Sequential`` of Linear / Conv2d / ReLU / Flatten / Normalize, the set of outputs over the box is exactly a
mixed-integer linear set (Tjeng et al. 2019): one continuous variable per neuron, an equality per affine output, and
for each ReLU whose input bounds ``[l, u]`` straddle 0 the big-M encoding with one binary ``d``::

    a >= z,   a <= z - l (1 - d),   a <= u d,   0 <= a <= u

A ReLU with ``l >= 0`` is the identity and one with ``u <= 0`` is 0, so only unstable ReLUs cost a binary: tighter
intermediate bounds (CROWN from :mod:`certprune.lirpa`) and sparser weights make the program smaller. Weights that
are exactly 0 (pruned) never enter the sparse constraint matrix. For each wrong class ``j`` (most threatening
first) HiGHS (``scipy.optimize.milp``) minimises ``logit_y - logit_j``. An image is **verified** when the solver's
*proven* lower bound (its dual bound, not its incumbent) exceeds :data:`TOLERANCE` for every class, **falsified**
when a solution's input, clipped to the box and re-checked by a plain float forward pass, is misclassified, and
**unknown** otherwise (time limit, or a candidate the forward pass refutes, which is logged).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from certprune.attacks import PGD
from certprune.lirpa import BoundedProxy, input_box
from certprune.models import Normalize

log = logging.getLogger("certprune")
# Margins within TOLERANCE of 0 are left undecided: HiGHS's feasibility tolerances (1e-6 .. 1e-7) and float32
# bounds make a proven bound of 1e-9 meaningless. Float32-derived ReLU bounds are widened by WIDEN (relative + abs).
TOLERANCE = 1e-4
WIDEN = 1e-5
SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, Normalize)


@dataclass
class Network:
    """The model as alternating steps: ``("affine", W (csr, float64), b)`` and ``("relu",)`` on flat vectors."""
    steps: list
    input_shape: tuple


@dataclass
class Outcome:
    """One image's answer. ``margin_lower_bound``: the proven lower bound of ``min_j logit_y - logit_j`` over the box
    (for a falsified image, the margin at its counterexample, which is below 0)."""
    status: str  # "verified" | "falsified" | "unknown"
    margin_lower_bound: float
    counterexample: torch.Tensor | None = None
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


def _conv_matrix(conv: nn.Conv2d, shape: tuple, chunk: int = 1024) -> sp.csr_matrix:
    """The conv (without bias) as an exact sparse matrix: its response to each basis image is one column, and a
    response to a single 1 is the weight itself, with no rounding."""
    weight = conv.weight.detach().double().cpu()
    n = int(np.prod(shape))
    blocks = []
    for start in range(0, n, chunk):
        basis = torch.zeros(min(chunk, n - start), n, dtype=torch.float64)
        basis[torch.arange(len(basis)), torch.arange(start, start + len(basis))] = 1.0
        with torch.no_grad():
            response = conv._conv_forward(basis.view(-1, *shape), weight, None).flatten(1)
        blocks.append(sp.csr_matrix(response.numpy().T))
    matrix = sp.hstack(blocks).tocsr()
    matrix.eliminate_zeros()
    return matrix


def network(model: nn.Module, example: torch.Tensor) -> Network:
    """The model's affine and ReLU steps; a ValueError for anything but a plain Sequential of supported layers."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"MILP verification needs a plain nn.Sequential, got {type(model).__name__}")
    odd = [type(layer).__name__ for layer in model if not isinstance(layer, SUPPORTED)]
    if odd:
        raise ValueError(f"MILP verification supports Linear, Conv2d, ReLU, Flatten, Normalize; not {odd[0]}")
    steps, h = [], example[:1].detach()
    shape = tuple(h.shape[1:])
    for layer in model:
        with torch.no_grad():
            out = layer(h)
        bias = getattr(layer, "bias", None)
        bias = np.zeros(out[0].numel()) if bias is None else bias.detach().cpu().double().repeat_interleave(
            out[0].numel() // len(bias)).numpy()  # per channel, each pixel
        if isinstance(layer, nn.ReLU):
            steps.append(("relu",))
        elif isinstance(layer, nn.Flatten) and (layer.start_dim != 1 or layer.end_dim != -1):
            raise ValueError("MILP verification supports Flatten(1, -1) only")
        elif isinstance(layer, Normalize):
            std, mean = (t.detach().cpu().double().flatten().repeat_interleave(h[0, 0].numel()) for t in
                         (layer.std, layer.mean))
            steps.append(("affine", sp.diags((1 / std).numpy(), format="csr"), (-mean / std).numpy()))
        elif isinstance(layer, nn.Conv2d):
            steps.append(("affine", _conv_matrix(layer, tuple(h.shape[1:])), bias))
        elif isinstance(layer, nn.Linear):
            if h.dim() != 2:
                raise ValueError("MILP verification needs a Flatten before each Linear")
            weight = sp.csr_matrix(layer.weight.detach().cpu().double().numpy())
            weight.eliminate_zeros()
            steps.append(("affine", weight, bias))
        h = out
    return Network(steps, shape)


@dataclass
class Program:
    """The image's mixed-integer program without its objective (one per image, solved once per wrong class)."""
    matrix: sp.csr_matrix  # rows: row_lower <= matrix @ v <= row_upper; variables: var_lower <= v <= var_upper
    row_lower: np.ndarray
    row_upper: np.ndarray
    var_lower: np.ndarray
    var_upper: np.ndarray
    integrality: np.ndarray
    logits: slice  # where the output variables sit in v
    stats: dict


def program(net: Network, x_lower: np.ndarray, x_upper: np.ndarray, affine_bounds: list) -> Program:
    """Variables: input, then each step's output, then a binary block per ReLU step with unstable units."""
    columns, integral = [(x_lower, x_upper)], [False]
    rows = []  # (list of (column block, matrix), row lower, row upper)
    previous, affine_index, binaries = 0, 0, 0
    for step in net.steps:
        if step[0] == "affine":
            columns.append(affine_bounds[affine_index])
            integral.append(False)
            affine_index += 1
            current = len(columns) - 1  # z - W a_prev = b
            rows.append(([(current, sp.identity(len(step[2]), format="csr")), (previous, -step[1])], step[2], step[2]))
        else:
            lower, upper = columns[previous]
            unstable, active = (lower < 0) & (upper > 0), lower >= 0
            columns.append((np.maximum(lower, 0), np.maximum(upper, 0)))  # inactive units: fixed at 0
            integral.append(False)
            current = len(columns) - 1
            eye = sp.identity(len(lower), format="csr")
            keep = active | unstable  # a - z = 0 (active); a - z >= 0 (unstable)
            rows.append(([(current, eye[keep]), (previous, -eye[keep])], np.zeros(keep.sum()),
                         np.where(active[keep], 0.0, np.inf)))
            if unstable.any():
                m, low, up, select = int(unstable.sum()), lower[unstable], upper[unstable], eye[unstable]
                columns.append((np.zeros(m), np.ones(m)))
                integral.append(True)
                d = len(columns) - 1  # a - z - l d <= -l  and  a - u d <= 0
                rows.append(([(current, select), (previous, -select), (d, -sp.diags(low, format="csr"))],
                             np.full(m, -np.inf), -low))
                rows.append(([(current, select), (d, -sp.diags(up, format="csr"))], np.full(m, -np.inf), np.zeros(m)))
                binaries += m
        previous = current
    sizes = [len(c[0]) for c in columns]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    blocks = []
    for parts, _, _ in rows:
        line = [sp.csr_matrix((parts[0][1].shape[0], size)) for size in sizes]
        for index, matrix in parts:
            line[index] = matrix
        blocks.append(sp.hstack(line, format="csr"))
    matrix = sp.vstack(blocks, format="csr")
    matrix.eliminate_zeros()
    integrality = np.concatenate([np.full(size, int(flag)) for size, flag in zip(sizes, integral)])
    return Program(matrix, np.concatenate([r[1] for r in rows]), np.concatenate([r[2] for r in rows]),
                   np.concatenate([c[0] for c in columns]), np.concatenate([c[1] for c in columns]), integrality,
                   slice(offsets[previous], offsets[previous + 1]),
                   {"binaries": binaries, "nonzeros": int(matrix.nnz), "constraints": int(matrix.shape[0]),
                    "variables": int(offsets[-1])})


def solve(prog: Program, label: int, other: int, time_limit: float):
    """HiGHS on ``min logit_label - logit_other``; scipy's result (``mip_dual_bound`` is the proven bound)."""
    cost = np.zeros(len(prog.var_lower))
    cost[prog.logits.start + label], cost[prog.logits.start + other] = 1.0, -1.0
    return milp(cost, integrality=prog.integrality, bounds=Bounds(prog.var_lower, prog.var_upper),
                constraints=LinearConstraint(prog.matrix, prog.row_lower, prog.row_upper),
                options={"time_limit": max(time_limit, 0.01), "disp": False, "mip_rel_gap": 1e-4})


def tightened_bounds(net: Network, lower: np.ndarray, upper: np.ndarray, relu_bounds=None) -> list:
    """Interval arithmetic in float64 (the cheapest sound stage): the bounds of every affine output, in order. At
    each ReLU's input they are first intersected with ``relu_bounds`` (another sound stage's, in float32: widened by
    WIDEN, and ignored where the two cross), so that later layers' intervals shrink too."""
    bounds, given = [], iter(relu_bounds or [])
    for step in net.steps:
        if step[0] == "affine":
            positive, negative = step[1].maximum(0), step[1].minimum(0)
            lower, upper = positive @ lower + negative @ upper + step[2], positive @ upper + negative @ lower + step[2]
            bounds.append((lower, upper))
            continue
        other = next(given, None)
        if other is not None and bounds:
            low, up = (torch.as_tensor(b).detach().cpu().double().reshape(-1).numpy() for b in other)
            low, up = low - WIDEN * (1 + np.abs(low)), up + WIDEN * (1 + np.abs(up))
            low, up = np.maximum(lower, low), np.minimum(upper, up)
            crossed = low > up
            lower, upper = np.where(crossed, lower, low), np.where(crossed, upper, up)
            bounds[-1] = (lower, upper)
        lower, upper = np.maximum(lower, 0), np.maximum(upper, 0)
    return bounds


def verify_image(model: nn.Module, x: torch.Tensor, label: int, eps: float, time_limit: float = 10.0,
                 net: Network | None = None, relu_bounds=None, margin_bounds=None) -> Outcome:
    """Decide one image ``x`` (C, H, W) exactly. ``relu_bounds``: sound bounds of each ReLU's input from another
    stage; ``margin_bounds``: sound lower bounds per wrong class, in class order (skips those already proven and
    solves the most threatening class first, so a counterexample usually comes from the first program)."""
    started = time.perf_counter()
    net = net or network(model, x[None])
    x_lower, x_upper = (b.detach().cpu().double().flatten().numpy() for b in input_box(x, eps))
    bounds = tightened_bounds(net, x_lower, x_upper, relu_bounds)
    out_low, out_up = bounds[-1]
    classes = [j for j in range(len(out_low)) if j != label]
    given = dict(zip(classes, np.asarray(margin_bounds, dtype=float))) if margin_bounds is not None else {}
    proven = {j: max(given.get(j, -np.inf), out_low[label] - out_up[j]) for j in classes}
    prog, why = program(net, x_lower, x_upper, bounds), "unknown"
    for j in sorted((j for j in classes if proven[j] <= TOLERANCE), key=proven.get):
        remaining = time_limit - (time.perf_counter() - started)
        if remaining <= 0:
            why = "timeout"
            break
        result = solve(prog, label, j, remaining)
        dual = getattr(result, "mip_dual_bound", None)  # None when no ReLU is unstable: then an LP, exact when solved
        dual = result.fun if dual is None and result.status == 0 and not prog.stats["binaries"] else dual
        if result.status in (0, 1) and dual is not None and np.isfinite(dual):
            proven[j] = max(proven[j], float(dual))
        if proven[j] > TOLERANCE:
            continue
        if result.x is not None and result.fun is not None and result.fun < 0:
            candidate = torch.tensor(result.x[:len(x_lower)], dtype=x.dtype).view_as(x)
            checked = check_counterexample(model, x, label, eps, candidate)
            if checked is not None:
                return Outcome("falsified", checked[0], checked[1], time.perf_counter() - started, prog.stats)
            log.warning("MILP counterexample for class %d (margin %.3g) fails the float forward check; image left "
                        "unknown", j, result.fun)
        why = "timeout" if result.status == 1 else "unknown"
        break
    else:
        return Outcome("verified", min(proven.values()), None, time.perf_counter() - started, prog.stats)
    return Outcome("unknown", min(proven.values()), None, time.perf_counter() - started, {**prog.stats, "why": why})


def check_counterexample(model: nn.Module, x: torch.Tensor, label: int, eps: float, candidate: torch.Tensor):
    """``(margin, input)`` when ``candidate``, clipped into the box, lies in the box and in [0, 1] and the model
    misclassifies it (``margin = logit_y - max_j logit_j < 0``); else None. The only way an image becomes falsified."""
    lower, upper = input_box(x, eps)
    candidate = torch.minimum(torch.maximum(candidate.to(x.device, x.dtype), lower), upper)
    inside = bool(((candidate >= lower) & (candidate <= upper) & (candidate >= 0) & (candidate <= 1)).all())
    with torch.no_grad():
        logits = model(candidate[None])[0].float()
    others = logits.clone()
    others[label] = float("-inf")
    margin = float(logits[label] - others.max())
    return (margin, candidate) if inside and int(logits.argmax()) != label else None


def crown_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int = 64):
    """CROWN's ReLU input bounds ``[(lower, upper) (N, ...)]`` and margin lower bounds ``(N, classes-1)``."""
    proxy = BoundedProxy(model, x[:1])
    parts = [proxy.relu_input_bounds(x[i:i + batch_size], y[i:i + batch_size], eps)
             for i in range(0, len(x), batch_size)]
    relus = [tuple(torch.cat([p[1][k][side] for p in parts]) for side in (0, 1)) for k in range(len(parts[0][1]))]
    return relus, torch.cat([p[0] for p in parts])


def decide(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, time_limit: float = 10.0,
           relu_bounds=None, margin_bounds=None, attack_steps: int = 20) -> list[Outcome]:
    """An :class:`Outcome` per image (images the model classifies correctly). A PGD attack runs first: its
    counterexamples, re-checked like the MILP's, end an image at a fraction of a program's cost. Without
    ``relu_bounds`` (per ReLU, ``(lower, upper)`` over all images), CROWN's are computed."""
    if not len(x):
        return []
    net = network(model, x[:1])
    if relu_bounds is None:
        relu_bounds, margin_bounds = crown_bounds(model, x, y, eps)
    started = time.perf_counter()
    adversarial = PGD(eps, steps=attack_steps, objective="margin").perturb(model, x, y) if attack_steps else None
    share, outcomes = (time.perf_counter() - started) / len(x), []
    for i in range(len(x)):
        found = adversarial is not None and check_counterexample(model, x[i], int(y[i]), eps, adversarial[i])
        if found:
            outcomes.append(Outcome("falsified", found[0], found[1], share, {"by": "PGD"}))
            continue
        outcome = verify_image(model, x[i], int(y[i]), eps, time_limit, net, [(low[i], up[i]) for low, up in
                               relu_bounds], None if margin_bounds is None else margin_bounds[i])
        outcome.seconds += share
        outcomes.append(outcome)
    return outcomes
