"""Specification of branch and bound (certprune.certify.bab) and its bound engine (certprune.certify.linear_bounds).

The engine is checked against auto_LiRPA's CROWN and against sampled margins for random slopes and multipliers; the
search against brute force over all activation patterns (one LP each) and against the MILP on tiny networks, where
every verdict must be the exact one.
"""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from certprune.boxes import spec_of
from certprune.certify import bab, bab_domains, bab_leaves, milp
from certprune.certify import bound_optimisation as bo
from certprune.certify import linear_bounds as lb
from certprune.certify.milp_encoding import network
from certprune.lirpa import BoundedProxy
from certprune.models import Normalize
from helpers import conv_net
from test_milp import brute_force_min_margins, tiny_net


def relu_last_net(seed=0):
    """Normalize with a negative and a positive std, a Linear chain and a ReLU after the last layer."""
    torch.manual_seed(seed)
    return nn.Sequential(Normalize([0.2, 0.7], [-0.5, 0.8]), nn.Flatten(), nn.Linear(2, 8), nn.ReLU(),
                         nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU()).double().eval()


def flat_input_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)).double().eval()


def engine_case(model, shape, seed=0, eps=0.3):
    """A box around a random input, the model's chain and its margin rows against every other class."""
    torch.manual_seed(seed)
    x = torch.rand(1, *shape, dtype=torch.float64)
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    label = int(model(x).argmax())
    classes = int(model(x).shape[-1])
    eye = torch.eye(classes, dtype=torch.float64)
    rows = eye[label] - eye[[j for j in range(classes) if j != label]]
    return lb.chain_of(network(model, x)), lower, upper, rows


def sampled(model, lower, upper, count=20000, seed=1):
    """Points of the box (its corners included) and the model's outputs there."""
    generator = torch.Generator().manual_seed(seed)
    points = lower + (upper - lower) * torch.rand(count, *lower.shape[1:], generator=generator, dtype=lower.dtype)
    corners = torch.where(torch.rand(count // 10, *lower.shape[1:], generator=generator) < 0.5, lower, upper)
    points = torch.cat([points, corners])
    with torch.no_grad():
        return points, model(points).double()


def test_crown_equals_auto_lirpas_crown():
    """Default slopes reproduce auto_LiRPA's CROWN (behind a Normalize, which the proxy maps the box through): every
    ReLU's input bounds and every margin bound. (On convolutions auto_LiRPA bounds some intermediate neurons
    differently, neither side tighter everywhere; the sampling test below covers them.)"""
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.3], [0.4]), nn.Flatten(), nn.Linear(49, 32), nn.ReLU(), nn.Linear(32, 24),
                          nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    x = torch.rand(3, 1, 7, 7)
    lower, upper = x - 0.05, x + 0.05
    spec = spec_of(torch.tensor([1, 4, 7]), None, 10)
    reference, relus = BoundedProxy(model, x).box_relu_bounds(lower, upper, spec, "CROWN")
    chain = lb.chain_of(network(model, x))
    for i in range(3):
        box = lower[i].double().reshape(1, -1), upper[i].double().reshape(1, -1)
        bounds = lb.crown_bounds(chain, *box)
        for (low, up), (ref_low, ref_up) in zip(bounds, relus):
            assert torch.allclose(low[0].float(), ref_low[i], atol=1e-4)
            assert torch.allclose(up[0].float(), ref_up[i], atol=1e-4)
            assert bool(((low < 0) & (up > 0)).any())  # the relaxations are exercised in every layer
        margins = bo.root_bounds(chain, *box, spec[i].double(), iterations=0).margins
        assert torch.allclose(margins.float(), reference[i], atol=1e-4)


@pytest.mark.parametrize("make,shape", [(relu_last_net, (2, 1, 1)), (flat_input_net, (5,)),
                                        (lambda: conv_net(1).double(), (1, 7, 7))])
