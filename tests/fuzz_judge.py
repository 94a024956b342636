"""The soundness fuzzer's judge: certprune's verification of a fuzzed case (``tests/fuzz_networks.py``), checked
against references that share no code with it.

- onnxruntime is the reference for every value: the margins at the box's centre, at its corners, at random points,
  at the points of a PGD attack (on the imported torch model, the one the verifier sees) and at the brute force's
  minimisers.
- On tiny networks branch and bound (``certify/bab.py``) decides each property too, and a "verified" verdict (of
  either) also meets a brute force over activation patterns, which gives the exact
  minimum margin: the network is affine on each region of the box where its ReLUs' signs are fixed, so one LP
  (``scipy.optimize.linprog``) per region and class gives the minimum there. It reads the generator's own float64
  copy of the network, not the importer's.

The checks, per property: (a) a "verified" verdict has no point whose onnxruntime margin is <= 0, no exact minimum
below 0, and a finite positive margin bound; (b) every bound stage's margin lower bounds are at or below the margins
at the box's centre (and at or below the exact minima), and the cascade's margin bound is at or below every
point's margin; (c) a "falsified" verdict's counterexample lies in the box and violates the property under
onnxruntime; (d) a network with a zero scale is refused in one line, and every other network is read, equal to
onnxruntime. A wrong verdict (a, c) and any other problem (a crash too) is one sentence each.
"""
from __future__ import annotations

import itertools
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from scipy.optimize import linprog

from certprune.certify.bab import Settings as BabSettings
from certprune.certify.bab import verify_box as bab_verify
from certprune.certify.cascade import STAGES, Cascade
from certprune.certify.instances import read_instances, verify_instances
from certprune.certify.onnx_import import load_onnx
from certprune.boxes import spec_of
from certprune.lirpa import BoundedProxy
from fuzz_networks import Case, Network, Property, forward, write_case

BOUND_STAGES = ("IBP", "CROWN-IBP", "CROWN", "alpha-CROWN")
CASCADE = ("IBP", "CROWN", "alpha-CROWN")  # the bound stages of the verdicts (the MILP follows on tiny networks)
TINY_RELUS = 12  # networks with at most this many ReLUs get the brute force and the MILP
# Float32 rounding of the networks' own values, relative to the largest |value| any layer takes at the reference
# points: onnxruntime, torch and the bounds each round differently by about 1e-7 of it per layer.
SLACK = 1e-5
LP_BUDGET = 2000  # LPs per property before the brute force gives up (it then reports nothing)


@dataclass
class Judged:
    """One property's verdict by one verifier (``path``: "cascade", "verify_instances" or "BaB") and what the judge
    found wrong with it."""
    seed: int
    index: int
    family: str
    kind: str
    relus: int
    path: str
    verdict: str = ""
    by: str = ""
    exact: float | None = None  # the brute force's minimum margin, when it ran
    violated: bool = False  # some reference point violates the property
    wrong: list = field(default_factory=list)  # why the verdict is wrong (a sentence each)
    problems: list = field(default_factory=list)  # anything else wrong: crashes, bounds above the truth, ...


