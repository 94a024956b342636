"""Specification of the empirical-robustness losses (PGD-AT, TRADES) and the batch-norm models on the masked core."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certprune import masking
from certprune.attacks import parse_eps
from certprune.certify.attack import make_attack
from certprune.config import load_config
from certprune.data import Dataset
from certprune.evaluation import configured_record, evaluate_configured, resolve_settings
from certprune.losses import LOSSES, make_loss
from certprune.losses.adversarial import PGDAdversarialLoss, TradesLoss
from certprune.models import MODELS, create_model
from certprune.pipeline import pretrain, prune
from certprune.runs import read_metrics
from helpers import assert_one_line_error

BN_MODELS = ["vgg16-bn", "wrn-28-4", "resnet-18"]
ROOT = Path(__file__).resolve().parents[1]


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3))


def batch(n=16):
    return torch.rand(n, 1, 6, 6), torch.randint(0, 3, (n,))


def test_both_losses_are_registered_and_strict_about_parameters():
    assert LOSSES["pgd"] is PGDAdversarialLoss and LOSSES["trades"] is TradesLoss
    assert make_loss("trades", eps="8/255").attack.eps == pytest.approx(8 / 255)
    assert make_loss("pgd", eps=0.1, steps=10).attack.step_size == pytest.approx(0.025)
    with pytest.raises(ValueError, match="no parameter sigma"):
        make_loss("pgd", eps=0.1, sigma=0.25)
    for bad in ({"eps": "8/0"}, {"eps": -0.1}, {"eps": 0.1, "steps": 0}, {"eps": 0.1, "beta": -1}):
        with pytest.raises(ValueError):
            make_loss("trades", **bad)


def test_trades_with_beta_zero_is_natural_cross_entropy():
    model, (x, y) = mlp(), batch()
    loss, metrics = make_loss("trades", eps=0.1, beta=0.0)(model, x, y, 0.0)
    expected = F.cross_entropy(model(x), y)
    assert torch.equal(loss, expected)
    assert metrics["loss"] == expected.item() and {"loss", "acc"} <= set(metrics)


def test_trades_adds_beta_times_a_nonnegative_divergence():
    model, (x, y) = mlp(), batch()
    loss, metrics = make_loss("trades", eps=0.1, beta=6.0, steps=3)(model, x, y, 0.0)
    natural = F.cross_entropy(model(x), y).item()
    assert metrics["robust_loss"] > 0
    assert loss.item() == pytest.approx(natural + 6.0 * float(metrics["robust_loss"]), rel=1e-5)


def test_pgd_training_loss_is_cross_entropy_on_worse_inputs():
    model, (x, y) = mlp(), batch(64)
    loss, metrics = make_loss("pgd", eps=0.1, steps=5)(model, x, y, 0.0)
    assert loss.item() > F.cross_entropy(model(x), y).item()
    assert {"loss", "acc", "adv_acc", "eps"} <= set(metrics) and metrics["eps"] == 0.1


def test_eps_ramp_scales_the_step_size_with_eps():
    loss = make_loss("pgd", eps=0.2, steps=4, ramp_start=1, ramp_epochs=2)
    assert loss.attack_at(0.5).eps == 0.0
    halfway = loss.attack_at(2.0)
    assert halfway.eps == pytest.approx(0.1) and halfway.step_size == pytest.approx(0.0625)
    assert loss.attack_at(5.0) is loss.attack


@pytest.mark.parametrize("name", ["pgd", "trades"])
def test_in_the_prune_phase_only_scores_and_norm_layers_get_gradient(name):
    model = create_model("cnn-small", image_size=12)
    masking.apply_masks(model, 0.1)
    masking.set_phase(model, "prune")
    x, y = torch.rand(8, 1, 12, 12), torch.randint(0, 10, (8,))
    loss, _ = make_loss(name, eps=0.1, steps=2)(model, x, y, 0.0)
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in masking.scores(model))
    assert all(masking.raw_weight(m).grad is None for _, m in masking.masked_layers(model))


def test_batch_norm_models_are_registered_with_data_shape_parameters():
    assert set(BN_MODELS) <= set(MODELS)
    for channels, size, classes in [(1, 28, 7), (3, 16, 100)]:
        model = create_model("wrn-28-4", in_channels=channels, image_size=size, num_classes=classes)
        assert model(torch.rand(2, channels, size, size)).shape == (2, classes)


@pytest.mark.parametrize("name", BN_MODELS)
def test_batch_norm_models_forward_with_masks_and_can_freeze_norm_layers_in_prune(name):
    model = create_model(name, in_channels=3, image_size=16, num_classes=10)
    masking.apply_masks(model, 0.05)
    masking.set_phase(model, "prune", train_norm_in_prune=False)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(p.requires_grad for m in norms for p in m.parameters())
    assert model.train()(torch.rand(4, 3, 16, 16)).shape == (4, 10)
    assert masking.sparsity(model) >= 0.949


def test_hydra_trains_scores_and_batch_norm_of_a_wide_resnet_under_pgd():
    """HYDRA's default: in the prune phase the scores and the batch-norm affine parameters train."""
    model = create_model("wrn-28-4", in_channels=3, image_size=16, num_classes=10)
    masking.apply_masks(model, 0.05)
    masking.set_phase(model, "prune")
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    loss, _ = make_loss("pgd", eps=8 / 255, steps=1)(model.train(), x, y, 0.0)
    loss.backward()
    assert all(s.grad is not None for s in masking.scores(model))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.weight.grad is not None for m in norms)
    assert all(masking.raw_weight(m).grad is None for _, m in masking.masked_layers(model))


