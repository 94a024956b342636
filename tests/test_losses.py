"""Specification of the certified-training losses and their schedules."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from certprune import masking
from certprune.losses import BoundLoss, make_loss, robust_cross_entropy
from certprune.models import create_model
from certprune.schedules import Interpolate, Ramp
from certprune.train import fit


def test_ramp_and_interpolation():
    ramp = Ramp(start=2, length=4)
    assert [ramp(e) for e in (0, 2, 3, 6, 9)] == [0, 0, 0.25, 1, 1]
    assert Ramp()(0) == 1.0
    beta = Interpolate(1.0, 0.0, ramp)
    assert beta(4) == 0.5


def test_crown_ibp_schedule_moves_eps_beta_and_kappa_together():
    loss = make_loss("crown-ibp", eps=0.2, ramp_start=1, ramp_epochs=2, kappa_end=0.5)
    assert (loss.eps(1), loss.beta(1), loss.kappa(1)) == (0.0, 1.0, 1.0)
    assert (loss.eps(2), loss.beta(2), loss.kappa(2)) == pytest.approx((0.1, 0.5, 0.75))
    assert (loss.eps(5), loss.beta(5), loss.kappa(5)) == (0.2, 0.0, 0.5)


def test_robust_cross_entropy_closed_form():
    margins = torch.tensor([[1.0, 2.0, -0.5]])
    expected = math.log(1 + sum(math.exp(-m) for m in (1.0, 2.0, -0.5)))
    assert robust_cross_entropy(margins).item() == pytest.approx(expected)


def test_zero_eps_or_full_kappa_is_natural_cross_entropy():
    model = create_model("cnn-small")
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    natural = F.cross_entropy(model(x), y)
    for loss in (make_loss("crown-ibp", eps=0.0), make_loss("ibp", eps=0.1, ramp_epochs=5, kappa_start=1.0)):
        assert torch.allclose(loss(model, x, y, 0.0)[0], natural)


def test_robust_loss_bounds_the_natural_loss_from_above():
    """CE of the worst-case logits is at least CE of the clean logits, since the box contains x."""
    model = create_model("cnn-small")
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss, metrics = make_loss("ibp", eps=0.05, kappa_end=0.0)(model, x, y, 1.0)
    assert loss.item() >= F.cross_entropy(model(x), y).item()
    assert metrics["verified_acc"] <= metrics["acc"]


@pytest.mark.parametrize("name, params", [("ibp", {"kappa_end": 0.0}), ("crown-ibp", {"ramp_epochs": 2}),
                                          ("crown-ibp", {"kappa_end": 0.0})])
def test_score_training_moves_scores_only(name, params):
    model = masking.apply_masks(create_model("cnn-small"), 0.1)
    masking.set_phase(model, "prune")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    scores = [s.detach().clone() for s in masking.scores(model)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    fit(model, make_loss(name, eps=0.05, **params), torch.optim.Adam(trainable, lr=1e-2), x, y, 1, 32)
    assert all(not torch.equal(a, b) for a, b in zip(scores, masking.scores(model)))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)


def test_loss_factory_is_strict():
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge")
    with pytest.raises(ValueError, match="takes no parameter sigma"):
        make_loss("ibp", eps=0.1, sigma=0.25)
    with pytest.raises(ValueError, match="eps must be"):
        BoundLoss(eps=-1)


@pytest.mark.parametrize("module", ["certprune.losses", "certprune.losses.noise", "certprune.losses.adversarial",
                                    "certprune.losses.bounds"])
def test_each_paths_loss_module_imports_on_its_own(module):
    # a fresh interpreter: an import cycle between the registry and a path's module shows only when that module
    # is imported first
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, capture_output=True, timeout=120)
