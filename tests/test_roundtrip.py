"""Specification of the round trip (issue 13): ``certprune verify`` on an exported (model.onnx, prop.vnnlib) pair
gives the verdicts that verifying the run gives, and it reads VNN-LIB and ONNX faithfully and soundly.

Independent checks: onnxruntime for the network, exact fractions for the box, dense sampling inside each box for
the verdicts, and the run's own cascade (certprune.certify.verify.evaluate) for the round trip."""
import math
import types
from fractions import Fraction

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from certprune import masking
from certprune.certify import export, milp
from certprune.certify import instances
from certprune.certify.instances import read_instances, verify_instances
from certprune.certify.onnx_import import load_onnx
from certprune.certify.cascade import Cascade
from certprune.certify.verify import evaluate
from certprune.certify.vnnlib import parse_vnnlib
from certprune.data import load_dataset
from certprune.boxes import spec_of
from certprune.lirpa import BoundedProxy
from certprune.models import Normalize, create_model
from helpers import assert_one_line_error, run, trained_7x7

DECLARE = "".join(f"(declare-const X_{i} Real)\n" for i in range(3)) + "".join(
    f"(declare-const Y_{j} Real)\n" for j in range(4))
BOX = "(assert (<= X_0 0.1))\n(assert (>= X_0 0.1))\n(assert (>= 1e-1 X_1))\n(assert (<= (- 0.25) X_1))\n" \
      "(assert (and (>= X_2 -0.5) (<= X_2 .75)))\n"


def ort_logits(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


# -- (a) the VNN-LIB reader ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("output,label,others", [
    ("(assert (or\n  (and (>= Y_1 Y_0))\n  (and (<= Y_0 Y_3))\n))", 0, (1, 3)),  # our exporter's form, both orders
    ("(assert (or (>= Y_0 Y_2) (>= Y_3 Y_2) (>= Y_1 Y_2)))", 2, (0, 1, 3)),  # bare atoms
    ("(assert (<= Y_1 Y_2)) ; one threat only", 1, (2,)),
])
def test_the_reader_gives_the_exact_box_rounded_outward_and_the_classes_to_beat(output, label, others):
    prop = parse_vnnlib("; a comment (with parentheses\n" + DECLARE + BOX + output)
    assert (prop.label, prop.others, prop.num_outputs) == (label, others, 4)
    exact = [(Fraction("0.1"), Fraction("0.1")), (Fraction("-0.25"), Fraction("0.1")), (Fraction("-0.5"),
                                                                                      Fraction("0.75"))]
    for (low, high), got_low, got_high in zip(exact, prop.lower.tolist(), prop.upper.tolist()):
        assert Fraction(got_low) <= low and Fraction(got_high) >= high  # never narrower than the file's box
        assert low - Fraction(got_low) <= Fraction(float(np.spacing(np.float32(abs(got_low)))))  # by at most a float32 ulp
        assert Fraction(got_high) - high <= Fraction(float(np.spacing(np.float32(abs(got_high)))))
    assert prop.lower.dtype == torch.float32 and prop.lower[0] < prop.upper[0]  # X_0 = 0.1: a one-ulp box around it
    expected = torch.zeros(len(others), 4)
    expected[:, label] = 1
    expected[range(len(others)), list(others)] = -1
    assert torch.equal(prop.spec(), expected)


@pytest.mark.parametrize("output,line,fragment", [
    ("(assert (>= Y_1 Y_0))\n(assert (>= Y_2 Y_0))", 14, "conjunction of output constraints"),
    ("(assert (or (and (>= Y_1 Y_0) (>= Y_2 Y_0))))", 13, "conjunctions inside the disjunction"),
    ("(assert (or (> Y_1 Y_0)))", 13, "expected (<= a b) or (>= a b), got (> Y_1 Y_0)"),
    ("(assert (or (>= Y_1 Y_0) (>= Y_2 Y_3)))", 13, "several outputs"),
    ("(assert (>= Y_1 Y_7))", 13, "Y_7 is used before its declare-const"),
    ("(assert (>= Y_1 X_0))", 13, "only X_i <= c"),
])
def test_anything_else_is_a_one_line_error_naming_the_line(output, line, fragment):
    with pytest.raises(ValueError) as error:
        parse_vnnlib(DECLARE + BOX + output, "p.vnnlib")
    assert str(error.value).startswith(f"p.vnnlib line {line}: ") and fragment in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="X_2 needs both a lower and an upper bound"):
        parse_vnnlib(DECLARE + BOX.replace("(<= X_2 .75)", "") + "(assert (>= Y_1 Y_0))")


