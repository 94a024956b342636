"""Specification of complete verification (certprune.certify.milp): exact, sound, and smaller when weights are 0.

Every claim is checked by an independent method: exhaustive enumeration of ReLU activation patterns (one LP each)
on tiny 2-input networks, a float forward pass for every counterexample, PGD against every verified image, and
auto_LiRPA's CROWN bounds as a floor under the MILP's proven bound.
"""
import logging
import types

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from certprune.attacks import PGD
from certprune.certify import milp, proof
from certprune.certify.verify import evaluate
from certprune.lirpa import BoundedProxy
from helpers import conv_net, trained_7x7


EPS = 0.02  # for the trained 7x7 net: about a tenth of its test images falsified


def tiny_net(seed, widths=(2, 7, 6, 3)):
    """Random weights large enough that the decision boundaries cross the unit square."""
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
        nn.init.normal_(layers[-2].weight, std=2.0)
        nn.init.normal_(layers[-2].bias, std=1.0)
    return nn.Sequential(*layers[:-1]).double().eval()


def brute_force_min_margins(model, lower, upper, label):
    """``min over the box of logit_label - logit_j`` for every j, exactly: a depth-first walk over the ReLUs' on/off
    choices, keeping only feasible regions (an LP each), then one LP per class on each full pattern's region."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    weights = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in linears]
    box = list(zip(lower, upper))
    best = np.full(weights[-1][0].shape[0], np.inf)

    def feasible(a_ub, b_ub):
        if not a_ub:
            return True
        return linprog(np.zeros(len(box)), A_ub=np.array(a_ub), b_ub=np.array(b_ub), bounds=box).status == 0

    def walk(layer, neuron, M, c, post_M, post_c, a_ub, b_ub):
        if neuron == len(c):  # layer done: the next pre-activation is affine in x on this region
            W, b = weights[layer + 1]
            M2, c2 = W @ np.array(post_M), W @ np.array(post_c) + b
            if layer + 1 == len(weights) - 1:
                for j in range(len(c2)):
                    objective = M2[label] - M2[j]
                    res = linprog(objective, A_ub=np.array(a_ub) if a_ub else None,
                                  b_ub=np.array(b_ub) if b_ub else None, bounds=box)
                    if res.status == 0:
                        best[j] = min(best[j], res.fun + c2[label] - c2[j])
                return
            return walk(layer + 1, 0, M2, c2, [], [], a_ub, b_ub)
        for active in (True, False):  # active: M x + c >= 0; inactive: M x + c <= 0
            sign = -1.0 if active else 1.0
            rows, rhs = a_ub + [sign * M[neuron]], b_ub + [-sign * c[neuron]]
            if feasible(rows, rhs):
                walk(layer, neuron + 1, M, c, post_M + [M[neuron] if active else 0 * M[neuron]],
                     post_c + [c[neuron] if active else 0.0], rows, rhs)

    W, b = weights[0]
    walk(0, 0, W, b, [], [], [], [])
    return best


# verified and falsified, with and without unstable ReLUs, the box clipped at 0 and 1 in the (0.05, 0.9) and
# (0.98, 0.02) cases; the last is robust only because of the clipping (the unclipped box holds margins of -1.77)
CASES = [(0, (0.5, 0.5), 0.3), (0, (0.9, 0.2), 0.2), (0, (0.05, 0.9), 0.4), (1, (0.05, 0.9), 0.4),
         (1, (0.9, 0.2), 0.2), (2, (0.3, 0.7), 0.1), (3, (0.05, 0.9), 0.4), (3, (0.3, 0.7), 0.1),
         (1, (0.98, 0.02), 0.3)]


@pytest.mark.parametrize("seed,center,eps", CASES)
def test_milp_equals_brute_force_enumeration_of_activation_patterns(seed, center, eps):
    """The exact minimum margin per class, and the decision, equal an LP per activation pattern. Centres near the
    border of [0, 1] with a large eps make the box clipping matter."""
    model = tiny_net(seed)
    x = torch.tensor(center, dtype=torch.float64)
    label = int(model(x[None]).argmax())
    lower = np.clip(np.array(center) - eps, 0, 1)  # the clipped box, computed here independently
    upper = np.clip(np.array(center) + eps, 0, 1)
    expected = brute_force_min_margins(model, lower, upper, label)
    net = milp.network(model, x[None])
    prog = milp.program(net, lower, upper, milp.tightened_bounds(net, lower, upper))
    for j in range(3):
        if j != label:
            result = milp.solve(prog, label, j, 10.0)
            assert result.status == 0 and result.fun == pytest.approx(expected[j], abs=1e-6)
    truth = min(expected[j] for j in range(3) if j != label)
    outcome = milp.verify_image(model, x, label, eps)
    tolerance = proof.milp_tolerance(prog.var_lower, prog.var_upper)
    assert outcome.status == ("verified" if truth > tolerance else "falsified")
    if outcome.status == "verified":  # proven, so never above the truth (classes intervals prove are not solved)
        assert tolerance < outcome.margin_lower_bound <= truth + 1e-6
    else:
        assert truth - 1e-6 <= outcome.margin_lower_bound < 0  # the counterexample's margin


def test_a_tiny_net_has_both_verified_and_falsified_cases():
    """The brute-force comparison above is only worth something if it covers both answers."""
    statuses = {milp.verify_image(tiny_net(seed), torch.tensor(center, dtype=torch.float64),
                                  int(tiny_net(seed)(torch.tensor([center], dtype=torch.float64)).argmax()),
                                  eps).status for seed, center, eps in CASES}
    assert statuses == {"verified", "falsified"}


def test_the_program_computes_exactly_what_the_model_does():
    """Normalize, the convolutions as sparse matrices and the linears reproduce the forward pass in float64."""
    model = conv_net().double()
    x = torch.rand(5, 1, 7, 7, dtype=torch.float64)
    net = milp.network(model, x)
    values = x.flatten(1).numpy().T
    for step in net.steps:
        values = np.maximum(values, 0) if step[0] == "relu" else step[1] @ values + step[2][:, None]
    assert np.allclose(values.T, model(x).detach().numpy(), atol=1e-12)


@pytest.fixture(scope="module")
def trained():
    return trained_7x7()


def settings(**changes):
    base = dict(eps=EPS, bound_methods=["IBP", "CROWN", "MILP"], batch_size=16, timeout=5.0, alpha_iterations=3,
                alpha_lr=0.5)
    return types.SimpleNamespace(**{**base, **changes})


@pytest.fixture(scope="module")
def cascade(trained):
    model, x, y = trained
    return evaluate(model, x, y, settings())


def test_every_image_is_decided_and_counted_once(trained, cascade):
    model, x, y = trained
    records = cascade["_per_image"]
    verified = [bool(r["verified_by"]) for r in records]
    assert not any(v and r["falsified"] for v, r in zip(verified, records))
    assert cascade["unknown_acc"] == 0 and cascade["decided_fraction"] == 1
    assert cascade["verified_acc"] + cascade["falsified_acc"] == pytest.approx(cascade["clean_acc"])
    assert cascade["verified_acc"] == pytest.approx(cascade["verified_acc_ibp"] + cascade["verified_extra_crown"]
                                                    + cascade["verified_extra_milp"])
    assert 0 < cascade["verified_acc"] < cascade["clean_acc"] and cascade["falsified_acc"] > 0
    assert cascade["robust_acc_exact"] == cascade["verified_acc"]
    assert all(r["margin_lower_bound"] > 0 for r in records if r["verified_by"])
    assert all(r["margin_lower_bound"] < 0 for r in records if r["falsified"])


def test_every_counterexample_is_in_the_box_and_misclassified(trained, cascade):
    model, x, y = trained
    index = cascade["_counterexample_index"]
    found = cascade["_counterexamples"]
    assert len(index) == round(cascade["falsified_acc"] * len(x)) > 0
    assert (found >= 0).all() and (found <= 1).all()
    assert ((found.double() - x[index].double()).abs() <= EPS).all()  # exact: float32 differences fit a double
    with torch.no_grad():
        assert (model(found).argmax(1) != y[index]).all()


def test_verified_never_exceeds_exact_never_exceeds_pgd_never_exceeds_clean(trained, cascade):
    model, x, y = trained
    attacked = PGD(EPS, steps=30, restarts=2, objective="margin").perturb(model, x, y)
    with torch.no_grad():
        robust = model(attacked).argmax(1) == y
    verified = torch.tensor([bool(r["verified_by"]) for r in cascade["_per_image"]])
    assert not (verified & ~robust).any()  # PGD never breaks a verified image
    assert cascade["verified_acc"] <= cascade["robust_acc_exact"] <= robust.float().mean() <= cascade["clean_acc"]


def test_milp_alone_verifies_images_pgd_cannot_break_and_bounds_at_least_crown(trained):
    """Without an attack or earlier stages, the MILP's own answers: its exact minimum per class lies above IBP's
    and CROWN's lower bounds, a verified image survives a strong PGD, and a counterexample's margin lies above
    CROWN's floor."""
    model, x, y = trained
    correct = model(x).argmax(1) == y
    x, y = x[correct][:12], y[correct][:12]
    proxy = BoundedProxy(model, x)
    floors = [proxy.margin_lower_bounds(x, y, EPS, method) for method in ("IBP", "CROWN")]
    outcomes = milp.decide(model, x, y, EPS, 10.0, relu_bounds=[], attack_steps=0)  # interval bounds only
    statuses = [o.status for o in outcomes]
    assert "verified" in statuses and "falsified" in statuses and "unknown" not in statuses
    for i in range(1):
        lower, upper = (b.double().flatten().numpy() for b in (x[i] - EPS, x[i] + EPS))
        lower, upper = lower.clip(0, 1), upper.clip(0, 1)
        net = milp.network(model, x[:1])
        prog = milp.program(net, lower, upper, milp.tightened_bounds(net, lower, upper))
        others = [j for j in range(10) if j != int(y[i])]
        exact = torch.tensor([milp.solve(prog, int(y[i]), j, 10.0).fun for j in others])
        for floor in floors:
            assert (exact >= floor[i].double() - 1e-4).all()
    for outcome, floor in zip(outcomes, floors[1].min(1).values.tolist()):
        assert outcome.margin_lower_bound >= floor - 1e-4 or outcome.status == "verified"
    proven = torch.tensor([s == "verified" for s in statuses])
    attacked = PGD(EPS, steps=50, restarts=3, objective="margin").perturb(model, x[proven], y[proven])
    assert (model(attacked).argmax(1) == y[proven]).all()


