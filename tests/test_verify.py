"""Specification of verified accuracy (certprune.certify.verify)."""
import pytest
import torch

from certprune.certify.verify import verify
from certprune.data import load_dataset
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
