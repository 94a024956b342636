"""Random small ReLU networks written as ONNX by hand, with random boxes and properties: the soundness fuzzer's cases
(``tests/test_soundness_fuzz.py``, ``benchmarks/fuzz_soundness.py``; the judge is ``tests/fuzz_judge.py``).

The files are foreign on purpose: ``onnx.helper`` writes them node by node, over every operator the importer
(``certify/onnx_import.py``) accepts: leading ``Sub``/``Div``/``Mul``/``Add`` by scalar and per-channel constants
(negative ones too, and zero scales the importer must refuse), ``Conv`` with pads and strides, ``Gemm`` (``transB``
both ways, ``alpha``, ``beta``), ``MatMul`` + ``Add``, ``Flatten``, ``Reshape`` (by a constant, or by the
``Shape``/``Gather``/``Unsqueeze``/``Concat`` arithmetic torch's exporter writes), ``Identity``, ``Relu``, operands as
initializers or ``Constant`` nodes, and sometimes a ReLU as the last layer.

Each network is built twice at once: as ONNX nodes, and as the float64 chain of affine maps and ReLUs it computes
(:attr:`Network.steps`), which the judge's exact brute force reads, so that neither the importer nor torch stands
between a file and its judge. A case is one network and a few properties on it; everything follows from its seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
FAMILIES = ("plain", "negative-scale", "final-relu", "zero-scale", "any")
BOX_KINDS = ("ordinary", "degenerate", "point", "clipped", "wide")


@dataclass
class Network:
    """An ONNX network and the same function as float64 ``steps``: ``("affine", W (out, in), b)`` and ``("relu",)``
    on flat (C, H, W)-ordered vectors. ``refusal``: the words the importer's ValueError must contain (a zero
    scale), or None for a network it must accept."""
    onnx: bytes
    input_shape: tuple
    steps: list
    features: list = field(default_factory=list)
    refusal: str | None = None

    @property
    def relus(self) -> int:
        """ReLU units, the last layer's included."""
        return sum(len(self.steps[i - 1][2]) for i, step in enumerate(self.steps) if step[0] == "relu")

    @property
    def outputs(self) -> int:
        return len(self.steps[-1][2]) if self.steps[-1][0] == "affine" else len(self.steps[-2][2])


@dataclass
class Property:
    """"``label`` beats every class of ``others``" on the float32 box ``lower <= x <= upper`` (flat)."""
    lower: np.ndarray
    upper: np.ndarray
    label: int
    others: tuple
    kind: str


@dataclass
class Case:
    seed: int
    family: str
    network: Network
    properties: list


def forward(steps: list, x: np.ndarray) -> np.ndarray:
    """The network of ``steps`` in float64 on flat inputs ``(N, features)``."""
    h = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    for step in steps:
        h = h @ step[1].T + step[2] if step[0] == "affine" else np.maximum(h, 0)
    return h


def _conv_matrix(weight: np.ndarray, shape: tuple, stride: tuple, pads: tuple) -> tuple[np.ndarray, tuple]:
    """ONNX's Conv (no bias) on (C, H, W) inputs as a dense matrix, written from its definition, and the output's
    shape."""
    out_c, _, kh, kw = weight.shape
    c, h, w = shape
    oh, ow = (h + 2 * pads[0] - kh) // stride[0] + 1, (w + 2 * pads[1] - kw) // stride[1] + 1
    matrix = np.zeros((out_c, oh, ow, c, h, w))
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for b in range(kw):
                    y, x = i * stride[0] + a - pads[0], j * stride[1] + b - pads[1]
                    if 0 <= y < h and 0 <= x < w:
                        matrix[:, i, j, :, y, x] += weight[:, :, a, b]
    return matrix.reshape(out_c * oh * ow, c * h * w), (out_c, oh, ow)


