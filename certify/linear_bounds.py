"""Linear bounds of a ReLU network's margins over a box, batched over subdomains: CROWN, alpha-CROWN and beta-CROWN
in plain torch, for branch and bound (:mod:`certprune.certify.bab`).

The network (a :class:`~certprune.certify.milp_encoding.Network`) becomes a :class:`Chain`: ``K`` ReLU layers
between ``K + 1`` dense affine maps, ``z_k = W_k h_{k-1} + b_k`` with ``h_{-1} = x`` and ``h_k = relu(z_k)``, and
the output ``z_K``. A subdomain is the input box plus a split of some ReLUs (``+1``: ``z >= 0``, ``-1``: ``z <= 0``,
``0``: free). Its margin bound is CROWN's backward substitution (Zhang et al. 2018): starting from a spec row ``c``
on the output, each affine map is substituted, each ReLU replaced by a linear bound of the right side, and the last
linear function of ``x`` is minimised over the box. Over ``z in [l, u]`` with ``l < 0 < u``, ``relu(z) <= u (z - l)
/ (u - l)`` and ``relu(z) >= alpha z`` for any ``alpha in [0, 1]`` (alpha-CROWN optimises these slopes); a split ReLU
is exact on its side (its bound clamped to ``l = 0`` or ``u = 0``), and the split's constraint ``s z >= 0`` enters
with a Lagrange multiplier ``beta >= 0`` as ``- beta s z`` (beta-CROWN, Wang et al. 2021). For ANY alpha in [0, 1],
beta >= 0 and sound intermediate bounds the result is a lower bound of the margin over the subdomain; optimisation
only makes it tighter.

**When a bound is a proof** (:func:`proven`): when it is finite and above the proof rule's tolerance
(:data:`certprune.certify.proof.BOUND_TOLERANCE`, as for every stage) after its rounding allowance is taken off. Every bound that can close a domain is computed in float64 (the weights and the float32 box convert to float64
exactly) by :func:`backward` with a :class:`Scale`, which also bounds, from above, the effect of every floating-point
rounding of that computation (the standard ``|fl(a . b) - a . b| <= gamma_n |a| . |b|``, ``gamma_n = n u / (1 - n
u)``, applied to each product, sum and relaxation line, and to the products that merged consecutive affine steps)
and subtracts it. So a proven bound is positive in exact arithmetic, for the network's float64 steps (the MILP's
encoding of it), whatever the scale of its weights. A NaN or an infinity never proves anything. Float32 passes
(optimising slopes, ranking splits) carry no allowance and never close a domain.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from certprune.certify import proof


def proven(bounds: torch.Tensor) -> torch.Tensor:
    """Where a lower bound (a float64 one with its rounding allowance taken off) proves its margin positive, by the
    one rule every stage obeys (:func:`certprune.certify.proof.proves`): finite and above its tolerance."""
    return torch.isfinite(bounds) & (bounds > proof.BOUND_TOLERANCE)


def _gamma(n: int, dtype: torch.dtype) -> float:
    """``gamma_n``: the relative error bound of an n-term dot product in ``dtype``, in any summation order."""
    unit = torch.finfo(dtype).eps / 2
    return n * unit / (1 - n * unit)


@dataclass
class Chain:
    """``weights[k]``, ``biases[k]``: the affine map into ReLU layer ``k`` (``k < K``) or into the output (``k = K``);
    dense tensors of one dtype. ``factors[k]``: None, or the absolute values ``(|W|, |b|)`` of the steps that were
    multiplied into map ``k`` (their rounding is part of the allowance)."""
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    factors: list

    @property
    def depth(self) -> int:
        """``K``, the number of ReLU layers."""
        return len(self.weights) - 1

    def to(self, dtype: torch.dtype) -> "Chain":
        return Chain([w.to(dtype) for w in self.weights], [b.to(dtype) for b in self.biases], self.factors)

    def pre_activations(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every ReLU layer's input ``z_k`` and the output, for flat inputs ``x (B, d)``."""
        inputs, h = [], x
        for weight, bias in zip(self.weights[:-1], self.biases[:-1]):
            inputs.append(h @ weight.T + bias)
            h = inputs[-1].clamp(min=0)
        return inputs, h @ self.weights[-1].T + self.biases[-1]


def chain_of(net) -> Chain:
    """The float64 :class:`Chain` of a ``Network``: consecutive affine steps multiplied into one, and an identity map
    where a ReLU follows a ReLU or the input, or ends the network."""
    weights, biases, factors, pending = [], [], [], []
    width = int(np.prod(net.input_shape))

    def close():
        if not pending:
            eye = torch.eye(width, dtype=torch.float64)
            return eye, torch.zeros(width, dtype=torch.float64), None
        weight, bias = pending[0]
        for step_weight, step_bias in pending[1:]:
            weight, bias = step_weight @ weight, step_weight @ bias + step_bias
        return weight, bias, [(w.abs(), b.abs()) for w, b in pending] if len(pending) > 1 else None

    for step in net.steps:
        if step[0] == "affine":
            pending.append((torch.from_numpy(step[1].toarray()).double(),
                            torch.from_numpy(np.asarray(step[2], dtype=np.float64))))
            width = len(step[2])
            continue
        for store, value in zip((weights, biases, factors), close()):
            store.append(value)
        pending = []
    for store, value in zip((weights, biases, factors), close()):
        store.append(value)
    return Chain(weights, biases, factors)