def test_every_bound_is_below_every_sampled_value_for_any_slopes_and_multipliers(make, shape):
    """Soundness for ANY alpha in [0, 1] and beta >= 0: on a domain of random splits (the signs at a sampled point,
    so it is not empty), random slopes and multipliers (up to 10) bound every sampled margin of the domain. Also the
    optimised root bounds contain every sampled ReLU input, and the float32-optimised alpha-CROWN margins are
    below the sampled ones. Networks: a negative Normalize scale and a ReLU last, a flat input, convolutions."""
    model = make()
    chain, lower, upper, rows = engine_case(model, shape)
    points, outputs = sampled(model, lower, upper)
    flat = points.flatten(1)
    inputs, _ = chain.pre_activations(flat)
    margins = outputs @ rows.T  # (count, R)
    root = bo.root_bounds(chain, lower.reshape(1, -1), upper.reshape(1, -1), rows, iterations=15, lr=0.2)
    assert (root.margins[None] <= margins.min(0).values + 1e-9).all()
    for (low, up), z in zip(root.bounds, inputs):
        assert (low <= z.min(0).values + 1e-9).all() and (up >= z.max(0).values - 1e-9).all()
    generator = torch.Generator().manual_seed(2)
    for trial in range(20):
        anchor = int(torch.randint(len(flat), (1,), generator=generator))
        splits = []
        for (low, up), z in zip(root.bounds, inputs):
            chosen = ((low < 0) & (up > 0)) & (torch.rand(low.shape, generator=generator) < 0.5)
            splits.append(torch.where(chosen, torch.where(z[anchor] >= 0, 1, -1), 0).to(torch.int8))
        inside = torch.ones(len(flat), dtype=torch.bool)
        for s, z in zip(splits, inputs):
            inside &= ((s[0] == 0) | (s[0] * z >= 0)).all(1)
        alphas = [torch.rand(s.shape, generator=generator, dtype=torch.float64) for s in splits]
        betas = [10 * torch.rand(s.shape, generator=generator, dtype=torch.float64) ** 3 for s in splits]
        relaxations = lb.split_relaxations(root.bounds, splits)
        for r in range(len(rows)):
            bound = bo.domain_bounds(chain, lower.reshape(1, -1), upper.reshape(1, -1), rows[r:r + 1], relaxations,
                                     splits, alphas, betas)
            assert bound <= margins[inside, r].min() + 1e-9, (trial, r)


def test_beta_tightens_the_bounds_of_split_domains():
    """The same optimisation with the multipliers frozen at 0 (alpha only) never ends higher, and the multipliers
    raise the bound of most two-sided split domains: what beta-CROWN adds."""
    model = flat_input_net(3)
    chain, lower, upper, rows = engine_case(model, (5,), eps=0.4)
    box = lower.reshape(1, -1), upper.reshape(1, -1)
    root = bo.root_bounds(chain, *box, rows, iterations=0)
    generator = torch.Generator().manual_seed(0)
    count = 64
    splits = [torch.where(((low < 0) & (up > 0)) & (torch.rand(count, low.shape[1], generator=generator) < 0.6),
                          torch.randint(0, 2, (count, low.shape[1]), generator=generator) * 2 - 1, 0).to(torch.int8)
              for low, up in root.bounds]
    domain_rows = rows[torch.randint(len(rows), (count,), generator=generator)]
    alphas = [torch.full((count, low.shape[1]), 0.5, dtype=torch.float64) for low, _ in root.bounds]
    betas = [torch.zeros_like(a) for a in alphas]
    results = {}
    for lr_beta in (0.0, 0.1):
        results[lr_beta] = bo.optimise_domains(chain, *box, domain_rows, root.bounds, splits, alphas, betas, 40, 0.1,
                                               lr_beta)[0]
    assert (results[0.1] >= results[0.0] - 1e-6).float().mean() >= 0.95
    assert (results[0.1] > results[0.0] + 1e-3).float().mean() >= 0.5


