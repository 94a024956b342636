"""The verification cascade on boxes: the one implementation behind ``certprune verify --from RUN`` (a run's images,
their clipped L-inf balls) and ``certprune verify --onnx/--instances`` (VNN-LIB properties, their boxes as given).

Each box carries a property "``logit_label > logit_j`` for every ``j`` in its classes". The stages run cheapest first,
each only on the boxes still open: bound methods (IBP, CROWN-IBP, CROWN, alpha-CROWN, in float64: a box is verified
when every margin's lower bound proves it positive under the rule of :mod:`certprune.certify.proof`) and last the
complete stages, branch and bound and the MILP (each with PGD first: verified, falsified or unknown at the time
limit they share). A counterexample counts only after a plain forward pass at a point of the ``inner`` box
(the real box rounded inward) violates the property; the bounds cover the box rounded outward.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from certprune.certify import proof
from certprune.boxes import spec_of
from certprune.lirpa import BoundedProxy

log = logging.getLogger("certprune")

STAGES = ("IBP", "CROWN-IBP", "CROWN", "alpha-CROWN", "BaB", "MILP")  # the cascade's order, cheapest first
COMPLETE = ("BaB", "MILP")  # the stages that decide a box either way: they share its time limit
MILP_CHUNK = 16  # boxes per call of a complete stage (its progress bar moves per chunk)


def complete_stage(name) -> str | None:
    """The spelling of :data:`COMPLETE` that ``name`` means, case-insensitively; None for a bound method."""
    return next((stage for stage in COMPLETE if str(name).lower() == stage.lower()), None)


class Cascade:
    """Boxes ``lower``/``upper`` ``(N, *input)`` with their ``labels`` and ``others`` (per box, the classes its label
    must beat; None: every other class), and what each stage has found about them. Per box: ``stage`` (1 + the index
    in :data:`STAGES` of the stage that verified it, 0 for none), ``falsified``, ``falsified_by`` ("PGD", "BaB",
    "MILP" or the caller's word), ``margin`` (the best proven margin lower bound, or a counterexample's margin), ``seconds``
    and ``counterexamples``."""

    def __init__(self, model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor,
                 others=None, inner: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.model, self.lower, self.upper, self.others = model.eval(), lower, upper, others
        self.labels = labels.to(lower.device)
        self.inner = inner or (lower, upper)
        n = len(lower)
        with torch.no_grad():
            classes = int(model(lower[:1]).shape[-1]) if n else 1
        self.spec = spec_of(self.labels, others, classes) if n else torch.zeros(0, 1, classes)
        self.stage = torch.zeros(n, dtype=torch.long)
        self.falsified = torch.zeros(n, dtype=torch.bool)
        self.falsified_by = [""] * n
        self.margin = torch.full((n,), float("-inf"), dtype=torch.float64)
        self.seconds = torch.zeros(n, dtype=torch.float64)
        self.class_bounds = torch.full(self.spec.shape[:2], float("-inf"), dtype=torch.float64)
        self.counterexamples = torch.zeros_like(lower)
        self.relus: dict[int, list] = {}
        self._proxy = None

    def open(self, among: torch.Tensor | None = None) -> torch.Tensor:
        """The boxes (of ``among``, a boolean mask) no stage has decided yet."""
        undecided = (self.stage == 0) & ~self.falsified
        return torch.nonzero(undecided if among is None else undecided & among.cpu()).flatten()

    def falsify(self, i: int, candidate: torch.Tensor, by: str) -> bool:
        """Box ``i`` is falsified when ``candidate``, moved into the inner box, violates its property."""
        from certprune.certify import milp  # scipy loads only when a counterexample is checked

        low, high = self.inner[0][i], self.inner[1][i]
        found = bool((low <= high).all()) and milp.check_box(
            self.model, low, high, int(self.labels[i]), None if self.others is None else self.others[i], candidate)
        if found:
            self.falsified[i], self.falsified_by[i] = True, by
            self.margin[i], self.counterexamples[i] = found[0], found[1].to(self.lower.dtype)
        return bool(found)

    def bound(self, method: str, todo: torch.Tensor, batch_size: int, keep_relus: bool = False,
              alpha_iterations: int = 10, alpha_lr: float = 0.5) -> None:
        """One bound stage on the boxes ``todo``; with ``keep_relus`` CROWN also keeps the ReLU input bounds it
        computed on the way (for the MILP)."""
        for start in tqdm(range(0, len(todo), batch_size), desc=f"verify {method}", leave=False, disable=None):
            index = todo[start:start + batch_size]
            box = (self.lower[index], self.upper[index], self.spec[index])
            if keep_relus and method == "CROWN":
                margins, layers = self._bounds(lambda proxy: proxy.box_relu_bounds(*box, "CROWN"))
                self.relus.update({i: [(low[k], up[k]) for low, up in layers] for k, i in enumerate(index.tolist())})
            else:
                margins = self._bounds(lambda proxy: proxy.box_spec_bounds(*box, [method], alpha_iterations,
                                                                           alpha_lr)[0])
            margins = self._checked(index, proof.finite_or_worst(margins.double().cpu()), method)
            self.class_bounds[index] = torch.maximum(self.class_bounds[index], margins)
            self.margin[index] = torch.maximum(self.margin[index], margins.min(1).values)
            self.stage[index[proof.proves(margins)]] = STAGES.index(method) + 1

    def _bounds(self, compute):
        """``compute(proxy)`` on the float64 proxy, in the conv mode it chose; where patches mode fails (auto_LiRPA 0.3
        mishandles some layouts: an assertion, a storage or stride error), on a proxy in its matrix mode from then on
        (slower, and equal where both run)."""
        self._proxy = self._proxy or BoundedProxy(self.model, self.lower[:1], torch.float64)
        with torch.no_grad():
            try:
                return compute(self._proxy)
            except (AssertionError, RuntimeError, TypeError):  # patches mode's failures (a shape or stride it misreads)
                if self._proxy.conv_mode == "matrix":
                    raise
                self._proxy = BoundedProxy(self.model, self.lower[:1], torch.float64, "matrix")
                return compute(self._proxy)

    def _checked(self, index: torch.Tensor, margins: torch.Tensor, method: str) -> torch.Tensor:
        """``margins`` with the rows of boxes where a bound exceeds the network's own margin at the box's centre set
        to ``-inf``: only a wrong bound can do that, and it must prove nothing (logged)."""
        centre = (self.lower[index] + self.upper[index]) / 2
        with torch.no_grad():
            logits = self.model(centre).double().cpu()
        at_centre = torch.einsum("brc,bc->br", self.spec[index].double().cpu(), logits)
        fine = proof.consistent(margins, at_centre, logits.abs().amax(1))
        if not fine.all():
            log.warning("%s bounds exceed the network's margin at the box's centre for %d boxes; they prove nothing "
                        "there", method, int((~fine).sum()))
        return torch.where(fine[:, None], margins, torch.full_like(margins, float("-inf")))

    def complete(self, method: str, todo: torch.Tensor, limits: torch.Tensor, attack_steps: int = 20) -> None:
        """A complete stage, "BaB" (:mod:`certprune.certify.bab`) or "MILP" (:mod:`certprune.certify.milp`, with
        CROWN's ReLU bounds where the cascade kept them), on the boxes ``todo``, box ``i`` within ``limits[i]``
        seconds (a box with none left stays open), with a progress bar of the verified / falsified / unknown counts."""
        todo = todo[limits[todo] > 0]
        counts = {"verified": 0, "falsified": 0, "unknown": 0}
        with tqdm(total=len(todo), desc=f"verify {method}", leave=False, disable=None) as bar:
            for start in range(0, len(todo), MILP_CHUNK):
                index = todo[start:start + MILP_CHUNK].tolist()
                decide = self._milp if method == "MILP" else self._bab
                for i, outcome in zip(index, decide(index, limits, attack_steps)):
                    self._record(i, outcome, method)
                    counts[outcome.status] += 1
                bar.update(len(index))
                bar.set_postfix(counts)

    def _milp(self, index: list[int], limits: torch.Tensor, attack_steps: int) -> list:
        from certprune.certify import milp  # scipy's MILP and the attack load only for complete verification

        kept = [self.relus.get(i) for i in index]
        relu_bounds = None if any(k is None for k in kept) else [
            tuple(torch.stack([k[layer][side] for k in kept]) for side in (0, 1)) for layer in range(len(kept[0]))]
        return milp.decide_box(
            self.model, self.lower[index], self.upper[index], self.labels[index],
            None if self.others is None else [self.others[i] for i in index], float(limits[index].min()),
            relu_bounds, self.class_bounds[index] if relu_bounds is not None else None, attack_steps,
            (self.inner[0][index], self.inner[1][index]))

    def _bab(self, index: list[int], limits: torch.Tensor, attack_steps: int) -> list:
        from certprune.certify import bab
        from certprune.certify.milp_encoding import network

        self._network = getattr(self, "_network", None) or network(self.model, self.lower[:1])
        settings = bab.Settings() if attack_steps else bab.Settings(attack_steps=0)  # its own attack, or none
        return [bab.verify_box(self.model, self.lower[i], self.upper[i], int(self.labels[i]),
                               None if self.others is None else self.others[i], float(limits[i]), self._network,
                               (self.inner[0][i], self.inner[1][i]), settings) for i in index]

    def _record(self, i: int, outcome, method: str) -> None:
        """Box ``i``'s outcome of a complete stage: a proof, a counterexample (re-checked by the stage in the inner
        box) or, for unknown, the best bound it proved."""
        self.seconds[i] += outcome.seconds
        if outcome.status == "falsified":
            self.falsified[i], self.falsified_by[i] = True, outcome.stats.get("by", method)
            self.margin[i] = outcome.margin_lower_bound
            self.counterexamples[i] = outcome.counterexample.to(self.lower.device, self.lower.dtype)
            return
        self.margin[i] = max(float(self.margin[i]), float(outcome.margin_lower_bound))
        if outcome.status == "verified":
            self.stage[i] = STAGES.index(method) + 1