def test_a_candidate_the_forward_pass_refutes_is_unknown_and_logged(trained, monkeypatch, caplog):
    model, x, y = trained
    i = int(torch.nonzero(model(x).argmax(1) == y)[0])
    fake = types.SimpleNamespace(status=0, fun=-1.0, mip_dual_bound=-1.0, x=None)

    def solve(prog, label, other, time_limit):  # claims the clean image itself is a counterexample
        fake.x = np.concatenate([x[i].flatten().double().numpy(), np.zeros(len(prog.var_lower) - x[i].numel())])
        return fake

    monkeypatch.setattr(milp, "solve", solve)
    with caplog.at_level(logging.WARNING, logger="certprune"):
        outcome = milp.verify_image(model, x[i], int(y[i]), 0.2)  # wide: no class proven by intervals alone
    assert outcome.status == "unknown" and outcome.counterexample is None
    assert "fails the float forward check" in caplog.text


def test_a_time_limited_solve_is_judged_by_its_dual_bound_not_its_incumbent(trained, monkeypatch):
    """At the time limit HiGHS holds a feasible point (its incumbent, an upper bound of the minimum) and a proven
    lower bound; only the second can verify."""
    model, x, y = trained
    i = int(torch.nonzero(model(x).argmax(1) == y)[0])
    timed_out = types.SimpleNamespace(status=1, fun=2.0, mip_dual_bound=-0.5, x=None)
    monkeypatch.setattr(milp, "milp", lambda *args, **kwargs: timed_out)
    outcome = milp.verify_image(model, x[i], int(y[i]), 0.2)
    assert outcome.status == "unknown" and outcome.stats["why"] == "timeout"
    timed_out.mip_dual_bound = 0.5  # proven above 0 for every class it is asked about: verified although timed out
    assert milp.verify_image(model, x[i], int(y[i]), 0.2).status == "verified"