def test_the_rounding_allowance_covers_what_rounding_does():
    """In float32, where rounding is large enough to see: on boxes so small that every ReLU is stable, CROWN's bound
    is the exact minimum of a linear function, attained at a corner (its value there computed in float64). Without
    the allowance, the float32 bound exceeds that minimum in some cases; with it, never."""
    exceeded, checked = 0, 0
    for seed in range(6):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(60, 120), nn.ReLU(), nn.Linear(120, 120), nn.ReLU(), nn.Linear(120, 10)).eval()
        x = torch.rand(1, 60)
        lower, upper = x - 1e-5, x + 1e-5
        rows = torch.eye(10, dtype=torch.float64)[0] - torch.eye(10, dtype=torch.float64)[1:]
        chain = lb.chain_of(network(model, x))
        bounds = lb.crown_bounds(chain, lower.double(), upper.double())
        assert not any(bool(((low < 0) & (up > 0)).any()) for low, up in bounds)
        single = chain.to(torch.float32)
        outward = [(torch.nextafter(low.float(), torch.tensor(-math.inf)), torch.nextafter(up.float(), torch.tensor(
            math.inf))) for low, up in bounds]  # sound float32 bounds
        relaxations = [lb.relaxation(*b) for b in outward]
        scale = lb.scale_of(single, lower, upper, outward)
        record = {}
        plain = lb.backward(single, rows.float()[None], 2, relaxations, lower, upper, record=record)[0]
        allowed = lb.backward(single, rows.float()[None], 2, relaxations, lower, upper, scale=scale)[0]
        corners = torch.where(record["x"][0] >= 0, lower, upper).double()  # the minimisers
        with torch.no_grad():
            exact = (model.double()(corners) * rows).sum(1)
        exceeded += int((plain.double() > exact).sum())
        checked += len(rows)
        assert (allowed.double() <= exact).all(), (allowed.double() - exact).max()
    assert exceeded > 0 and checked == 54


def test_nan_and_infinite_bounds_prove_nothing_and_the_proof_rules_tolerance_holds():
    bounds = torch.tensor([math.nan, math.inf, -math.inf, 0.0, 1e-300, 1e-6, 2e-6], dtype=torch.float64)
    assert lb.proven(bounds).tolist() == [False, False, False, False, False, False, True]


# tiny nets (seed, centre, eps) near their critical eps, where the search must split to decide, some to the last
# ReLU (a linear program per leaf): verified (49; 95, through 291 leaves) and falsified without the attack (81, 74,
# 41), plus test_milp's cases
SPLIT_CASES = [(49, (0.8, 0.47, 0.3), 0.2857), (81, (0.61, 0.64, 0.68), 0.2317), (95, (0.44, 0.24, 0.4), 0.3567),
               (74, (0.41, 0.92, 0.07), 0.3748), (41, (0.11, 0.91, 0.8), 0.1651)]


def tiny_case(seed, centre, eps, widths):
    model = tiny_net(seed, widths)
    x = torch.tensor(centre, dtype=torch.float64)
    label = int(model(x[None]).argmax())
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    expected = brute_force_min_margins(model, lower.numpy(), upper.numpy(), label)
    return model, lower, upper, label, min(expected[j] for j in range(len(expected)) if j != label)


@pytest.mark.parametrize("seed,centre,eps,widths", [(*case, (3, 6, 5, 3)) for case in SPLIT_CASES] + [
    (seed, centre, eps, (2, 7, 6, 3)) for seed, centre, eps in [(0, (0.5, 0.5), 0.3), (0, (0.05, 0.9), 0.4),
                                                              (1, (0.98, 0.02), 0.3), (3, (0.3, 0.7), 0.1)]])
