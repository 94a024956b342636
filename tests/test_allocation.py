"""Specification of the layer allocations of the masked-layer core: layerwise, global, erk, learned."""
import copy
import math

import pytest
import torch
from torch import nn

from certprune import masking
from certprune.masking import allocation as alloc_module
from certprune.models import create_model

CNN_SMALL_SIZES = [256, 8192, 156800, 1000]  # conv1, conv2, fc1, fc2 at 28x28


def toy_layers():
    """Weights of shape (3, 4): 12 weights, (5, 2, 3, 3): 90, (10, 20): 200 (never run, only masked)."""
    return nn.Sequential(nn.Linear(4, 3), nn.Conv2d(2, 5, 3), nn.Linear(20, 10))


def small_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 7), nn.ReLU(),
                         nn.Linear(7, 3))


def mask_counts(model):
    return [int(masking.mask_of(layer).mask().sum()) for _, layer in masking.masked_layers(model)]


def randomise(model, seed=0):
    """Scores (and learned rates) as score training might leave them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for scores in masking.scores(model):
            scores.copy_(torch.randn(scores.shape, generator=generator) * scores.abs().mean())
        for rate in masking.rate_parameters(model):
            rate.add_(torch.randn((), generator=generator))
    return model


@pytest.fixture(scope="module")
def cnn_small():
    torch.manual_seed(0)
    return create_model("cnn-small")


@pytest.mark.parametrize("allocation", masking.ALLOCATIONS)
@pytest.mark.parametrize("k", [0.1, 0.05, 0.01])
def test_every_allocation_keeps_exactly_the_documented_total(cnn_small, allocation, k):
    model = masking.apply_masks(copy.deepcopy(cnn_small), k, allocation=allocation)
    expected = (sum(masking.num_kept(k, n) for n in CNN_SMALL_SIZES) if allocation == "layerwise"
                else masking.num_kept(k, sum(CNN_SMALL_SIZES)))
    for trained in (False, True):
        if trained:
            randomise(model)
        with masking.cached():  # one global top-k per block (cnn-small is slow to rank on a busy CPU)
            counts = mask_counts(model)
            reported = masking.allocation_counts(model)
        assert sum(counts) == expected
        assert all(1 <= c <= n for c, n in zip(counts, CNN_SMALL_SIZES))
        assert list(reported.values()) == list(zip(counts, CNN_SMALL_SIZES))


def test_layerwise_is_todays_mask_bit_for_bit(cnn_small):
    default = masking.apply_masks(copy.deepcopy(cnn_small), 0.01)
    layerwise = masking.apply_masks(copy.deepcopy(cnn_small), 0.01, allocation="layerwise")
    assert mask_counts(layerwise) == [3, 82, 1568, 10]
    for (_, a), (_, b), (_, plain) in zip(masking.masked_layers(default), masking.masked_layers(layerwise),
                                          masking.prunable_layers(cnn_small)):
        assert torch.equal(a.weight, b.weight)
        n = plain.weight.numel()
        top = plain.weight.detach().abs().flatten().topk(masking.num_kept(0.01, n)).indices
        assert set(masking.mask_of(b).mask().flatten().nonzero().flatten().tolist()) == set(top.tolist())
    assert set(layerwise.state_dict()) == set(default.state_dict())  # old checkpoints still load


@pytest.mark.parametrize("k, counts", [(0.1, [223, 501, 14917, 984]), (0.05, [112, 250, 7459, 492]),
                                       (0.01, [22, 50, 1492, 99]), (0.2, [256, 1039, 30955, 1000])])
def test_erk_on_cnn_small_is_the_closed_form(cnn_small, k, counts):
    # ERK mass of a layer = n_l * sum(shape)/prod(shape) = sum(shape): 25, 56, 1668, 110 (total 1859), so
    # c_l = K * sum(shape_l) / 1859 with K = ceil(k * 166248); k = 0.01: K = 1663, c = 22.36, 50.10, 1492.12, 98.40:
    # floors 22 50 1492 98 (1662), the unit left to fc2 (.40). k = 0.2: K = 33250 makes conv1 (447) and fc2 (1967)
    # dense; conv2 and fc1 share 33250 - 1256 = 31994 as 56 : 1668, i.e. 1039.24 and 30954.76 -> 1039 and 30955.
    model = masking.apply_masks(copy.deepcopy(cnn_small), k, allocation="erk")
    assert mask_counts(model) == counts
    assert masking.erk_counts([(16, 1, 4, 4), (32, 16, 4, 4), (100, 1568), (10, 100)], k) == counts


@pytest.mark.parametrize("k, counts", [(0.25, [11, 20, 45]), (0.5, [12, 42, 97]), (0.8, [12, 70, 160]),
                                       (0.99, [12, 87, 200]), (0.01, [1, 1, 2]), (1.0, [12, 90, 200])])
def test_erk_on_a_toy_model_is_the_hand_computed_closed_form(k, counts):
    # ERK density_l = eps * sum(shape_l) / n_l, so c_l = eps * sum(shape_l): shares 7 : 13 : 30 of K = ceil(k * 302).
    # 0.25: K = 76, c = 10.64, 19.76, 45.6 -> floors 10 19 45, the 2 units left to .76 and .64.
    # 0.5: K = 151, c_1 = 21.14 > 12 -> dense (RigL); 139 shared 13 : 30 -> 42.02, 96.98 -> 42, 97.
    # 0.8: K = 242, first dense, 230 -> 69.53, 160.47 -> 70, 160.
    # 0.99: K = 299, first dense, 287 -> 86.77, 200.23 > 200 -> third dense too (a second round), second 87.
    # 0.01: K = 4, c = 0.56, 1.04, 2.4: the first would keep < 1 -> 1; 3 shared 13 : 30 -> 0.91 < 1 -> 1; third 2.
    model = masking.apply_masks(toy_layers(), k, allocation="erk")
    assert [layer.weight.numel() for _, layer in masking.masked_layers(model)] == [12, 90, 200]
    assert mask_counts(model) == counts


def test_learned_starts_from_erk_and_its_rates_are_trained_only_in_prune(cnn_small):
    model = masking.apply_masks(copy.deepcopy(cnn_small), 0.01, allocation="learned")
    assert mask_counts(model) == [22, 50, 1492, 99]
    rates = masking.rate_parameters(model)
    assert len(rates) == 4 and all(any(r is p for p in model.parameters()) for r in rates)
    masking.set_phase(model, "prune")
    assert all(r.requires_grad for r in rates)
    masking.set_phase(model, "finetune")
    assert not any(r.requires_grad for r in rates) and not any(s.requires_grad for s in masking.scores(model))
    assert masking.rate_parameters(masking.apply_masks(small_net(), 0.1, allocation="erk")) == []


def positive_pair():
    """Two layers with positive weights: d(-sum of layer 0's effective weight)/d mask < 0 everywhere in layer 0."""
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 30))
    with torch.no_grad():
        for layer in model:
            layer.weight.uniform_(0.5, 1.0)
    return model


