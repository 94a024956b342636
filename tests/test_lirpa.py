"""Specification of certprune.lirpa: auto_LiRPA's bounds of masked models are exact and sound."""
import warnings

import pytest
import torch
from torch import nn

from certprune import lirpa_compat, masking
from certprune.boxes import input_box, margin_spec
from certprune.lirpa import BoundedProxy
from certprune.models import VERIFIABLE, create_model

with warnings.catch_warnings():  # after certprune.lirpa, which applies the compatibility shims auto_LiRPA needs
    warnings.simplefilter("ignore")
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

EPS = 0.03


def sample_box(x, eps, count):
    """Random points of the clipped box, corners included (where ReLU networks are most extreme)."""
    lower, upper = input_box(x, eps)
    u = torch.rand(count, *x.shape)
    u[: count // 2] = u[: count // 2].round()
    return lower + u * (upper - lower)


def test_every_shim_is_still_needed_and_auto_lirpa_works():
    """If this fails after an upgrade of torch or numpy, delete the shim that is no longer needed."""
    lirpa_compat.apply()
    assert lirpa_compat.APPLIED and all(lirpa_compat.APPLIED.values()), lirpa_compat.APPLIED


def test_margin_spec_rows_are_true_minus_other():
    spec = margin_spec(torch.tensor([2, 0]), 4)
    assert spec.shape == (2, 3, 4)
    assert torch.equal(spec[0], torch.tensor([[-1., 0, 1, 0], [0, -1, 1, 0], [0, 0, 1, -1]]))
    assert torch.equal(spec[1], torch.tensor([[1., -1, 0, 0], [1, 0, -1, 0], [1, 0, 0, -1]]))


@pytest.mark.parametrize("method", ["IBP", "CROWN"])
def test_linear_layer_bounds_are_closed_form(method):
    """For y = Wx + b over a box [l, u], the tightest bounds are W+ l + W- u + b and W+ u + W- l + b."""
    linear = nn.Linear(6, 3)
    model = nn.Sequential(linear)
    x = torch.rand(4, 6) * 0.8 + 0.1
    lower_x, upper_x = input_box(x, 0.05)
    positive, negative = linear.weight.clamp(min=0), linear.weight.clamp(max=0)
    expected_lower = lower_x @ positive.T + upper_x @ negative.T + linear.bias
    expected_upper = upper_x @ positive.T + lower_x @ negative.T + linear.bias
    lower, upper = BoundedProxy(model, x).output_bounds(x, 0.05, method)
    assert torch.allclose(lower, expected_lower, atol=1e-5) and torch.allclose(upper, expected_upper, atol=1e-5)


def test_input_box_is_clipped_to_pixel_domain():
    lower, upper = input_box(torch.tensor([0.0, 0.5, 0.98]), 0.1)
    assert torch.allclose(lower, torch.tensor([0.0, 0.4, 0.88])) and torch.allclose(upper, torch.tensor([0.1, 0.6, 1.0]))


def interval_propagation(model, lower, upper):
    """An independent plain-torch IBP for Sequential models of Normalize / Conv2d / Linear / ReLU / Flatten."""
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            center, radius = (upper + lower) / 2, (upper - lower) / 2
            op = layer._conv_forward if isinstance(layer, nn.Conv2d) else None
            if op is not None:
                mid = op(center, layer.weight, layer.bias)
                rad = op(radius, layer.weight.abs(), None)
            else:
                mid, rad = center @ layer.weight.T + layer.bias, radius @ layer.weight.abs().T
            lower, upper = mid - rad, mid + rad
        else:  # monotone elementwise layers (Normalize with std > 0, ReLU) and Flatten
            lower, upper = layer(lower), layer(upper)
    return lower, upper


@pytest.mark.parametrize("name", VERIFIABLE)
def test_ibp_agrees_with_independent_interval_propagation(name):
    model = masking.apply_masks(create_model(name, image_size=12), 0.3)
    x = torch.rand(3, 1, 12, 12)
    lower, upper = BoundedProxy(model, x).output_bounds(x, EPS, "IBP")
    with torch.no_grad():
        ref_lower, ref_upper = interval_propagation(masking.dense_copy(model), *input_box(x, EPS))
    assert torch.allclose(lower, ref_lower, atol=1e-4, rtol=1e-4)
    assert torch.allclose(upper, ref_upper, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", VERIFIABLE)
@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN"])
def test_bounds_of_masked_models_contain_sampled_outputs(name, method):
    model = masking.apply_masks(create_model(name, image_size=12), 0.2).eval()
    x = torch.rand(2, 1, 12, 12)
    lower, upper = BoundedProxy(model, x).output_bounds(x, EPS, method)
    with torch.no_grad():
        samples = sample_box(x, EPS, 200)
        outputs = model(samples.flatten(0, 1)).view(200, 2, -1)
    assert (outputs >= lower - 1e-5).all() and (outputs <= upper + 1e-5).all()


@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN"])
def test_pgd_on_the_margin_never_goes_below_the_certified_lower_bound(method):
    model = masking.apply_masks(create_model("cnn-small", image_size=12), 0.3).eval()
    x, y = torch.rand(4, 1, 12, 12), torch.tensor([0, 1, 2, 3])
    certified = BoundedProxy(model, x).margin_lower_bounds(x, y, EPS, method)
    spec = margin_spec(y, 10)
    lower_x, upper_x = input_box(x, EPS)
    delta = (torch.rand_like(x) * 2 - 1) * EPS
    for _ in range(40):
        delta.requires_grad_(True)
        margins = torch.einsum("bkc,bc->bk", spec, model((x + delta).clamp(lower_x, upper_x)))
        margins.min(1).values.sum().backward()
        with torch.no_grad():
            delta = (delta - EPS / 8 * delta.grad.sign()).clamp(-EPS, EPS)
    with torch.no_grad():
        attacked = torch.einsum("bkc,bc->bk", spec, model((x + delta).clamp(lower_x, upper_x)))
    assert (attacked >= certified - 1e-5).all()


def direct_bounded(plain, x, eps):
    """auto_LiRPA's own ``BoundedModule`` over a plain network (Normalize included), and its input over the clipped
    box: an independent reference for :class:`BoundedProxy` (no weight copy, no gradient chaining, no Normalize
    taken out of the graph). Matrix mode, since patches mode (the proxy's) trips an assertion on Normalize."""
    lower, upper = input_box(x, eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bounded = BoundedModule(plain, x[:1], bound_opts={"conv_mode": "matrix"})
    return bounded, BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=lower, x_U=upper))


def test_masked_proxy_bounds_equal_auto_lirpas_bounds_of_the_dense_model():
    """The proxy follows the model's current effective weights (new weights, a new mask) and bounds them as
    auto_LiRPA bounds the baked network directly."""
    model = masking.apply_masks(create_model("cnn-small", image_size=12), 0.1)
    x, y = torch.rand(5, 1, 12, 12), torch.randint(0, 10, (5,))
    proxy = BoundedProxy(model, x)
    proxy.margin_lower_bounds(x, y, EPS, "IBP")
    before = [masking.mask_of(layer).mask().detach() for _, layer in masking.masked_layers(model)]
    with torch.no_grad():  # a training step later: every tensor moves, scores too, so the mask changes
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    after = [masking.mask_of(layer).mask().detach() for _, layer in masking.masked_layers(model)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    bounded, box = direct_bounded(masking.dense_copy(model), x, EPS)
    with torch.no_grad():
        for method in ("IBP", "CROWN"):
            lower, upper = proxy.output_bounds(x, EPS, method)
            direct_lower, direct_upper = bounded.compute_bounds(x=(box,), method=method)
            assert torch.allclose(lower, direct_lower, atol=1e-5, rtol=1e-5), method
            assert torch.allclose(upper, direct_upper, atol=1e-5, rtol=1e-5), method
        margins = proxy.margin_lower_bounds(x, y, EPS, "CROWN-IBP")
        direct = bounded.compute_bounds(x=(box,), C=margin_spec(y, 10), method="CROWN-IBP", bound_upper=False)[0]
    assert torch.allclose(margins, direct, atol=1e-5, rtol=1e-5)


def bound_loss(ibp, crown_ibp):
    return torch.nn.functional.softplus(-ibp).sum() + crown_ibp.square().mean()


@pytest.mark.parametrize("phase", ["prune", "finetune"])
def test_gradient_reaches_scores_and_weights_through_the_proxy(phase):
    """The chained gradient is auto_LiRPA's own gradient of the same bounds of the baked network w.r.t. its
    (effective) weights, carried on by hand: to scores straight-through (d|s|/ds = sign(s), times the raw weight),
    to raw weights times the mask; biases get it unchanged."""
    model = masking.apply_masks(create_model("cnn-small", image_size=12), 0.2)
    masking.set_phase(model, phase)
    x, y = torch.rand(6, 1, 12, 12), torch.randint(0, 10, (6,))
    bound_loss(*BoundedProxy(model, x).margin_lower_bounds_many(x, y, EPS, ["IBP", "CROWN-IBP"])).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    dense = masking.dense_copy(model)  # plain leaf Parameters holding the effective weights
    params = dict(dense.named_parameters())
    for param in params.values():
        param.requires_grad_(True)
    bounded, box = direct_bounded(dense, x, EPS)
    spec = margin_spec(y, 10)
    bounds = [bounded.compute_bounds(x=(box,), C=spec, method=method, bound_upper=False)[0]
              for method in ("IBP", "CROWN-IBP")]
    reference = dict(zip(params, torch.autograd.grad(bound_loss(*bounds), list(params.values()))))

    expected = {}
    for name, layer in masking.masked_layers(model):
        mask = masking.mask_of(layer)
        if phase == "prune":
            scores = mask.scores.detach()
            expected[f"{name}.parametrizations.weight.0.scores"] = (
                reference[f"{name}.weight"] * masking.raw_weight(layer).detach() * scores.sign())
        else:
            expected[f"{name}.parametrizations.weight.original"] = reference[f"{name}.weight"] * mask.mask().detach()
            expected[f"{name}.bias"] = reference[f"{name}.bias"]
    assert set(got) == set(expected)
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(got[name], grad, atol=1e-6, rtol=1e-4), name


def test_weight_gradient_through_the_proxy_matches_finite_differences():
    """With the mask fixed (finetune), the bounds are piecewise smooth in the raw weights and biases: central
    differences in float64 are a reference that shares no code with either gradient path."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = masking.apply_masks(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), 0.5)
        masking.set_phase(model, "finetune")
        x, y = torch.rand(3, 4), torch.tensor([0, 1, 2])
        proxy = BoundedProxy(model, x)

        def objective():
            return bound_loss(*proxy.margin_lower_bounds_many(x, y, 0.1, ["IBP", "CROWN"]))

        objective().backward()
        step = 1e-6
        trained = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        assert len(trained) == 4  # raw weights and biases; the scores are frozen
        for name, param in trained:
            numeric = torch.zeros_like(param).view(-1)
            flat = param.detach().view(-1)
            with torch.no_grad():
                for i in range(flat.numel()):
                    flat[i] += step
                    up = objective()
                    flat[i] -= 2 * step
                    down = objective()
                    flat[i] += step
                    numeric[i] = (up - down) / (2 * step)
            assert numeric.abs().max() > 0, name
            assert torch.allclose(param.grad, numeric.view_as(param), atol=1e-6, rtol=1e-4), name
    finally:
        torch.set_default_dtype(default)


def test_bounding_keeps_no_batch_sized_state_and_the_gradient_does_not_need_it(monkeypatch):
    """auto_LiRPA leaves every node's bounds and A matrices behind; the proxy drops them (memory held between steps)
    and the chained gradient is exactly the one computed with them kept."""
    def score_gradient():
        torch.manual_seed(0)
        model = masking.apply_masks(create_model("cnn-small", image_size=12), 0.2)
        masking.set_phase(model, "prune")
        x, y = torch.rand(4, 1, 12, 12), torch.randint(0, 10, (4,))
        proxy = BoundedProxy(model, x)
        ibp, crown_ibp = proxy.margin_lower_bounds_many(x, y, EPS, ["IBP", "CROWN-IBP"])
        left = [(node.name, attr) for node in proxy.bounded._modules.values()
                for attr in ("lower", "upper", "interval", "forward_value", "d", "lA", "lower_d") if hasattr(node, attr)]
        (torch.nn.functional.softplus(-ibp).sum() + crown_ibp.square().mean()).backward()
        return left, [p.grad for p in model.parameters() if p.requires_grad]

    left, released = score_gradient()
    assert left == []
    monkeypatch.setattr(BoundedProxy, "_release_node_state", lambda self: None)
    left, kept = score_gradient()
    assert left  # without the release the state is there
    assert all(torch.equal(a, b) for a, b in zip(released, kept))


def test_no_gradient_leaks_without_grad_mode():
    model = masking.apply_masks(create_model("cnn-small", image_size=12), 0.2)
    x, y = torch.rand(2, 1, 12, 12), torch.tensor([1, 2])
    with torch.no_grad():
        bounds = BoundedProxy(model, x).margin_lower_bounds(x, y, EPS, "IBP")
    assert not bounds.requires_grad


def test_the_proof_box_never_is_narrower_than_the_real_ball_nor_the_counterexample_box_wider():
    """x ± eps rounds to the nearest float32; a bound over a box half an ulp too narrow could prove a false claim."""
    x = torch.rand(10_000)
    exact_low, exact_up = (x.double() - 0.1).clamp(0, 1), (x.double() + 0.1).clamp(0, 1)
    low, up = input_box(x, 0.1)
    inner_low, inner_up = input_box(x, 0.1, outward=False)
    assert low.dtype == torch.float32 and (low.double() <= exact_low).all() and (up.double() >= exact_up).all()
    assert (inner_low.double() >= exact_low).all() and (inner_up.double() <= exact_up).all()
    assert (low < (x - 0.1).clamp(0, 1)).any()  # float32 arithmetic alone would have been narrower somewhere
    assert ((inner_low - low) <= 2 * torch.finfo(torch.float32).eps).all()  # one ulp apart at most
