"""Specification of the export to ONNX + VNN-LIB (certprune.certify.export and ``certprune export``).

Run directories are made here from random masked models (nothing is trained); onnxruntime and a small VNN-LIB
parser written below check the files independently of the code that wrote them."""
import math
import os
import re
from fractions import Fraction

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from certprune import masking, runs
from certprune.certify import export
from certprune.cli_export import export as export_command
from certprune.data import load_dataset
from certprune.models import MODELS, VERIFIABLE, create_model
from certprune.models.layers import normalize


@pytest.fixture(scope="module")
def mnist():
    data = load_dataset("mnist-embedded")
    return data.test_x, data.test_y


def make_run(run_dir, name, k=None, **kwargs):
    """A run directory holding a random model (masked to a fraction k, batch-norm statistics randomised)."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.uniform_(-0.5, 0.5)
    if k is not None:
        masking.apply_masks(model, k=k)
    runs.save_model(model, run_dir / runs.MODEL_FILE, {"name": name, "kwargs": kwargs})
    return model


def onnx_logits(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name,kwargs,images", [("cnn-small", {}, 256), ("cnn-large", {}, 32), ("cnn-7layer", {}, 16),
                                                 ("resnet-18", {"in_channels": 1, "image_size": 8}, 16)])
def test_onnxruntime_logits_equal_load_runs(tmp_path, mnist, name, kwargs, images):
    assert set(VERIFIABLE) <= {"cnn-small", "cnn-large", "cnn-7layer"}, "a new VERIFIABLE model needs a case here"
    make_run(tmp_path / "run", name, k=0.1 if name in ("cnn-small", "cnn-large") else None, **kwargs)  # masking
    # cnn-7layer's 13M weights would double the test's time; the zero-weight test below covers masked models
    model = runs.load_run(tmp_path / "run")
    if name in VERIFIABLE:  # MNIST test images (cnn-7layer costs 0.1 GMAC each on 2 CPU cores)
        x, y = mnist[0][:images], mnist[1][:images]
    else:
        x, y = torch.rand(images, 1, 8, 8), torch.randint(0, 10, (images,))
        x[0], x[1] = 0.0, 1.0
    summary = export.export_run(model, x, y, tmp_path / "out", 0.1, [0], 60)
    with torch.no_grad():
        expected = model(x).numpy()
    got = onnx_logits(tmp_path / "out" / "model.onnx", x)  # the whole batch: the batch dimension is dynamic
    assert np.abs(got - expected).max() <= 1e-5
    assert summary["opset"] == export.OPSET == onnx.load(tmp_path / "out" / "model.onnx").opset_import[0].version


def test_zero_weights_in_the_onnx_file_are_the_pruned_count(tmp_path, mnist):
    k = 0.05
    masked = make_run(tmp_path / "run", "cnn-small", k=k)
    pruned = sum(layer.weight.numel() - masking.num_kept(k, layer.weight.numel())
                 for _, layer in masking.prunable_layers(masked))
    x, y = mnist
    for source, out in ((runs.load_run(tmp_path / "run"), "plain"), (masked, "masked")):
        summary = export.export_run(source, x, y, tmp_path / out, 0.1, [0], 60)
        proto = onnx.load(tmp_path / out / "model.onnx")
        zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in proto.graph.initializer
                    if t.name.endswith("weight"))
        assert zeros == summary["zero_weights"] == pruned, out


# -- an independent VNN-LIB reader -------------------------------------------------------------------------------
def parse_vnnlib(text):
    """``(inputs, outputs, lower, upper, disjunction)``: declared names, the X bounds as strings, and the
    ``(Y_a, Y_b)`` pairs of ``(or (and (>= Y_a Y_b)) ...)``."""
    tokens = re.findall(r"\(|\)|[^\s()]+", re.sub(r";[^\n]*", "", text))
    stack, top = [[]], None
    for token in tokens:
        if token == "(":
            stack.append([])
        elif token == ")":
            top = stack.pop()
            stack[-1].append(top)
        else:
            stack[-1].append(token)
    declared, lower, upper, disjunction = [], {}, {}, None
    for form in stack[0]:
        if form[0] == "declare-const":
            assert form[2] == "Real"
            declared.append(form[1])
            continue
        assert form[0] == "assert", form
        body = form[1]
        if body[0] == "or":
            assert disjunction is None
            disjunction = []
            for term in body[1:]:
                assert term[0] == "and" and len(term) == 2 and term[1][0] == ">="
                disjunction.append((term[1][1], term[1][2]))
        else:
            operator, name, value = body
            assert re.fullmatch(r"\d+\.\d+", value), value  # SMT-LIB decimals: no exponent, no sign
            bounds = upper if operator == "<=" else lower
            assert operator in ("<=", ">=") and name not in bounds
            bounds[name] = value
    inputs = [name for name in declared if name.startswith("X_")]
    outputs = [name for name in declared if name.startswith("Y_")]
    return inputs, outputs, lower, upper, disjunction


@pytest.mark.parametrize("eps,exact", [("8/255", Fraction(8, 255)), (0.1, Fraction(0.1))])
def test_vnnlib_states_the_clipped_box_rounded_outward_and_the_unsafe_disjunction(tmp_path, mnist, eps, exact):
    make_run(tmp_path / "run", "cnn-small")
    x, y = mnist
    indices = [0, 7, 1499]
    export.export_run(runs.load_run(tmp_path / "run"), x, y, tmp_path / "out", eps, indices, 60)
    clipped = 0
    for index in indices:
        text = (tmp_path / "out" / "vnnlib" / f"prop_{index}.vnnlib").read_text()
        inputs, outputs, lower, upper, disjunction = parse_vnnlib(text)
        assert inputs == [f"X_{i}" for i in range(784)] and outputs == [f"Y_{j}" for j in range(10)]
        assert set(lower) == set(upper) == set(inputs)
        for i, pixel in enumerate(x[index].flatten().tolist()):
            low = max(Fraction(0), Fraction(pixel) - exact)
            high = min(Fraction(1), Fraction(pixel) + exact)
            stated_low, stated_high = lower[f"X_{i}"], upper[f"X_{i}"]
            # contains the exact box, read exactly and read as a double; wider by at most about a double ulp
            assert Fraction(stated_low) <= low and Fraction(float(stated_low)) <= low
            assert Fraction(stated_high) >= high and Fraction(float(stated_high)) >= high
            assert low - Fraction(stated_low) <= 2 * Fraction(math.ulp(float(low)))
            assert Fraction(stated_high) - high <= 2 * Fraction(math.ulp(float(high)))
            clipped += (low == 0) + (high == 1)
        label = f"Y_{int(y[index])}"
        assert sorted(disjunction) == sorted((name, label) for name in outputs if name != label)
        assert len(disjunction) == 9
    assert clipped > 0  # the images' 0 and 1 pixels exercise the clipping


def test_cli_writes_instances_readme_and_the_chosen_properties(tmp_path):
    make_run(tmp_path / "run", "cnn-small", k=0.1)
    result = CliRunner().invoke(export_command, ["--from", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                                                 "--eps", "8/255", "--max", "3", "--skip", "5", "--timeout", "60"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "vnnlib").iterdir()) == ["prop_0.vnnlib", "prop_10.vnnlib", "prop_5.vnnlib"]
    assert (out / "instances.csv").read_text() == "".join(
        f"model.onnx,vnnlib/prop_{i}.vnnlib,60\n" for i in (0, 5, 10))
    readme = (out / "README.md").read_text()
    assert f"opset {export.OPSET}" in readme and "8/255" in readme and "instances.csv" in readme
    written = [p for p in out.rglob("*") if p.is_file()]
    mask = os.umask(0)
    os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o666 & ~mask)}  # as a plain open() gives


class Cosine(nn.Module):
    def forward(self, x):
        return torch.cos(x)


class Spectrum(nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x, dim=1).abs()


UNEXPORTABLE = {  # registered only inside the test (tests elsewhere parametrize over the whole registry)
    "test-export-cos": lambda **_: nn.Sequential(normalize(1, None, None), nn.Flatten(), nn.Linear(784, 10),
                                                 Cosine(), nn.Linear(10, 10)),
    "test-export-fft": lambda **_: nn.Sequential(normalize(1, None, None), nn.Flatten(), nn.Linear(784, 18),
                                                 Spectrum()),
}


@pytest.mark.parametrize("name,args,message", [
    ("cnn-small", ["--max", "0"], "--max must be a positive number"),
    ("cnn-small", ["--out-is-a-file"], "is a file"),
    ("test-export-cos", [], "Cos"),  # ONNX has Cos; verifiers of piecewise-linear networks do not take it
    ("test-export-fft", [], "ONNX export cannot express"),
])
def test_bad_input_is_a_one_line_error_before_any_file_is_written(tmp_path, monkeypatch, name, args, message):
    if name in UNEXPORTABLE:
        monkeypatch.setitem(MODELS, name, UNEXPORTABLE[name])
    make_run(tmp_path / "run", name)
    out = tmp_path / "out"
    if args == ["--out-is-a-file"]:
        out.write_text("keep me")
        args = []
    result = CliRunner().invoke(export_command, ["--from", str(tmp_path / "run"), "--out", str(out), *args])
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.startswith("Error: ") and result.output.strip().count("\n") == 0, result.output
    assert message in result.output
    assert (out.read_text() == "keep me") if out.is_file() else not out.exists()