# -- (b) the ONNX reader --------------------------------------------------------------------------------------------
def test_an_exported_cnn_small_reads_back_to_onnxruntimes_logits(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn-small")
    masking.apply_masks(model, k=0.1)
    data = load_dataset("mnist-embedded")
    export.export_run(model, data.test_x, data.test_y, tmp_path, 0.1, [0], 60)
    converted, shape = load_onnx(tmp_path / "model.onnx")
    assert shape == (1, 28, 28) and isinstance(converted[0], Normalize)
    x = data.test_x[:128]
    with torch.no_grad():
        assert np.abs(converted(x).numpy() - ort_logits(tmp_path / "model.onnx", x)).max() <= 1e-5


def graph_file(path, nodes, initializers, input_shape, outputs=3):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])],
                              [numpy_helper.from_array(np.asarray(v, dtype=np.float32 if k != "shape" else np.int64),
                                                       k) for k, v in initializers.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_matmul_add_reshape_and_per_channel_constants_read_back_to_onnxruntimes_logits(tmp_path):
    rng = np.random.default_rng(0)
    chain = ["x", *(f"t{i}" for i in range(10)), "y"]
    ops = [("Sub", "mean"), ("Div", "std"), ("Mul", "scale"), ("Conv", "k"), ("Add", "conv_bias"), ("Relu", None),
           ("Reshape", "shape"), ("MatMul", "w"), ("Add", "b"), ("Relu", None), ("Gemm", "w2")]
    nodes = [helper.make_node(op, [chain[i]] + ([operand] if operand else []) + (["b2"] if op == "Gemm" else []),
                              [chain[i + 1]], **({"pads": [1] * 4} if op == "Conv" else {"alpha": 0.5, "transB": 1}
                                                 if op == "Gemm" else {})) for i, (op, operand) in enumerate(ops)]
    values = {"mean": [[[0.1]], [[0.2]]], "std": [[[0.3]], [[0.5]]], "scale": [2.0], "k": rng.normal(size=(3, 2, 3, 3)) / 3,
              "conv_bias": rng.normal(size=(3, 1, 1)), "shape": [-1, 48], "w": rng.normal(size=(48, 5)) / 7,
              "b": rng.normal(size=5), "w2": rng.normal(size=(3, 5)), "b2": rng.normal(size=3)}
    path = graph_file(tmp_path / "m.onnx", nodes, values, ["N", 2, 4, 4])
    model, shape = load_onnx(path)
    x = torch.rand(64, *shape)
    with torch.no_grad():
        assert np.abs(model(x).numpy() - ort_logits(path, x)).max() <= 1e-5
    assert [type(layer).__name__ for layer in model] == ["Normalize", "Conv2d", "ReLU", "Flatten", "Linear", "ReLU",
                                                         "Linear"]  # Sub, Div and Mul compose into one


@pytest.mark.parametrize("node,fragment", [
    (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2]), "op MaxPool at node 0 (unnamed) is not supported"),
    (helper.make_node("Add", ["x", "x"], ["y"]), "op Add at node 0 (unnamed) is not supported: the graph must be"),
])
def test_other_operators_are_a_one_line_error_naming_the_node(tmp_path, node, fragment):
    with pytest.raises(ValueError) as error:
        load_onnx(graph_file(tmp_path / "m.onnx", [node], {}, ["N", 1, 4, 4]))
    assert fragment in str(error.value) and "\n" not in str(error.value)


# -- (c) the round trip ---------------------------------------------------------------------------------------------
EPS = 0.03