def test_learned_rates_move_toward_the_layer_the_gradient_favours_and_the_total_stays_exact():
    model = masking.apply_masks(positive_pair(), 0.1, allocation="learned")
    budget = masking.num_kept(0.1, 1200)
    before = mask_counts(model)
    masking.set_phase(model, "prune")
    rates = masking.rate_parameters(model)
    for _ in range(10):
        for rate in rates:
            rate.grad = None
        with masking.cached():
            loss = -model[0].weight.sum()
        loss.backward()
        assert rates[0].grad < 0 < rates[1].grad  # more of layer 0 lowers the loss; the budget takes it from 1
        with torch.no_grad():  # plain SGD, lr 0.01
            for rate in rates:
                rate.sub_(0.01 * rate.grad)
        assert sum(mask_counts(model)) == budget
    after = mask_counts(model)
    assert after[0] > before[0] + 20 and after[1] < before[1] - 20 and after[1] >= 1


def test_rate_gradient_is_the_mean_marginal_value_near_the_boundary():
    magnitude = torch.rand(1000)
    real = torch.tensor(50.3, dtype=torch.float64, requires_grad=True)
    mask = alloc_module._RankedTopK.apply(magnitude, real, 50)
    assert int(mask.sum()) == 50 and bool((mask[magnitude.topk(50).indices] == 1).all())
    (mask * -0.7).sum().backward()  # every weight lowers the loss by 0.7 per unit of mask: so does one more kept
    assert real.grad.item() == pytest.approx(-0.7, abs=1e-6)
    far = torch.zeros(1000)
    far[magnitude.argmax()] = 1.0  # the top-ranked weight, far inside the kept set, says nothing about the count
    real.grad = None
    (alloc_module._RankedTopK.apply(magnitude, real, 50) * far).sum().backward()
    assert abs(real.grad.item()) < 1e-6


