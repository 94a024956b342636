"""Branch and bound's leaves: a subdomain whose unstable ReLUs are all split is one activation pattern, on which the
network is affine, so one linear program decides it; its answer counts only through its dual multipliers,
re-evaluated as a float64 beta-CROWN bound with its rounding allowance."""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog

from certprune.certify import bound_optimisation as bo
from certprune.certify import linear_bounds as lb


def decide_leaf(chain: lb.Chain, x_lower: torch.Tensor, x_upper: torch.Tensor, row: torch.Tensor, bounds: list,
                 splits: list, scale: lb.Scale):
    """Decide a domain whose root-unstable ReLUs are all split: on it each ReLU is fixed on or off, so every ``z_k``
    and the margin are affine in ``x``, and the domain is ``{x in box: s_i z_i(x) >= 0 for each split i}``. HiGHS
    solves ``min margin`` over it; its dual multipliers, as beta-CROWN's ``beta``, give a float64 bound (with the
    rounding allowance of ``scale``) that is exact at the optimum. If HiGHS finds the domain empty, the program of
    the most violated split gives multipliers that prove it empty the same way (the zero objective's bound is
    positive). Returns ``(bound, point)``: the
    bound (proven when :func:`~certprune.certify.linear_bounds.proven`) and HiGHS's minimiser (a candidate
    counterexample; None when the domain is empty)."""
    weights = [w.numpy() for w in chain.weights]
    biases = [b.numpy() for b in chain.biases]
    rows, rhs, owners = [], [], []
    h_map, h_offset = None, None  # h_k = h_map @ x + h_offset on this pattern (None: the input itself)
    for k, ((low, _), split) in enumerate(zip(bounds, splits)):
        affine = weights[k] if h_map is None else weights[k] @ h_map
        offset = biases[k] if h_offset is None else weights[k] @ h_offset + biases[k]
        side = split[0].numpy().astype(np.float64)
        chosen = np.nonzero(side)[0]
        rows.append(-side[chosen, None] * affine[chosen])  # -s z <= 0
        rhs.append(side[chosen] * offset[chosen])
        owners += [(k, i) for i in chosen]
        on = ((low[0].numpy() >= 0) | (side > 0)).astype(np.float64)
        h_map, h_offset = affine * on[:, None], offset * on
    out_map = weights[-1] if h_map is None else weights[-1] @ h_map
    box = np.stack([x_lower[0].numpy(), x_upper[0].numpy()], 1)
    a_ub = np.concatenate(rows) if owners else None
    b_ub = np.concatenate(rhs) if owners else None
    result = linprog(row.numpy() @ out_map, A_ub=a_ub, b_ub=b_ub, bounds=box, method="highs")
    objective = row
    if result.status == 2:  # infeasible: minimise the largest violation t, with -s z - t <= 0
        width = a_ub.shape[1]
        result = linprog(np.eye(width + 1)[-1], A_ub=np.hstack([a_ub, -np.ones((len(a_ub), 1))]), b_ub=b_ub,
                         bounds=np.vstack([box, [[-np.inf, np.inf]]]), method="highs")
        objective = torch.zeros_like(row)
    if result.status != 0:
        return torch.tensor(-torch.inf, dtype=torch.float64), None
    multipliers = [torch.zeros_like(s, dtype=torch.float64) for s in splits]
    if owners:
        for (k, i), value in zip(owners, -result.ineqlin.marginals):
            multipliers[k][0, i] = max(float(value), 0.0)
    bound = bo.domain_bounds(chain, x_lower, x_upper, objective[None], lb.split_relaxations(bounds, splits), splits,
                             [torch.zeros_like(m) for m in multipliers], multipliers, scale=scale)[0]
    return bound, torch.from_numpy(result.x) if objective is row else None
