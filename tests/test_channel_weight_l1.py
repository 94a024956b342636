"""Specification of HYDRA's App. C.9 channel scores (``prune.channel_scores: weight-l1``): per-weight HYDRA scores,
each channel ranked by the L1 norm of its weights' scores, straight-through to every score."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from certprune import masking, runs
from certprune.models import create_model
from certprune.pipeline import prune
from certprune.runs import CHECKPOINT_FILE, safe_load

from helpers import bn_net, channel_rows, dense_run, interrupt_training


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


def test_weight_l1_hydra_run_resumes_its_per_weight_scores_and_keeps_pruned_channels_zero(tmp_path, monkeypatch):
    config = dense_run(tmp_path / "dense")
    config = config.model_copy(update={"prune": config.prune.model_copy(update={"channel_scores": "weight-l1"})})
    straight = prune(config, tmp_path / "straight", 0.25, "hydra", tmp_path / "dense")
    interrupt_training(monkeypatch)  # after the prune phase's one epoch
    with pytest.raises(KeyboardInterrupt):
        prune(config, tmp_path / "resumed", 0.25, "hydra", tmp_path / "dense")
    monkeypatch.undo()
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
