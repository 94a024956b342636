"""alpha- and beta-CROWN: the slopes and split multipliers of :mod:`certprune.certify.linear_bounds`' bounds,
optimised by Adam, at the root of a branch and bound (every layer's slopes) and on batches of its subdomains
(warm-started from their parents). Any slopes in [0, 1] and multipliers >= 0 give sound bounds; optimisation only
tightens them, so only the final float64 pass with its rounding allowance may close a domain."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from certprune.certify.linear_bounds import Chain, Scale, bound_rows, backward, crown_bounds, default_slopes, relaxation, scale_of, spec_lam, split_relaxations


@dataclass
class Root:
    """What bounding the whole box gives branch and bound: ``bounds`` (the ReLU inputs' ``(l, u)``, each
    ``(1, n_k)``), per spec row its lower bound ``margins (R,)`` and the lower slopes ``alphas[k] (R, n_k)`` that gave
    it (warm starts for the subdomains)."""
    bounds: list
    margins: torch.Tensor
    alphas: list


def _sweep(chain: Chain, x_lower: torch.Tensor, x_upper: torch.Tensor, rows: torch.Tensor, crown: list,
           unstable: list, slopes: list, rigorous: bool):
    """One alpha-CROWN pass over one box: each intermediate layer's unstable neurons bounded in turn with their own
    slopes (``slopes[t - 1]`` for layer ``t``, ``slopes[-1]`` for the spec rows), through the bounds just computed for
    the layers below; each neuron's bounds intersected with CROWN's; ``rigorous``: with rounding allowances. Returns
    the bounds of every layer, each layer's raw ``[l; -u]`` of its unstable neurons (``(1, 2 m)``, layer 0 has none)
    and the rows' bounds ``(R,)``."""
    current, sides, relaxations = [crown[0]], [None], [relaxation(*crown[0])]
    for t in range(1, chain.depth):
        scale = scale_of(chain, x_lower, x_upper, current) if rigorous else None
        both = backward(chain, bound_rows(chain, t, unstable[t]), t, relaxations, x_lower, x_upper,
                        [s[None] for s in slopes[t - 1]], scale=scale)
        m = both.shape[1] // 2
        low, up = crown[t][0].clone(), crown[t][1].clone()
        low[:, unstable[t]] = torch.maximum(both[:, :m], crown[t][0][:, unstable[t]])
        up[:, unstable[t]] = torch.minimum(-both[:, m:], crown[t][1][:, unstable[t]])
        current.append((low, up))
        relaxations.append(relaxation(low, up))
        sides.append(both)
    scale = scale_of(chain, x_lower, x_upper, current) if rigorous else None
    final = backward(chain, rows[None], chain.depth, relaxations, x_lower, x_upper, [s[None] for s in slopes[-1]],
                     scale=scale)[0]
    return current, sides, final


def root_bounds(chain: Chain, x_lower: torch.Tensor, x_upper: torch.Tensor, rows: torch.Tensor, iterations: int = 20,
                lr: float = 0.1, dtype: torch.dtype = torch.float32, deadline: float = float("inf")) -> Root:
    """CROWN, then alpha-CROWN over one box (``x_lower (1, d)``, ``rows (R, out)``): Adam on the lower slopes of every
    unstable ReLU, one set per bounded neuron (each intermediate layer's unstable neurons, both sides) and per spec
    row, maximising the sum of the rows' bounds. The slopes are optimised in ``dtype`` (float32: twice as fast);
    each bounded neuron and row keeps the slopes of its best iterate, and one last pass in the chain's dtype
    (float64) computes the bounds that count from them. Past the ``deadline`` (``time.perf_counter()``) no further
    iterate starts."""
    crown = crown_bounds(chain, x_lower, x_upper)
    with torch.no_grad():
        margins = backward(chain, rows[None], chain.depth, [relaxation(*b) for b in crown], x_lower, x_upper,
                           scale=scale_of(chain, x_lower, x_upper, crown))[0]
    alphas = [default_slopes(*b).expand(len(rows), -1).clone() for b in crown]
    unstable = [((low < 0) & (up > 0))[0] for low, up in crown]
    if iterations <= 0 or not any(bool(u.any()) for u in unstable):
        return Root(crown, margins, alphas)
    fast, fast_crown = chain.to(dtype), [(low.to(dtype), up.to(dtype)) for low, up in crown]
    fast_box, fast_rows = (x_lower.to(dtype), x_upper.to(dtype)), rows.to(dtype)
    sizes = [2 * int(u.sum()) for u in unstable[1:]] + [len(rows)]  # rows bounded per layer 1 .. K-1, then the spec
    slopes = [[default_slopes(*fast_crown[j]).expand(size, -1).clone().requires_grad_() for j in range(t + 1)]
              for t, size in enumerate(sizes)]
    kept = [[s.detach().clone() for s in layer] for layer in slopes]
    best = [torch.full((size,), -torch.inf, dtype=dtype) for size in sizes]
    optimizer = torch.optim.Adam([s for layer in slopes for s in layer], lr=lr)
    for iteration in range(iterations):
        if iteration and time.perf_counter() > deadline:
            break
        _, sides, final = _sweep(fast, *fast_box, fast_rows, fast_crown, unstable, slopes, False)
        with torch.no_grad():
            for t, value in enumerate([side[0] for side in sides[1:]] + [final]):
                better = value > best[t]
                best[t] = torch.where(better, value, best[t])
                for store, slope in zip(kept[t], slopes[t]):
                    store[better] = slope[better]
        optimizer.zero_grad()
        (-final.sum()).backward()
        optimizer.step()
        with torch.no_grad():
            for layer in slopes:
                for s in layer:
                    s.clamp_(0, 1)
    with torch.no_grad():
        bounds, _, final = _sweep(chain, x_lower, x_upper, rows, crown, unstable,
                                  [[s.to(chain.weights[0].dtype) for s in layer] for layer in kept], True)
    better = final > margins
    for k in range(chain.depth):
        alphas[k][better] = kept[-1][k][better].to(alphas[k].dtype)
    return Root(bounds, torch.where(better, final, margins), alphas)