def session(network: Network):
    """``x (N, *input) -> logits`` by onnxruntime on one thread (a batch-1 network runs point by point)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    run = onnxruntime.InferenceSession(network.onnx, options, providers=["CPUExecutionProvider"])
    fixed = run.get_inputs()[0].shape[0] == 1

    def logits(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, *network.input_shape)
        if fixed:
            return np.concatenate([run.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
        return run.run(None, {"input": x})[0]
    return logits


def margins(logits: np.ndarray, prop: Property) -> np.ndarray:
    """``logit_label - logit_j`` for each ``j`` of ``others``, per row."""
    return logits[:, [prop.label]].astype(np.float64) - logits[:, list(prop.others)]


def scale_of(network: Network, points: np.ndarray) -> float:
    """1 + the largest |value| of any layer of the network at ``points`` (float64 reference)."""
    h, largest = points.reshape(len(points), -1).astype(np.float64), 0.0
    for step in network.steps:
        h = h @ step[1].T + step[2] if step[0] == "affine" else np.maximum(h, 0)
        largest = max(largest, float(np.abs(h).max()))
    return 1.0 + largest


def pgd(model, props: list, shape: tuple, outputs: int, restarts: int = 8, steps: int = 30,
        seed: int = 0) -> list[np.ndarray]:
    """Per property, points of its box where PGD (sign steps, shrinking from a quarter of each side; from the centre
    and random starts; all properties in one batch) maximises the largest ``logit_j - logit_label`` of the imported
    model, the one the verifier sees."""
    generator = torch.Generator().manual_seed(seed)
    low, high = (torch.tensor(np.repeat(np.stack(b), restarts, 0)).view(-1, *shape)
                 for b in ([p.lower for p in props], [p.upper for p in props]))
    x = low + torch.rand(low.shape, generator=generator) * (high - low)
    x[::restarts] = (low[::restarts] + high[::restarts]) / 2
    labels = torch.tensor([p.label for p in props]).repeat_interleave(restarts)
    threats = torch.zeros(len(props), outputs, dtype=torch.bool)
    for k, p in enumerate(props):
        threats[k, list(p.others)] = True
    threats = threats.repeat_interleave(restarts, 0)
    for t in range(steps):
        x.requires_grad_(True)
        logits = model(x)
        wrong = logits.masked_fill(~threats, float("-inf")).max(1).values
        grad, = torch.autograd.grad((wrong - logits.gather(1, labels[:, None])[:, 0]).sum(), x)
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x + (high - low) * (0.25 * (1 - t / steps) + 0.01) * grad.sign(), low),
                              high)
    return list(x.detach().numpy().reshape(len(props), restarts, -1))


def sample_points(prop: Property, rng: np.random.Generator, random: int = 64, corners: int = 64) -> np.ndarray:
    """The centre, the corners (all of them up to 2**6, else ``corners`` random ones), ``random`` uniform points."""
    n, low, high = len(prop.lower), prop.lower.astype(np.float64), prop.upper.astype(np.float64)
    picks = np.array(list(itertools.product((0, 1), repeat=n))) if n <= 6 else rng.integers(0, 2, (corners, n))
    points = [(low + high) / 2, *np.where(picks == 1, high, low), *(low + rng.random((random, n)) * (high - low))]
    return np.clip(np.asarray(points, dtype=np.float32), prop.lower, prop.upper)


# -- the brute force -------------------------------------------------------------------------------------------------
class _OverBudget(Exception):
    pass


class _BruteForce:
    """The exact minimum margins over a box: the network is affine on each region of fixed ReLU signs, so one LP per
    region and class gives the minimum there. Regions are split one ReLU at a time, and only ReLUs whose input's
    range over the whole box has both signs split. The points (the judge's samples) save most LPs: a sign that a
    point of the region takes needs no LP to show it is non-empty, and a region whose margin's range over the box
    cannot go below the best point's margin needs no LP at all."""

    def __init__(self, steps: list, lower: np.ndarray, upper: np.ndarray, budget: int):
        self.steps, self.lower, self.upper, self.budget = steps, lower, upper, budget
        self.bounds = list(zip(lower, upper))

    def lp(self, cost: np.ndarray, a: np.ndarray, b: np.ndarray):
        self.budget -= 1
        if self.budget < 0:
            raise _OverBudget
        return linprog(cost, a if len(a) else None, b if len(b) else None, bounds=self.bounds, method="highs")

    def regions(self, points: np.ndarray):
        """``(A, b, M, c)`` per non-empty region: on ``{x in box: A x <= b}`` the network is ``x -> M x + c``."""
        n = len(self.lower)
        yield from self._walk(0, np.zeros((0, n)), np.zeros(0), np.eye(n), np.zeros(n), points)

    def _walk(self, k, a, b, m, c, points):
        if k == len(self.steps):
            yield a, b, m, c
        elif self.steps[k][0] == "affine":
            weight, bias = self.steps[k][1:]
            yield from self._walk(k + 1, a, b, weight @ m, weight @ c + bias, points)
        else:
            positive, negative = np.maximum(m, 0), np.minimum(m, 0)
            low = positive @ self.lower + negative @ self.upper + c
            high = positive @ self.upper + negative @ self.lower + c
            yield from self._split(k, a, b, m, c, points, high > 0, np.flatnonzero((low < 0) & (high > 0)))

    def _split(self, k, a, b, m, c, points, active, unstable):
        if not len(unstable):
            yield from self._walk(k + 1, a, b, m * active[:, None], c * active, points)
            return
        u, values = unstable[0], points @ m[unstable[0]] + c[unstable[0]]
        for on in (True, False):
            row, limit = (-m[u], c[u]) if on else (m[u], -c[u])  # on: z_u >= 0; off: z_u <= 0
            a2, b2, inside = np.vstack([a, row]), np.append(b, limit), values >= 0 if on else values <= 0
            if not inside.any() and self.lp(np.zeros(len(self.lower)), a2, b2).status != 0:
                continue
            signs = active.copy()
            signs[u] = on
            yield from self._split(k, a2, b2, m, c, points[inside], signs, unstable[1:])

    def minima(self, rows: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row ``r`` (of ``rows``, over the outputs), the minimum of ``r . f(x)`` over the box and a minimiser."""
        values = forward(self.steps, points) @ rows.T
        best, where = values.min(0), points[values.argmin(0)].copy()
        for a, b, m, c in self.regions(points):
            for k, row in enumerate(rows):
                cost, offset = row @ m, row @ c
                floor = np.minimum(cost * self.lower, cost * self.upper).sum() + offset
                if floor >= best[k]:
                    continue
                result = self.lp(cost, a, b)
                if result.status == 2:  # empty after all (its points sat on a boundary)
                    break
                if result.status == 0 and result.fun + offset < best[k]:
                    best[k], where[k] = result.fun + offset, result.x
        return best, where


def exact_minima(network: Network, prop: Property, points: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per class of ``others``, the exact minimum of ``logit_label - logit_j`` over the box and a minimiser (the
    ``points`` of the box seed the search); None when the brute force would need more than :data:`LP_BUDGET` LPs."""
    rows = np.eye(network.outputs)[[prop.label]] - np.eye(network.outputs)[list(prop.others)]
    try:
        return _BruteForce(network.steps, prop.lower.astype(np.float64), prop.upper.astype(np.float64),
                           LP_BUDGET).minima(rows, points.astype(np.float64))
    except _OverBudget:
        return None


# -- running the verifier --------------------------------------------------------------------------------------------
def _direct(model, shape, props: list, stages: list, milp_limit: float, alpha_iterations: int):
    """The cascade as ``certprune verify --instances`` runs it (centre, bound stages on the open boxes, the MILP, here
    without the PGD it starts with), on ``load_onnx``'s model; per property ``(verdict, by, margin bound,
    counterexample)``, and the crashes."""
    stack = lambda boxes: torch.tensor(np.stack(boxes)).view(-1, *shape)  # noqa: E731
    lower, upper = stack([p.lower for p in props]), stack([p.upper for p in props])
    cascade = Cascade(model, lower, upper, torch.tensor([p.label for p in props]), [list(p.others) for p in props])
    crashes = []
    for i in range(len(props)):
        cascade.falsify(i, (lower[i] + upper[i]) / 2, "centre")
    for method in stages:
        todo = cascade.open()
        if not len(todo):
            break
        try:
            if method == "MILP":  # without its PGD step, so that the program itself decides (and is judged)
                cascade.complete("MILP", todo, torch.full((len(cascade.lower),), float(milp_limit)), attack_steps=0)
            else:
                cascade.bound(method, todo, 64, "MILP" in stages, alpha_iterations, 0.5)
        except Exception as error:  # a crash on an accepted network is a finding, not the end of the case
            crashes.append(f"{method} crashed: {type(error).__name__}: {str(error).strip()[:150]}")
    results = []
    for i in range(len(props)):
        verdict = "verified" if cascade.stage[i] else "falsified" if cascade.falsified[i] else "unknown"
        by = STAGES[int(cascade.stage[i]) - 1] if cascade.stage[i] \
            else cascade.falsified_by[i]
        margin = float(cascade.margin[i])
        results.append((verdict, by, margin if math.isfinite(margin) else None,
                        cascade.counterexamples[i].numpy().reshape(-1) if cascade.falsified[i] else None))
    return results, crashes


def _public(folder: Path, stages: list, milp_limit: float, alpha_iterations: int):
    """``verify_instances`` on a case's files (model.onnx, prop_k.vnnlib, instances.csv in ``folder``)."""
    records = verify_instances(read_instances(folder / "instances.csv"), stages, milp_limit, 64, alpha_iterations)
    return [(r["verdict"], r["verified_by"] or r["falsified_by"], r["margin_lower_bound"],
             None if r["counterexample"] is None else r["counterexample"].numpy().reshape(-1)) for r in records], []


def _bab(model, shape, props: list, time_limit: float) -> list:
    """Branch and bound (``certify/bab.py``) on each property alone, without its PGD step so that the search itself
    decides: per property ``((verdict, by, margin bound, counterexample), crashes)``."""
    found = []
    for prop in props:
        low, high = (torch.tensor(b).view(shape) for b in (prop.lower, prop.upper))
        try:
            outcome = bab_verify(model, low, high, prop.label, list(prop.others), time_limit,
                                 settings=BabSettings(attack_steps=0, attack_restarts=0))
        except Exception as error:
            found.append((("crashed", "", None, None), [f"BaB crashed: {type(error).__name__}: "
                                                       f"{str(error).strip()[:150]}"]))
            continue
        margin = float(outcome.margin_lower_bound)
        found.append(((outcome.status, "BaB" if outcome.status != "falsified" else outcome.stats.get("by", "BaB"),
                       margin if math.isfinite(margin) else None,
                       None if outcome.counterexample is None else outcome.counterexample.numpy().reshape(-1)), []))
    return found


def _stage_bounds(model, shape, props: list, outputs: int, methods, alpha_iterations: int) -> dict:
    """Each bound stage's raw margin lower bounds (``(boxes, rows)``, rows in ``others`` order) on every box, as the
    cascade's proxy computes them (float64; the proxy's own choice of auto_LiRPA's conv mode, then its matrix mode
    where that fails an assertion, as the cascade falls back), before any rule of the cascade's filters them."""
    stack = lambda boxes: torch.tensor(np.stack(boxes)).view(-1, *shape)  # noqa: E731
    lower, upper = stack([p.lower for p in props]), stack([p.upper for p in props])
    spec = spec_of(torch.tensor([p.label for p in props]), [list(p.others) for p in props], outputs)
    proxies, found = {}, {}
    for method in methods:
        for mode in (None, "matrix"):
            try:
                proxies[mode] = proxies.get(mode) or BoundedProxy(model, lower[:1], torch.float64, mode)
                with torch.no_grad():
                    found[method] = proxies[mode].box_spec_bounds(lower, upper, spec, [method], alpha_iterations,
                                                                  0.5)[0].double().numpy()
                break
            except AssertionError as error:
                found[method] = f"AssertionError: {str(error).strip()[:150]}"
            except Exception as error:
                found[method] = f"{type(error).__name__}: {str(error).strip()[:150]}"
                break
    return found


def judge_case(case: Case, public: bool = False, milp_limit: float = 5.0, alpha_iterations: int = 3,
               folder: str | Path | None = None, stages=CASCADE, bab: bool = True) -> list[Judged]:
    """Verify ``case`` (through ``verify_instances`` on its written files when ``public``, else through the
    :class:`Cascade` on ``load_onnx``'s model) with the bound ``stages``, then the MILP on tiny networks, and judge
    every answer; on tiny networks also branch and bound (``bab``), each property alone. The bound methods of
    :data:`BOUND_STAGES` (alpha-CROWN when ``stages`` has it) are also judged on every box, whatever the cascade
    decided. ``folder``: where its files go (a temporary folder by default). One record per property and verifier,
    the cascade's first."""
    if folder is None:
        with tempfile.TemporaryDirectory() as temporary:
            return judge_case(case, public, milp_limit, alpha_iterations, temporary, stages, bab)
    folder, network = Path(folder), case.network
    write_case(case, folder)
    path = "verify_instances" if public else "cascade"
    judged = [Judged(case.seed, k, case.family, p.kind, network.relus, path) for k, p in enumerate(case.properties)]
    try:
        model, shape = load_onnx(folder / "model.onnx")
    except ValueError as error:
        message = str(error)
        fine = network.refusal is not None and network.refusal in message and "\n" not in message
        for record in judged:
            record.verdict = "refused"
            if not fine:
                record.problems.append(f"the importer refused: {message!r}" if network.refusal is None else
                                       f"the refusal is not one line naming a {network.refusal} scale: {message!r}")
        if public and network.refusal is not None:
            try:
                verify_instances(read_instances(folder / "instances.csv"), ["IBP"])
                judged[0].problems.append("verify_instances accepted a network with a zero scale")
            except ValueError:
                pass
        return judged
    if network.refusal is not None:
        for record in judged:
            record.verdict = "accepted"
            record.problems.append(f"the importer accepted a network with a {network.refusal} scale")
        return judged
    tiny = network.relus <= TINY_RELUS
    stages = list(stages) + (["MILP"] if tiny else [])
    try:
        results, crashes = (_public(folder, stages, milp_limit, alpha_iterations) if public else
                            _direct(model, shape, case.properties, stages, milp_limit, alpha_iterations))
    except Exception as error:
        results = [("crashed", "", None, None)] * len(judged)
        crashes = [f"verification crashed: {type(error).__name__}: {str(error).strip()[:150]}"]
    bounds = _stage_bounds(model, shape, case.properties, network.outputs,
                           [m for m in BOUND_STAGES if m in stages or m != "alpha-CROWN"], alpha_iterations)
    verdicts = [[(record, result)] for record, result in zip(judged, results)]
    for record in judged:
        record.problems += crashes
    if tiny and bab:
        for k, (result, crash) in enumerate(_bab(model, shape, case.properties, milp_limit)):
            record = Judged(case.seed, k, case.family, case.properties[k].kind, network.relus, "BaB")
            record.problems += crash
            verdicts[k].append((record, result))
    logits_of, attacked = session(network), pgd(model, case.properties, shape, network.outputs, seed=case.seed)
    for k, prop in enumerate(case.properties):
        _judge(network, model, shape, prop, verdicts[k], {m: b if isinstance(b, str) else b[k]
                                                          for m, b in bounds.items()}, attacked[k], logits_of, tiny)
    return [record for pairs in verdicts for record, _ in pairs]


def _judge(network, model, shape, prop, verdicts, bounds, attacked, logits_of, tiny) -> None:
    """Judge one property's ``verdicts`` (pairs of a record and ``(verdict, by, margin bound, counterexample)``):
    reference points (centre, corners, random, PGD, and the brute force's minimisers when a tiny network's property
    is verified), onnxruntime's logits there, then the checks. The bound stages' checks go to the first record."""
    first = verdicts[0][0]
    rng = np.random.default_rng(first.seed * 1000 + first.index)
    sampled = sample_points(prop, rng)
    origins = ["the box's centre"] + ["a corner or random point"] * (len(sampled) - 1) + ["a PGD point"] * len(
        attacked)
    points = np.concatenate([sampled, attacked])
    exact = exact_minima(network, prop, points) if tiny and any(
        result[0] == "verified" for _, result in verdicts) else None
    if exact is not None:
        points = np.concatenate([points, np.clip(exact[1], prop.lower, prop.upper).astype(np.float32)])
        origins += ["a minimiser of the brute force"] * len(exact[1])
    logits = logits_of(points)
    slack = SLACK * scale_of(network, points)
    with torch.no_grad():
        imported = model(torch.tensor(points).view(-1, *shape)).double().numpy()
    for name, values in (("the importer's model", imported),
                         ("the generator's float64 network", forward(network.steps, points))):
        gap = float(np.abs(values - logits).max())
        if gap > slack:
            first.problems.append(f"{name} differs from onnxruntime by {gap:.3g} (allowed {slack:.3g})")
    found = margins(logits, prop)
    _check_bounds(prop, first, bounds, found[0], None if exact is None else exact[0], slack)
    for record, (verdict, by, margin_bound, counterexample) in verdicts:
        record.verdict, record.by = verdict, by
        record.violated = bool((found.min(1) <= 0).any())
        record.exact = None if exact is None else float(exact[0].min())
        _check_verdict(prop, record, margin_bound, counterexample, found.min(1), origins, logits_of, slack)


def _check_bounds(prop, record, bounds, at_centre, minima, slack) -> None:
    """(b): each bound stage's margin lower bounds at or below the margins at the centre and the exact minima."""
    for method, values in bounds.items():
        if isinstance(values, str):
            record.problems.append(f"{method} crashed: {values}")
            continue
        values = values[:len(prop.others)]  # the spec's padding rows repeat the first
        for truth, what in ((at_centre, "its value {} at the box's centre"), (minima, "its exact minimum {}")):
            if truth is not None and (values > truth + slack).any():
                j = int(np.argmax(values - truth))
                record.problems.append(f"{method}'s bound {values[j]:.6g} on logit_{prop.label} - logit_"
                                       f"{prop.others[j]} exceeds " + what.format(f"{truth[j]:.6g}"))


def _check_verdict(prop, record, margin_bound, counterexample, worst, origins, logits_of, slack) -> None:
    """(a) and (c): a verified verdict against every reference point and the exact minimum, its margin bound
    against the points; a falsified verdict's counterexample in the box and violating under onnxruntime."""
    by = record.by
    if record.verdict == "verified":
        if record.violated:
            at = int(np.argmin(worst))
            record.wrong.append(f"verified by {by}, but onnxruntime's margin is {worst[at]:.6g} <= 0 at "
                                f"{origins[at]}")
        if record.exact is not None and record.exact < -slack:
            record.wrong.append(f"verified by {by}, but the exact minimum margin is {record.exact:.6g}")
        if margin_bound is None or not margin_bound > 0:
            record.problems.append(f"verified by {by} on the margin bound {margin_bound}")
    elif record.verdict == "falsified":
        inside = counterexample is not None and bool(((counterexample >= prop.lower) &
                                                      (counterexample <= prop.upper)).all())
        if not inside:
            record.wrong.append(f"falsified by {by} with a counterexample outside the box")
        else:
            there = float(margins(logits_of(counterexample[None]), prop).min())
            if there > slack:  # within float32 rounding of a tie, onnxruntime and torch may round either way
                record.wrong.append(f"falsified by {by}, but onnxruntime's margin at the counterexample is "
                                    f"{there:.6g} > 0")
    if record.verdict != "falsified" and margin_bound is not None and margin_bound > worst.min() + slack:
        record.problems.append(f"{record.verdict} by {by or 'no stage'} with the margin bound {margin_bound:.6g}, "
                               f"above the smallest margin {worst.min():.6g} onnxruntime finds")
