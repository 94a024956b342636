"""The only module that imports auto_LiRPA: bounds of a (possibly masked) model's classification margins.

auto_LiRPA 0.3 is exact only for a plain network: multiplying a mask inside its traced graph gives wrong bounds
silently, and top-k is an unsupported op. So :class:`BoundedProxy` bounds a *plain copy* of the model. Before each
bound computation the model's effective weights (``weight * mask``, via :mod:`certprune.masking`) are copied into
the copy in place, and :class:`_ChainToModel` hands the gradient w.r.t. the copy's parameters back to the model's
effective tensors, from where autograd carries it on to scores (straight-through) and weights.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from . import lirpa_compat, masking
from .boxes import input_box, margin_spec, normalized_box
from .models import Normalize

with warnings.catch_warnings():  # auto_LiRPA 0.3 uses APIs that torch 2 deprecates
    warnings.simplefilter("ignore")
    warnings.showwarning = lambda *args, **kwargs: None  # its import resets the filters to "once" midway
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on every CPU run
    lirpa_compat.apply()
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm  # noqa: E402

METHODS = ("IBP", "CROWN", "CROWN-IBP", "alpha-CROWN")
# alpha-CROWN (auto_LiRPA's "CROWN-Optimized"): Adam steps on the ReLU relaxation slopes, final bounds only (the
# intermediate bounds stay CROWN's). Defaults measured on the demo's dense cnn-small at eps 0.1, on the 21 of the
# first 300 test images that IBP and CROWN leave open (benchmarks/bench_milp.py --alpha-grid, 2 CPU cores): lr 0.5
# verifies 2 of them from 5 steps on; the mean bound is -0.5310 after 10 steps, -0.5306 after 20 and -0.5302 after
# 50, at about 0.7 s per step for the 21 images. lr 0.1 needs 20 steps to catch up, and lr 1.0 is no better than 0.5.
ALPHA_ITERATIONS = 10
ALPHA_LR = 0.5


def canonical_method(name: str) -> str:
    """The spelling of ``METHODS`` that ``name`` means, case-insensitively (``"ALPHA-CROWN"`` -> ``"alpha-CROWN"``)."""
    for method in METHODS:
        if str(name).lower() == method.lower():
            return method
    raise ValueError(f"unknown bound method {name!r}; choose from {', '.join(METHODS)}")


class _ChainToModel(torch.autograd.Function):
    """Hands the proxy's bounds to the caller; backward routes their gradient to the model's effective tensors.

    ``forward(proxy_graph, *model_tensors)``: ``proxy_graph = (bounds, proxy_params)`` holds the bounds with their
    graph to the proxy's parameters, whose values equal ``model_tensors``. It travels as a plain object so that
    autograd does not link the two graphs; the outputs are detached copies of the bounds.
    """

    @staticmethod
    def forward(ctx, proxy_graph: tuple, *model_tensors):
        ctx.proxy_graph = proxy_graph
        return tuple(bound.detach().clone() for bound in proxy_graph[0])

    @staticmethod
    def backward(ctx, *grad_bounds: torch.Tensor):
        graph_bounds, proxy_params = ctx.proxy_graph
        del ctx.proxy_graph
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[1:]) if needed]
        grads = [None] * len(proxy_params)
        pairs = [(b, g) for b, g in zip(graph_bounds, grad_bounds) if g is not None]
        if wanted and pairs:
            computed = torch.autograd.grad([b for b, _ in pairs], [proxy_params[i] for i in wanted],
                                           [g for _, g in pairs], allow_unused=True)
            for i, grad in zip(wanted, computed):
                grads[i] = grad
        return (None, *grads)


def _conv_mode(model: nn.Module, example_input: torch.Tensor) -> str:
    """auto_LiRPA 0.3's patches mode is sound only for square convolutions on square images: with unequal strides or
    paddings it returned a lower bound above the network's own output (0.108 against 0.048, found by the soundness
    fuzzer), and on a 5x4 image it failed. Matrix mode is general, and slower (5-6x for CROWN on cnn-small), so it
    serves only where needed."""
    def square(conv: nn.Conv2d) -> bool:
        return not isinstance(conv.padding, str) and conv.groups == 1 and all(
            len(set(v)) == 1 for v in (conv.kernel_size, conv.stride, conv.padding, conv.dilation))

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    square_image = example_input.dim() != 4 or example_input.shape[2] == example_input.shape[3]
    return "patches" if square_image and all(square(conv) for conv in convs) else "matrix"


class BoundedProxy:
    """auto_LiRPA's ``BoundedModule`` over a plain copy of ``model`` that follows the model's current weights.

    A leading :class:`~certprune.models.Normalize` stays outside the bounded graph: its division by a per-channel
    std trips an assertion in auto_LiRPA 0.3's CROWN (patches mode), and it is exact to map the input box through
    it instead, as auto_LiRPA's own examples do.

    ``dtype``: the precision of the bounded copy and of its boxes. Training bounds in the model's own (float32);
    verification in float64, so that rounding cannot lift a bound over the proof rule's tolerance
    (:mod:`certprune.certify.proof`). The model's float32 weights convert to float64 exactly. ``conv_mode``:
    auto_LiRPA's representation of convolutions, "patches" (fast) or "matrix" (general); by default patches where
    every convolution and the image are square (:func:`_conv_mode`).
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, dtype: torch.dtype | None = None,
                 conv_mode: str | None = None):
        dtype = dtype or next((p.dtype for p in model.parameters()), torch.get_default_dtype())
        self.model, self.dtype, self.conv_mode = model, dtype, conv_mode or _conv_mode(model, example_input)
        self.num_classes = self._infer_classes(model, example_input)
        example_input = example_input.to(dtype)
        plain = masking.dense_copy(model).to(dtype)
        self.normalize_name = None
        if isinstance(plain, nn.Sequential) and isinstance(plain[0], Normalize):
            self.normalize_name, self.normalize = next(iter(plain.named_children()))
            plain = plain[1:]  # a slice keeps the original child names, so parameter names still match the model
        else:
            self.normalize = nn.Identity()
        self._plain = plain
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.bounded = BoundedModule(plain, self.normalize(example_input[:1]), device=example_input.device,
                                         bound_opts={"conv_mode": self.conv_mode})
        self._param_names = [name for name, _ in plain.named_parameters()]
        self._plain_params = [p for _, p in plain.named_parameters()]
        self._buffers = [(name, buffer) for name, buffer in plain.named_buffers()]
        if self.normalize_name is not None:
            self._buffers += [(f"{self.normalize_name}.{name}", buffer)
                              for name, buffer in self.normalize.named_buffers()]

    @staticmethod
    def _infer_classes(model: nn.Module, example_input: torch.Tensor) -> int:
        with torch.no_grad():
            return int(model(example_input[:1]).shape[-1])

    def _model_tensor(self, dotted: str) -> torch.Tensor:
        """The model's tensor behind a plain parameter name: the *effective* weight for masked layers."""
        module_name, _, attr = dotted.rpartition(".")
        return getattr(self.model.get_submodule(module_name), attr)

    def _sync(self) -> list[torch.Tensor]:
        """Copy the model's effective tensors into the proxy in place; return them (with their autograd graph)."""
        tensors = [self._model_tensor(name) for name in self._param_names]
        with torch.no_grad():
            for plain, source in zip(self._plain_params, tensors):
                plain.copy_(source)
                plain.requires_grad_(source.requires_grad)
            for name, buffer in self._buffers:
                buffer.copy_(self._model_tensor(name))
        self.bounded.train(self.model.training)
        return tensors

    def _bounded_box(self, lower: torch.Tensor, upper: torch.Tensor) -> BoundedTensor:
        """The box ``[lower, upper]`` (pixel space) mapped through the leading normalisation (see
        :func:`normalized_box`)."""
        lower, upper = normalized_box(self.normalize, lower.to(self.dtype), upper.to(self.dtype))
        # For the L-inf norm auto_LiRPA reads only x_L and x_U; eps (the largest half-width) is for its records.
        half_width = ((upper - lower) / 2).amax()
        return BoundedTensor((lower + upper) / 2, PerturbationLpNorm(norm=float("inf"), eps=half_width, x_L=lower,
                                                                     x_U=upper))

    def margin_lower_bounds(self, x: torch.Tensor, labels: torch.Tensor, eps: float,
                            method: str = "IBP", **alpha_options) -> torch.Tensor:
        """Lower bounds on ``logit_y - logit_j`` (``j != y``) over the clipped L-inf box; shape ``(B, classes-1)``.

        Differentiable w.r.t. the model's trainable tensors (scores included) when grad mode is on, except for
        alpha-CROWN, an evaluation method (``alpha_options``: ``iterations``, ``lr``), whose bounds are detached.
        """
        return self.margin_lower_bounds_many(x, labels, eps, [method], **alpha_options)[0]

    def margin_lower_bounds_many(self, x: torch.Tensor, labels: torch.Tensor, eps: float, methods: list[str],
                                 iterations: int = ALPHA_ITERATIONS, lr: float = ALPHA_LR) -> list[torch.Tensor]:
        """:meth:`margin_lower_bounds` for several methods over one weight copy (CROWN-IBP mixes IBP and CROWN)."""
        return self.box_spec_bounds(*input_box(x, eps), margin_spec(labels, self.num_classes), methods, iterations,
                                    lr)

    def box_spec_bounds(self, lower: torch.Tensor, upper: torch.Tensor, spec: torch.Tensor, methods: list[str],
                        iterations: int = ALPHA_ITERATIONS, lr: float = ALPHA_LR) -> list[torch.Tensor]:
        """Lower bounds of ``spec @ logits`` (``spec``: ``(B, rows, classes)``, e.g. :func:`margin_spec`) over the
        per-pixel box ``[lower, upper]``, one ``(B, rows)`` tensor per method: the one code path of every bound."""
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown bound method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        tensors = self._sync()
        bounded_x, spec = self._bounded_box(lower, upper), spec.to(self.dtype)
        lowers = [self._compute(bounded_x, spec, method, iterations, lr) for method in methods]
        self._release_node_state()
        if (not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)
                or "alpha-CROWN" in methods):
            return [lower.detach() for lower in lowers]
        return list(_ChainToModel.apply((lowers, self._plain_params), *tensors))

    def _compute_bounds(self, **kwargs):
        """auto_LiRPA's ``compute_bounds`` with torch's default dtype set to the proxy's: it creates some of its
        tensors (identity matrices in matrix mode) in the default dtype, which must match the weights'."""
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            return self.bounded.compute_bounds(**kwargs)
        finally:
            torch.set_default_dtype(default)

    def _compute(self, bounded_x, spec, method: str, iterations: int, lr: float) -> torch.Tensor:
        if method == "alpha-CROWN" and not self.bounded.relus:
            method = "CROWN"  # no ReLU slopes to optimise: alpha-CROWN is CROWN (auto_LiRPA's backward would fail)
        if method != "alpha-CROWN":
            return self._compute_bounds(x=(bounded_x,), C=spec, method=method, bound_upper=False)[0]
        if not (int(iterations) >= 1 and float(lr) > 0):
            raise ValueError(f"alpha-CROWN needs iterations >= 1 and lr > 0, got {iterations} and {lr}")
        self.bounded.set_bound_opts({"optimize_bound_args": {"iteration": int(iterations), "lr_alpha": float(lr)}})
        # Its sparse intermediate bounds fail an assertion on some boxes of small networks (alpha per spec row).
        sparse = self.bounded.bound_opts.get("sparse_intermediate_bounds", True)
        self.bounded.bound_opts["sparse_intermediate_bounds"] = False
        for relu in self.bounded.relus:
            # auto_LiRPA 0.3 keeps sparse slope indices for a layer whose unstable share exceeds 90 % while it
            # allocates full slopes there (its reset sits under `if verbosity > 0`): a shape error. Full slopes always.
            relu.use_sparse_features_alpha = False
        with torch.enable_grad(), warnings.catch_warnings():  # it optimises slopes by gradient, even under no_grad
            warnings.simplefilter("ignore")  # its LR scheduler warns about its own call order
            try:
                lower = self._compute_bounds(x=(bounded_x,), C=spec, method="CROWN-Optimized", bound_upper=False)[0]
            finally:
                self.bounded.bound_opts["sparse_intermediate_bounds"] = sparse
        return lower.detach()

    def relu_input_bounds(self, x: torch.Tensor, labels: torch.Tensor, eps: float, method: str = "CROWN"):
        """Margin lower bounds as :meth:`margin_lower_bounds`, and the bounds of every ReLU's input that the same
        pass computed (see :meth:`box_relu_bounds`), over the clipped L-inf box."""
        return self.box_relu_bounds(*input_box(x, eps), margin_spec(labels, self.num_classes), method)

    def box_relu_bounds(self, lower: torch.Tensor, upper: torch.Tensor, spec: torch.Tensor, method: str = "CROWN"):
        """Lower bounds of ``spec @ logits`` over the box ``[lower, upper]``, and the bounds of every ReLU's input that
        the same pass computed, in the network's order: ``(bounds (B, rows), [(lower, upper) (B, *shape)])``.

        The complete verifier (:mod:`certprune.certify.milp`) needs them: the tighter they are, the fewer ReLUs
        are unstable and the fewer binaries its program has. Detached; IBP or CROWN."""
        if method not in ("IBP", "CROWN"):
            raise ValueError(f"ReLU input bounds come from IBP or CROWN, not {method!r}")
        self._sync()
        with torch.no_grad():
            margins = self._compute_bounds(x=(self._bounded_box(lower, upper),), C=spec.to(self.dtype),
                                                  method=method, bound_upper=False)[0]
            relus = [(relu.inputs[0].lower.detach().clone(), relu.inputs[0].upper.detach().clone())
                     for relu in self.bounded.relus]
        self._release_node_state()
        return margins.detach(), relus

    def output_bounds(self, x: torch.Tensor, eps: float, method: str = "IBP") -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds of every logit over the clipped L-inf box (for soundness checks)."""
        self._sync()
        with torch.no_grad():
            bounds = self._compute_bounds(x=(self._bounded_box(*input_box(x, eps)),), method=method)
        self._release_node_state()
        return bounds

    def _release_node_state(self) -> None:
        """Drop the per-node bounds, relaxations and A matrices auto_LiRPA keeps after a call (with auto_LiRPA's own
        routine, which it runs anyway at the start of the next call). They are batch-sized, about 21 MiB per
        CIFAR image for ``cnn-7layer`` (5.6 GiB at batch 256 on an H200), and would otherwise stay alive through
        the backward pass and the next forward; the autograd graph keeps what the backward needs."""
        self.bounded._clear_and_set_new(intermediate_layer_bounds=None)
