"""Specification of Shi et al. (2021)'s IBP initialisation: interval widths keep their size through the layers at
the start of certified training, checked in closed form and by interval arithmetic written out by hand."""
import math

import pytest
import torch
from torch import nn

from certprune import pipeline
from certprune.config import ConfigError
from certprune.models import create_model, ibp_init
from helpers import assert_one_line_error, run, tiny_config


def mlp(width=512, depth=6, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(width, width) for _ in range(depth)]
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())][:-1])


def interval_widths(model, centre, radius):
    """Mean width of the interval after every Linear + ReLU pair, by plain interval arithmetic."""
    low, high, widths = centre - radius, centre + radius, []
    for module in model:
        if isinstance(module, nn.Linear):
            mid, rad = (high + low) / 2, (high - low) / 2
            mid, rad = module(mid), rad @ module.weight.abs().t()
            low, high = mid - rad, mid + rad
        else:
            low, high = module(low), module(high)
            widths.append(float((high - low).mean()))
    return widths


def test_a_row_of_ibp_initialised_weights_has_l1_norm_two_in_expectation():
    layer = mlp(width=1024, depth=2)[0]
    ibp_init(nn.Sequential(layer, nn.ReLU(), nn.Linear(1024, 10)))
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / 1024, rel=0.01)
    assert layer.weight.abs().sum(1).mean().item() == pytest.approx(2.0, rel=0.01)  # 1024 * std * sqrt(2 / pi)


def test_interval_widths_keep_their_size_under_ibp_init_and_explode_under_torchs_default():
    centre, radius = torch.randn(64, 512), 0.01
    with torch.no_grad():
        default = interval_widths(mlp(), centre, radius)
        ibp = interval_widths(ibp_init(mlp()), centre, radius)
    start = 2 * radius
    assert all(0.5 < w / start < 2.0 for w in ibp), ibp  # about the input's width after every layer
    assert default[-1] / start > 1000, default  # about sqrt(512) / 4 more per layer


def test_the_last_layer_and_every_bias_keep_torchs_initialisation():
    torch.manual_seed(0)
    default = create_model("cnn-small")
    torch.manual_seed(0)
    changed = ibp_init(create_model("cnn-small"))
    linears = [name for name, m in default.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    before, after = default.state_dict(), changed.state_dict()
    assert torch.equal(before[f"{linears[-1]}.weight"], after[f"{linears[-1]}.weight"])
    assert all(torch.equal(before[f"{name}.bias"], after[f"{name}.bias"]) for name in linears)
    assert not torch.equal(before[f"{linears[0]}.weight"], after[f"{linears[0]}.weight"])


def test_pretrain_starts_from_the_configured_init(tmp_path):
    pipeline.pretrain(tiny_config(weight_init="ibp", pretrain={"epochs": 0}, verify=None), tmp_path / "dense")
    state = torch.load(tmp_path / "dense" / "model.pt", weights_only=True)["state_dict"]
    conv2, fc1 = state["3.weight"], state["6.weight"]  # 32 x 16 x 4 x 4 (fan-in 256) and 100 x 1568
    assert conv2.std().item() == pytest.approx(math.sqrt(2 * math.pi) / 256, rel=0.05)  # torch's: 3.7x larger
    assert fc1.std().item() == pytest.approx(math.sqrt(2 * math.pi) / 1568, rel=0.05)  # torch's: 9x larger


def test_an_unknown_or_unfit_weight_init_is_refused_when_the_config_is_read_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="weight_init: 'xavier'; model cnn-small takes default, ibp"):
        tiny_config(weight_init="xavier")
    with pytest.raises(ConfigError, match="'ibp'; model resnet-18 takes default$"):  # no residual halving here
        tiny_config(weight_init="ibp", model="resnet-18")
    assert_one_line_error(run("pretrain", "--set", "weight_init=xavier", "--out", tmp_path / "dense"), "xavier")
    assert not (tmp_path / "dense").exists()


def test_pruning_a_dense_run_under_another_weight_init_is_refused_so_the_record_cannot_name_the_wrong_one(tmp_path):
    pipeline.pretrain(tiny_config(pretrain={"epochs": 0}, verify=None), tmp_path / "dense")  # torch's default init
    result = run("prune", "--set", "weight_init=ibp", "--set", "train_examples=64", "--set", "model=cnn-small",
                 "--from", tmp_path / "dense", "--k", "0.5", "--out", tmp_path / "pruned")
    assert_one_line_error(result, "pretrained with weight_init default, but the config says ibp; set weight_init: default")
    assert not (tmp_path / "pruned" / "model.pt").exists()
