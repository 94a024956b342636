"""Specification of structured (channel) pruning and compaction (certprune.masking.channel, certprune compact).

Models here are random or trained for a step or two: what is specified is which channels a mask keeps, that pruned
channels are exactly 0 wherever the model is read, and that the compact model is the same function with the same
bounds."""
import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from certprune import masking, pipeline, runs
from certprune.config import load_config
from certprune.lirpa import BoundedProxy
from certprune.models import Normalize, create_model
from certprune.pipeline import prune
from certprune.runs import CHECKPOINT_FILE, safe_load

from helpers import assert_one_line_error, run

EPS = 0.03


def bn_net():
    """A VGG-like net with batch norm (random statistics) before and after a max-pool, then Flatten into a Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.5], [0.5]), nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10))
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def channel_rows(layer):
    """Per output channel: is every weight of it, and its bias, exactly 0?"""
    zero = (layer.weight.detach().flatten(1) == 0).all(1)
    return zero & (layer.bias.detach() == 0) if layer.bias is not None else zero


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


def weight_l1(model, k, allocation="layerwise"):
    return masking.apply_masks(model, k, allocation=allocation, granularity="channel", channel_scores="weight-l1")


@pytest.mark.parametrize("name, size, k", [(name, 28, k) for name in ("cnn-small", "cnn-large") for k in (0.5, 0.1)]
                         + [("vgg16-bn", 16, 0.1)])
def test_weight_l1_scores_keep_exactly_num_kept_channels_per_layer_and_the_exact_global_total(name, size, k):
    model = weight_l1(create_model(name, image_size=size), k)
    layers = list(masking.masked_layers(model))
    for layer_name, layer in layers:
        mask, channels = masking.mask_of(layer), layer.weight.shape[0]
        assert isinstance(mask, masking.channel.WeightL1ChannelMask) and mask.scores.shape == layer.weight.shape
        assert masking.channel_counts(model)[layer_name] == (masking.num_kept(k, channels), channels)
        assert int((~channel_rows(layer)).sum()) == masking.num_kept(k, channels)
    model = weight_l1(create_model(name, image_size=size), k, "global")
    counts = [masking.channel_counts(model)[layer_name] for layer_name, _ in layers]
    assert sum(kept for kept, _ in counts) == masking.num_kept(k, sum(c for _, c in counts))
    assert min(kept for kept, _ in counts) >= 1
    assert sum(int((~channel_rows(layer)).sum()) for _, layer in masking.masked_layers(model)) == sum(
        kept for kept, _ in counts)


def test_weight_l1_ranks_channels_by_the_l1_norm_of_their_scaled_weight_scores():
    conv = nn.Conv2d(1, 4, 2, bias=False)
    with torch.no_grad():  # L1 norms 4, 3, 1, 2.4; signed sums 0, 3, 1, 1.2; max |w| 1, 3, 0.25, 0.6
        conv.weight.copy_(torch.tensor([[1., -1, 1, -1], [3, 0, 0, 0], [0.25, 0.25, 0.25, 0.25],
                                        [-0.6, 0.6, 0.6, 0.6]]).view(4, 1, 2, 2))
    expected = {0.25: [1.0, 0, 0, 0], 0.5: [1.0, 1, 0, 0], 0.75: [1.0, 1, 0, 1]}
    for k, kept in expected.items():
        model = weight_l1(nn.Sequential(copy.deepcopy(conv), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)), k)
        mask = masking.mask_of(model[0])
        assert torch.equal(mask.scores, masking.scaled_scores(conv.weight.detach()))  # HYDRA's scores, per weight
        assert torch.allclose(mask.magnitude(), math.sqrt(6 / 4) / 3 * torch.tensor([4.0, 3, 1, 2.4]))
        assert mask.mask().tolist() == kept


@pytest.mark.parametrize("allocation", ["layerwise", "global"])
def test_before_score_training_weight_l1_masks_are_the_channel_masks(allocation):
    for model in (bn_net(), create_model("cnn-large")):
        same = copy.deepcopy(model)
        masking.apply_masks(model, 0.3, allocation=allocation, granularity="channel")
        weight_l1(same, 0.3, allocation)
        for (_, a), (_, b) in zip(masking.masked_layers(model), masking.masked_layers(same)):
            one, each = masking.mask_of(a), masking.mask_of(b)
            assert type(one) is masking.ChannelMask and type(each) is masking.channel.WeightL1ChannelMask  # default
            assert torch.equal(one.mask(), each.mask()) and torch.equal(a.weight, b.weight)
            if allocation == "global":  # the comparable channel score is norm / max(norm) for both
                norms = a.parametrizations.weight.original.detach().abs().flatten(1).sum(1)
                for mask in (one, each):
                    assert torch.allclose(mask.magnitude() * mask.scale, norms / norms.max(), rtol=1e-6, atol=0)
    lwm = masking.apply_masks(bn_net(), 0.3, init="magnitude", granularity="channel", channel_scores="weight-l1")
    assert type(masking.mask_of(lwm[1])) is masking.ChannelMask  # LWM's one score per channel is the same L1 norm


@pytest.mark.parametrize("allocation", ["layerwise", "global"])
def test_weight_l1_score_gradient_is_the_channel_mask_gradient_times_the_sign_of_each_score(allocation):
    model, plain = weight_l1(bn_net().train(), 0.5, allocation), bn_net().train()
    masking.set_phase(model, "prune")
    conv, norm, x = model[1], model[2], torch.rand(4, 1, 8, 8)
    with masking.cached():
        effective = [conv.weight, norm.weight, norm.bias]
        for tensor in effective:
            tensor.retain_grad()
        model(x).square().sum().backward()
    raw = [conv.parametrizations.weight.original, norm.parametrizations.weight.original,
           norm.parametrizations.bias.original]
    channel_grad = sum((t.grad * r.detach()).flatten(1).sum(1) if t.dim() > 1 else t.grad * r.detach()
                       for t, r in zip(effective, raw))
    scores = masking.mask_of(conv).scores
    assert torch.allclose(scores.grad, scores.detach().sign() * channel_grad.view(-1, 1, 1, 1), atol=1e-5)
    reference = scores.detach().clone().requires_grad_()  # by hand: a straight-through 0/1 of per-channel L1 norms
    norms = reference.abs().flatten(1).sum(1)
    soft = masking.mask_of(conv).mask().detach() + norms - norms.detach()  # the kept channels: tested above
    with masking.cached():  # every other tensor as the masked model reads it
        tensors = {name: getattr(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]).detach()
                   for name, _ in plain.named_parameters()}
    tensors.update({"1.weight": raw[0].detach() * soft.view(-1, 1, 1, 1), "2.weight": raw[1].detach() * soft,
                    "2.bias": raw[2].detach() * soft})
    functional_call(plain, tensors, (x,)).square().sum().backward()
    assert torch.allclose(scores.grad, reference.grad, atol=1e-5)


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


def dense_run(run_dir):
    """A finished 'dense' run of a random cnn-small with a tiny config (nothing trained)."""
    config = load_config(None, [{"model": "cnn-small", "train_examples": 64, "batch_size": 32, "verify": None,
                                 "loss": {"name": "natural"}, "prune": {"epochs": 1, "granularity": "channel"},
                                 "finetune": {"epochs": 1, "lr": 0.05}}])
    model = create_model("cnn-small")
    runs.save_model(model, run_dir / "model.pt", {"name": "cnn-small", "kwargs": {"in_channels": 1, "image_size": 28,
                                                                                 "num_classes": 10}})
    runs.write_config(run_dir, config.model_copy(update={"prune": config.prune.model_copy(
        update={"granularity": "weight"})}))
    runs.write_metrics(run_dir, {"method": "dense", "k": 1.0})
    return config


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


def test_weight_l1_hydra_run_resumes_its_per_weight_scores_and_keeps_pruned_channels_zero(tmp_path, monkeypatch):
    config = dense_run(tmp_path / "dense")
    config = config.model_copy(update={"prune": config.prune.model_copy(update={"channel_scores": "weight-l1"})})
    straight = prune(config, tmp_path / "straight", 0.25, "hydra", tmp_path / "dense")
    real_fit = pipeline.fit

    def fit_stopped_after_the_prune_phase(*args, on_epoch_end=None, **kwargs):
        def checkpoint_then_stop(epoch, means):
            on_epoch_end(epoch, means)
            raise KeyboardInterrupt
        return real_fit(*args, on_epoch_end=checkpoint_then_stop, **kwargs)

    monkeypatch.setattr(pipeline, "fit", fit_stopped_after_the_prune_phase)
    with pytest.raises(KeyboardInterrupt):
        prune(config, tmp_path / "resumed", 0.25, "hydra", tmp_path / "dense")
    monkeypatch.setattr(pipeline, "fit", real_fit)
    checkpoint = safe_load(tmp_path / "resumed" / CHECKPOINT_FILE)
    assert checkpoint["completed"] == ["0:prune"]
    assert checkpoint["model"]["1.parametrizations.weight.0.scores"].shape == (16, 1, 4, 4)  # per weight
    resumed = prune(config, tmp_path / "resumed", 0.25, "hydra", tmp_path / "dense", resume=True)
    for metrics in (straight, resumed):
        assert metrics["granularity"] == "channel" and metrics["channel_scores"] == "weight-l1"
        assert metrics["kept_channels_per_layer"] == {"1": [4, 16], "3": [8, 32], "6": [25, 100], "8": [10, 10]}
    model, dense = runs.load_run(tmp_path / "resumed"), runs.load_run(tmp_path / "dense")
    for a, b in zip(runs.load_run(tmp_path / "straight").state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # the resumed run rebuilt the same masks from the checkpoint
    for name, layer in list(masking.prunable_layers(model))[:-1]:
        pruned = channel_rows(layer)
        assert int((~pruned).sum()) == masking.num_kept(0.25, layer.weight.shape[0])
        assert not torch.equal(layer.weight[~pruned], dense.get_submodule(name).weight[~pruned])  # fine-tuned
    weights = config.model_copy(update={"prune": config.prune.model_copy(update={"granularity": "weight",
                                                                                "channel_scores": "channel"})})
    assert "channel_scores" not in prune(weights, tmp_path / "weights", 0.25, "lwm", tmp_path / "dense")


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
