"""Specification of Shi et al. (2021)'s warm-up regularisers, an option of every certified-training loss.

The hand-computed case: one input ``x = 0.5``, eps 0.1 (half-width 0.1), into three ReLUs with weights 2 and biases
-0.5, -1.3, -0.9: centres 0.5, -0.3, 0.1, half-width 0.2 each, so one unit active, one inactive, one unstable.
With tol 0.8: tightness ``relu(0.8 - 0.1 / 0.2) / 0.8 = 0.375``; ReLU balance: means 0.5 / 3 against 0.3 / 3
(ratio 5/3, taken as 0.6), squared deviations from the mean 0.1 of 0.16 against 0.16 (ratio 1), so
``(relu(0.8 - 0.6) + relu(0.8 - 1)) / 0.8 = 0.25``. The regulariser is 0.625.
"""
import pytest
import torch
from torch import nn

from certprune import masking
from certprune.boxes import input_box, margin_spec
from certprune.lirpa import BoundedProxy
from certprune.losses import make_loss
from certprune.losses.warmup import relu_input_intervals, warmup_regulariser
from certprune.models import create_model

HAND = 0.625


def hand_net(biases=(-0.5, -1.3, -0.9)):
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.fill_(2.0)
        net[0].bias.copy_(torch.tensor(biases))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0, 2.0], [0.5, 1.0, -1.0]]))
        net[2].bias.zero_()
    return net


def test_the_hand_case():
    x = torch.tensor([[0.5]])
    assert warmup_regulariser(hand_net(), x - 0.1, x + 0.1, tol=0.8).item() == pytest.approx(HAND, abs=1e-6)


def test_a_layer_without_inactive_units_adds_tightness_alone():
    """All three centres at 0.5: the balance ratios are not finite, and the layer adds none (as in Shi et al.)."""
    x = torch.tensor([[0.5]])
    regulariser = warmup_regulariser(hand_net((-0.5, -0.5, -0.5)), x - 0.1, x + 0.1, tol=0.8)
    assert regulariser.item() == pytest.approx(0.375, abs=1e-6)


@pytest.mark.parametrize("k", [None, 0.1])
def test_the_intervals_are_auto_lirpas_ibp_bounds(k):
    """An independent cross-check: torch's interval arithmetic on the (masked) model against auto_LiRPA's IBP."""
    model = create_model("cnn-small")
    if k is not None:
        masking.apply_masks(model, k)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    box = input_box(x, 0.1)
    _, ours = relu_input_intervals(model, *box)
    _, theirs = BoundedProxy(model, x).box_relu_bounds(*box, margin_spec(y, 10), "IBP")
    assert len(ours) == len(theirs) == 3
    for (low, up), (their_low, their_up) in zip(ours, theirs):
        assert torch.allclose(low, their_low, atol=1e-4) and torch.allclose(up, their_up, atol=1e-4)


@pytest.mark.parametrize("name, params", [("ibp", {"kappa_start": 0.0, "kappa_end": 0.0}),
                                          ("crown-ibp", {"kappa_start": 0.0}), ("sabr", {"lam": 0.5}),
                                          ("mtl-ibp", {"alpha": 0.5}), ("cc-ibp", {"alpha": 0.5}),
                                          ("exp-ibp", {"alpha": 0.5})])
def test_the_certified_losses_add_it_weighted_by_how_far_eps_is_from_its_target(name, params):
    """eps ramps 0 -> 0.2 over epochs 0..2: at epoch 1 eps is 0.1 (the hand case) and the weight 0.4 * (1 - 1/2)."""
    x, y = torch.tensor([[0.5]]), torch.tensor([0])

    def loss_at(epoch, **warmup):
        torch.manual_seed(0)  # the same PGD start, where the loss attacks
        return make_loss(name, eps=0.2, ramp_epochs=2, **params, **warmup)(hand_net(), x, y, epoch)

    (plain, _), (loss, metrics) = loss_at(1.0), loss_at(1.0, warmup_reg=0.4, warmup_tol=0.8)
    assert (loss - plain).item() == pytest.approx(0.2 * HAND, abs=1e-6)
    assert metrics["warmup_reg"].item() == pytest.approx(HAND, abs=1e-6)
    (at_target, metrics), (plain, _) = loss_at(2.0, warmup_reg=0.4, warmup_tol=0.8), loss_at(2.0)
    assert at_target.item() == plain.item() and metrics["warmup_reg"] == 0.0


@pytest.mark.parametrize("name, params", [("ibp", {}), ("crown-ibp", {}), ("sabr", {"lam": 0.5}),
                                          ("cc-ibp", {"alpha": 0.5})])
def test_it_is_off_by_default(name, params):
    loss = make_loss(name, eps=0.2, ramp_epochs=2, **params)
    metrics = loss(hand_net(), torch.tensor([[0.5]]), torch.tensor([0]), 1.0)[1]
    assert loss.warmup_reg == 0 and "warmup_reg" not in metrics


def test_its_gradient_reaches_the_scores_of_every_layer_before_the_last_relu():
    model = masking.apply_masks(create_model("cnn-small"), 0.1)
    masking.set_phase(model, "prune")
    x = torch.rand(8, 1, 28, 28)
    warmup_regulariser(model, *input_box(x, 0.05), tol=5.0).backward()  # tol > 1: every hinge is on
    *inner, last = masking.scores(model)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in inner) and last.grad is None


@pytest.mark.parametrize("params, message", [({"warmup_reg": -0.5}, "warmup_reg must be a number >= 0"),
                                             ({"warmup_reg": "yes"}, "warmup_reg must be a number"),
                                             ({"warmup_tol": 0}, "warmup_tol must be a finite number > 0")])
def test_bad_settings_are_one_line_errors(params, message):
    for name, required in [("ibp", {}), ("mtl-ibp", {"alpha": 0.5})]:
        with pytest.raises(ValueError, match=message):
            make_loss(name, eps=0.1, **required, **params)


def test_a_layer_it_cannot_bound_is_named():
    with pytest.raises(ValueError, match="cannot bound a BatchNorm1d layer"):
        relu_input_intervals(nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2), nn.ReLU()), torch.zeros(2, 1),
                             torch.ones(2, 1))