@dataclass
class Scale:
    """Upper bounds of the magnitudes the rounding allowance needs, over the box: ``x`` ``(1, d)`` of the input;
    per ReLU layer ``k`` whose bounds are known ``z[k]`` ``(1, n_k)`` of its input; per affine map ``k`` whose input
    bounds are known ``reach[k] = |W_k| . max|h_{k-1}|`` ``(n_k,)`` and ``merged[k]``, how far rounding the merged
    product may move ``z_k`` ``(n_k,)``."""
    x: torch.Tensor
    z: list
    reach: list
    merged: list


def scale_of(chain: Chain, x_lower: torch.Tensor, x_upper: torch.Tensor, bounds: list) -> Scale:
    """The :class:`Scale` over one box (``x_lower (1, d)``) given sound bounds of the first ``len(bounds)`` ReLU
    layers' inputs: the maps ``0 .. len(bounds)`` are covered."""
    x = torch.maximum(x_lower.abs(), x_upper.abs())
    z = [torch.maximum(low.abs(), up.abs()) for low, up in bounds]
    inputs = [x[0]] + [up[0].clamp(min=0) for _, up in bounds]  # max |h_{k-1}| for map k
    reach, merged = [], []
    for k, h in enumerate(inputs[:chain.depth + 1]):
        reach.append(chain.weights[k].abs() @ h)
        moved = torch.zeros_like(chain.biases[k])
        if chain.factors[k] is not None:
            magnitude, widest = h, max(w.shape[1] for w, _ in chain.factors[k])
            for weight, bias in chain.factors[k]:
                magnitude = weight @ magnitude + bias
            moved = len(chain.factors[k]) * _gamma(widest + 1, torch.float64) * magnitude
        merged.append(moved)
    return Scale(x, z, reach, merged)


def clamp_to_splits(low: torch.Tensor, up: torch.Tensor, splits: torch.Tensor | None):
    """A split ReLU's input bounds on its side: ``l >= 0`` where active (``+1``), ``u <= 0`` where inactive."""
    if splits is None:
        return low, up
    return torch.where(splits > 0, low.clamp(min=0), low), torch.where(splits < 0, up.clamp(max=0), up)


