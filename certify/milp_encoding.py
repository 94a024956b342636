"""The exact mixed-integer encoding of a ReLU network over an input box (Tjeng et al. 2019), for
:mod:`certprune.certify.milp`, which solves it.

For a plain ``nn.Sequential`` of Linear / Conv2d / ReLU / Flatten / Normalize, the set of outputs over the box is
exactly a mixed-integer linear set: one continuous variable per neuron, an equality per affine output, and for each
ReLU whose input bounds ``[l, u]`` straddle 0 the big-M encoding with one binary ``d``::

    a >= z,   a <= z - l (1 - d),   a <= u d,   0 <= a <= u

A ReLU with ``l >= 0`` is the identity and one with ``u <= 0`` is 0, so only unstable ReLUs cost a binary: tighter
intermediate bounds (CROWN from :mod:`certprune.lirpa`) and sparser weights make the program smaller. Weights that
are exactly 0 (pruned) never enter the sparse constraint matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from certprune.models import Normalize

# Float32-derived ReLU bounds are widened by WIDEN (relative + absolute) before they tighten float64 intervals.
WIDEN = 1e-5
SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, Normalize)


@dataclass
class Network:
    """The model as alternating steps: ``("affine", W (csr, float64), b)`` and ``("relu",)`` on flat vectors."""
    steps: list
    input_shape: tuple


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


class BoundsDisagree(RuntimeError):
    """Two sound stages' bounds of one neuron do not overlap: one of them is wrong, so neither may prove anything."""


def output_bounds(net: Network, bounds: list) -> tuple[np.ndarray, np.ndarray]:
    """The network's output bounds from :func:`tightened_bounds`' affine ones: a final ReLU clamps them at 0."""
    lower, upper = bounds[-1]
    if net.steps[-1][0] == "relu":
        return np.maximum(lower, 0), np.maximum(upper, 0)
    return lower, upper


def tightened_bounds(net: Network, lower: np.ndarray, upper: np.ndarray, relu_bounds=None) -> list:
    """Interval arithmetic in float64 (the cheapest sound stage): the bounds of every affine output, in order. At
    each ReLU's input they are first intersected with ``relu_bounds`` (another sound stage's, widened by WIDEN for
    their rounding), so that later layers' intervals shrink too. Intervals that do not overlap raise
    :class:`BoundsDisagree`."""
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
            if not (np.isfinite(low).all() and np.isfinite(up).all()):
                raise BoundsDisagree(f"ReLU layer {len(bounds)}: the given bounds are not finite")
            low, up = np.maximum(lower, low), np.minimum(upper, up)
            if (low > up).any():
                raise BoundsDisagree(f"ReLU layer {len(bounds)}: interval and given bounds do not overlap at "
                                     f"{int((low > up).sum())} neurons")
            lower, upper = low, up
            bounds[-1] = (lower, upper)
        lower, upper = np.maximum(lower, 0), np.maximum(upper, 0)
    return bounds