def test_pruned_weights_leave_the_constraint_matrix():
    model = tiny_net(0, (4, 10, 8, 3))
    x = torch.full((4,), 0.5, dtype=torch.float64)
    dense = milp.network(model, x[None])
    with torch.no_grad():
        zeroed = 0
        for layer in model:
            if isinstance(layer, nn.Linear):
                mask = torch.rand_like(layer.weight) < 0.5
                layer.weight[mask] = 0
                zeroed += int(mask.sum())
    pruned = milp.network(model, x[None])
    nnz = lambda net: sum(step[1].nnz for step in net.steps if step[0] == "affine")  # noqa: E731
    assert nnz(dense) - nnz(pruned) == zeroed
    lower, upper = np.full(4, 0.4), np.full(4, 0.6)
    sizes = [milp.program(net, lower, upper, milp.tightened_bounds(net, lower, upper)).stats for net in
             (dense, pruned)]
    assert sizes[1]["nonzeros"] < sizes[0]["nonzeros"]
    conv = conv_net()
    before = milp.network(conv, torch.rand(1, 1, 7, 7)).steps[1][1].nnz
    with torch.no_grad():
        conv[1].weight[:, :, 0, :] = 0
    assert milp.network(conv, torch.rand(1, 1, 7, 7)).steps[1][1].nnz < before


class Residual(nn.Module):
    def forward(self, x):
        return x + 1


@pytest.mark.parametrize("model", [Residual(), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 2)),
                                   nn.Sequential(nn.Linear(4, 3), nn.Tanh())])
def test_other_models_are_a_one_line_value_error(model):
    with pytest.raises(ValueError) as error:
        milp.network(model, torch.rand(1, 4))
    assert "\n" not in str(error.value) and "MILP" in str(error.value)