def brute_force_global(model, budget):
    """Top-``budget`` over the concatenated |scores| * scale, each layer's own best reserved."""
    masks = [masking.mask_of(layer) for _, layer in masking.masked_layers(model)]
    values = [(m.scores.detach().abs() * m.scale).flatten() for m in masks]
    reserved = {(i, int(v.argmax())) for i, v in enumerate(values)}
    rest = sorted(((float(v[j]), i, j) for i, v in enumerate(values) for j in range(v.numel())
                   if (i, j) not in reserved), reverse=True)
    kept = reserved | {(i, j) for _, i, j in rest[:budget - len(reserved)]}
    return [{j for i, j in kept if i == layer} for layer in range(len(masks))]


@pytest.mark.parametrize("init", ["scaled", "magnitude"])
def test_global_is_a_brute_force_top_k_over_normalised_scores(init):
    torch.manual_seed(1)
    model = masking.apply_masks(small_net(), 0.1, init=init, allocation="global")
    for _, layer in masking.masked_layers(model):
        weight = masking.raw_weight(layer).detach()
        peak = math.sqrt(6 / weight[0].numel()) if init == "scaled" else weight.abs().max()
        assert masking.mask_of(layer).scale.item() == pytest.approx(1 / float(peak))
    budget = masking.num_kept(0.1, 36 + 1008 + 21)
    for trained in (False, True):  # the mask follows the current scores: counts move, the total stays
        if trained:
            randomise(model, seed=3)
        chosen = [set(masking.mask_of(layer).mask().flatten().nonzero().flatten().tolist())
                  for _, layer in masking.masked_layers(model)]
        assert chosen == brute_force_global(model, budget)
        assert sum(map(len, chosen)) == budget


def test_global_starts_as_global_magnitude_on_max_normalised_weights_for_both_inits():
    torch.manual_seed(2)
    net = small_net()
    a = masking.apply_masks(copy.deepcopy(net), 0.05, init="scaled", allocation="global")
    b = masking.apply_masks(copy.deepcopy(net), 0.05, init="magnitude", allocation="global")
    for (_, x), (_, y) in zip(masking.masked_layers(a), masking.masked_layers(b)):
        assert torch.equal(masking.mask_of(x).mask(), masking.mask_of(y).mask())


def test_global_gives_weights_to_a_layer_whose_scores_grow_and_leaves_none_empty():
    model = masking.apply_masks(small_net(), 0.05, allocation="global")
    scores = masking.scores(model)
    before = mask_counts(model)
    with torch.no_grad():
        scores[0].abs_().add_(100.0)  # the conv's scores grow: it takes the budget (all 36 weights)
        scores[2].mul_(1e-6)  # the last layer's shrink: it keeps only its best weight
    after = mask_counts(model)
    assert after[0] == 36 > before[0] and after[2] == 1 and sum(after) == sum(before)


@pytest.mark.parametrize("allocation", masking.ALLOCATIONS)
def test_straight_through_gradient_reaches_every_score(allocation):
    layer = nn.Linear(6, 4)
    model = nn.Sequential(layer, nn.Linear(4, 3))
    masking.apply_masks(model, 0.3, allocation=allocation)
    masking.set_phase(model, "prune")
    upstream = torch.randn(4, 6)
    (layer.weight * upstream).sum().backward()  # d loss / d effective weight = upstream
    scores = masking.mask_of(layer).scores
    expected = upstream * masking.raw_weight(layer).detach() * scores.detach().sign()
    assert torch.allclose(scores.grad, expected, atol=1e-6)  # pruned entries too