def test_bab_decides_exactly_what_brute_force_and_the_milp_decide(seed, centre, eps, widths):
    """Without the attack, so that counterexamples must come from the search itself: verified iff the exact minimum
    margin (an LP per activation pattern) is positive, falsified otherwise, never unknown; a verified bound never
    exceeds the exact minimum, a counterexample's margin is never below it; the MILP agrees."""
    model, lower, upper, label, truth = tiny_case(seed, centre, eps, widths)
    outcome = bab.verify_box(model, lower, upper, label, time_limit=30, settings=bab.Settings(attack_steps=0))
    assert outcome.status == ("verified" if truth > 0 else "falsified"), (truth, outcome)
    if outcome.status == "verified":
        assert 0 < outcome.margin_lower_bound <= truth + 1e-9
    else:
        assert truth - 1e-6 <= outcome.margin_lower_bound <= 0
        assert ((outcome.counterexample >= lower) & (outcome.counterexample <= upper)).all()
        logits = model(outcome.counterexample[None])[0]
        assert logits[label] <= logits[[j for j in range(3) if j != label]].max()
    assert milp.verify_box(model, lower, upper, label).status == outcome.status


def test_the_cases_above_reach_both_verdicts_and_the_linear_programs_of_full_splits():
    """The comparison above is worth something only if the search splits to the leaves in it, both ways."""
    reached = set()
    for case in (SPLIT_CASES[1], SPLIT_CASES[2]):
        model, lower, upper, label, _ = tiny_case(*case, (3, 6, 5, 3))
        outcome = bab.verify_box(model, lower, upper, label, time_limit=30, settings=bab.Settings(attack_steps=0))
        reached.add((outcome.status, outcome.stats["leaves"] > 0))
    assert reached == {("verified", True), ("falsified", True)}


def pattern_minimum(chain, lower, upper, row, pattern):
    """min of row . output over the box points whose ReLU inputs have the signs of ``pattern`` (scipy, independent
    of the engine): None when no point has them."""
    affine, offset, rows, rhs = np.eye(len(lower)), np.zeros(len(lower)), [], []
    for weight, bias, signs in zip(chain.weights, chain.biases, pattern):
        z_map, z_offset = weight.numpy() @ affine, weight.numpy() @ offset + bias.numpy()
        rows.append(-signs[:, None] * z_map)
        rhs.append(signs * z_offset)
        affine, offset = z_map * (signs > 0)[:, None], z_offset * (signs > 0)
    result = linprog(row @ chain.weights[-1].numpy() @ affine, A_ub=np.concatenate(rows), b_ub=np.concatenate(rhs),
                     bounds=list(zip(lower, upper)), method="highs")
    return None if result.status == 2 else result.fun + row @ (chain.weights[-1].numpy() @ offset +
                                                               chain.biases[-1].numpy())


def test_a_fully_split_domain_is_decided_by_its_linear_program():
    """Every full split of the root's unstable ReLUs: the leaf's proven bound equals the minimum over the domain
    computed independently, an empty domain is proven empty (bound > 0), and the leaves' minimum is the exact one."""
    model, lower, upper, label, truth = tiny_case(49, (0.8, 0.47, 0.3), 0.2857, (3, 6, 5, 3))
    chain = lb.chain_of(network(model, lower[None]))
    box = lower[None], upper[None]
    eye = torch.eye(3, dtype=torch.float64)
    bounds = bo.root_bounds(chain, *box, eye[label] - eye[[j for j in range(3) if j != label]], iterations=0).bounds
    unstable = [((low < 0) & (up > 0))[0] for low, up in bounds]
    count, empty, lowest = int(sum(u.sum() for u in unstable)), 0, math.inf
    assert count >= 6
    for other in [j for j in range(3) if j != label]:
        row = eye[label] - eye[other]
        for number in range(2 ** count):
            signs = iter([1 if number >> bit & 1 else -1 for bit in range(count)])
            splits = [torch.tensor([[next(signs) if u else 0 for u in layer]], dtype=torch.int8) for layer in unstable]
            bound, point = bab_leaves.decide_leaf(chain, *box, row, bounds, splits, lb.scale_of(chain, *box, bounds))
            pattern = [np.where(s[0].numpy() != 0, s[0].numpy(), np.where(low[0].numpy() >= 0, 1, -1)).astype(float)
                       for s, (low, _) in zip(splits, bounds)]
            exact = pattern_minimum(chain, lower.numpy(), upper.numpy(), row.numpy(), pattern)
            if exact is None:
                empty += 1
                assert lb.proven(bound) and point is None
            else:
                assert float(bound) == pytest.approx(exact, abs=1e-7)
                lowest = min(lowest, float(bound))
    assert empty > 0 and lowest == pytest.approx(truth, abs=1e-7)


