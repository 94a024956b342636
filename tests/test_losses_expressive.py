"""Specification of the expressive certified-training losses: SABR, MTL-IBP, CC-IBP and Exp-IBP.

The hand-computed case: ``x`` in R^2 at (0.5, 0.5), eps 0.1, label 0, through ``z = W2 relu(W1 x + b1)`` with
``W1 = [[1, 1], [1, -1]]``, ``b1 = [-0.5, 0.3]``, ``W2 = [[1, -1], [0, 1]]``. On the eps box both ReLUs are active,
so the margin ``z0 - z1 = h1 - 2 h2 = -x1 + 3 x2 - 1.1``: the cross-entropy rises with x1 and falls with x2
everywhere, so PGD ends at the corner (0.6, 0.4) from any start, where the margin is -0.5. IBP bounds
``h1 = x1 + x2 - 0.5`` by [0.3, 0.7] and ``h2 = x1 - x2 + 0.3`` by [0.1, 0.5], so the margin by 0.3 - 2 * 0.5 = -0.7
(looser than the true -0.5). With two classes every cross-entropy is ``softplus(-margin)``.
"""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certprune import masking
from certprune.cli_common import build_config
from certprune.config import load_config
from certprune.boxes import input_box, margin_spec
from certprune.losses import LOSSES, make_loss, robust_cross_entropy
from certprune.losses.expressive import CCIBPLoss, ExpIBPLoss, MTLIBPLoss, SABRLoss, margins, small_box
from certprune.models import create_model
from certprune.train import fit

MIXED = ["mtl-ibp", "cc-ibp", "exp-ibp"]
ALL = [("sabr", {"lam": 0.4}), *[(name, {"alpha": 0.5}) for name in MIXED]]
IBP_MARGIN, PGD_MARGIN = -0.7, -0.5


def softplus(value):
    return math.log1p(math.exp(value))


def hand_net():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([-0.5, 0.3]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
        net[2].bias.zero_()
    return net


def hand_batch():
    return torch.tensor([[0.5, 0.5]]), torch.tensor([0])


def mnist_batch(n=16):
    """Random images (pixels near 0 and 1 among them, where the eps box is clipped) and labels, and cnn-small."""
    return create_model("cnn-small"), torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))


def test_the_losses_are_registered():
    assert (LOSSES["sabr"], LOSSES["mtl-ibp"], LOSSES["cc-ibp"], LOSSES["exp-ibp"]) == (
        SABRLoss, MTLIBPLoss, CCIBPLoss, ExpIBPLoss)


def test_the_hand_case_holds_for_the_ibp_and_pgd_losses():
    """The module docstring's figures, through the existing losses: the reference the new ones are held to."""
    net, (x, y) = hand_net(), hand_batch()
    ibp, _ = make_loss("ibp", eps=0.1, kappa_end=0.0)(net, x, y, 0.0)
    assert ibp.item() == pytest.approx(softplus(-IBP_MARGIN), abs=1e-6)
    pgd, _ = make_loss("pgd", eps=0.1, steps=1)(net, x, y, 0.0)
    assert pgd.item() == pytest.approx(softplus(-PGD_MARGIN), abs=1e-6)


@pytest.mark.parametrize("name, expected", [
    ("mtl-ibp", 0.3 * softplus(-IBP_MARGIN) + 0.7 * softplus(-PGD_MARGIN)),
    ("cc-ibp", softplus(-(0.3 * IBP_MARGIN + 0.7 * PGD_MARGIN))),
    ("exp-ibp", softplus(-IBP_MARGIN) ** 0.3 * softplus(-PGD_MARGIN) ** 0.7)])
