"""The proof rule on networks certprune did not write: each way a verifier could be fooled into "holds", shown on
the smallest network that does it, with the verdict every stage must (not) give.

Each network's truth is known in closed form; onnxruntime, not the importer, computes the reference logits.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from certprune.certify import milp, proof
from certprune.certify.cascade import Cascade
from certprune.certify.instances import Instance, verify_instances
from certprune.certify.milp_encoding import BoundsDisagree, network, tightened_bounds
from certprune.certify.onnx_import import load_onnx
from certprune.boxes import margin_spec, normalized_box
from certprune.lirpa import BoundedProxy
from certprune.models import Normalize

BOUND_STAGES = ("IBP", "CROWN-IBP", "CROWN", "alpha-CROWN")


def write_onnx(path, input_shape, nodes, constants) -> str:
    """A graph ``x -> nodes -> y`` with ``constants`` (name -> array) as initializers, as a foreign tool writes it."""
    graph = helper.make_graph(
        nodes, "foreign", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *input_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), name) for name, v in constants.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


def write_vnnlib(path, lower, upper, label, others) -> str:
    lines = [f"(declare-const X_{i} Real)" for i in range(len(lower))]
    lines += [f"(declare-const Y_{j} Real)" for j in range(2)]
    for i, (low, up) in enumerate(zip(lower, upper)):
        lines += [f"(assert (>= X_{i} {low}))", f"(assert (<= X_{i} {up}))"]
    lines.append("(assert (or " + " ".join(f"(and (>= Y_{j} Y_{label}))" for j in others) + "))")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def onnx_margin(path, point) -> float:
    logits = onnxruntime.InferenceSession(path).run(None, {"x": np.asarray(point, dtype=np.float32)[None]})[0][0]
    return float(logits[0] - logits[1])


@pytest.fixture
def negative_scale(tmp_path):
    """``y = [-(x1 + x2) + 1.5, 0]`` through a leading ``Mul`` by -1: the margin is 1.5 - x1 - x2, positive at the
    centre of [0, 1]^2 and -0.5 at its corner (1, 1)."""
    path = write_onnx(tmp_path / "negative.onnx", (1, 1, 2), [
        helper.make_node("Mul", ["x", "minus_one"], ["scaled"]),
        helper.make_node("Flatten", ["scaled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["y"], transB=1)],
        {"minus_one": -1.0, "w": [[1.0, 1.0], [0.0, 0.0]], "b": [1.5, 0.0]})
    return path, write_vnnlib(tmp_path / "p.vnnlib", [0, 0], [1, 1], 0, [1])


def test_a_negative_input_scale_is_violated_at_a_corner_and_no_stage_says_it_holds(negative_scale):
    path, vnnlib = negative_scale
    assert onnx_margin(path, [[[0.5, 0.5]]]) > 0 > onnx_margin(path, [[[1.0, 1.0]]])
    for stage in BOUND_STAGES:
        record, = verify_instances([Instance(Path(path), Path(vnnlib))], [stage])
        assert record["verdict"] == "unknown", stage
    record, = verify_instances([Instance(Path(path), Path(vnnlib))], [*BOUND_STAGES, "MILP"])
    assert record["verdict"] == "falsified"
    assert onnx_margin(path, record["counterexample"].numpy()) <= 0


def test_a_negative_scale_maps_the_box_to_ordered_ends_containing_the_exact_image():
    normalize = Normalize([0.1, -0.3], [-0.7, 0.3])
    lower = torch.rand(64, 2, 3, 3)
    upper = lower + torch.rand(64, 2, 3, 3)
    low, up = normalized_box(normalize, lower, upper)
    exact = [(end.double() - normalize.mean.double()) / normalize.std.double() for end in (lower, upper)]
    assert (low <= up).all()
    assert (low.double() <= torch.minimum(*exact)).all() and (up.double() >= torch.maximum(*exact)).all()


def test_the_normalised_box_never_loses_a_point_to_float32_rounding():
    """Re-rounding the box after the map could move an end inward by half a float32 step (1.7e-7 here)."""
    normalize = Normalize([0.1307], [0.3081])
    lower = torch.rand(10_000, 1, 1, 1)
    low, up = normalized_box(normalize, lower, lower)
    exact = (lower.double() - 0.1307) / 0.3081  # the float32 buffers' values, close enough to show the side
    exact = (lower.double() - normalize.mean.double()) / normalize.std.double()
    assert (low.double() <= exact).all() and (up.double() >= exact).all()


@pytest.mark.parametrize("std", [0.0, float("nan"), float("inf")])
def test_normalize_refuses_a_scale_no_verifier_can_bound_through(std):
    with pytest.raises(ValueError, match="finite non-zero stds"):
        Normalize([0.0], [std])


def test_the_importer_composes_leading_constants_into_one_normalize_equal_to_onnxruntime(tmp_path):
    path = write_onnx(tmp_path / "chain.onnx", (2, 2, 2), [
        helper.make_node("Sub", ["x", "mean"], ["a"]), helper.make_node("Div", ["a", "std"], ["b"]),
        helper.make_node("Mul", ["b", "scale"], ["c"]), helper.make_node("Add", ["c", "shift"], ["d"]),
        helper.make_node("Conv", ["d", "kernel", "bias"], ["e"]), helper.make_node("Mul", ["e", "post"], ["f"]),
        helper.make_node("Relu", ["f"], ["g"]), helper.make_node("Flatten", ["g"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["i"]), helper.make_node("Add", ["i", "b2"], ["y"])],
        {"mean": np.array([0.2, 0.6]).reshape(1, 2, 1, 1), "std": np.array([-0.5, 0.25]).reshape(1, 2, 1, 1),
         "scale": -3.0, "shift": np.array([1.0, -2.0]).reshape(2, 1, 1),
         "kernel": np.random.default_rng(0).normal(size=(3, 2, 1, 1)), "bias": [0.1, 0.2, 0.3],
         "post": np.array([-1.0, 2.0, -0.5]).reshape(3, 1, 1), "w": np.random.default_rng(1).normal(size=(12, 2)),
         "b2": [0.5, -0.5]})
    model, shape = load_onnx(path)
    assert sum(isinstance(layer, Normalize) for layer in model) == 1 and isinstance(model[0], Normalize)
    x = torch.rand(16, *shape)
    reference = onnxruntime.InferenceSession(path).run(None, {"x": x[:1].numpy()})[0]
    with torch.no_grad():
        assert np.allclose(model(x[:1]).numpy(), reference, atol=1e-5)


@pytest.mark.parametrize("op,value,message", [
    ("Div", 0.0, "Div by a zero constant"), ("Mul", 0.0, "Mul by a zero constant"),
    ("Mul", float("nan"), "not finite"), ("Div", 1e-45, "overflows or vanishes")])
def test_the_importer_refuses_a_scale_it_cannot_bound_through_in_one_line(tmp_path, op, value, message):
    path = write_onnx(tmp_path / "bad.onnx", (1, 1, 2), [
        helper.make_node(op, ["x", "c"], ["a"]), helper.make_node("Flatten", ["a"], ["y"])], {"c": value})
    with pytest.raises(ValueError, match=message) as error:
        load_onnx(path)
    assert "\n" not in str(error.value)


def test_a_constant_after_a_relu_is_refused_not_misplaced(tmp_path):
    path = write_onnx(tmp_path / "late.onnx", (1, 1, 2), [
        helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Mul", ["a", "c"], ["y"])], {"c": -2.0})
    with pytest.raises(ValueError, match="at the input or right after Conv, Gemm or MatMul, not after ReLU"):
        load_onnx(path)


def final_relu_net() -> nn.Sequential:
    """``relu(x - 1)`` and ``relu(-2)`` on x in [0, 1]: both logits are 0 everywhere, so "logit 0 > logit 1" fails
    everywhere, while the pre-ReLU interval says it holds by 1."""
    layer = nn.Linear(1, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0], [0.0]]))
        layer.bias.copy_(torch.tensor([-1.0, -2.0]))
    return nn.Sequential(layer, nn.ReLU())


def test_the_milp_reads_a_final_relu_output_not_its_input():
    outcome = milp.verify_box(final_relu_net(), torch.zeros(1), torch.ones(1), 0, None, 10.0)
    assert outcome.status == "falsified" and outcome.margin_lower_bound == 0.0


def test_a_final_relu_is_not_verified_by_any_stage():
    model = final_relu_net()
    cascade = Cascade(model, torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([0]))
    for stage in BOUND_STAGES:
        cascade.bound(stage, cascade.open(), 8)
    cascade.complete("MILP", cascade.open(), torch.full((len(cascade.lower),), 10.0))
    assert not cascade.stage.any() and cascade.falsified.all()


def false_property_net() -> nn.Sequential:
    """``[x, 0.5]`` on [0, 1]: "logit 0 > logit 1" is false for x <= 0.5."""
    layer = nn.Linear(1, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0], [0.0]]))
        layer.bias.copy_(torch.tensor([0.0, 0.5]))
    return nn.Sequential(layer)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_infinite_bound_proves_nothing_in_the_milp(bad):
    outcome = milp.verify_box(false_property_net(), torch.zeros(1), torch.ones(1), 0, None, 10.0,
                              margin_bounds=[bad])
    assert outcome.status == "falsified"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_infinite_bound_proves_nothing_in_a_bound_stage(monkeypatch, bad):
    monkeypatch.setattr(BoundedProxy, "box_spec_bounds", lambda self, low, up, spec, *a: [torch.full(
        (len(low), spec.shape[1]), bad, dtype=torch.float64)])
    cascade = Cascade(false_property_net(), torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([0]))
    cascade.bound("IBP", cascade.open(), 8)
    assert not cascade.stage.any() and cascade.margin[0] == float("-inf")
    cascade.complete("MILP", cascade.open(), torch.full((len(cascade.lower),), 10.0))
    assert cascade.falsified.all()


def test_a_bound_above_the_margin_at_the_centre_is_refused_and_said(monkeypatch, caplog):
    """A wrong bound stage (here: one that adds 1) is caught by the network's own margin at the box's centre."""
    honest = BoundedProxy.box_spec_bounds
    monkeypatch.setattr(BoundedProxy, "box_spec_bounds", lambda *a: [b + 1 for b in honest(*a)])
    cascade = Cascade(false_property_net(), torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([0]))
    with caplog.at_level(logging.WARNING, "certprune"):
        cascade.bound("IBP", cascade.open(), 8)
    assert not cascade.stage.any() and "prove nothing" in caplog.text


def test_a_bound_stage_needs_more_than_rounding_above_zero():
    """A margin of 5e-7 everywhere is positive, but no more than float rounding could make it: not a proof."""
    layer = nn.Linear(1, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([5e-7, 0.0]))
    cascade = Cascade(nn.Sequential(layer), torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([0]))
    cascade.bound("IBP", cascade.open(), 8)
    assert 0 < cascade.margin[0] < proof.BOUND_TOLERANCE and not cascade.stage.any()
    layer.bias.data[0] = 2 * proof.BOUND_TOLERANCE
    cascade = Cascade(nn.Sequential(layer), torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([0]))
    cascade.bound("IBP", cascade.open(), 8)
    assert cascade.stage.all()


def test_the_milp_needs_its_dual_bound_above_the_solver_tolerance(monkeypatch):
    layer = nn.Linear(1, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([5e-5, 0.0]))
    options = []
    solver = milp.milp
    monkeypatch.setattr(milp, "milp", lambda *a, **kw: options.append(kw["options"]) or solver(*a, **kw))
    outcome = milp.verify_box(nn.Sequential(layer), torch.zeros(1), torch.ones(1), 0, None, 10.0)
    assert outcome.status == "unknown" and outcome.margin_lower_bound == pytest.approx(5e-5)
    assert options and all(o[f"{kind}_feasibility_tolerance"] == proof.HIGHS_FEASIBILITY <= 1e-9
                           for o in options for kind in ("primal", "dual", "mip"))


def test_bounds_from_two_stages_that_do_not_overlap_prove_nothing():
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2))
    net = network(model, torch.zeros(1, 1))
    lower, upper = np.zeros(1), np.ones(1)
    exact = tightened_bounds(net, lower, upper)[0]
    far = [(torch.tensor(exact[1] + 10), torch.tensor(exact[1] + 11))]  # a "sound" stage's bounds, far off
    with pytest.raises(BoundsDisagree):
        tightened_bounds(net, lower, upper, far)
    outcome = milp.verify_box(model, torch.zeros(1), torch.ones(1), 0, None, 10.0, relu_bounds=far)
    assert outcome.status == "unknown" and outcome.stats["why"] == "bounds disagree"


def test_convolutions_with_unequal_pads_are_bounded_soundly():
    """auto_LiRPA 0.3's patches mode bounded this network's first output below 0.108 over a box holding a point where
    it is 0.048 (pads (0, 1), two boxes in the batch): such networks are bounded in matrix mode."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 1, 2, 2, (0, 1)), nn.ReLU(), nn.Conv2d(1, 2, 3, 1, 1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(12, 2)).eval()
    x = torch.rand(1, 1, 5, 5)
    lower, upper = torch.cat([torch.zeros(1, 1, 5, 5), x]), torch.cat([torch.ones(1, 1, 5, 5), x])
    proxy = BoundedProxy(model, lower[:1], torch.float64)
    bounds = proxy.box_spec_bounds(lower, upper, torch.eye(2)[None].expand(2, 2, 2), ["CROWN"])[0]
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())[0]  # the point box's true outputs, in float64
    assert proxy.conv_mode == "matrix" and (bounds[1] <= exact + 1e-9).all()
    assert BoundedProxy(nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1)), lower[:1]).conv_mode == "patches"


