"""Export a run for external complete verifiers (alpha,beta-CROWN and the other VNN-COMP entrants): the network as
ONNX and one local-robustness property per test image as VNN-LIB 1.0, laid out as VNN-COMP benchmarks ship them.

``OUT/model.onnx``: the plain model ``load_run`` gives (masks folded, pruned weights exactly 0, the input
normalisation inside), opset 13, a dynamic batch dimension. It is written by torch's TorchScript exporter
(``dynamo=False``): that one needs only ``onnx``, while the torch.export-based one also needs ``onnxscript``; the
exporter folds eval-mode batch norm into the convolution before it, so zeros stay zeros. Only operators that
piecewise-linear verifiers read are allowed (:data:`VERIFIER_OPS`); anything else is a one-line error.

``OUT/vnnlib/prop_<index>.vnnlib``: ``X_i`` are the image's pixels flattened in (C, H, W) order, ``Y_j`` the logits.
The input box is ``[max(0, x - eps), min(1, x + eps)]`` per pixel, computed exactly (the pixel's float32 value and
eps as a fraction, so ``8/255`` is 8/255, not its nearest double) and printed outward: each lower bound is a decimal
that is <= the exact bound both read exactly and read as the nearest double (and likewise >= for upper bounds), so
the stated box always contains the real one and exceeds it by at most about one double ulp. The property asserts
the unsafe set, "some other logit >= the label's logit", as a disjunction: a verifier that proves it unsatisfiable
has proved the image robust. ``OUT/instances.csv``: ``model.onnx,vnnlib/prop_<index>.vnnlib,<timeout>`` rows, no
header. ``OUT/README.md`` says what the files are and how they were made.

Everything that can be refused (arguments, the output path, the model's layers) is checked before any file is
written; each file is written to a temporary name and renamed.
"""
from __future__ import annotations

import io
import math
import warnings
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from certprune import masking
from certprune.atomic import atomic_write_bytes
from certprune.attacks import eval_mode, parse_eps

OPSET = 13
INPUT, OUTPUT = "input", "output"
# The operators of feed-forward ReLU networks with conv, pooling and (folded) batch norm, which VNN-COMP
# verifiers accept; the exporter's shape plumbing (Shape, Gather, ...) is allowed as it is constant.
VERIFIER_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Concat", "Constant", "Conv", "Div", "Flatten", "Gather", "Gemm",
    "GlobalAveragePool", "Identity", "MatMul", "MaxPool", "Mul", "Pad", "Relu", "Reshape", "Shape", "Squeeze",
    "Sub", "Transpose", "Unsqueeze"})
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def exact_eps(eps) -> Fraction:
    """eps as an exact fraction: ``"8/255"`` stays 8/255; a float is its exact binary value. Checked >= 0."""
    parse_eps(eps)  # the one-line errors for bad values
    return Fraction(str(eps).replace(" ", "")) if isinstance(eps, str) else Fraction(float(eps))


def bound_text(value: Fraction, down: bool) -> str:
    """A plain decimal (no exponent, as SMT-LIB wants) for a box bound, rounded outward: read exactly or as the
    nearest double, it is <= ``value`` (``down``) or >= ``value`` (not ``down``)."""
    candidate, step = float(value), (-math.inf if down else math.inf)
    while True:
        text = repr(candidate)
        exact, as_double = Fraction(text), Fraction(candidate)  # float(text) == candidate: repr round-trips
        if (max(exact, as_double) <= value) if down else (min(exact, as_double) >= value):
            return format(Decimal(text), "f")
        candidate = math.nextafter(candidate, step)


def box_texts(image: torch.Tensor, eps: Fraction) -> list[tuple[str, str]]:
    """``(lower, upper)`` text per pixel of ``image`` (flattened): ``x -+ eps`` clipped to [0, 1], rounded outward."""
    cache: dict[float, tuple[str, str]] = {}  # images have few distinct pixel values (256 for 8-bit data)
    texts = []
    for value in image.detach().cpu().flatten().tolist():
        if value not in cache:
            pixel = Fraction(value)
            cache[value] = (bound_text(max(Fraction(0), pixel - eps), True),
                            bound_text(min(Fraction(1), pixel + eps), False))
        texts.append(cache[value])
    return texts


