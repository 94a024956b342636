"""Specification of certprune.attacks: PGD finds known worst cases, stays in budget, and leaves the model as it was."""
import pytest
import torch
from torch import nn

from certprune.attacks import PGD, margin_objective, parse_eps
from certprune.certify.attack import attack_accuracy


def linear_two_class(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(dim, 2))


def margin_direction(model) -> torch.Tensor:
    """For a two-class linear model and true class 0, the margin z1 - z0 is v . x + c with this v."""
    weight = model[1].weight.detach()
    return weight[1] - weight[0]


def test_linf_pgd_finds_the_closed_form_worst_case_inside_the_pixel_box():
    """max v.d over |d_i| <= eps and 0 <= x_i + d_i <= 1 is separable: each d_i goes to the end of its interval
    in the direction of sign(v_i). Pixels near 0 and 1 make the box bind."""
    dim, eps = 30, 0.1
    model = linear_two_class(dim)
    x = torch.rand(8, dim)
    x[:, :6] = torch.tensor([0.0, 0.03, 0.5, 0.97, 1.0, 0.95])
    y = torch.zeros(8, dtype=torch.long)
    v = margin_direction(model)
    upper, lower = torch.minimum(torch.full_like(x, eps), 1 - x), torch.maximum(torch.full_like(x, -eps), -x)
    best_delta = torch.where(v > 0, upper, lower)
    x_adv = PGD(eps, "linf", steps=20, objective="margin").perturb(model, x, y)
    with torch.no_grad():
        assert torch.allclose(margin_objective(model(x_adv), y), margin_objective(model(x + best_delta), y),
                              atol=1e-5)
    assert torch.allclose(x_adv, x + best_delta, atol=1e-6)


@pytest.mark.parametrize("objective", ["margin", "ce"])
def test_l2_pgd_finds_the_closed_form_worst_case(objective):
    """Away from the box, the worst L2 perturbation of a linear margin is eps * v / |v|, raising it by eps |v|.

    From a random start on the sphere, each step of size eps followed by projection halves the angle to v."""
    dim, eps = 30, 0.05
    model = linear_two_class(dim)
    x = 0.4 + 0.2 * torch.rand(8, dim)
    y = torch.zeros(8, dtype=torch.long)
    v = margin_direction(model)
    x_adv = PGD(eps, "l2", steps=30, step_size=eps, objective=objective).perturb(model, x, y)
    with torch.no_grad():
        gained = margin_objective(model(x_adv), y) - margin_objective(model(x), y)
    assert torch.allclose(gained, torch.full_like(gained, eps * v.norm().item()), rtol=1e-4)
    assert torch.allclose(x_adv - x, (eps * v / v.norm()).expand_as(x), atol=1e-5)


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 10))


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("linf", 8 / 255), ("l2", 0.5), ("l2", 2.0)])
def test_pgd_never_leaves_the_eps_ball_or_the_pixel_box(norm, eps):
    model = small_cnn()
    x = torch.rand(16, 1, 12, 12).round()  # pixels at exactly 0 and 1, where the box binds
    x[8:] = torch.rand(8, 1, 12, 12)
    y = torch.randint(0, 10, (16,))
    x_adv = PGD(eps, norm, steps=7, step_size=eps, restarts=3).perturb(model, x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_raises_the_loss_it_maximises():
    model = small_cnn().eval()
    x, y = torch.rand(32, 1, 12, 12), torch.randint(0, 10, (32,))
    x_adv = PGD(0.1, "linf", steps=10).perturb(model, x, y)
    with torch.no_grad():
        loss = nn.functional.cross_entropy
        assert loss(model(x_adv), y) > loss(model(x), y)


def test_robust_accuracy_never_exceeds_clean_accuracy_and_equals_it_at_eps_zero():
    model = small_cnn().eval()
    x, y = torch.rand(64, 1, 12, 12), torch.randint(0, 10, (64,))
    with torch.no_grad():
        y[:32] = model(x[:32]).argmax(1)  # half the images are classified correctly
    result = attack_accuracy(model, x, y, PGD(0.05, "linf", steps=5, restarts=2), batch_size=20)
    assert result["pgd_acc"] <= result["clean_acc"]
    assert result["clean_acc"] >= 0.5 and result["attack_examples"] == 64
    assert result["attack"] == {"attack": "pgd", "norm": "linf", "eps": 0.05, "steps": 5, "step_size": 0.025,
                                "restarts": 2, "objective": "ce", "start": "uniform"}
    at_zero = attack_accuracy(model, x, y, PGD(0.0, "linf", steps=5))
    assert at_zero["pgd_acc"] == at_zero["clean_acc"]


def bn_state(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_attacking_leaves_modes_norm_statistics_and_gradients_unchanged():
    model = small_cnn().train()
    model[4].eval()  # a module whose own flag differs from its parent's must get it back too
    before = bn_state(model)
    x, y = torch.rand(16, 1, 12, 12), torch.randint(0, 10, (16,))
    PGD(0.1, "linf", steps=3, restarts=2).perturb(model, x, y)
    assert model.training and model[1].training and not model[4].training
    after = bn_state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.grad is None for p in model.parameters())


class FailsAfter(nn.Module):
    """Raises on its n-th forward pass, in the middle of an attack."""

    def __init__(self, calls: int):
        super().__init__()
        self.calls = calls

    def forward(self, x):
        self.calls -= 1
        if self.calls <= 0:
            raise RuntimeError("boom")
        return x


def test_an_error_inside_the_attack_still_restores_modes_and_statistics():
    model = nn.Sequential(*small_cnn(), FailsAfter(calls=3)).train()
    before = bn_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        PGD(0.1, "linf", steps=10).perturb(model, torch.rand(4, 1, 12, 12), torch.randint(0, 10, (4,)))
    assert all(module.training for module in model.modules())
    after = bn_state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), ("0.1", 0.1), (" 2 / 255 ", 2 / 255), ("0", 0.0),
                                         (0.3, 0.3), ("1e-2", 0.01)])
def test_eps_accepts_numbers_and_fractions(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text, message", [("8/0", "divides by zero"), ("abc", "number or a fraction"),
                                           ("-0.1", ">= 0"), ("-8/255", ">= 0"), ("nan", "number"),
                                           (float("inf"), "finite"), ("", "number"), (None, "number")])
def test_malformed_or_negative_eps_is_rejected(text, message):
    with pytest.raises(ValueError, match=message):
        parse_eps(text)


@pytest.mark.parametrize("settings, message", [({"steps": 0}, "steps"), ({"steps": -3}, "steps"),
                                               ({"steps": 2.5}, "steps"), ({"restarts": 0}, "restarts"),
                                               ({"norm": "l3"}, "norm"), ({"objective": "kl"}, "objective"),
                                               ({"step_size": "-1/255"}, "step size"), ({"eps": "-1"}, "eps")])
def test_invalid_attack_settings_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        PGD(**{"eps": 0.1, **settings})