def tiny_data(n_train=256, n_test=64):
    """Two classes that differ in brightness by 0.4 (robustly separable at eps 0.1)."""
    generator = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.randint(0, 2, (n,), generator=generator)
        x = (0.3 + 0.4 * y.float()).view(-1, 1, 1, 1) + 0.05 * torch.randn(n, 1, 12, 12, generator=generator)
        return x.clamp(0, 1), y

    return Dataset("tiny", *make(n_train), *make(n_test), num_classes=2)


def test_pipeline_trains_prunes_and_attacks_under_pgd(tmp_path):
    config = load_config(overrides=[{
        "loss": {"name": "pgd", "eps": 0.1, "steps": 3}, "verify": None,
        "attack": {"eps": "1/10", "steps": 5, "restarts": 2}, "batch_size": 64,
        "pretrain": {"epochs": 3, "lr": 0.01}, "prune": {"epochs": 1}, "finetune": {"epochs": 1}, "seed": 3}])
    data = tiny_data()
    pretrain(config, tmp_path / "dense", data=data)
    dense = evaluate_configured(tmp_path / "dense", config, data=data)["attack"]
    assert dense["pgd_acc"] <= dense["clean_acc"] and dense["pgd_acc"] > 0.9
    assert dense["attack"]["eps"] == 0.1 and dense["attack"]["restarts"] == 2
    assert dense["images"]["count"] == len(data.test_x) and dense["settings"]["eps"] == 0.1
    assert dense["settings"]["seed"] == 3  # the attack has no seed of its own: the run's is recorded
    pruned = prune(config, tmp_path / "hydra", 0.1, "hydra", tmp_path / "dense", data=data)
    attacked = evaluate_configured(tmp_path / "hydra", config, data=data)["attack"]
    assert configured_record(read_metrics(tmp_path / "hydra"), config, "attack") == attacked
    assert pruned["sparsity"] >= 0.89


@pytest.mark.parametrize("path", sorted(str(p) for p in (ROOT / "configs").rglob("*.yaml")
                                        if "adversarial" in p.name
                                        or (p.parent.name == "paper" and "smoothing" not in p.name)))
def test_shipped_adversarial_configs_build_their_losses_and_attacks(path):
    config = load_config(path)
    for phase in ("pretrain", "prune", "finetune"):
        name, params = config.phase_loss(phase)
        assert isinstance(make_loss(name, **params), (PGDAdversarialLoss, TradesLoss))
    attack = make_attack(resolve_settings(config, "attack"))
    assert attack.eps == parse_eps(config.loss["eps"]) > 0
    assert config.model in MODELS and config.report_metric == "pgd_acc"


def test_a_loss_without_its_required_eps_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from certprune.cli import main

    with pytest.raises(ValueError, match="needs eps"):
        make_loss("pgd")
    result = CliRunner().invoke(main, ["pretrain", "--loss", "trades", "--out", str(tmp_path / "run"),
                                       "--set", "pretrain.epochs=1"])
    assert_one_line_error(result, "loss 'trades' needs eps (e.g. --set loss.eps=...)")
    assert not (tmp_path / "run").exists()