def test_a_network_with_a_relu_last_is_bounded_after_that_relu():
    """The margin after a final ReLU: BaB's verdict agrees with a dense grid of the 2-D box (the MILP's interval
    shortcut once read the bounds before that ReLU)."""
    model = relu_last_net(4)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, 301, dtype=torch.float64)] * 2, indexing="ij"), -1)
    with torch.no_grad():
        outputs = model(grid.reshape(-1, 2, 1, 1))
    statuses = set()
    for label in range(3):
        for centre, eps in [((0.3, 0.6), 0.2), ((0.7, 0.2), 0.1), ((0.5, 0.5), 0.5)]:
            x = torch.tensor(centre, dtype=torch.float64).view(2, 1, 1)
            lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
            inside = ((grid.reshape(-1, 2) >= lower.flatten()) & (grid.reshape(-1, 2) <= upper.flatten())).all(1)
            margins = outputs[inside][:, label:label + 1] - outputs[inside][:, [j for j in range(3) if j != label]]
            outcome = bab.verify_box(model, lower, upper, label, time_limit=30)
            statuses.add(outcome.status)
            if outcome.status == "verified":
                assert outcome.margin_lower_bound <= margins.min() + 1e-9
            else:
                assert outcome.status == "falsified" and outcome.margin_lower_bound <= 0
    assert statuses == {"verified", "falsified"}


def test_the_attack_finds_what_the_box_centre_does_not():
    """A falsified case whose centre is classified correctly: PGD's counterexample, re-checked in the inner box."""
    model, lower, upper, label, truth = tiny_case(41, (0.11, 0.91, 0.8), 0.1651, (3, 6, 5, 3))
    assert truth < 0 and int(model(((lower + upper) / 2)[None]).argmax()) == label
    inner = lower + 0.001, upper - 0.001
    outcome = bab.verify_box(model, lower, upper, label, time_limit=30, inner=inner)
    assert outcome.status == "falsified" and outcome.stats["by"] == "PGD"
    assert ((outcome.counterexample >= inner[0]) & (outcome.counterexample <= inner[1])).all()


def test_the_time_limit_covers_every_stage():
    """A robust property that alpha-CROWN proves in a few iterations (the MILP needs about a minute): unknown when
    its limit is too short for them, and the limit holds; verified when it is not. A wider box needs about 15 s of
    splitting (88,000 domains): unknown at 1 s, with a bound below its margin."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.rand(20)
    label = int(model(x[None]).argmax())
    short = bab.verify_box(model, x - 0.0547, x + 0.0547, label, time_limit=0.01)
    assert short.status == "unknown" and short.stats["why"] == "timeout" and short.seconds < 0.5
    assert bab.verify_box(model, x - 0.0547, x + 0.0547, label, time_limit=30).status == "verified"
    searching = bab.verify_box(model, x - 0.17, x + 0.17, label, time_limit=1.0)
    assert searching.status == "unknown" and searching.stats["why"] == "timeout" and searching.seconds < 1.5
    assert searching.stats["domains"] > 0 and searching.margin_lower_bound < 0


def test_only_check_box_turns_a_candidate_into_a_counterexample(monkeypatch):
    """With check_box refusing every candidate, a violated property is never falsified: PGD's points, the bounds'
    minimisers and the linear programs' optima all go through it."""
    calls = []
    monkeypatch.setattr(milp, "check_box", lambda *args: calls.append(args) and None)
    model, lower, upper, label, truth = tiny_case(41, (0.11, 0.91, 0.8), 0.1651, (3, 6, 5, 3))
    outcome = bab.verify_box(model, lower, upper, label, time_limit=30)
    assert truth < 0 and outcome.status == "unknown" and outcome.stats["why"] == "undecided leaf"
    assert len(calls) > 1 and outcome.margin_lower_bound <= truth


