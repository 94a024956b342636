"""Specification of verified accuracy (certprune.certify.verify)."""
import copy
import json
import types

import pytest
import torch

from certprune.attacks import PGD
from certprune.certify.verify import evaluate, verify
from certprune.data import load_dataset
from certprune.boxes import margin_spec
from certprune.lirpa import BoundedProxy
from certprune.losses import make_loss
from certprune.models import create_model
from certprune.train import fit


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = load_dataset("mnist-embedded")
    model = create_model("cnn-small")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    fit(model, make_loss("natural"), optimizer, data.train_x[:3000], data.train_y[:3000], 2, 64)
    return model.eval(), data.test_x[:60], data.test_y[:60]


def test_verified_never_exceeds_clean_and_grows_as_eps_shrinks(trained):
    model, x, y = trained
    figures = [verify(model, x, y, eps, ["IBP", "CROWN"]) for eps in (0.02, 0.001)]
    clean = figures[0]["clean_acc"]
    assert clean > 0.8
    verified = [f["verified_acc"] for f in figures]
    assert verified == sorted(verified) and 0 < verified[-1] <= clean
    for figure in figures:
        assert figure["verified_acc_ibp"] <= figure["verified_acc"] <= figure["clean_acc"]


def test_eps_zero_verifies_exactly_the_correct_images(trained):
    model, x, y = trained
    figure = verify(model, x, y, 0.0, ["IBP"])
    assert figure["verified_acc"] == figure["clean_acc"]


@pytest.fixture(scope="module")
def cascade_and_union(trained):
    model, x, y = trained
    return (verify(model, x, y, 0.004, ["IBP", "CROWN"], cascade=True),
            verify(model, x, y, 0.004, ["IBP", "CROWN"], cascade=False))


def test_cascade_verifies_the_same_images_as_running_every_method(cascade_and_union):
    cascade, union = cascade_and_union
    assert cascade["verified_acc"] == union["verified_acc"]
    assert cascade["verified_acc_ibp"] == union["verified_acc_ibp"]
    assert cascade["verified_extra_crown"] == pytest.approx(cascade["verified_acc"] - cascade["verified_acc_ibp"])
    assert "verified_acc_crown" not in cascade and union["verified_acc_crown"] >= cascade["verified_extra_crown"]


def test_crown_is_at_least_as_tight_as_ibp_on_a_naturally_trained_net(cascade_and_union):
    _, union = cascade_and_union
    assert union["verified_acc_crown"] >= union["verified_acc_ibp"]


def test_bad_arguments(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="unknown verification method"):
        verify(model, x, y, 0.1, ["LP"])
    with pytest.raises(ValueError, match="eps"):
        verify(model, x, y, -0.1)


def settings(methods, eps=0.004):
    return types.SimpleNamespace(eps=eps, bound_methods=methods, batch_size=16, timeout=5.0, alpha_iterations=5,
                                 alpha_lr=0.5)


def test_evaluate_agrees_with_verify_and_adds_alpha_crown(trained):
    """The evaluator's IBP -> CROWN figures are verify()'s; alpha-CROWN only adds images, and without a complete
    stage nothing is falsified, so robust accuracy is exact only if every correct image is verified."""
    model, x, y = trained
    x, y = x[:30], y[:30]
    old = verify(model, x, y, 0.004, ["IBP", "CROWN"])
    new = evaluate(model, x, y, settings(["ibp", "crown", "ALPHA-CROWN"]))
    for key in ("clean_acc", "verified_acc_ibp", "verified_extra_crown"):
        assert new[key] == pytest.approx(old[key])
    assert new["verified_acc"] == pytest.approx(old["verified_acc"] + new["verified_extra_alpha_crown"])
    assert new["falsified_acc"] == 0 and new["seconds_alpha_crown"] >= 0
    assert new["unknown_acc"] == pytest.approx(new["clean_acc"] - new["verified_acc"])
    assert ("robust_acc_exact" in new) == (new["unknown_acc"] == 0)
    records = new.pop("_per_image")
    assert [r["verified_by"] for r in records].count("alpha-CROWN") == round(30 * new["verified_extra_alpha_crown"])
    json.dumps(records), json.dumps({k: v for k, v in new.items() if not k.startswith("_")})


def test_alpha_crown_bounds_are_at_least_crowns_and_sound():
    torch.manual_seed(0)
    model = create_model("cnn-small", image_size=12).eval()
    x, y = torch.rand(6, 1, 12, 12), torch.randint(0, 10, (6,))
    proxy = BoundedProxy(model, x)
    crown = proxy.margin_lower_bounds(x, y, 0.02, "CROWN")
    alpha = proxy.margin_lower_bounds(x, y, 0.02, "alpha-CROWN", iterations=5, lr=0.5)
    assert (alpha >= crown - 1e-5).all() and (alpha > crown + 1e-4).any()
    attacked = PGD(0.02, steps=20, objective="margin").perturb(model, x, y)
    with torch.no_grad():
        logits = model(attacked)
    margins = torch.einsum("bkc,bc->bk", margin_spec(y, 10), logits)  # logit_y - logit_j at the attacked point
    assert (margins >= alpha - 1e-5).all()


def test_without_the_cascade_each_method_proves_exactly_the_images_its_own_bounds_prove(trained):
    from certprune.certify.verify import verify_examples

    model, x, y = trained
    correct, proven = verify_examples(model, x, y, 0.004, ["IBP", "CROWN"], batch_size=16, cascade=False)
    proxy = BoundedProxy(model, x[:1])
    for method in ("IBP", "CROWN"):
        with torch.no_grad():
            own = proxy.margin_lower_bounds(x, y, 0.004, method).min(1).values > 0
        assert torch.equal(proven[method], own.cpu() & correct), method
    assert proven["IBP"].any() and (proven["CROWN"] & proven["IBP"]).any()  # CROWN re-proves IBP's images too


def test_the_figures_count_the_classes_predicted_so_a_collapsed_model_shows(trained):
    """A network trained to a constant output is at chance and "verified" at any eps on the images of its one
    class (a constant function is robust): the count of distinct predictions tells it apart from a weak model."""
    model, x, y = trained
    assert evaluate(model, x, y, settings(["ibp"]))["predicted_classes"] == len(set(y.tolist()))
    constant = copy.deepcopy(model)
    last = [m for m in constant.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_(), last.bias.zero_(), last.bias[3].fill_(1.0)
    figures = evaluate(constant, x, y, settings(["ibp"]))
    assert figures["predicted_classes"] == 1 and figures["clean_acc"] == pytest.approx(float((y == 3).float().mean()))