def vnnlib_text(image: torch.Tensor, label: int, num_classes: int, eps: Fraction, comment: str = "") -> str:
    """The VNN-LIB 1.0 property of one image: its input box, and the unsafe set as a disjunction over classes."""
    box = box_texts(image, eps)
    lines = [f"; {line}" for line in comment.splitlines()]
    lines += [f"(declare-const X_{i} Real)" for i in range(len(box))]
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_classes)]
    lines.append("; input box: x -+ eps clipped to [0, 1], bounds rounded outward")
    for i, (lower, upper) in enumerate(box):
        lines += [f"(assert (<= X_{i} {upper}))", f"(assert (>= X_{i} {lower}))"]
    lines.append(f"; unsafe: some other logit >= the logit of label {label}")
    lines.append("(assert (or")
    lines += [f"    (and (>= Y_{j} Y_{label}))" for j in range(num_classes) if j != label]
    lines.append("))")
    return "\n".join(lines) + "\n"


def onnx_model(model: nn.Module, sample: torch.Tensor):
    """The model as a checked ONNX ModelProto (opset 13, dynamic batch), or a one-line ValueError when ONNX or the
    verifiers cannot express one of its layers."""
    try:
        import onnx
    except ImportError:
        raise ValueError("exporting needs the onnx package: pip install onnx") from None
    plain = masking.dense_copy(model) if any(masking.is_masked(m) for m in model.modules()) else model
    buffer = io.BytesIO()
    with eval_mode(plain), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        try:
            sample = sample[:1].detach().to(next(plain.parameters()).device)
            torch.onnx.export(plain, sample, buffer, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=[OUTPUT], do_constant_folding=True,
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        except Exception as error:  # the exporter raises many types for an operator it cannot express
            raise ValueError(f"ONNX export cannot express this model: {_one_line(error)}") from None
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    unsupported = sorted({node.op_type for node in proto.graph.node} - VERIFIER_OPS)
    if unsupported:
        raise ValueError(f"the model needs the ONNX operator(s) {', '.join(unsupported)}, which VNN-LIB verifiers "
                         f"do not take (allowed: {', '.join(sorted(VERIFIER_OPS))})")
    if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
        raise ValueError("a VNN-LIB property needs a model with one input and one output")
    return proto


def onnx_weight_zeros(proto) -> tuple[int, int]:
    """``(exactly-zero entries, entries)`` of the weight initializers of Conv / Gemm / MatMul nodes."""
    from onnx import numpy_helper

    weights = {node.input[1] for node in proto.graph.node if node.op_type in WEIGHT_OPS and len(node.input) > 1}
    arrays = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.name in weights]
    return sum(int((a == 0).sum()) for a in arrays), sum(a.size for a in arrays)


def model_weight_zeros(model: nn.Module) -> tuple[int, int]:
    """``(exactly-zero weights, weights)`` of the model's Conv2d / Linear layers (its pruned count)."""
    layers = [layer for _, layer in masking.prunable_layers(model)]
    return sum(int((l.weight == 0).sum()) for l in layers), sum(l.weight.numel() for l in layers)


def check_output_dir(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a directory")
    for parent in out_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out {out_dir} lies under the file {parent}")
    return out_dir


def export_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, out_dir: str | Path, eps,
               indices: Sequence[int], timeout: float = 300.0, source: str = "") -> dict[str, Any]:
    """Write ``model.onnx``, ``vnnlib/prop_<index>.vnnlib`` for each test image ``x[index]`` (labels ``y``),
    ``instances.csv`` and ``README.md`` into ``out_dir``; returns a summary. ``eps``: a number or a fraction string
    (L-inf, pixel space); ``timeout``: seconds per instance in instances.csv; ``source``: for README.md."""
    out_dir, exact = check_output_dir(out_dir), exact_eps(eps)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("no test images chosen: --max must be a positive number of images")
    if any(i < 0 or i >= len(x) for i in indices):
        raise ValueError(f"test image indices must lie in [0, {len(x)}), got {min(indices)}..{max(indices)}")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"--timeout must be a positive number of seconds, got {timeout!r}")
    chosen = x[indices].detach().cpu().float()
    if chosen.min() < 0 or chosen.max() > 1:
        raise ValueError("the test images must lie in [0, 1] (the model takes pixels; normalisation is inside)")
    proto = onnx_model(model, chosen)
    zeros, total = onnx_weight_zeros(proto)
    pruned, weights = model_weight_zeros(masking.dense_copy(model) if any(
        masking.is_masked(m) for m in model.modules()) else model)
    if zeros < pruned:  # batch-norm folding can only add zeros (a zero scale), never remove one
        raise RuntimeError(f"the ONNX graph has {zeros} zero weights, the model {pruned}: export not faithful")
    with torch.no_grad(), eval_mode(model):
        predictions = model(chosen.to(next(model.parameters()).device)).argmax(1).cpu()
    num_classes = int(proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value)
    labels = y[indices].detach().cpu().tolist()

    atomic_write_bytes(out_dir / "model.onnx", proto.SerializeToString())
    rows = []
    for index, image, label in zip(indices, chosen, labels):
        comment = f"certprune export of {source or 'a model'}: test image {index}, label {label}, L-inf eps {eps}"
        atomic_write_bytes(out_dir / "vnnlib" / f"prop_{index}.vnnlib", vnnlib_text(image, label, num_classes, exact,
                                                                           comment).encode())
        rows.append(f"model.onnx,vnnlib/prop_{index}.vnnlib,{timeout:g}\n")
    atomic_write_bytes(out_dir / "instances.csv", "".join(rows).encode())
    wrong = [i for i, p, label in zip(indices, predictions.tolist(), labels) if p != label]
    summary = {"out": str(out_dir), "model": "model.onnx", "opset": OPSET, "properties": len(indices),
               "first": indices[0], "last": indices[-1], "eps": str(eps), "timeout": timeout,
               "input_shape": list(chosen.shape[1:]), "num_classes": num_classes, "zero_weights": zeros,
               "weights": total, "model_zero_weights": pruned, "misclassified": wrong}
    atomic_write_bytes(out_dir / "README.md", readme(summary, source).encode())
    return summary


