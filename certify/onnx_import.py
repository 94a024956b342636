"""Read a feed-forward ReLU network from ONNX into the ``nn.Sequential`` our verifiers take (``Normalize``, Conv2d,
Linear, ReLU, Flatten), so that an exported model, or a small VNN-COMP benchmark network, can be verified.

A hand-written reader on purpose: it knows the few operators such networks use (those ``certprune export`` writes
for the ``VERIFIABLE`` models, and the common MatMul + Add form) and refuses every other one in one line, rather
than pulling in a general converter and its torch. The graph must be a chain: each operator takes the previous
one's output and constants (initializers, ``Constant`` nodes, and the shape arithmetic the exporter derives from
them, which is evaluated here). Elementwise constants (``Sub``, ``Div``, ``Add``, ``Mul``) at an image input, by a
scalar or a per-channel constant, negative ones included, compose into one leading
:class:`~certprune.models.Normalize` (the verifiers map the box through it exactly); right after a MatMul, Gemm or
Conv they fold into its weight and bias. Both are computed in float64 and rounded once; a zero or non-finite
constant, and a constant anywhere else, is refused.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from certprune.models import Normalize

CONSTANT_OPS = ("Constant", "Identity", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat")
LAYER_OPS = ("Relu", "Flatten", "Reshape", "Sub", "Div", "Add", "Mul", "Conv", "MatMul", "Gemm")


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _fold(node, values: list, attrs: dict, shapes: dict) -> np.ndarray:
    """The constant an operator of :data:`CONSTANT_OPS` computes from constant inputs (``Shape`` reads a tensor's
    static shape, batch 1)."""
    from onnx import numpy_helper

    op = node.op_type
    if op == "Constant":
        return numpy_helper.to_array(attrs["value"])
    if op == "Shape":
        return np.array(shapes[node.input[0]], dtype=np.int64)
    if op == "Identity":
        return values[0]
    if op == "Gather":
        return np.take(values[0], values[1], axis=attrs.get("axis", 0))
    if op == "Concat":
        return np.concatenate(values, axis=attrs["axis"])
    axes = attrs.get("axes", values[1].tolist() if len(values) > 1 else None)  # opset 13 passes axes as an input
    if op == "Unsqueeze":
        return np.expand_dims(values[0], tuple(axes))
    return np.squeeze(values[0], tuple(axes) if axes is not None else None)


class _Builder:
    """The layers so far, and the static shape (batch 1) of the tensor they produce."""

    def __init__(self, input_shape: tuple):
        self.layers: list[nn.Module] = []
        self.example = torch.zeros(1, *input_shape)

    def add(self, layer: nn.Module):
        self.layers.append(layer)
        with torch.no_grad():
            self.example = layer(self.example)

    def channel_constant(self, value: np.ndarray, where: str) -> torch.Tensor:
        """A scalar or per-channel constant of an image tensor as a float64 ``(C,)`` tensor; else a ValueError."""
        channels = self.example.shape[1]
        padded = value.reshape((1,) * (4 - value.ndim) + value.shape) if value.ndim <= 4 else value
        if self.example.dim() != 4 or padded.ndim != 4 or padded.shape[0] != 1 or padded.shape[2:] != (1, 1) \
                or padded.shape[1] not in (1, channels):
            raise ValueError(f"{where}: an elementwise constant here must be a scalar or per-channel on an image "
                             f"(N, C, H, W) tensor; got shape {tuple(value.shape)} on {tuple(self.example.shape)}")
        return torch.tensor(padded.reshape(-1), dtype=torch.float64).expand(channels).clone()

    def output_constant(self, layer: nn.Module, value: np.ndarray) -> torch.Tensor | None:
        """A constant of the shape of ``layer``'s output channels (scalar, ``(out,)`` for a Linear, ``(out, 1, 1)``
        for a Conv2d, with or without a batch axis) as a float64 ``(out,)`` tensor; None when it has another shape."""
        out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        shapes = [(), (1,), (out,), (1, out)] if isinstance(layer, nn.Linear) else \
            [(), (1,), (out, 1, 1), (1, out, 1, 1), (1, 1, 1), (1, 1, 1, 1)]
        if value.shape not in shapes:
            return None
        return torch.tensor(value.reshape(-1), dtype=torch.float64).expand(out).clone()

    def elementwise(self, op: str, value: np.ndarray, where: str):
        """``Sub``, ``Add``, ``Mul`` or ``Div`` by a constant, kept exact in real arithmetic: at the input it becomes
        (or extends) the one leading :class:`Normalize`; right after a Linear or Conv2d it is folded into that
        layer's weight and bias (computed in float64, rounded once); anywhere else it is refused."""
        if not np.isfinite(value).all():
            raise ValueError(f"{where}: the constant is not finite")
        if op in ("Div", "Mul") and not (value != 0).all():
            raise ValueError(f"{where}: {op} by a zero constant")
        last = self.layers[-1] if self.layers else None
        if isinstance(last, (nn.Linear, nn.Conv2d)):
            constant = self.output_constant(last, value)
            if constant is None:
                raise ValueError(f"{where}: a constant after {type(last).__name__} must be a scalar or one value per "
                                 f"output channel; got shape {tuple(value.shape)}")
            scale, shift = {"Sub": (1.0, -constant), "Add": (1.0, constant), "Mul": (constant, 0.0),
                            "Div": (1.0 / constant, 0.0)}[op]
            return _scale_layer(last, scale, shift)
        if last is not None and not (len(self.layers) == 1 and isinstance(last, Normalize)):
            raise ValueError(f"{where}: an elementwise constant is supported at the input or right after Conv, Gemm "
                             f"or MatMul, not after {type(last).__name__}")
        constant = self.channel_constant(value, where)
        if last is None:
            last = Normalize(torch.zeros(len(constant)), torch.ones(len(constant)))
            self.add(last)
        mean, std = last.mean.double().flatten(), last.std.double().flatten()  # compose with (x - mean) / std
        mean, std = {"Sub": (mean + constant * std, std), "Add": (mean - constant * std, std),
                     "Div": (mean, std * constant), "Mul": (mean, std / constant)}[op]
        try:
            self.layers[0] = Normalize(mean, std)
        except ValueError:
            raise ValueError(f"{where}: the input's affine map overflows or vanishes in float32") from None
        with torch.no_grad():
            self.example = self.layers[0](torch.zeros_like(self.example))

    def node(self, node, index: int, constants: list, attrs: dict):
        """Append the layer of one operator of :data:`LAYER_OPS` whose first input is the chain's current tensor and
        whose other inputs are ``constants``."""
        where, op = f"op {node.op_type} at node {index} ({node.name or 'unnamed'})", node.op_type
        if op == "Relu":
            return self.add(nn.ReLU())
        if op == "Flatten":
            if attrs.get("axis", 1) != 1:
                raise ValueError(f"{where}: only Flatten(axis=1) is supported")
            return self.add(nn.Flatten())
        if op == "Reshape":
            target = [int(d) for d in constants[0]]
            if target == list(self.example.shape):
                return
            if len(target) == 2 and target[0] in (0, 1, -1) and target[1] in (-1, self.example[0].numel()):
                return self.add(nn.Flatten())
            raise ValueError(f"{where}: only a Reshape to (batch, features) is supported, got {target}")
        if op in ("Sub", "Div", "Add", "Mul"):
            return self.elementwise(op, np.asarray(constants[0], dtype=np.float64), where)
        weight = torch.tensor(constants[0], dtype=torch.float32)
        bias = torch.tensor(constants[1], dtype=torch.float32) if len(constants) > 1 else None
        if op == "Conv":
            return self.add(_conv(weight, bias, attrs, where))
        if op == "MatMul" and weight.dim() == 2 and self.example.dim() == 2:
            return self.add(_linear(weight.t(), None))
        if op == "Gemm" and not attrs.get("transA", 0) and self.example.dim() == 2:
            weight = weight * attrs.get("alpha", 1.0) if attrs.get("alpha", 1.0) != 1 else weight
            bias = bias * attrs.get("beta", 1.0) if bias is not None and attrs.get("beta", 1.0) != 1 else bias
            return self.add(_linear(weight if attrs.get("transB", 0) else weight.t(), bias))
        raise ValueError(f"{where} is not supported with these inputs or attributes")


