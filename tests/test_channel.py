"""Specification of structured (channel) pruning and compaction (certprune.masking.channel, certprune compact).

Models here are random or trained for a step or two: what is specified is which channels a mask keeps, that pruned
channels are exactly 0 wherever the model is read, and that the compact model is the same function with the same
bounds."""
import json
import math

import pytest
import torch
from torch import nn

from certprune import masking, runs
from certprune.lirpa import BoundedProxy
from certprune.models import create_model
from certprune.pipeline import prune

from helpers import assert_one_line_error, bn_net, channel_rows, dense_run, run

EPS = 0.03



@pytest.mark.parametrize("name, size, k", [(name, 28, k) for name in ("cnn-small", "cnn-large") for k in (0.5, 0.25, 0.1)]
                         + [("vgg16-bn", 16, 0.1)])
def test_each_layer_keeps_exactly_num_kept_channels_and_the_last_layer_is_untouched(name, size, k):
    model = create_model(name, image_size=size)
    last_name, last = list(masking.prunable_layers(model))[-1]
    last_weight = last.weight.detach().clone()
    masking.apply_masks(model, k, granularity="channel")
    counts = masking.channel_counts(model)
    for layer_name, layer in masking.prunable_layers(model):
        channels = layer.weight.shape[0]
        if layer_name == last_name:
            assert not masking.is_masked(layer) and torch.equal(layer.weight, last_weight)
            assert counts[layer_name] == (channels, channels)
            continue
        kept = masking.num_kept(k, channels)
        assert counts[layer_name] == (kept, channels)
        assert int((~channel_rows(layer)).sum()) == kept  # the effective weights agree with the count


def test_global_channel_allocation_keeps_the_exact_total_and_one_channel_per_layer():
    model = create_model("cnn-large")
    masking.apply_masks(model, 0.1, allocation="global", granularity="channel")
    counts = [kept for name, (kept, _) in masking.channel_counts(model).items() if name != "14"]
    assert sum(counts) == masking.num_kept(0.1, 32 + 32 + 64 + 64 + 512 + 512) and min(counts) >= 1


def test_lwm_keeps_the_filters_of_largest_l1_norm():
    conv = nn.Conv2d(1, 4, 2, bias=False)
    with torch.no_grad():  # L1 norms 4, 3, 1, 2.4; by L2 or max |w| the second filter would rank first
        conv.weight.copy_(torch.tensor([[1., 1, 1, 1], [3, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [-0.6, 0.6, 0.6, -0.6]])
                          .view(4, 1, 2, 2))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(4, 3))
    masking.apply_masks(model, 0.5, init="magnitude", granularity="channel")
    assert masking.mask_of(conv).mask().tolist() == [1.0, 1.0, 0.0, 0.0]
    assert torch.equal(masking.mask_of(conv).scores, torch.tensor([4.0, 3.0, 1.0, 2.4]))


def test_hydra_channel_scores_are_the_scaled_filter_norms():
    conv = nn.Conv2d(3, 5, 3)
    norms = conv.weight.detach().abs().flatten(1).sum(1)
    masking.apply_masks(nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)), 0.5, granularity="channel")
    expected = math.sqrt(6 / 27) * norms / norms.max()
    assert torch.allclose(masking.mask_of(conv).scores, expected)


def test_channel_score_gradient_is_straight_through_over_every_tensor_of_the_channel():
    model = bn_net().train()
    masking.apply_masks(model, 0.5, granularity="channel")
    masking.set_phase(model, "prune")
    conv, norm = model[1], model[2]
    with masking.cached():  # the effective tensors are computed once, so their gradients can be read
        effective = [conv.weight, norm.weight, norm.bias]
        for tensor in effective:
            tensor.retain_grad()
        model(torch.rand(4, 1, 8, 8)).square().sum().backward()
    raw = [conv.parametrizations.weight.original, norm.parametrizations.weight.original,
           norm.parametrizations.bias.original]
    expected = sum((t.grad * r.detach()).flatten(1).sum(1) if t.dim() > 1 else t.grad * r.detach()
                   for t, r in zip(effective, raw))
    assert torch.allclose(masking.mask_of(conv).scores.grad, expected, atol=1e-5)
    assert norm.parametrizations.weight.original.requires_grad  # batch norm trains with the scores (HYDRA)
    assert not conv.parametrizations.weight.original.requires_grad