@pytest.mark.parametrize("allocation", masking.ALLOCATIONS)
def test_pruned_weights_stay_exactly_zero_through_finetuning_and_baking(allocation):
    model = randomise(masking.apply_masks(small_net(), 0.1, allocation=allocation), seed=5)
    masking.set_phase(model, "finetune")
    masks = [masking.mask_of(layer).mask().clone() for _, layer in masking.masked_layers(model)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, weight_decay=0.1)
    x = torch.randn(8, 1, 8, 8)
    optimizer.zero_grad()
    model(x).logsumexp(1).mean().backward()
    optimizer.step()
    for mask, (_, layer) in zip(masks, masking.masked_layers(model)):
        assert torch.equal(masking.mask_of(layer).mask(), mask)
        assert not layer.weight[mask == 0].any()
    dense = masking.dense_copy(model)
    assert torch.equal(dense(x), model(x))
    for mask, (_, plain) in zip(masks, masking.prunable_layers(dense)):
        assert not plain.weight[mask == 0].any()
    masking.remove_masks(model)
    assert all(torch.equal(a.weight, b.weight) for (_, a), (_, b) in
               zip(masking.prunable_layers(model), masking.prunable_layers(dense)))
    assert sum(kept for kept, _ in masking.allocation_counts(dense).values()) <= sum(int(m.sum()) for m in masks)


@pytest.mark.parametrize("allocation", masking.ALLOCATIONS)
@pytest.mark.parametrize("init", ["scaled", "magnitude"])
def test_state_dict_round_trips_into_a_fresh_model_of_the_same_allocation(allocation, init):
    model = randomise(masking.apply_masks(small_net(), 0.2, init=init, allocation=allocation), seed=7)
    fresh = small_net()
    with torch.no_grad():
        fresh[0].weight.mul_(1000.0)  # a magnitude-init global scale of its own, unless the state dict brings one
    clone = masking.apply_masks(fresh, 0.2, init=init, allocation=allocation)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(clone(x), model(x))
    assert masking.allocation_counts(clone) == masking.allocation_counts(model)


def test_a_copy_taken_after_a_cached_step_works():
    model = masking.apply_masks(small_net(), 0.2, allocation="learned")
    masking.set_phase(model, "prune")
    with masking.cached():
        loss = model(torch.randn(2, 1, 8, 8)).sum()
    loss.backward()
    dense = masking.dense_copy(model)  # the plan's memo (an autograd graph) is not copied
    assert masking.sparsity(dense) == masking.sparsity(model)


@pytest.mark.parametrize("allocation", ["global", "learned"])
def test_a_shared_plan_is_computed_once_per_cached_block_and_follows_the_scores(allocation, monkeypatch):
    model = masking.apply_masks(small_net(), 0.1, allocation=allocation)
    plan = masking.mask_of(model[0]).plan
    calls = []
    compute = type(plan).compute
    monkeypatch.setattr(type(plan), "compute", lambda self: calls.append(1) or compute(self))
    with masking.cached():
        model(torch.randn(2, 1, 8, 8))
        model(torch.randn(2, 1, 8, 8))
    assert len(calls) == 1
    with torch.no_grad():
        masking.scores(model)[0].mul_(1000.0)
        for rate in masking.rate_parameters(model)[:1]:
            rate.add_(5.0)
    with masking.cached():
        assert mask_counts(model)[0] == 36  # recomputed in the next block, not a stale copy


def test_bad_allocation_init_or_budget_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown allocation 'uniform'; choose from layerwise, global, erk, learned"):
        masking.apply_masks(small_net(), 0.1, allocation="uniform")
    with pytest.raises(ValueError, match="unknown score init"):
        masking.apply_masks(small_net(), 0.1, init="random")
    with pytest.raises(ValueError, match="fewer than the 3 layers"):
        masking.apply_masks(small_net(), 1e-4, allocation="erk")
    assert mask_counts(masking.apply_masks(small_net(), 1e-4)) == [1, 1, 1]  # layerwise: one per layer, as today