def _scale_layer(layer: nn.Module, scale, shift) -> None:
    """``layer``'s output times ``scale`` plus ``shift`` (per output channel), folded into its weight and bias."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    scale = torch.as_tensor(scale, dtype=torch.float64).expand(layer.weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(layer.weight.double() * scale.view(shape))
        layer.bias.copy_(layer.bias.double() * scale + shift)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(torch.zeros(weight.shape[0]) if bias is None else bias.reshape(-1))
    return layer


def _conv(weight: torch.Tensor, bias: torch.Tensor | None, attrs: dict, where: str) -> nn.Conv2d:
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if (weight.dim() != 4 or attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1]))
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or pads[:2] != pads[2:]):
        raise ValueError(f"{where}: only 2-d convolutions with group 1, dilation 1 and symmetric explicit pads "
                         "are supported")
    layer = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), tuple(attrs.get("strides", [1, 1])),
                      tuple(pads[:2]), bias=True)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(torch.zeros(weight.shape[0]) if bias is None else bias)
    return layer


def load_onnx(path: str | Path) -> tuple[nn.Sequential, tuple]:
    """The network of the ONNX file ``path`` as an ``nn.Sequential`` in eval mode, and its input shape without the
    batch dimension; a one-line ValueError for a graph or an operator it cannot read."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ONNX file {path} does not exist")
    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:  # protobuf's decode errors have no common type
        raise ValueError(f"{path} is not a readable ONNX model: {str(error).strip()[:200]}") from None
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in constants]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"{path}: a verifiable network has one input and one output, not {len(inputs)} and "
                         f"{len(graph.output)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) < 2 or dims[0] not in (None, 1) or any(d is None for d in dims[1:]):
        raise ValueError(f"{path}: the input needs a batch dimension and fixed other dimensions, got {dims}")
    builder, current = _Builder(tuple(dims[1:])), inputs[0].name
    shapes = {current: [1, *dims[1:]]}
    for index, node in enumerate(graph.node):
        attrs, values = _attributes(node), [constants.get(name) for name in node.input if name]
        if node.op_type in CONSTANT_OPS and (node.op_type == "Constant" or all(v is not None for v in values) or (
                node.op_type == "Shape" and node.input[0] in shapes)):
            try:
                constants[node.output[0]] = _fold(node, values, attrs, shapes)
            except (ValueError, IndexError, KeyError, TypeError) as error:
                raise ValueError(f"op {node.op_type} at node {index}: {error}") from None
            continue
        if node.op_type == "Identity" and node.input[0] == current:
            shapes[node.output[0]], current = shapes[current], node.output[0]
            continue
        if not node.input or node.input[0] != current or any(v is None for v in values[1:]):
            raise ValueError(f"op {node.op_type} at node {index} ({node.name or 'unnamed'}) is not supported: "
                             f"the graph must be a chain of one tensor through operators with constant operands")
        if node.op_type not in LAYER_OPS:
            raise ValueError(f"op {node.op_type} at node {index} ({node.name or 'unnamed'}) is not supported")
        builder.node(node, index, values[1:], attrs)
        current = node.output[0]
        shapes[current] = list(builder.example.shape)
    if current != graph.output[0].name:
        raise ValueError(f"{path}: the graph's output {graph.output[0].name} is not the end of its chain")
    return nn.Sequential(*builder.layers).eval(), tuple(dims[1:])