class _Chain:
    """The ONNX nodes and initializers of a chain under construction, its current tensor and shape (without the
    batch), and the same chain as float64 steps."""

    def __init__(self, rng: np.random.Generator, input_shape: tuple, batch):
        self.rng, self.shape, self.batch = rng, tuple(input_shape), batch
        self.nodes, self.initializers, self.steps, self.features = [], [], [], []
        self.current, self.count = "input", 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def constant(self, value: np.ndarray, stem: str) -> str:
        """An operand, as an initializer or (one time in four) a ``Constant`` node."""
        name = self.name(stem)
        tensor = numpy_helper.from_array(value, name)
        if self.rng.random() < 0.25:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def node(self, op: str, operands: list, **attributes) -> None:
        output = self.name(op.lower())
        self.nodes.append(helper.make_node(op, [self.current, *operands], [output], name=self.name("node"),
                                           **attributes))
        self.current = output

    def affine(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Append an affine step; consecutive affine steps compose into one."""
        if self.steps and self.steps[-1][0] == "affine":
            _, w0, b0 = self.steps.pop()
            weight, bias = weight @ w0, weight @ b0 + bias
        self.steps.append(("affine", weight, bias))

    def weights(self, rows: int, columns: int) -> np.ndarray:
        gain = self.rng.uniform(0.5, 2.0)
        return (self.rng.normal(size=(rows, columns)) * gain / np.sqrt(columns)).astype(np.float32)

    def bias(self, size: int) -> np.ndarray:
        return (self.rng.normal(size=size) * 0.3).astype(np.float32)

    # -- operators ------------------------------------------------------------------------------------------------
    def relu(self) -> None:
        self.node("Relu", [])
        self.steps.append(("relu",))

    def elementwise(self, op: str, values: np.ndarray) -> None:
        """``op`` by a constant of one value per channel (image) or unit (flat tensor), ``values``, written as a
        scalar or in one of the broadcast shapes ONNX allows for it."""
        n, image = self.shape[0], len(self.shape) == 3
        shapes = [(n, 1, 1), (1, n, 1, 1)] if image else [(n,), (1, n)]
        if np.all(values == values[0]):
            shapes += [(), (1,)] + ([(1, 1, 1), (1, 1, 1, 1)] if image else [])
        shape = shapes[int(self.rng.integers(len(shapes)))]
        value = values.reshape(shape) if np.prod(shape, dtype=int) == n else values[:1].reshape(shape)
        self.node(op, [self.constant(np.asarray(value, dtype=np.float32), op.lower())])
        per_unit = np.repeat(values.astype(np.float64), int(np.prod(self.shape[1:])))
        if op in ("Sub", "Add"):
            self.affine(np.eye(len(per_unit)), per_unit * (-1 if op == "Sub" else 1))
        elif np.all(per_unit != 0):
            self.affine(np.diag(per_unit if op == "Mul" else 1 / per_unit), np.zeros(len(per_unit)))
        sign = "<0" if (values < 0).any() else "=0" if (values == 0).any() else ""
        self.features.append(f"{op}{sign}{shape}")

    def conv(self, out_channels: int, kernel: tuple, stride: tuple, pads: tuple) -> None:
        weight = (self.rng.normal(size=(out_channels, self.shape[0], *kernel)) * self.rng.uniform(0.5, 2.0)
                  / np.sqrt(self.shape[0] * kernel[0] * kernel[1])).astype(np.float32)
        bias = self.bias(out_channels)
        matrix, shape = _conv_matrix(weight.astype(np.float64), self.shape, stride, pads)
        attributes = {"pads": [pads[0], pads[1], pads[0], pads[1]]} if any(pads) or self.rng.random() < 0.3 else {}
        if stride != (1, 1) or self.rng.random() < 0.3:
            attributes["strides"] = list(stride)
        if self.rng.random() < 0.3:
            attributes.update(kernel_shape=list(kernel), dilations=[1, 1], group=1)
        how = str(self.rng.choice(["input", "Add", "none"]))
        self.node("Conv", [self.constant(weight, "weight")] + ([self.constant(bias, "bias")] if how == "input" else []),
                  **attributes)
        if how == "Add":
            shape_of_bias = (out_channels, 1, 1) if self.rng.random() < 0.5 else (1, out_channels, 1, 1)
            self.node("Add", [self.constant(bias.reshape(shape_of_bias), "bias")])
        elif how == "none":
            bias = np.zeros(out_channels, dtype=np.float32)
        self.shape = shape
        self.affine(matrix, np.repeat(bias.astype(np.float64), shape[1] * shape[2]))
        self.features.append(f"Conv(k={kernel},s={stride},p={pads},bias={how})")

    def flatten(self) -> None:
        n = int(np.prod(self.shape))
        how = str(self.rng.choice(["Flatten", "Reshape(0,-1)", "Reshape(-1,n)", "Reshape(0,n)", "Reshape(shape)"]
                                   + (["Reshape(1,n)"] if self.batch == 1 else [])))
        if how == "Flatten":
            self.node("Flatten", [], **({"axis": 1} if self.rng.random() < 0.5 else {}))
        elif how == "Reshape(shape)":  # torch's exporter: Shape -> Gather -> Unsqueeze -> Concat -> Reshape
            names = [self.name(stem) for stem in ("shape", "batch", "batch_1d", "target")]
            index, axes, rest = (self.constant(np.asarray(v, dtype=np.int64), "index") for v in (0, [0], [-1]))
            self.nodes += [helper.make_node("Shape", [self.current], [names[0]]),
                           helper.make_node("Gather", [names[0], index], [names[1]], axis=0),
                           helper.make_node("Unsqueeze", [names[1], axes], [names[2]]),
                           helper.make_node("Concat", [names[2], rest], [names[3]], axis=0)]
            self.node("Reshape", [names[3]])
        else:
            first, second = how[len("Reshape("):-1].split(",")
            target = [int(first), n if second == "n" else int(second)]
            self.node("Reshape", [self.constant(np.asarray(target, dtype=np.int64), "target")])
        self.shape = (n,)
        self.features.append(how)

    def dense(self, size: int) -> None:
        """A fully connected layer as Gemm (either layout, alpha, beta, with or without C) or MatMul (+ Add)."""
        inputs = self.shape[0]
        weight, bias = self.weights(size, inputs), self.bias(size)
        if self.rng.random() < 0.5:
            trans_b = int(self.rng.integers(2))
            alpha = float(self.rng.choice([1.0, self.rng.uniform(-2, 2)]))
            beta = float(self.rng.choice([1.0, self.rng.uniform(-2, 2)]))
            with_c = self.rng.random() < 0.8
            stored = weight if trans_b else np.ascontiguousarray(weight.T)
            c_shape = (size,) if self.rng.random() < 0.5 else (1, size)
            operands = [self.constant(stored, "weight")] + ([self.constant(bias.reshape(c_shape), "c")]
                                                            if with_c else [])
            attributes = {"alpha": alpha, "beta": beta} if alpha != 1 or beta != 1 else {}
            if trans_b or self.rng.random() < 0.5:
                attributes["transB"] = trans_b
            self.node("Gemm", operands, **attributes)
            # ONNX: alpha * A @ B' + beta * C, with the float32 products the importer folds
            effective = np.float64(np.float32(alpha)) * weight
            bias = np.float64(np.float32(beta)) * bias if with_c else np.zeros(size)
            self.features.append(f"Gemm(transB={trans_b},alpha={alpha:.2g},beta={beta:.2g},C={with_c})")
        else:
            self.node("MatMul", [self.constant(np.ascontiguousarray(weight.T), "weight")])
            with_add = self.rng.random() < 0.8
            if with_add:
                self.node("Add", [self.constant(bias.reshape((size,) if self.rng.random() < 0.5 else (1, size)),
                                                "bias")])
            effective, bias = weight.astype(np.float64), bias.astype(np.float64) if with_add else np.zeros(size)
            self.features.append(f"MatMul+Add={with_add}")
        self.shape = (size,)
        self.affine(effective, bias)

    def identity(self) -> None:
        self.node("Identity", [])

    def model(self, input_shape: tuple) -> bytes:
        graph = helper.make_graph(
            self.nodes, "fuzz", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                               [self.batch, *input_shape])],
            [helper.make_tensor_value_info(self.current, TensorProto.FLOAT, [self.batch, self.shape[0]])],
            self.initializers)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        proto.ir_version = 8  # onnxruntime reads IR <= 9 at opset 13
        onnx.checker.check_model(proto)
        return proto.SerializeToString()


def _scale(rng: np.random.Generator, size: int, sign: str) -> np.ndarray:
    """One value per channel or unit (half the time a common one) of magnitude 0.25 .. 4: all positive (``sign``
    "+"), some negative ("-") or one zero ("0")."""
    values = np.resize(np.exp(rng.uniform(np.log(0.25), np.log(4.0), size=size if rng.random() < 0.5 else 1)), size)
    if sign == "-":
        flip = np.full(size, True) if rng.random() < 0.5 else rng.random(size) < 0.5
        flip[rng.integers(size)] = True
        values = np.where(flip, -values, values)
    if sign == "0":
        values[rng.integers(size)] = 0.0
    return values.astype(np.float32)


def _constants(chain: _Chain, rng: np.random.Generator, count: int, special: str | None) -> None:
    """``count`` Sub / Div / Mul / Add by constants on the chain's current tensor; with ``special`` ("-" or "0")
    one of them is a Mul or Div whose scale has a negative (or zero) entry, and the others' scales are positive
    (negative too, at random, when ``special`` is "-")."""
    ops = [str(op) for op in rng.choice(["Sub", "Div", "Mul", "Add"], size=count)]
    if special:
        ops.insert(int(rng.integers(len(ops) + 1)), "special")
    for op in ops:
        if op in ("Sub", "Add"):
            chain.elementwise(op, np.resize(rng.normal(size=chain.shape[0] if rng.random() < 0.5 else 1),
                                            chain.shape[0]).astype(np.float32))
        elif op == "special":
            chain.elementwise(str(rng.choice(["Mul", "Div"])), _scale(rng, chain.shape[0], special))
        else:
            chain.elementwise(op, _scale(rng, chain.shape[0], "-" if special == "-" and rng.random() < 0.3 else "+"))


def random_network(rng: np.random.Generator, family: str = "any") -> Network:
    """A random network of ``family``: "plain" (positive scales, no ReLU last), "negative-scale" (a Mul or Div by a
    constant with a negative entry, at the input or after a layer), "final-relu" (a ReLU last), "zero-scale" (a Mul
    or Div by a constant with a zero entry: to be refused), or "any" (one of these at random).

    Constants sit where the importer takes them: at an image input, and right after a Conv, Gemm or MatMul."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if family == "any":
        family = str(rng.choice(FAMILIES[:4], p=[0.5, 0.25, 0.2, 0.05]))
    special = {"negative-scale": "-", "zero-scale": "0"}.get(family)
    image = rng.random() < 0.6
    input_shape = (int(rng.integers(1, 3)), *(int(s) for s in rng.integers(4, 7, size=2))) if image \
        else (int(rng.integers(2, 9)),)
    chain = _Chain(rng, input_shape, 1 if rng.random() < 0.2 else "N")

    def maybe_constants(chance: float = 0.25, last: bool = False):
        """Constants here at random; the family's special scale here at random, and at the latest last."""
        nonlocal special
        here = special if special and (rng.random() < 0.5 or last) else None
        if here or rng.random() < chance:
            _constants(chain, rng, int(rng.integers(0 if here else 1, 3)), here)
            special = None if here else special

    if image:
        maybe_constants(chance=0.6)
        for _ in range(int(rng.choice([0, 1, 1, 2]))):
            kernel = tuple(int(k) for k in rng.integers(1, 4, size=2))
            stride, pads = tuple(int(s) for s in rng.integers(1, 3, size=2)), tuple(int(p) for p in
                                                                                  rng.integers(0, 2, size=2))
            if any((size + 2 * p - k) // s + 1 < 1 for size, k, s, p in zip(chain.shape[1:], kernel, stride, pads)):
                continue
            chain.conv(int(rng.integers(1, 4)), kernel, stride, pads)
            maybe_constants()
            chain.relu()
        chain.flatten()
    elif rng.random() < 0.2:
        chain.flatten()  # a Flatten of a flat tensor changes nothing
    for _ in range(int(rng.choice([1, 1, 2, 3]))):
        chain.dense(int(rng.integers(2, 7)))
        maybe_constants()
        if rng.random() < 0.15:
            chain.identity()
        chain.relu()
    chain.dense(int(rng.integers(2, 6)))
    maybe_constants(last=True)
    if family == "final-relu":
        chain.relu()
        chain.features.append("final Relu")
    proto = chain.model(input_shape)
    return Network(proto, input_shape, chain.steps, chain.features, "zero" if family == "zero-scale" else None)


def _critical_radius(steps: list, centre: np.ndarray, label: int, others: tuple) -> float:
    """The L-inf radius at which the network's linearisation at ``centre`` (its affine piece there) reaches margin 0:
    boxes near it are where verifiers have to work, and where they can go wrong."""
    h, jacobian = centre.astype(np.float64), np.eye(len(centre))
    for step in steps:
        if step[0] == "affine":
            h, jacobian = step[1] @ h + step[2], step[1] @ jacobian
        else:
            jacobian, h = jacobian * (h > 0)[:, None], np.maximum(h, 0)
    margins = h[label] - h[list(others)]
    j = others[int(np.argmin(margins))]
    slope = np.abs(jacobian[label] - jacobian[j]).sum()
    return float(margins.min() / slope) if margins.min() > 0 and slope > 0 else 0.1


def random_property(rng: np.random.Generator, network: Network, kind: str | None = None) -> Property:
    """A box of ``kind`` (random when None): "ordinary" (a random centre, an asymmetric half-width), "degenerate"
    (ordinary, with lower == upper in some coordinates), "point" (in all), "clipped" (an L-inf ball around a point
    of [0, 1], clipped to [0, 1]) or "wide" ([-50, 50]). The half-width is 0.3 to 3 times the radius at which the
    margin's linearisation at the centre reaches 0, or (one time in three) 0.005 to 0.5. The label is the class at
    the centre two times in three, else random; the others are a random non-empty subset of the other classes."""
    kind = kind or str(rng.choice(BOX_KINDS, p=[0.35, 0.2, 0.1, 0.2, 0.15]))
    n, classes = int(np.prod(network.input_shape)), network.outputs
    centre = rng.random(n) if len(network.input_shape) == 3 or kind == "clipped" else rng.normal(size=n)
    if kind == "clipped":
        centre = np.where(rng.random(n) < 0.3, rng.integers(0, 2, n).astype(float), centre)
    centre = centre.astype(np.float32)
    predicted = int(np.argmax(forward(network.steps, centre[None])[0]))
    label = predicted if rng.random() < 2 / 3 else int(rng.integers(classes))
    rest = [j for j in range(classes) if j != label]
    others = tuple(sorted(int(j) for j in (rest if rng.random() < 0.5 else rng.choice(
        rest, size=int(rng.integers(1, len(rest) + 1)), replace=False))))
    radius = np.exp(rng.uniform(np.log(0.005), np.log(0.5))) if rng.random() < 1 / 3 else \
        _critical_radius(network.steps, centre, label, others) * np.exp(rng.uniform(np.log(0.3), np.log(3)))
    below, above = (radius * (1 if kind == "clipped" else rng.random(n)) for _ in range(2))
    lower, upper = (np.full(n, -50.0), np.full(n, 50.0)) if kind == "wide" else (centre - below, centre + above)
    if kind == "clipped":
        lower, upper = np.clip(lower, 0, 1), np.clip(upper, 0, 1)
    if kind in ("degenerate", "point"):
        flat = rng.random(n) < (1.0 if kind == "point" else rng.uniform(0.1, 0.9))
        lower, upper = np.where(flat, centre, lower), np.where(flat, centre, upper)
    lower, upper = lower.astype(np.float32), upper.astype(np.float32)
    return Property(np.minimum(lower, upper), np.maximum(lower, upper), label, others, kind)


def make_case(seed: int, family: str = "any", properties: int = 3) -> Case:
    """Case ``seed`` of ``family``: a random network and ``properties`` random properties on it."""
    rng = np.random.default_rng(seed)
    network = random_network(rng, family)
    return Case(seed, family, network, [random_property(rng, network) for _ in range(properties)])


def exact_decimal(value) -> str:
    """A float's exact value as a plain decimal (every float32 is a finite binary fraction): read back exactly,
    the box in a VNN-LIB file is the float32 box itself, with nothing rounded outward or inward."""
    return format(Decimal(float(value)), "f")


def vnnlib_text(prop: Property, outputs: int) -> str:
    """The VNN-LIB 1.0 property: the box, and the unsafe set "some class of ``others`` >= the label"."""
    lines = [f"(declare-const X_{i} Real)" for i in range(len(prop.lower))]
    lines += [f"(declare-const Y_{j} Real)" for j in range(outputs)]
    for i, (low, high) in enumerate(zip(prop.lower, prop.upper)):
        lines += [f"(assert (>= X_{i} {exact_decimal(low)}))", f"(assert (<= X_{i} {exact_decimal(high)}))"]
    lines.append("(assert (or " + " ".join(f"(and (>= Y_{j} Y_{prop.label}))" for j in prop.others) + "))")
    return "\n".join(lines) + "\n"


def write_case(case: Case, folder: str | Path) -> Path:
    """``model.onnx``, ``prop_<k>.vnnlib`` and an ``instances.csv`` listing them (timeout 10) in ``folder``;
    returns the instances.csv."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(case.network.onnx)
    rows = []
    for k, prop in enumerate(case.properties):
        (folder / f"prop_{k}.vnnlib").write_text(vnnlib_text(prop, case.network.outputs))
        rows.append(f"model.onnx,prop_{k}.vnnlib,10\n")
    (folder / "instances.csv").write_text("".join(rows))
    return folder / "instances.csv"