@pytest.fixture(scope="module")
def trained():
    """A conv net trained for a second on 7x7 MNIST (average-pooled): at EPS, images of every verdict."""
    model, x, y = trained_7x7()
    return model, x[:20], y[:20]


def run_verdicts(records):
    """A run's verdict per image; a misclassified image's property is violated (the image is a counterexample)."""
    return ["verified" if r["verified_by"] else "falsified" if r["falsified"] or r["prediction"] != r["label"]
            else "unknown" for r in records]


def test_verifying_the_exported_pairs_gives_the_runs_verdicts(tmp_path, trained):
    model, x, y = trained
    settings = types.SimpleNamespace(eps=EPS, bound_methods=["IBP", "CROWN", "MILP"], batch_size=16, timeout=5.0,
                                     alpha_iterations=3, alpha_lr=0.5)
    expected = run_verdicts(evaluate(model, x, y, settings)["_per_image"])
    assert {"verified", "falsified"} <= set(expected)  # and images with clipped pixels (0 background)
    export.export_run(model, x, y, tmp_path, EPS, range(len(x)), 5)
    records = verify_instances(read_instances(tmp_path / "instances.csv"), ["IBP", "CROWN", "MILP"])
    assert [r["verdict"] for r in records] == expected
    assert {r["result"] for r in records} <= {"holds", "violated"}
    for index, record in enumerate(records):  # every counterexample, checked by onnxruntime in the exact box
        if record["verdict"] == "falsified":
            found = record["counterexample"][None]
            stated = export.box_texts(x[index], export.exact_eps(EPS))  # what the file says, exactly
            assert all(Fraction(low) <= Fraction(value) <= Fraction(high)
                       for (low, high), value in zip(stated, found.flatten().tolist()))
            logits = ort_logits(tmp_path / "model.onnx", found)[0]
            assert np.delete(logits, int(y[index])).max() >= logits[int(y[index])] - 1e-5


# -- (d) soundness on arbitrary boxes -----------------------------------------------------------------------------
def test_a_box_the_samples_falsify_is_never_verified_and_proven_margins_hold_at_every_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    for layer in model[::2]:
        nn.init.normal_(layer.weight, std=1.0), nn.init.normal_(layer.bias, std=0.5)
    centre, width = torch.rand(24, 4), torch.rand(24, 4) * 0.3
    width[::4, 1] = 0  # degenerate sides
    lower, upper = centre - width * torch.rand(24, 4), centre + width * torch.rand(24, 4)  # not symmetric
    labels = model(centre).argmax(1)
    others = [[j for j in range(4) if j != int(label)][: 1 + i % 3] for i, label in enumerate(labels)]
    spec = spec_of(labels, others, 4)
    proxy = BoundedProxy(model, lower[:1])
    ibp, crown = proxy.box_spec_bounds(lower, upper, spec, ["IBP", "CROWN"])
    samples = lower[:, None] + torch.rand(24, 4000, 4) * (upper - lower)[:, None]
    with torch.no_grad():
        margins = torch.einsum("nkc,nsc->nsk", spec, model(samples))  # rows past len(others) repeat the first
    kinds = set()
    for i in range(24):
        sampled = margins[i].min(0).values  # per row
        falsified_by_sampling = bool((sampled <= 0).any())
        outcome = milp.verify_box(model, lower[i], upper[i], int(labels[i]), others[i], time_limit=10.0)
        kinds.add((outcome.status, falsified_by_sampling))
        for bound in (ibp[i], crown[i]):
            assert (bound <= sampled + 1e-5).all()  # every proven margin holds at every sample
        if outcome.status == "falsified":  # its counterexample violates this property (its classes) in its box
            found = outcome.counterexample
            assert ((found >= lower[i]) & (found <= upper[i])).all()
            assert float((spec[i] @ model(found[None])[0]).min().detach()) <= 0
        if falsified_by_sampling:
            assert outcome.status == "falsified" and outcome.margin_lower_bound <= 0
        else:
            assert outcome.status != "unknown"
            if outcome.status == "verified":
                assert outcome.margin_lower_bound <= float(sampled.min()) + 1e-5
    assert ("verified", False) in kinds and ("falsified", True) in kinds


