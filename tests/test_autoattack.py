"""Specification of the AutoAttack evaluator (certprune.certify.autoattack).

The reference budgets (100 iterations, 5,000 Square queries) take minutes on a CPU, so the tests that run the
attacks cut them (``short_budget``); the settings record is read back from the attack objects, so it must show the
cut values, and the standard values are checked on their own (eps 0 runs no attack)."""
import sys
import types

import pytest
import torch
from torch import nn

import pyautoattack.autoattack as package
from certprune.attacks import PGD
from certprune.certify import autoattack

try:  # the PGD evaluator (certify/attack.py; certify/empirical.py before the evaluator seam)
    from certprune.certify.attack import attack_accuracy
except ImportError:
    from certprune.certify.empirical import attack_accuracy


def settings(**changes):
    return types.SimpleNamespace(**{"norm": "linf", "eps": 0.05, "batch_size": 500, "seed": 0,
                                    "version": "standard", **changes})


def tiny(classes=5):
    """A small MLP on 8x8 images and images it classifies as its own labels (clean accuracy 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes)).eval()
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.fixture
def short_budget(monkeypatch):
    """5 iterations for APGD-CE / APGD-T / FAB-T and 50 Square queries instead of the reference's budgets."""
    def cut(cls, **values):
        return lambda *args, **kwargs: cls(*args, **{**kwargs, **values})

    for name in ("APGDAttack", "APGDAttack_targeted", "FABAttack_PT"):
        monkeypatch.setattr(package, name, cut(getattr(package, name), n_iter=5))
    set_version = package.AutoAttack._set_version

    def short_version(self, version="standard"):
        set_version(self, version)
        self.square.n_queries = 50

    monkeypatch.setattr(package.AutoAttack, "_set_version", short_version)


@pytest.mark.parametrize("norm,eps", [("linf", 0.06), ("l2", 0.6)])
def test_autoattack_runs_and_is_at_most_pgd_on_the_same_images(short_budget, norm, eps):
    model, x, y = tiny()
    result = autoattack.evaluate(model, x, y, settings(norm=norm, eps=eps))
    pgd = attack_accuracy(model, x, y, PGD(eps, norm, steps=20), seed=0)["pgd_acc"]
    assert result["clean_acc"] == 1.0 and result["autoattack_examples"] == len(x)
    assert 0 < pgd < 1  # the budget is neither trivial nor hopeless
    assert result["autoattack_acc"] <= pgd
    used = result["autoattack"]
    assert used["package"] == "pyautoattack" and used["version"] == "standard"
    assert used["norm"] == norm and used["eps"] == eps and used["seed"] == 0
    assert used["apgd_ce"]["iterations"] == 5 and used["square"]["queries"] == 50  # read back, not restated
    assert result["seconds_autoattack"] > 0


def test_standard_settings_are_the_reference_ones():
    model, x, y = tiny(classes=10)
    used = autoattack.evaluate(model, x, y, settings(eps=0.0))["autoattack"]  # eps 0: nothing to attack
    assert used["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert used["apgd_ce"] == {"iterations": 100, "restarts": 1, "rho": 0.75}
    assert used["apgd_t"] == {"iterations": 100, "restarts": 1, "target_classes": 9}
    assert used["fab_t"] == {"iterations": 100, "restarts": 1, "target_classes": 9}
    assert used["square"] == {"queries": 5000, "p_init": 0.8}


def test_eps_fraction_strings_are_parsed():
    model, x, y = tiny()
    assert autoattack.evaluate(model, x, y, settings(eps="0/255"))["autoattack"]["eps"] == 0.0


def test_an_image_counts_only_when_correct_clean_and_at_the_attack_point(monkeypatch):
    """Image 0 is misclassified clean but classified correctly at the attack point; image 1 the reverse."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0, 0] = 1.0
        model[1].bias.copy_(torch.tensor([-0.5, 0.0, -1.0, -1.0, -1.0]))  # class 0 iff pixel 0 > 0.5, else 1
    x = torch.full((2, 1, 8, 8), 0.5)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.52, 0.47
    y = torch.tensor([1, 1])

    def attack(self, x_orig, y_orig, **_):
        return x_orig + torch.tensor([-0.05, 0.05]).view(2, 1, 1, 1) * (torch.arange(64) == 0).view(1, 1, 8, 8), y_orig

    monkeypatch.setattr(package.AutoAttack, "run_standard_evaluation", attack)
    result = autoattack.evaluate(model, x, y, settings(eps=0.05))
    assert result["clean_acc"] == 0.5 and result["autoattack_acc"] == 0.0


@pytest.mark.parametrize("field,value,message", [
    ("norm", "l1", "AutoAttack supports the norms linf and l2"),
    ("version", "rand", "unknown AutoAttack version"),
    ("eps", "8/0", "divides by zero"),
])
def test_bad_settings_are_one_line_value_errors(field, value, message):
    model, x, y = tiny()
    with pytest.raises(ValueError, match=message) as error:
        autoattack.evaluate(model, x, y, settings(**{field: value}))
    assert "\n" not in str(error.value)


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    model, x, y = tiny()
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import raises ImportError
    with pytest.raises(ValueError, match=r"pip install certprune\[attacks\]") as error:
        autoattack.evaluate(model, x, y, settings())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("shift", ["ball", "box"])
def test_points_outside_the_ball_or_the_box_are_refused(monkeypatch, shift):
    model, x, y = tiny()
    x[:, :, 0, 0] = 0.0

    def bad(self, x_orig, y_orig, **_):
        if shift == "ball":
            return (x_orig + 0.1).clamp(0, 1), y_orig  # twice eps
        return x_orig - 0.01, y_orig  # inside the ball, below 0 at pixel (0, 0)

    monkeypatch.setattr(package.AutoAttack, "run_standard_evaluation", bad)
    with pytest.raises(RuntimeError, match="outside the linf ball"):
        autoattack.evaluate(model, x, y, settings())


def test_the_callers_random_state_is_left_alone(short_budget):
    model, x, y = tiny()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    autoattack.evaluate(model, x[:4], y[:4], settings())
    assert torch.equal(torch.rand(3), expected)