def test_convolutions_on_images_that_are_not_square_are_bounded_in_matrix_mode():
    """Patches mode failed (a storage error) on a 5x4 image with square convolutions; found by the fuzzer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3, 2, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6, 3)).eval()
    x = torch.rand(3, 1, 5, 4)
    proxy = BoundedProxy(model, x[:1], torch.float64)
    bounds = proxy.box_spec_bounds(x - 0.05, x + 0.05, margin_spec(model(x).argmax(1), 3), ["CROWN"])[0]
    samples = x[:, None] - 0.05 + 0.1 * torch.rand(3, 500, 1, 5, 4)
    with torch.no_grad():
        margins = torch.einsum("brc,bsc->bsr", margin_spec(model(x).argmax(1), 3),
                               model(samples.flatten(0, 1)).view(3, 500, 3)).min(1).values
    assert proxy.conv_mode == "matrix" and (bounds <= margins.double() + 1e-6).all()


def test_alpha_crown_bounds_small_networks_auto_lirpa_failed_on():
    """auto_LiRPA 0.3's sparse intermediate bounds failed an assertion in alpha-CROWN on about a tenth of small-MLP
    boxes; with them off, alpha-CROWN is at least CROWN and at most every sampled margin."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    lower = torch.rand(3, 4)
    upper = lower + 0.1
    spec = margin_spec(torch.tensor([0, 1, 2]), 3)
    proxy = BoundedProxy(model, lower[:1], torch.float64)
    alpha, crown = proxy.box_spec_bounds(lower, upper, spec, ["alpha-CROWN", "CROWN"], 5, 0.5)
    samples = lower[:, None] + 0.1 * torch.rand(3, 2000, 4)
    with torch.no_grad():
        sampled = torch.einsum("brc,bsc->bsr", spec, model(samples)).min(1).values.double()
    assert (alpha >= crown - 1e-12).all() and (alpha <= sampled + 1e-9).all()