# -- (e) bad input --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained):
    model, x, y = trained
    out = tmp_path_factory.mktemp("exported")
    export.export_run(model, x, y, out, EPS, [0, 1], 5)
    (out / "strict.vnnlib").write_text((out / "vnnlib" / "prop_0.vnnlib").read_text().replace(">= Y_", "> Y_"))
    return out


@pytest.mark.parametrize("args,fragment", [
    (["--onnx", "missing.onnx", "--vnnlib", "vnnlib/prop_0.vnnlib"], "missing.onnx does not exist"),
    (["--onnx", "model.onnx", "--vnnlib", "vnnlib/prop_9.vnnlib"], "prop_9.vnnlib does not exist"),
    (["--onnx", "model.onnx"], "--onnx needs at least one --vnnlib"),
    (["--vnnlib", "vnnlib/prop_0.vnnlib"], "--vnnlib needs --onnx"),
    (["--from", "run", "--instances", "instances.csv"], "--from and --instances exclude each other"),
    (["--instances", "instances.csv", "--eps", "0.1"], "--eps does not apply"),
    (["--instances", "instances.csv", "--method", "PGD"], "unknown verification method PGD"),
    (["--instances", "instances.csv", "--max", "0"], "--max must be positive"),
    (["--instances", "instances.csv", "--restart"], "--restart needs --out"),
    (["--instances", "instances.csv", "--out", "instances.csv"], "holds verdicts of other settings or is not a verdict"),
    (["--onnx", "model.onnx", "--vnnlib", "strict.vnnlib"], "strict.vnnlib line "),
    ([], "--from is required"),
])
def test_bad_input_is_a_one_line_error(exported, monkeypatch, args, fragment):
    monkeypatch.chdir(exported)
    assert_one_line_error(run("verify", *args), fragment)


def test_the_command_prints_and_writes_one_verdict_per_property(exported, monkeypatch):
    monkeypatch.chdir(exported)
    result = run("verify", "--instances", "instances.csv", "--method", "IBP", "--out", "verdicts.tsv", "--restart")
    assert result.exit_code == 0, result.output
    lines = (exported / "verdicts.tsv").read_text().splitlines()
    assert lines[0] == "# certprune verify: methods IBP; time limit per instance each instance's own, else 10 s; batch 256"
    assert lines[1].split("\t")[:5] == ["instance", "verdict", "verified_by", "margin_lower_bound", "seconds"]
    assert sorted(line.split("\t")[0] for line in lines[2:]) == ["vnnlib/prop_0.vnnlib", "vnnlib/prop_1.vnnlib"]
    assert result.stdout.startswith("\n".join(lines[1:])) and "# 2 properties:" in result.stdout
    assert math.isfinite(float(lines[2].split("\t")[3]))