def readme(summary: dict[str, Any], source: str) -> str:
    import onnx

    shape = "x".join(map(str, summary["input_shape"]))
    wrong = summary["misclassified"]
    return f"""# Verification benchmark exported by certprune

Made by `certprune export` (certprune.certify.export) from `{source or 'a model'}`, with torch {torch.__version__}
(TorchScript ONNX exporter) and onnx {onnx.__version__}.

- `model.onnx`: the network, ONNX opset {summary['opset']}, input `{INPUT}` of shape (batch, {shape}) with pixels
  in [0, 1] (dynamic batch dimension; batch 1 works), output `{OUTPUT}` of shape (batch, {summary['num_classes']})
  logits. The input normalisation is inside the graph, pruning masks are folded into the weights and batch norm
  into the convolutions: {summary['zero_weights']} of {summary['weights']} Conv/Gemm weights are exactly 0 (the
  model has {summary['model_zero_weights']} zero weights).
- `vnnlib/prop_<index>.vnnlib`: one VNN-LIB 1.0 property per test image (`<index>` = its index in the data set's
  test split; every image chosen, {summary['properties']} from {summary['first']} to {summary['last']}). `X_i` are
  the pixels flattened in (channel, row, column) order, `Y_j` the logits. The input box is x -+ eps clipped to
  [0, 1] with L-inf eps = {summary['eps']}, computed exactly and printed rounded outward, so it contains the exact
  box and exceeds it by at most about one double ulp. The asserted output set is the UNSAFE one: some logit
  Y_j (j != label) >= Y_label. `unsat` means the image is verified robust; `sat` comes with a counterexample.
- `instances.csv`: `model.onnx,vnnlib/prop_<index>.vnnlib,<timeout>` rows without a header, VNN-COMP's layout,
  timeout {summary['timeout']:g} s per instance.

The model misclassifies {len(wrong)} of these images{': ' + ', '.join(map(str, wrong[:50])) if wrong else ''}
{'(their properties are trivially sat: the image itself is a counterexample).' if wrong else ''}
"""


def export_saved_run(source: str | Path, out_dir: str | Path, eps=None, maximum: int | None = None,
                     skip: int = 1, timeout: float = 300.0) -> dict[str, Any]:
    """:func:`export_run` on a run directory (or its model.pt) and its data set's test images: every ``skip``-th
    test image from 0, at most ``maximum``; eps defaults to the run's training eps. Arguments are checked first."""
    from certprune.config import load_config
    from certprune.data import load_dataset
    from certprune.runs import CONFIG_FILE, load_run, resolve_model_path

    if maximum is not None and maximum <= 0:
        raise ValueError(f"--max must be a positive number of images, got {maximum}")
    if skip <= 0:
        raise ValueError(f"--skip must be a positive integer, got {skip}")
    check_output_dir(out_dir)
    if eps is not None:
        exact_eps(eps)
    model_path = resolve_model_path(source)
    config_path = model_path.parent / CONFIG_FILE
    config = load_config(config_path if config_path.is_file() else None)
    if eps is None:
        eps = config.loss.get("eps")
        if eps is None:
            raise ValueError(f"the run's loss {config.loss.get('name')!r} has no eps: pass --eps")
    model = load_run(model_path)
    data = load_dataset(config.dataset, config.data_dir)
    indices = list(range(0, len(data.test_x), skip))[:maximum]
    return export_run(model, data.test_x, data.test_y, out_dir, eps, indices, timeout, str(source))