def patches_mode_failure():
    """A small network with unequal conv strides and an image batch on which auto_LiRPA 0.3's patches mode, forced,
    fails an assertion (whether it does depends on the weights and the box)."""
    for seed in range(20):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=(2, 1), padding=(1, 0)), nn.ReLU(),
                              nn.Conv2d(2, 3, 2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)).eval()
        centre = torch.rand(4, 1, 4, 4)
        labels = model(centre).argmax(1)
        try:
            BoundedProxy(model, centre, torch.float64, "patches").box_spec_bounds(
                centre - 0.05, centre + 0.05, margin_spec(labels, 3), ["CROWN"])
        except AssertionError:
            return model, centre, labels
    raise AssertionError("no network of this shape trips auto_LiRPA's patches mode any more")


def test_a_network_auto_lirpas_patches_mode_cannot_bound_is_bounded_in_matrix_mode(monkeypatch):
    """Should patches mode fail an assertion on a network it is chosen for, the cascade bounds in matrix mode from
    then on, and its bounds are sound (at or below every sampled margin)."""
    model, centre, labels = patches_mode_failure()
    monkeypatch.setattr("certprune.lirpa._conv_mode", lambda model, example: "patches")
    cascade = Cascade(model, centre - 0.05, centre + 0.05, labels)
    cascade.bound("CROWN", cascade.open(), 8)
    assert cascade._proxy.conv_mode == "matrix" and torch.isfinite(cascade.margin).all()
    samples = centre[:, None] - 0.05 + 0.1 * torch.rand(4, 500, 1, 4, 4)
    with torch.no_grad():
        margins = torch.einsum("brc,bsc->bsr", cascade.spec, model(samples.flatten(0, 1)).view(4, 500, 3))
    assert (cascade.class_bounds <= margins.min(1).values.double() + 1e-9).all()


