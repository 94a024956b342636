"""Specification of the masked-layer core (certprune.masking)."""
import math

import pytest
import torch
from torch import nn

from certprune import masking
from certprune.models import MODELS, create_model


def small_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 7), nn.ReLU(),
                         nn.Linear(7, 3))


@pytest.mark.parametrize("k, n, kept", [(0.05, 100, 5), (0.1, 30, 3), (0.01, 256, 3), (0.07, 100, 7),
                                        (0.3, 10, 3), (1.0, 17, 17), (1e-9, 5, 1), (0.5, 3, 2)])
def test_num_kept_is_ceiling_of_exact_decimal_product(k, n, kept):
    assert masking.num_kept(k, n) == kept


def test_num_kept_has_no_float_drift_for_any_layer_size():
    for k in (0.01, 0.05, 0.1, 0.2, 0.3, 0.7):
        for n in range(1, 2000):
            hundredths = round(k * 100)
            assert masking.num_kept(k, n) == max(1, -(-hundredths * n // 100))


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5, float("nan"), float("inf"), "abc", None])
def test_invalid_k_is_rejected(k):
    with pytest.raises(ValueError, match="k must"):
        masking.check_k(k)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("k", [0.1, 0.05, 0.01])
def test_mask_keeps_exactly_the_documented_count_per_layer(name, k):
    model = create_model(name, image_size=16)
    masking.apply_masks(model, k)
    for _, layer in masking.masked_layers(model):
        n = layer.weight.numel()
        assert int((masking.mask_of(layer).mask() != 0).sum()) == masking.num_kept(k, n)
        assert int((layer.weight != 0).sum()) <= masking.num_kept(k, n)


def test_ties_still_keep_exactly_count():
    layer = nn.Linear(10, 10)
    masking.apply_masks(nn.Sequential(layer), 0.25)
    with torch.no_grad():
        masking.mask_of(layer).scores.fill_(1.0)
    assert int(masking.mask_of(layer).mask().sum()) == 25


def test_identity_mask_changes_nothing():
    model = small_net()
    x = torch.randn(5, 1, 8, 8)
    before = model(x)
    masking.apply_masks(model, 1.0)
    assert torch.equal(model(x), before)


def test_initial_mask_is_least_weight_magnitude_for_both_inits():
    for init in ("scaled", "magnitude"):
        layer = nn.Linear(20, 10)
        weight = layer.weight.detach().clone()
        masking.apply_masks(nn.Sequential(layer), 0.1, init=init)
        kept = masking.mask_of(layer).mask().bool()
        threshold = weight.abs().flatten().topk(20).values.min()
        assert torch.equal(kept, weight.abs() >= threshold)


def test_scaled_init_is_hydra_formula():
    layer = nn.Conv2d(3, 8, 3)
    weight = layer.weight.detach().clone()
    masking.apply_masks(nn.Sequential(layer), 0.5)
    expected = math.sqrt(6 / (3 * 3 * 3)) * weight / weight.abs().max()
    assert torch.allclose(masking.mask_of(layer).scores, expected)