def default_slopes(low: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """CROWN's lower slope of an unstable ReLU (auto_LiRPA's "adaptive" choice): 1 where ``u > -l``, else 0."""
    return (up > -low).to(low.dtype)


@dataclass
class Relaxation:
    """A ReLU layer's linear bounds over its input bounds ``[l, u]`` (each ``(B or 1, n)``): ``relu(z) <= chord z +
    intercept`` and ``relu(z) >= floor z``, where ``floor`` is 1 / 0 on stable ReLUs and CROWN's choice on the
    ``unstable`` ones, which an alpha may replace."""
    unstable: torch.Tensor
    chord: torch.Tensor
    intercept: torch.Tensor
    floor: torch.Tensor


def relaxation(low: torch.Tensor, up: torch.Tensor) -> Relaxation:
    active, unstable = low >= 0, (low < 0) & (up > 0)
    chord = torch.where(unstable, up / torch.where(unstable, up - low, torch.ones_like(up)), active.to(low.dtype))
    intercept = torch.where(unstable, -chord * low, torch.zeros_like(low))
    return Relaxation(unstable, chord, intercept, torch.where(unstable, default_slopes(low, up), active.to(low.dtype)))


def split_relaxations(bounds: list, splits: list) -> list[Relaxation]:
    """The relaxations of each domain's layers: the bounds ``(l, u)`` (each ``(1 or B, n_k)``) clamped to the
    domain's ``splits[k] (B, n_k)``."""
    return [relaxation(*clamp_to_splits(low, up, s)) for (low, up), s in zip(bounds, splits)]


def backward(chain: Chain, lam, top: int, relaxations: list, x_lower: torch.Tensor, x_upper: torch.Tensor,
             alphas=None, split_terms=None, record: dict | None = None, scale: Scale | None = None) -> torch.Tensor:
    """A lower bound ``(B, M)`` of ``lam . z_top`` over the box: ``lam (B, M, n_top)``, or ``(index, sign)`` (each
    ``(M,)``) for the rows ``sign * e_index`` (a neuron's bounds, without an ``n_top``-wide product); ``relaxations[k]``
    of the ReLU layers below ``top``; ``alphas[k]``: lower slopes of the unstable ReLUs, broadcastable to
    ``(B, M, n_k)`` (None: CROWN's); ``split_terms[k] = beta * s (B, n_k)``; ``record`` (a dict) receives each layer's
    ``lam`` on ``h_k`` under ``k`` and the final one on ``x`` under ``"x"``. Positive coefficients take the lower line,
    negative ones the upper chord. With a ``scale`` (of the box and of the bounds the relaxations come from, or wider
    ones) the rounding allowance of the computation is taken off the bound."""
    if isinstance(lam, tuple):  # the rows' products with map ``top`` are exact: a row of W and an entry of b
        index, sign = lam
        const = (sign * chain.biases[top][index])[None]
        error = torch.zeros_like(const) if scale is None else scale.merged[top][index][None]
        lam = (sign[:, None] * chain.weights[top][index])[None]
    else:
        const, error = _affine(chain, top, lam, torch.zeros(lam.shape[:2], dtype=lam.dtype), scale)
        lam = lam @ chain.weights[top]
    unit = torch.finfo(lam.dtype).eps / 2
    for k in range(top - 1, -1, -1):  # lam is on h_k
        relax = relaxations[k]
        if record is not None:
            record[k] = lam
        floor = relax.floor[:, None, :] if alphas is None or alphas[k] is None else torch.where(
            relax.unstable[:, None, :], alphas[k], relax.floor[:, None, :])
        negative = lam.clamp(max=0)
        chord = relax.chord[:, None, :]
        cut = negative * relax.intercept[:, None, :]
        const = const + cut.sum(-1)
        product = lam * torch.where(lam >= 0, floor, chord)
        lam = product if split_terms is None else product - split_terms[k][:, None, :]
        if scale is not None:  # the chord's rounding (<= 4u of its terms), the sum, the products and the split term
            size, gamma = scale.z[k][:, None, :], _gamma(lam.shape[-1] + 1, lam.dtype)
            split = 0 if split_terms is None else split_terms[k].abs()[:, None, :]
            error = error + 4 * unit * (-negative * chord * size - cut).sum(-1) + gamma * (-cut.sum(-1) + const.abs())
            error = error + 3 * unit * ((product.abs() + split) * size).sum(-1)
        step, step_error = _affine(chain, k, lam, const, scale)  # lam is on z_k
        const, error = step, error + step_error
        lam = lam @ chain.weights[k]
    if record is not None:
        record["x"] = lam
    bound = const + (lam.clamp(min=0) * x_lower[:, None, :]).sum(-1) + (lam.clamp(max=0) * x_upper[:, None, :]).sum(-1)
    if scale is None:
        return bound
    error = error + _gamma(lam.shape[-1] + 2, lam.dtype) * ((lam.abs() * scale.x[:, None, :]).sum(-1) + const.abs())
    return bound - error * (1 + 1e-3)


def _affine(chain: Chain, k: int, lam: torch.Tensor, const: torch.Tensor, scale: Scale | None):
    """``const + lam . b_k`` and the rounding allowance of it and of the coming ``lam @ W_k`` (0 without a scale)."""
    const = const + lam @ chain.biases[k]
    if scale is None:
        return const, 0
    size = lam.abs()
    return const, _gamma(lam.shape[-1] + 1, lam.dtype) * (size @ (chain.biases[k].abs() + scale.reach[k])
                                                          + const.abs()) + size @ scale.merged[k]


def bound_rows(chain: Chain, k: int, rows: torch.Tensor | None = None):
    """The rows ``(index, sign)`` whose lower bounds are ``[l; -u]`` of ``z_k`` (all neurons, or those of the boolean
    ``rows``)."""
    index = torch.arange(len(chain.biases[k])) if rows is None else torch.nonzero(rows).flatten()
    dtype = chain.biases[k].dtype
    return torch.cat([index, index]), torch.cat([torch.ones(len(index), dtype=dtype), -torch.ones(len(index),
                                                                                                    dtype=dtype)])


def crown_bounds(chain: Chain, x_lower: torch.Tensor, x_upper: torch.Tensor) -> list:
    """CROWN's bounds ``(l, u)`` ``(1, n_k)`` of every ReLU layer's input over one box (``x_lower (1, d)``): each layer
    bounded by backward substitution through the relaxations of the layers below it, with its rounding allowance."""
    bounds, relaxations = [], []
    with torch.no_grad():
        for k in range(chain.depth):
            both = backward(chain, bound_rows(chain, k), k, relaxations, x_lower, x_upper,
                            scale=scale_of(chain, x_lower, x_upper, bounds))
            n = both.shape[1] // 2
            bounds.append((both[:, :n], -both[:, n:]))
            relaxations.append(relaxation(*bounds[-1]))
    return bounds


def spec_lam(rows: torch.Tensor) -> torch.Tensor:
    """``lam`` of the spec rows ``(B, out)`` on the output, one row per domain: ``(B, 1, out)``."""
    return rows[:, None, :]