def domain_bounds(chain: Chain, x_lower: torch.Tensor, x_upper: torch.Tensor, rows: torch.Tensor,
                  relaxations: list, splits: list, alphas: list, betas: list | None, record: dict | None = None,
                  scale: Scale | None = None) -> torch.Tensor:
    """The lower bound ``(B,)`` of each domain's spec row ``rows (B, out)``: ``relaxations`` from
    :func:`split_relaxations` of the domains' ``splits[k] (B, n_k)`` (in {-1, 0, 1}), ``alphas[k] (B, n_k)`` lower
    slopes, ``betas[k] (B, n_k) >= 0`` the split constraints' multipliers (None: 0); with the ``scale`` of the
    unsplit bounds, less its rounding allowance."""
    terms = None if betas is None else [b * s.to(b.dtype) for b, s in zip(betas, splits)]
    return backward(chain, spec_lam(rows), chain.depth, relaxations, x_lower, x_upper, [a[:, None, :] for a in alphas],
                    terms, record, scale)[:, 0]


def optimise_domains(chain: Chain, x_lower: torch.Tensor, x_upper: torch.Tensor, rows: torch.Tensor, bounds: list,
                     splits: list, alphas: list, betas: list, iterations: int, lr_alpha: float, lr_beta: float,
                     deadline: float = float("inf")):
    """beta-CROWN on a batch of domains: Adam on their slopes and multipliers from the given warm starts, projected
    to ``alpha in [0, 1]``, ``beta >= 0`` after each step. Returns each domain's best bound over the iterates (all
    sound; the first iterate is the warm start's) with the ``alphas`` and ``betas`` that gave it. Past the
    ``deadline`` (``time.perf_counter()``) no further iterate starts."""
    relaxations = split_relaxations(bounds, splits)
    alpha = [a.detach().clone().requires_grad_() for a in alphas]
    beta = [b.detach().clone().requires_grad_() for b in betas]
    optimizer = torch.optim.Adam([{"params": alpha, "lr": lr_alpha}, {"params": beta, "lr": lr_beta}])
    best_bound = torch.full((len(rows),), -torch.inf, dtype=rows.dtype)
    best_alpha, best_beta = [a.detach().clone() for a in alphas], [b.detach().clone() for b in betas]
    for iteration in range(iterations):
        if iteration and time.perf_counter() > deadline:
            break
        bound = domain_bounds(chain, x_lower, x_upper, rows, relaxations, splits, alpha, beta)
        with torch.no_grad():
            better = bound > best_bound
            best_bound = torch.where(better, bound, best_bound)
            for store, value in zip(best_alpha + best_beta, alpha + beta):
                store[better] = value[better]
        optimizer.zero_grad()
        (-bound.sum()).backward()
        optimizer.step()
        with torch.no_grad():
            for a in alpha:
                a.clamp_(0, 1)
            for b in beta:
                b.clamp_(min=0)
    return best_bound.detach(), best_alpha, best_beta