def test_parameter_identity_survives_so_optimizers_stay_valid():
    model = small_net()
    weights = [layer.weight for _, layer in masking.prunable_layers(model)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masking.apply_masks(model, 0.5)
    assert [masking.raw_weight(layer) for _, layer in masking.prunable_layers(model)] == weights
    assert all(any(p is w for p in model.parameters()) for w in weights)
    assert optimizer.param_groups[0]["params"][0] is weights[0]


def test_scores_get_straight_through_gradient_and_frozen_weights_get_none():
    model = small_net()
    masking.apply_masks(model, 0.2)
    masking.set_phase(model, "prune")
    model(torch.randn(4, 1, 8, 8)).square().sum().backward()
    for _, layer in masking.masked_layers(model):
        scores = masking.mask_of(layer).scores
        assert scores.grad is not None and scores.grad.abs().sum() > 0
        pruned = masking.mask_of(layer).mask() == 0
        assert scores.grad[pruned].abs().sum() > 0, "straight-through: pruned weights' scores get gradient too"
        assert masking.raw_weight(layer).grad is None
        assert layer.bias.grad is None


def test_score_gradient_is_upstream_gradient_times_weight():
    layer = nn.Linear(6, 4)
    model = nn.Sequential(layer)
    masking.apply_masks(model, 0.5)
    masking.set_phase(model, "prune")
    x = torch.randn(3, 6)
    model(x).sum().backward()
    effective_grad = torch.ones(3, 4).T @ x  # d sum(Wx+b) / dW
    scores = masking.mask_of(layer).scores
    expected = effective_grad * masking.raw_weight(layer).detach() * scores.detach().sign()
    assert torch.allclose(scores.grad, expected, atol=1e-6)


def test_masked_entries_get_no_weight_gradient_in_finetune():
    model = small_net()
    masking.apply_masks(model, 0.2)
    masking.set_phase(model, "finetune")
    model(torch.randn(4, 1, 8, 8)).square().sum().backward()
    for _, layer in masking.masked_layers(model):
        pruned = masking.mask_of(layer).mask() == 0
        assert masking.raw_weight(layer).grad[pruned].abs().max() == 0
        assert masking.mask_of(layer).scores.grad is None


def test_phases_toggle_only_requires_grad():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    masking.apply_masks(model, 0.5)
    params = list(model.parameters())
    trainable = lambda: {name for name, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    masking.set_phase(model, "prune")
    assert trainable() == {"0.parametrizations.weight.0.scores", "4.parametrizations.weight.0.scores",
                           "1.weight", "1.bias"}
    masking.set_phase(model, "prune", train_norm_in_prune=False)
    assert trainable() == {"0.parametrizations.weight.0.scores", "4.parametrizations.weight.0.scores"}
    masking.set_phase(model, "finetune")
    assert not any("scores" in name for name in trainable()) and "0.parametrizations.weight.original" in trainable()
    assert list(model.parameters()) == params
    with pytest.raises(ValueError, match="unknown phase"):
        masking.set_phase(model, "train")


def test_frozen_weights_do_not_move_while_scores_train():
    model = small_net()
    masking.apply_masks(model, 0.1)
    masking.set_phase(model, "prune")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    scores_before = [s.detach().clone() for s in masking.scores(model)]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(8, 1, 8, 8)).logsumexp(1).mean().backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(scores_before, masking.scores(model)))


def test_pruned_weights_stay_zero_through_finetuning():
    model = small_net()
    masking.apply_masks(model, 0.1)
    masking.set_phase(model, "finetune")
    masks = [masking.mask_of(layer).mask().clone() for _, layer in masking.masked_layers(model)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, weight_decay=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(8, 1, 8, 8)).logsumexp(1).mean().backward()
        optimizer.step()
    for mask, (_, layer) in zip(masks, masking.masked_layers(model)):
        assert torch.equal(masking.mask_of(layer).mask(), mask)
        assert layer.weight[mask == 0].abs().max() == 0
    assert masking.sparsity(model) == pytest.approx(1 - sum(int(m.sum()) for m in masks) /
                                                     sum(m.numel() for m in masks))


def test_state_dict_round_trips():
    model = small_net()
    masking.apply_masks(model, 0.3)
    with torch.no_grad():
        for scores in masking.scores(model):
            scores.normal_()
    clone = masking.apply_masks(small_net(), 0.3)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(clone(x), model(x))


def test_dense_copy_bakes_masks_and_leaves_original_intact():
    model = small_net()
    masking.apply_masks(model, 0.1)
    x = torch.randn(3, 1, 8, 8)
    dense = masking.dense_copy(model)
    assert not any(masking.is_masked(m) for m in dense.modules())
    assert torch.equal(dense(x), model(x))
    assert masking.sparsity(dense) == masking.sparsity(model) > 0.85
    assert masking.is_masked(model[0]) and model[0].weight.shape == (4, 1, 3, 3)  # original still works
    assert set(dense.state_dict()) == {"0.weight", "0.bias", "3.weight", "3.bias", "5.weight", "5.bias"}


def test_masking_twice_or_nothing_is_an_error():
    model = masking.apply_masks(small_net(), 0.5)
    with pytest.raises(ValueError, match="already masked"):
        masking.apply_masks(model, 0.5)
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        masking.apply_masks(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(ValueError, match="masked model"):
        masking.set_phase(small_net(), "prune")


def test_the_package_keeps_every_name_its_importers_use():
    from certprune.masking import PHASES, TopKMask, check_k, num_kept  # noqa: F401  (cli, certify/smoothing)
    model = masking.apply_masks(small_net(), 0.5)  # allocation defaults to layerwise, HYDRA's default
    assert all(isinstance(masking.mask_of(layer), TopKMask) for _, layer in masking.masked_layers(model))
    assert masking.allocation_counts(model) == {"0": (18, 36), "3": (504, 1008), "5": (11, 21)}
    assert masking.rate_parameters(model) == []