def test_compact_model_has_the_masked_models_logits_and_bounds():
    for model, shape in ((bn_net(), (1, 8, 8)), (create_model("cnn-small").eval(), (1, 28, 28))):
        masking.apply_masks(model, 0.25, init="magnitude", granularity="channel")
        small, widths = masking.compacted(model)
        assert widths == {name: kept for name, (kept, _) in masking.channel_counts(model).items() if name in widths}
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in masking.dense_copy(model)
                                                                  .parameters()) / 3
        x = torch.rand(3, *shape)
        with torch.no_grad():
            assert (small(x) - model(x)).abs().max() <= 1e-5
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            continue  # the verifiable path bounds plain ReLU networks
        masked, compact = BoundedProxy(model, x), BoundedProxy(small, x)
        for method in ("IBP", "CROWN"):
            for a, b in zip(masked.output_bounds(x, EPS, method), compact.output_bounds(x, EPS, method)):
                assert (a - b).abs().max() <= 1e-5, method



def test_pruned_channels_stay_zero_through_fine_tuning_and_in_the_saved_model(tmp_path):
    config = dense_run(tmp_path / "dense")
    metrics = prune(config, tmp_path / "lwm", 0.25, "lwm", tmp_path / "dense")
    assert metrics["granularity"] == "channel" and metrics["kept_channels_per_layer"]["1"] == [4, 16]
    model = runs.load_run(tmp_path / "lwm")
    before = runs.load_run(tmp_path / "dense")
    layers = list(masking.prunable_layers(model))
    for name, layer in layers[:-1]:
        pruned = channel_rows(layer)
        assert int((~pruned).sum()) == masking.num_kept(0.25, layer.weight.shape[0])
        dense_layer = before.get_submodule(name)
        kept_moved = not torch.equal(layer.weight[~pruned], dense_layer.weight[~pruned])
        assert kept_moved  # fine-tuning trained the kept channels while the pruned ones stayed exactly 0
    assert not (layers[-1][1].weight == 0).any()


def test_compact_run_loads_verifies_and_exports(tmp_path):
    config = dense_run(tmp_path / "dense")
    prune(config, tmp_path / "hydra", 0.25, "hydra", tmp_path / "dense")
    result = run("compact", "--from", tmp_path / "hydra", "--out", tmp_path / "small")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["widths"] == {"1": 4, "3": 8, "6": 25} and facts["params"] < facts["source_params"] / 4
    small, masked = runs.load_run(tmp_path / "small"), runs.load_run(tmp_path / "hydra")
    assert small[1].out_channels == 4 and small[6].in_features == 8 * 7 * 7
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert (small(x) - masked(x)).abs().max() <= 1e-5
    verified = []
    for name in ("hydra", "small"):
        result = run("verify", "--from", tmp_path / name, "--eps", 0.01, "--max", 8, "--method", "IBP",
                     "--method", "CROWN")
        assert result.exit_code == 0, result.output
        verified.append(json.loads(result.stdout))
    records = [next(iter(r.values())) for r in verified]
    assert records[0]["verified_acc"] == records[1]["verified_acc"]
    result = run("export", "--from", tmp_path / "small", "--out", tmp_path / "onnx", "--max", 2, "--eps", 0.01)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "onnx" / "model.onnx").is_file()


def test_compacting_a_weight_granularity_run_says_to_prune_channels_instead(tmp_path):
    dense_run(tmp_path / "dense")
    model = create_model("cnn-small")
    masking.apply_masks(model, 0.1)
    runs.save_model(model, tmp_path / "w" / "model.pt", {"name": "cnn-small", "kwargs": {}})
    runs.write_metrics(tmp_path / "w", {"method": "hydra", "k": 0.1, "granularity": "weight"})
    assert_one_line_error(run("compact", "--from", tmp_path / "w", "--out", tmp_path / "c"), "--granularity channel")
    assert_one_line_error(run("compact", "--from", tmp_path / "dense", "--out", tmp_path / "c"), "dense run")
    assert not (tmp_path / "c" / "model.pt").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--granularity", "filter"], "unknown prune granularity 'filter'; choose from weight, channel"),
    (["--granularity", "channel", "--allocation", "erk"], "channel granularity takes layerwise or global"),
    (["--granularity", "channel", "--model", "resnet-18"], "residual additions"),
    (["--set", "prune.channel_scores=l2"], "unknown prune channel_scores 'l2'; choose from channel, weight-l1"),
    (["--granularity", "weight", "--set", "prune.channel_scores=weight-l1"],
     "prune channel_scores weight-l1 ranks channels; it needs granularity channel, not weight"),
])
def test_bad_granularity_is_a_one_line_error_before_any_work(tmp_path, flags, fragment):
    result = run("prune", "--k", 0.1, "--from", tmp_path / "missing", "--out", tmp_path / "out", *flags)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()
