"""Complete verification by branch and bound over ReLU splits (BaB): the second complete stage beside the MILP.

A property "``logit_label > logit_j`` for every ``j`` in ``others``" over a box is decided in three steps, all
within one time limit:

1. **Falsify**: PGD on ``logit_j - logit_label`` for each class ``j``, from the box's centre and from random starts.
2. **Bound the box** (:func:`~certprune.certify.linear_bounds.root_bounds`): CROWN, then alpha-CROWN with every
   intermediate layer's slopes optimised too. Each spec row ``e_label - e_j`` whose bound is proven is done; each
   other row opens one domain.
3. **Branch and bound**, best first: take the open domains with the lowest bounds, split one unstable ReLU of each
   (chosen among a few high BaBSR / intercept scores by the bounds the two halves would get, FSB-style), and bound
   both children with beta-CROWN (slopes and split multipliers warm-started from the parent, optimised by Adam).
   A child whose bound is proven is closed. The point of the box that minimises each domain's linear bound is
   checked for a counterexample whenever a domain is taken. The ReLU bounds stay the root's, clamped by the splits,
   so a domain whose unstable ReLUs are all split is one activation pattern: a linear program, which
   :func:`~certprune.certify.bab_leaves.decide_leaf` decides exactly. That makes the search complete.

Verified when no domain is left open; falsified only through :func:`~certprune.certify.milp.check_box` (a plain
forward pass at a point of the ``inner`` box); unknown at the time limit. A bound closes a domain by the rule of
:func:`~certprune.certify.linear_bounds.proven` (float64, less its rounding allowance, positive); a linear program's
answer counts only through its dual multipliers, re-evaluated as such a beta-CROWN bound, never by the solver's
tolerances.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from certprune.certify import bound_optimisation as bo
from certprune.certify import linear_bounds as lb
from certprune.certify import milp
from certprune.certify.bab_domains import Domains, Pool
from certprune.certify.bab_leaves import decide_leaf
from certprune.certify.box_attack import falsify
from certprune.certify.milp import Outcome
from certprune.certify.milp_encoding import Network, network


@dataclass
class Settings:
    """The search's knobs. ``candidates``: ReLUs per score whose split is tried before one is chosen;
    ``max_domains``: past this many open domains the deepest are taken first (their children close soonest), so that
    memory stays bounded. Measured on an image of a normally trained 784-256x2 net at eps 0.05 whose proof takes
    34,000 domains (its tree does not depend on ``batch_size``): 5 Adam steps per batch give the same tree as 10 or
    20 at a third of the cost; beta's lr 0.2 to 1.0 need 33,000 domains, 0.05 needs 44,000; 3 candidates per score
    34,000, 2 need 44,000, 1 needs 61,000; keeping the split whose worse half is best needs 90,000."""
    attack_steps: int = 50
    attack_restarts: int = 4
    root_iterations: int = 20
    root_lr: float = 0.1
    batch_size: int = 256
    iterations: int = 5
    lr_alpha: float = 0.1
    lr_beta: float = 0.5
    candidates: int = 3
    max_domains: int = 100_000

    def __post_init__(self):
        may_be_zero = ("attack_steps", "attack_restarts", "root_iterations")
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    value >= 0 if item.name in may_be_zero else value > 0):
                kind = "non-negative" if item.name in may_be_zero else "positive"
                raise ValueError(f"BaB setting {item.name} must be a {kind} number, got {value!r}")


class _Search:
    """The branch and bound of one property over one box (see the module's docstring)."""

    def __init__(self, model: nn.Module, chain: lb.Chain, box: tuple, inner: tuple, label: int, classes: list[int],
                 settings: Settings, deadline: float):
        self.model, self.chain, self.inner, self.label, self.classes = model, chain, inner, label, classes
        self.settings, self.shape = settings, tuple(box[0].shape)
        self.x_lower, self.x_upper = (b.detach().cpu().double().reshape(1, -1) for b in box)
        eye = torch.eye(len(chain.biases[-1]), dtype=torch.float64)
        self.rows = eye[label] - eye[classes]
        root = bo.root_bounds(chain, self.x_lower, self.x_upper, self.rows, settings.root_iterations, settings.root_lr,
                              deadline=deadline)
        self.bounds = root.bounds
        self.scale = lb.scale_of(chain, self.x_lower, self.x_upper, self.bounds)
        # the float32 copies: for optimising and ranking, never for a bound that closes a domain
        self.fast = (chain.to(torch.float32), self.x_lower.float(), self.x_upper.float(), self.rows.float(),
                     [(low.float(), up.float()) for low, up in self.bounds])
        self.positions = [torch.nonzero((low[0] < 0) & (up[0] > 0)).flatten() for low, up in self.bounds]
        self.offsets = np.cumsum([0] + [len(p) for p in self.positions]).tolist()
        done = lb.proven(root.margins)
        open_rows = torch.nonzero(~done).flatten()
        self.floor = float(root.margins[done].min()) if bool(done.any()) else torch.inf  # of the closed domains
        count, width = len(open_rows), self.offsets[-1]
        self.open = Pool(Domains(open_rows, torch.zeros(count, width, dtype=torch.int8),
                                   self._compact([a[open_rows] for a in root.alphas]).float(),
                                   torch.zeros(count, width), root.margins[open_rows],
                                   torch.zeros(count, dtype=torch.long)))
        self.stats = {"unstable": width, "domains": 0, "depth": 0, "leaves": 0}
        self.stuck = torch.inf  # the lowest bound of a leaf that could not be decided

    # -- compact (N, U) <-> per layer (N, n_k) ------------------------------------------------------------------------
    def _compact(self, dense: list) -> torch.Tensor:
        return torch.cat([d[:, p] for d, p in zip(dense, self.positions)], 1)

    def _dense(self, compact: torch.Tensor, dtype=torch.float64) -> list:
        out = []
        for k, (low, _) in enumerate(self.bounds):
            layer = torch.zeros(len(compact), low.shape[1], dtype=dtype)
            layer[:, self.positions[k]] = compact[:, self.offsets[k]:self.offsets[k + 1]].to(dtype)
            out.append(layer)
        return out

    def _bound(self, domains: Domains, record: dict | None = None, fast: bool = False) -> torch.Tensor:
        """The domains' bounds with their slopes and multipliers: in float64, or ``fast`` in float32."""
        chain, x_lower, x_upper, rows, bounds = self.fast if fast else (
            self.chain, self.x_lower, self.x_upper, self.rows, self.bounds)
        dtype, splits = rows.dtype, self._dense(domains.splits, torch.int8)
        return bo.domain_bounds(chain, x_lower, x_upper, rows[domains.row], lb.split_relaxations(bounds, splits),
                                splits, self._dense(domains.alpha, dtype), self._dense(domains.beta, dtype), record,
                                None if fast else self.scale)

    # -- one round -------------------------------------------------------------------------------------------------
    def _check_points(self, points: torch.Tensor):
        """A counterexample among the flat float64 ``points``, through :func:`check_box`, or None."""
        lower = self.inner[0]
        candidates = points.to(lower.device, lower.dtype).view(-1, *self.shape)
        with torch.no_grad():
            logits = self.model(candidates)
        margins = logits[:, self.label] - logits[:, self.classes].max(1).values
        for i in torch.nonzero(margins <= 0).flatten().tolist():
            found = milp.check_box(self.model, *self.inner, self.label, self.classes, candidates[i])
            if found is not None:
                return found
        return None

    def _scores(self, domains: Domains, record: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per free unstable ReLU of each domain (split ones: -1), BaBSR's score (Bunel et al. 2020) and the upper
        chord's intercept times its coefficient, the part of the bound that splitting that ReLU removes."""
        lam = self._compact([record[k][:, 0] for k in range(self.chain.depth)])
        low, up = (self._compact([b[i] for b in self.bounds])[0] for i in (0, 1))
        bias = self._compact([b[None] for b in self.chain.biases[:-1]])[0]
        slope = up / (up - low)
        intercept = lam.clamp(max=0) * (-slope * low)
        weighted = bias * lam
        babsr = (torch.maximum(weighted * (slope - 1), weighted * slope) + intercept).abs()
        free = domains.splits == 0
        return torch.where(free, babsr, -1.0), torch.where(free, -intercept, -1.0)

    def _branch(self, domains: Domains, record: dict) -> torch.Tensor:
        """The ReLU to split in each domain (a compact index): of the top ``candidates`` by each score, the one whose
        two halves get the best bound (the better half's, with the parent's slopes and multipliers)."""
        count = min(self.settings.candidates, domains.splits.shape[1])
        scores = self._scores(domains, record)
        candidates = torch.cat([torch.topk(s, count, 1).indices for s in scores], 1)  # (B, C)
        valid = torch.cat([torch.topk(s, count, 1).values >= 0 for s in scores], 1)
        trial = self._children(domains.select(torch.arange(len(domains)).repeat(candidates.shape[1])),
                               candidates.T.reshape(-1))
        with torch.no_grad():
            halves = self._bound(trial, fast=True).view(2, candidates.shape[1], len(domains))
        quality = torch.where(valid.T, halves.max(0).values, -torch.inf)
        return candidates.gather(1, quality.argmax(0)[:, None])[:, 0]

    @staticmethod
    def _children(domains: Domains, decision: torch.Tensor) -> Domains:
        """Both halves of each domain split at its ``decision``: the active ones first, then the inactive ones."""
        both = domains.extend(domains)
        index = torch.arange(len(both))
        both.splits = both.splits.clone()
        both.beta = both.beta.clone()
        both.splits[index, decision.repeat(2)] = torch.cat([torch.ones(len(domains)), -torch.ones(len(domains))]).to(
            torch.int8)
        both.beta[index, decision.repeat(2)] = 0
        both.depth = both.depth + 1
        return both

    def _close(self, bounds: torch.Tensor) -> None:
        done = lb.proven(bounds)
        if bool(done.any()):
            self.floor = min(self.floor, float(bounds[done].min()))

    def round(self, deadline: float):
        """Take a batch, check it, decide its leaves, split the rest; a counterexample ``(margin, input)`` or None."""
        batch = self.open.take(self.settings.batch_size, len(self.open) > self.settings.max_domains)
        record = {}
        with torch.no_grad():
            self._bound(batch, record, fast=True)  # for the branching scores and the candidates only
        vertices = torch.where(record["x"][:, 0] >= 0, self.x_lower, self.x_upper)
        found = self._check_points(vertices)
        if found is not None:
            return found
        leaf = (batch.splits != 0).all(1)
        for i in torch.nonzero(leaf).flatten().tolist():
            self.stats["leaves"] += 1
            bound, point = decide_leaf(self.chain, self.x_lower, self.x_upper, self.rows[batch.row[i]], self.bounds,
                                        self._dense(batch.splits[i:i + 1], torch.int8), self.scale)
            found = None if point is None else self._check_points(point[None])
            if found is not None:
                return found
            if bool(lb.proven(bound[None])):
                self._close(bound[None])
            else:
                self.stuck = min(self.stuck, float(bound))
        branching = ~leaf
        if not bool(branching.any()):
            return None
        parents = batch.select(branching)
        children = self._children(parents, self._branch(parents, {k: v[branching] for k, v in record.items()}))
        chain, x_lower, x_upper, rows, bounds = self.fast
        _, alphas, betas = bo.optimise_domains(
            chain, x_lower, x_upper, rows[children.row], bounds, self._dense(children.splits, torch.int8),
            self._dense(children.alpha, torch.float32), self._dense(children.beta, torch.float32),
            self.settings.iterations, self.settings.lr_alpha, self.settings.lr_beta, deadline)
        children.alpha, children.beta = self._compact(alphas), self._compact(betas)
        with torch.no_grad():
            bound = children.bound = self._bound(children)
        self.stats["domains"] += len(children)
        self.stats["depth"] = max(self.stats["depth"], int(children.depth.max()))
        self._close(bound)
        self.open.add(children.select(~lb.proven(bound)))
        return None

    def lowest(self) -> float:
        """The proven lower bound of the margin so far: the lowest of the closed and the open domains' bounds."""
        return min(self.floor, self.stuck, self.open.lowest())


def _classes(label: int, others, count: int) -> list[int]:
    classes = [j for j in range(count) if j != label] if others is None else [int(j) for j in others]
    if not 0 <= label < count or not classes or any(not 0 <= j < count or j == label for j in classes):
        raise ValueError(f"BaB needs a label and other classes among the model's {count} outputs, the label not "
                         f"among the others; got label {label}, others {others}")
    return classes


def _check_box(lower: torch.Tensor, upper: torch.Tensor, name: str) -> None:
    if lower.shape != upper.shape or not bool(torch.isfinite(lower).all() & torch.isfinite(upper).all()) or bool(
            (lower > upper).any()):
        raise ValueError(f"BaB needs a {name} box of finite lower <= upper of one shape, got shapes "
                         f"{tuple(lower.shape)} and {tuple(upper.shape)}")


def verify_box(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, label: int, others=None,
               time_limit: float = 10.0, net: Network | None = None, inner=None,
               settings: Settings | None = None) -> Outcome:
    """Decide "``logit_label > logit_j`` for every ``j`` in ``others`` (None: every other class) everywhere in the
    box ``[lower, upper]``" (each shaped like one input) by falsification, then branch and bound, within
    ``time_limit`` seconds in all. ``inner``: the box a counterexample must lie in, when ``[lower, upper]`` is a real
    box rounded outward (default: the same box). Like the MILP, an :class:`Outcome`; its stats: ``by`` (what decided
    it), ``domains`` (subdomains bounded), ``depth`` (the most splits on one), ``unstable`` (ReLUs unstable over the
    box), ``leaves`` (domains decided by a linear program), ``why`` (for unknown)."""
    started = time.perf_counter()
    settings = settings or Settings()
    if not time_limit > 0:
        raise ValueError(f"BaB needs a positive time limit, got {time_limit}")
    inner = inner or (lower, upper)
    _check_box(lower, upper, "")
    _check_box(*inner, "inner")
    with torch.no_grad():
        classes = _classes(int(label), others, int(model(lower[None]).shape[-1]))
    chain = lb.chain_of(net or network(model, lower[None]))
    if not all(bool(torch.isfinite(t).all()) for t in chain.weights + chain.biases):
        raise ValueError("BaB needs a network with finite weights and biases")
    deadline = started + time_limit
    found = falsify(model, *inner, int(label), classes, settings.attack_steps, settings.attack_restarts)
    if found is not None:
        return Outcome("falsified", found[0], found[1], time.perf_counter() - started, {"by": "PGD"})
    if time.perf_counter() > deadline:
        return Outcome("unknown", -torch.inf, None, time.perf_counter() - started, {"why": "timeout"})
    search = _Search(model, chain, (lower, upper), inner, int(label), classes, settings, deadline)
    while len(search.open):
        if time.perf_counter() > deadline:
            return Outcome("unknown", search.lowest(), None, time.perf_counter() - started,
                           {**search.stats, "why": "timeout"})
        found = search.round(deadline)
        if found is not None:
            return Outcome("falsified", found[0], found[1], time.perf_counter() - started,
                           {**search.stats, "by": "BaB"})
    seconds = time.perf_counter() - started
    if search.stuck < torch.inf:
        return Outcome("unknown", search.lowest(), None, seconds, {**search.stats, "why": "undecided leaf"})
    return Outcome("verified", search.lowest(), None, seconds, {**search.stats, "by": "BaB"})


def decide_box(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor, others=None,
               time_limit: float = 10.0, inner=None, settings: Settings | None = None) -> list[Outcome]:
    """:func:`verify_box` on each box (``lower``, ``upper``: ``(N, *input)``; ``others``: per property, the classes
    its label must beat, None for all), each within its own ``time_limit``."""
    inner_lower, inner_upper = inner or (lower, upper)
    net = network(model, lower[:1]) if len(lower) else None
    return [verify_box(model, lower[i], upper[i], int(labels[i]), None if others is None else others[i], time_limit,
                       net, (inner_lower[i], inner_upper[i]), settings) for i in range(len(lower))]