def test_a_stopped_run_keeps_its_verdicts_and_a_rerun_decides_only_the_rest(exported, monkeypatch):
    """Each verdict is on disk the moment it is decided: stopped after the first, the file holds that line, and the
    same command then verifies only the other instance and reports both."""
    monkeypatch.chdir(exported)
    args = ("verify", "--instances", "instances.csv", "--method", "IBP", "--out", "stopped.tsv")
    real = instances.VerdictFile.add

    def stop_after_one(self, record):
        real(self, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(instances.VerdictFile, "add", stop_after_one)
    assert run(*args).exit_code != 0
    first = (exported / "stopped.tsv").read_text().splitlines()
    assert len(first) == 3
    monkeypatch.setattr(instances.VerdictFile, "add", real)
    decided = []
    monkeypatch.setattr(instances, "verify_instances", lambda todo, *a, **k: decided.extend(todo) or original(
        todo, *a, **k))
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert len(decided) == 1 and str(decided[0].vnnlib) != first[2].split("\t")[0]
    lines = (exported / "stopped.tsv").read_text().splitlines()
    assert lines[:3] == first and len(lines) == 4 and "(1 kept from stopped.tsv)" in result.stdout
    assert "other settings" in run(*args[:-2], "--method", "CROWN", "--out", "stopped.tsv").output


original = instances.verify_instances


def test_one_time_limit_covers_all_of_an_instances_stages(exported, monkeypatch):
    """VNN-COMP's rule: the complete stage gets what the earlier stages left of the instance's limit, nothing when
    they used it all."""
    chosen = read_instances(exported / "instances.csv")
    given = []
    monkeypatch.setattr(instances.Cascade, "complete", lambda self, method, todo, limits, *a: given.append(
        float(limits[todo].min())))
    monkeypatch.setattr(instances.Cascade, "bound", lambda self, method, todo, *a: self.seconds.__setitem__(
        todo, self.seconds[todo] + 4.0))  # each bound stage takes 4 s of every open instance's time
    records = verify_instances(chosen, ["IBP", "CROWN", "MILP"], timeout=10.0)
    assert given == [pytest.approx(2.0, abs=0.5)] * len(chosen)
    records = verify_instances(chosen, ["IBP", "CROWN", "alpha-CROWN", "MILP"], timeout=10.0)
    assert all(limit <= 0 for limit in given[len(chosen):]) and {r["verdict"] for r in records} == {"unknown"}


def test_branch_and_bound_in_the_cascade_agrees_with_the_milp_on_every_image_both_decide(trained):
    """The two complete stages answer the same question by different algorithms: where both decide an image, they
    agree; each counterexample is in the ball and misclassified; BaB leaves no image the MILP decides open."""
    model, x, y = trained
    verdicts = {}
    for stage in ("BaB", "MILP"):
        settings = types.SimpleNamespace(eps=EPS, bound_methods=["IBP", stage], batch_size=16, timeout=5.0,
                                         alpha_iterations=3, alpha_lr=0.5)
        figures = evaluate(model, x, y, settings)
        verdicts[stage] = run_verdicts(figures["_per_image"])
        for index, found in zip(figures["_counterexample_index"], figures["_counterexamples"]):
            assert ((found.double() - x[index].double()).abs() <= EPS).all()
            with torch.no_grad():
                assert model(found[None]).argmax(1) != y[index]
        if stage == "BaB":
            assert {r["verified_by"] for r in figures["_per_image"]} <= {"", "IBP", "BaB"}
            assert {"verified", "falsified"} <= set(verdicts["BaB"])
    both = [(b, m) for b, m in zip(verdicts["BaB"], verdicts["MILP"]) if "unknown" not in (b, m)]
    assert both and all(b == m for b, m in both)
    assert not any(b == "unknown" and m != "unknown" for b, m in zip(verdicts["BaB"], verdicts["MILP"]))


def test_the_complete_stages_share_each_images_timeout(trained, monkeypatch):
    model, x, y = trained
    given = {}

    def complete(self, method, todo, limits, *args):
        given[method] = limits[todo].clone()
        self.seconds[todo] += 3.0  # each complete stage spends 3 s of every open image's time

    monkeypatch.setattr(Cascade, "complete", complete)
    settings = types.SimpleNamespace(eps=EPS, bound_methods=["IBP", "BaB", "MILP"], batch_size=16, timeout=5.0,
                                     alpha_iterations=3, alpha_lr=0.5)
    evaluate(model, x, y, settings)
    assert (given["BaB"] == 5.0).all() and (given["MILP"] == 2.0).all()


def test_an_instance_left_unknown_by_the_last_complete_stage_is_written_before_the_next_starts(exported,
                                                                                               monkeypatch):
    chosen = read_instances(exported / "instances.csv")
    seen, order = [], []
    monkeypatch.setattr(instances.Cascade, "complete", lambda self, method, todo, *a: order.append(len(seen)))
    verify_instances(chosen, ["IBP", "MILP"], timeout=5.0, on_record=lambda record: seen.append(record["verdict"]))
    assert order == list(range(len(chosen)))  # each instance's line is out before the next one's stage starts
    assert seen == ["unknown"] * len(chosen)