def test_the_pool_of_open_domains_takes_the_lowest_bounds_and_loses_none():
    """Domains go in and out of the pool's slots in many rounds (growing it): each taken batch holds the lowest bounds
    (or the deepest domains), and every domain added comes out exactly once."""
    generator = torch.Generator().manual_seed(0)

    def domains(start, count):
        ids = torch.arange(start, start + count)
        return bab_domains.Domains(ids, ids[:, None].to(torch.int8).expand(-1, 3).clone(), torch.zeros(count, 3),
                            torch.zeros(count, 3), torch.rand(count, generator=generator, dtype=torch.float64),
                            torch.randint(0, 50, (count,), generator=generator))

    pool, taken, added = bab_domains.Pool(domains(0, 5)), [], 5
    for round_ in range(30):
        pool.add(domains(added, 7))
        added += 7
        deepest = round_ % 5 == 0
        open_keys = torch.where(pool.used, -pool.store.depth.double() if deepest else pool.store.bound, torch.inf)
        batch = pool.take(4, deepest)
        key = -batch.depth.double() if deepest else batch.bound
        assert key.max() <= torch.sort(open_keys).values[3]
        assert (batch.splits[:, 0] == batch.row.to(torch.int8)).all()  # each domain's fields stay together
        taken += batch.row.tolist()
    taken += pool.take(added, False).row.tolist()
    assert sorted(taken) == list(range(added)) and len(pool) == 0


def test_decide_box_answers_each_property():
    model, lower, upper, label, truth = tiny_case(49, (0.8, 0.47, 0.3), 0.2857, (3, 6, 5, 3))
    outcomes = bab.decide_box(model, torch.stack([lower, lower]), torch.stack([upper, upper]),
                              torch.tensor([label, label]), [[j for j in range(3) if j != label], [(label + 1) % 3]])
    assert [o.status for o in outcomes] == ["verified", "verified"]
    assert outcomes[0].margin_lower_bound <= outcomes[1].margin_lower_bound


@pytest.mark.parametrize("change,message", [
    (dict(time_limit=0), "positive time limit"), (dict(label=3), "label"), (dict(others=[0, 1]), "label"),
    (dict(lower=torch.full((3,), 0.6, dtype=torch.float64)), "box"),
    (dict(upper=torch.tensor([1.0, math.nan, 1.0], dtype=torch.float64)), "box"),
    (dict(settings=lambda: bab.Settings(iterations=0)), "iterations"),
    (dict(model=lambda: nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()).double()), "Sigmoid")])
def test_bad_input_is_a_one_line_value_error_before_any_work(change, message, monkeypatch):
    monkeypatch.setattr(bab, "falsify", lambda *a: pytest.fail("work started"))
    arguments = dict(model=tiny_net(0, (3, 4, 3)), lower=torch.zeros(3, dtype=torch.float64),
                     upper=torch.full((3,), 0.5, dtype=torch.float64), label=0, others=None, time_limit=1.0)
    with pytest.raises(ValueError, match=message) as error:
        arguments.update({k: v() if callable(v) and k in ("settings", "model") else v for k, v in change.items()})
        bab.verify_box(**arguments)
    assert "\n" not in str(error.value)


def test_a_non_finite_weight_is_refused():
    model = tiny_net(0, (3, 4, 3))
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="finite"):
        bab.verify_box(model, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), 0)