def test_mixed_losses_on_the_hand_case(name, expected):
    net, (x, y) = hand_net(), hand_batch()
    loss, metrics = make_loss(name, eps=0.1, alpha=0.3)(net, x, y, 0.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["robust_loss"].item() == pytest.approx(softplus(-IBP_MARGIN), abs=1e-6)
    assert metrics["verified_acc"] == 0 and metrics["adv_acc"] == 0


def test_sabr_on_the_hand_case():
    """lam 0.5: a box of half-width 0.05 around the PGD corner (0.6, 0.4), re-centred to (0.55, 0.45) to fit in the
    eps box: x1 in [0.5, 0.6], x2 in [0.4, 0.5]; h1 in [0.4, 0.6], h2 in [0.3, 0.5]; margin >= 0.4 - 1.0 = -0.6."""
    net, (x, y) = hand_net(), hand_batch()
    loss, metrics = make_loss("sabr", eps=0.1, lam=0.5)(net, x, y, 0.0)
    assert loss.item() == pytest.approx(softplus(0.6), abs=1e-6)
    assert "verified_acc" not in metrics  # a small box's bound certifies nothing about the eps box


@pytest.mark.parametrize("name", MIXED)
def test_alpha_one_is_the_ibp_loss_and_alpha_zero_the_pgd_loss(name):
    model, x, y = mnist_batch()
    ibp, _ = make_loss("ibp", eps=0.1, kappa_end=0.0)(model, x, y, 0.0)
    assert make_loss(name, eps=0.1, alpha=1.0)(model, x, y, 0.0)[0].item() == pytest.approx(ibp.item(), rel=1e-5)
    torch.manual_seed(1)
    pgd, _ = make_loss("pgd", eps=0.1, steps=1)(model, x, y, 0.0)
    torch.manual_seed(1)  # the same random start: the same PGD point
    assert make_loss(name, eps=0.1, alpha=0.0)(model, x, y, 0.0)[0].item() == pytest.approx(pgd.item(), rel=1e-5)


def test_sabr_with_lam_one_is_the_ibp_loss_over_the_whole_box():
    """Also where the eps box is clipped at 0 or 1, where re-centring alone would let the small box out."""
    model, x, y = mnist_batch()
    ibp, _ = make_loss("ibp", eps=0.1, kappa_end=0.0)(model, x, y, 0.0)
    assert make_loss("sabr", eps=0.1, lam=1.0)(model, x, y, 0.0)[0].item() == pytest.approx(ibp.item(), rel=1e-5)


def test_sabr_with_lam_zero_is_cross_entropy_at_the_pgd_point():
    model, x, y = mnist_batch()
    torch.manual_seed(1)
    pgd, _ = make_loss("pgd", eps=0.1, steps=8)(model, x, y, 0.0)
    torch.manual_seed(1)
    assert make_loss("sabr", eps=0.1, lam=0.0)(model, x, y, 0.0)[0].item() == pytest.approx(pgd.item(), rel=1e-5)


@pytest.mark.parametrize("radius", [0.0, 0.02, 0.05, 0.1])
def test_the_small_box_lies_in_the_eps_box_and_holds_the_point(radius):
    x = torch.cat([torch.rand(2000), torch.tensor([0.0, 1.0, 0.03, 0.97])])
    lower, upper = input_box(x, 0.1)
    point = lower + (upper - lower) * torch.rand(len(x))
    low, up = small_box(point, lower, upper, radius)
    assert (lower <= low).all() and (up <= upper).all()
    assert (low <= point).all() and (point <= up).all()
    assert torch.allclose(up - low, torch.minimum(upper - lower, torch.tensor(2 * radius)), atol=1e-6)


def test_margins_are_the_rows_of_the_bounds_spec_and_their_cross_entropy_is_cross_entropy():
    logits, y = torch.randn(6, 5), torch.tensor([0, 4, 2, 2, 1, 3])
    assert torch.allclose(margins(logits, y), (margin_spec(y, 5) @ logits[:, :, None]).squeeze(2))
    assert torch.allclose(robust_cross_entropy(margins(logits, y)), F.cross_entropy(logits, y))


@pytest.mark.parametrize("name, params", ALL)
def test_before_the_ramp_the_loss_is_cross_entropy_and_eps_then_ramps_as_the_bound_losses(name, params):
    model, x, y = mnist_batch()
    loss = make_loss(name, eps=0.2, ramp_start=1, ramp_epochs=2, **params)
    value, metrics = loss(model, x, y, 0.5)
    assert torch.allclose(value, F.cross_entropy(model(x), y)) and metrics["eps"] == 0
    ibp = make_loss("ibp", eps=0.2, ramp_start=1, ramp_epochs=2)
    assert [loss.eps(e) for e in (0.5, 2.0, 3.0, 9.0)] == [ibp.eps(e) for e in (0.5, 2.0, 3.0, 9.0)]
    assert loss(model, x, y, 2.0)[1]["eps"] == pytest.approx(0.1)
    assert loss.attack_at(2.0).step_size == pytest.approx(loss.attack.step_size / 2)


@pytest.mark.parametrize("name, params", ALL)
def test_pretraining_ramps_eps_as_for_the_bound_losses(name, params):
    config = load_config(overrides=[{"loss": {"name": name, "eps": 0.1, **params}, "pretrain": {"epochs": 10}}])
    assert config.phase_loss("pretrain")[1]["ramp_epochs"] == 4
    assert "ramp_epochs" not in config.phase_loss("finetune")[1]


@pytest.mark.parametrize("name", MIXED)
def test_at_alpha_one_the_gradient_is_the_ibp_losss(name):
    model, x, y = mnist_batch()
    gradients = []
    for loss in (make_loss("ibp", eps=0.1, kappa_end=0.0), make_loss(name, eps=0.1, alpha=1.0)):
        model.zero_grad()
        loss(model, x, y, 0.0)[0].backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(*gradients))


@pytest.mark.parametrize("name, params", ALL)
def test_score_training_moves_scores_only(name, params):
    model = masking.apply_masks(create_model("cnn-small"), 0.1)
    masking.set_phase(model, "prune")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    scores = [s.detach().clone() for s in masking.scores(model)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    fit(model, make_loss(name, eps=0.05, steps=2, **params), torch.optim.Adam(trainable, lr=1e-2), x, y, 1, 32)
    assert all(not torch.equal(a, b) for a, b in zip(scores, masking.scores(model)))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)


@pytest.mark.parametrize("name, params, message", [
    ("sabr", {"lam": 1.5}, "lam .* must be a number in \\[0, 1\\], got 1.5"),
    ("sabr", {"lam": True}, "must be a number in"),
    ("mtl-ibp", {"alpha": -0.1}, "alpha must be a number in \\[0, 1\\]"),
    ("cc-ibp", {"alpha": "half"}, "alpha must be a number in"),
    ("exp-ibp", {}, "needs alpha"),
    ("sabr", {}, "needs lam"),
    ("mtl-ibp", {"alpha": 0.5, "steps": 0}, "steps must be a positive integer"),
    ("sabr", {"lam": 0.5, "norm": "l2"}, "takes no parameter norm")])
def test_bad_parameters_are_one_line_errors(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_loss(name, eps=0.1, **params)


def test_the_module_imports_on_its_own():
    subprocess.run([sys.executable, "-c", "import certprune.losses.expressive"], check=True, capture_output=True,
                   timeout=120)


def test_a_loss_named_on_the_command_line_keeps_its_set_parameters():
    config = build_config(None, ["loss.lam=0.4", "loss.steps=3"], loss="sabr", eps="0.1")
    assert config.loss == {"name": "sabr", "eps": 0.1, "lam": 0.4, "steps": 3}