def test_the_solvers_own_prints_do_not_reach_the_user(monkeypatch, capfd):
    """HiGHS writes some diagnostics to the process's stdout, past Python (a stand-in writes to descriptor 1 as it
    does); they are dropped, while the solver's answer and the program's own output are kept."""
    solver = milp.milp

    def noisy(*args, **kwargs):
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
        return solver(*args, **kwargs)

    monkeypatch.setattr(milp, "milp", noisy)
    outcome = milp.verify_box(final_relu_net(), torch.zeros(1), torch.ones(1), 0, None, 10.0)
    print("after")
    assert outcome.status == "falsified" and capfd.readouterr().out == "after\n"


@pytest.mark.parametrize("stage", ["BaB", "MILP"])
def test_only_a_complete_stages_verified_outcome_marks_a_box_verified(stage):
    cascade = Cascade(false_property_net(), torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([0, 0]))
    cascade._record(0, milp.Outcome("unknown", 0.25, None, 1.5, {"why": "timeout"}), stage)
    cascade._record(1, milp.Outcome("verified", 0.5, None, 2.0, {}), stage)
    assert cascade.stage.tolist() == [0, 5 if stage == "BaB" else 6] and not cascade.falsified.any()
    assert cascade.margin.tolist() == [0.25, 0.5] and cascade.seconds.tolist() == [1.5, 2.0]
