"""Randomized smoothing (Cohen, Rosenfeld and Kolter 2019): certified L2 radii of the smoothed classifier.

The smoothed classifier is ``g(x) = argmax_c P(f(x + delta) = c)`` with ``delta ~ N(0, sigma^2 I)`` in pixel space
(every certprune model normalises in its first layer). :class:`Smooth` wraps a base model ``f`` and implements

- ``certify(x, n0, n, alpha)``: ``n0`` noisy samples choose the top class ``c``; ``n`` fresh samples count ``n_A``
  votes for it; ``p_A`` is the one-sided ``(1 - alpha)`` Clopper-Pearson lower bound on ``P(f(x + delta) = c)``. When
  ``p_A <= 1/2`` it abstains, else ``g`` is certified to predict ``c`` within L2 radius ``sigma * Phi^-1(p_A)``
  (with probability at least ``1 - alpha`` over the sampling).
- ``predict(x, n, alpha)``: a two-sided binomial test of the top two counts; abstains unless it rejects a tie.

Noise is drawn on the model's device from a seeded :class:`torch.Generator`; votes are counted there with
``bincount``, so a sample costs little more than its forward pass. For GPU speed, ``precision="bf16"`` runs the
base classifier under bf16 autocast, ``channels_last`` stores images and convolution weights channels-last, and
``compile`` runs it through ``torch.compile``. The noise is always drawn and added in float32: the certificate is
exact for the base classifier *as it is computed* (the bf16 network is a deterministic function of the fp32 noisy
image, so Cohen et al.'s theorem covers it), but a bf16 classifier is a slightly different classifier from the fp32
one, and its certified radii belong to it.
This file holds only the algorithm; :mod:`certprune.certify.smoothing_run` certifies a run's test images into
``certify.tsv`` (resumable, sharded under torchrun) and summarises them.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from certprune.quantities import check_alpha, check_sigma

ABSTAIN = -1
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # None: the model's own dtype, no autocast


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a whole number > 0, got {value!r}")
    return value


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` Clopper-Pearson lower bound on a binomial proportion (0 when there is no success)."""
    if successes <= 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius ``n`` samples can certify (every vote for the top class): ``sigma * Phi^-1(alpha^(1/n))``."""
    return float(sigma * norm.ppf(lower_confidence_bound(n, n, alpha)))


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model lives and the floating dtype it computes in (CPU float32 for a model without tensors)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


class Smooth:
    """The Gaussian-smoothed version of ``model`` (a classifier returning ``(batch, classes)`` logits).

    Inputs are single examples of any shape (no batch dimension). ``num_classes`` is read from the logits when not
    given. ``seed`` seeds the noise generator; :meth:`manual_seed` reseeds it (certify_run seeds per example, so a
    resumed run reproduces an uninterrupted one). The model is put in eval mode: batch statistics would make the
    noisy samples depend on each other.

    Speed options (see the module's docstring for what they mean for the certificate): ``precision`` ``"fp32"`` or
    ``"bf16"`` (autocast; weights, and so masks, stay as they are); ``channels_last`` for images on a GPU (the
    model is copied, not changed); ``compile`` wraps the forward pass in ``torch.compile`` (one compilation per
    batch shape, so at most three per run: the n0 batch, the full batch and the last partial one).
    """

    ABSTAIN = ABSTAIN

    def __init__(self, model: nn.Module, sigma: float, num_classes: int | None = None, seed: int = 0,
                 precision: str = "fp32", channels_last: bool = False, compile: bool = False):
        self.model = model.eval()
        self.sigma = check_sigma(sigma)
        self.num_classes = num_classes
        self.precision = check_precision(precision)
        self.channels_last = channels_last
        self.device, self.dtype = _device_and_dtype(model)
        classifier = copy.deepcopy(model).to(memory_format=torch.channels_last) if channels_last else model
        self.classifier = torch.compile(classifier, dynamic=False) if compile else classifier
        self.compile = compile
        self.generator = torch.Generator(device=self.device)
        self.manual_seed(seed)

    def _compiler_settings(self):
        """Inductor's freezing for the compiled classifier: its weights become constants of the graph (batch norm
        folds into the convolutions), 5% faster for ResNet-110 on an H200. The certifier never changes the weights.
        (``torch.compile(options={"freezing": True})`` does not reach that setting, measured with torch 2.13.)"""
        if not self.compile:
            return contextlib.nullcontext()
        from torch._inductor import config
        return config.patch(freezing=True)

    def manual_seed(self, seed: int) -> "Smooth":
        self.generator.manual_seed(int(seed))
        return self

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int = 1000) -> int:
        """The smoothed prediction, or ``ABSTAIN`` unless a two-sided binomial test at level ``alpha`` separates
        the top two classes of ``n`` noisy samples."""
        _check_count("n", n)
        alpha = check_alpha(alpha)
        counts = self.sample_counts(x, n, batch_size)
        top = counts.topk(min(2, len(counts)))
        first = int(top.values[0])
        second = int(top.values[1]) if len(top.values) > 1 else 0
        if binomtest(first, first + second, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top.indices[0])

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int = 1000) -> tuple[int, float]:
        """``(class, radius)``: ``g`` predicts ``class`` everywhere within L2 ``radius`` of ``x``, with probability
        at least ``1 - alpha``; ``(ABSTAIN, 0.0)`` when the top class's lower bound is not above 1/2."""
        _check_count("n0", n0)
        _check_count("n", n)
        alpha = check_alpha(alpha)
        top = int(self.sample_counts(x, n0, batch_size).argmax())
        votes = int(self.sample_counts(x, n, batch_size)[top])
        p_lower = lower_confidence_bound(votes, n, alpha)
        if p_lower <= 0.5:  # a tie cannot be ruled out; Cohen et al. certify radius 0 at exactly 1/2
            return ABSTAIN, 0.0
        return top, float(self.sigma * norm.ppf(p_lower))

    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int = 1000) -> torch.Tensor:
        """Votes of ``num`` noisy copies of ``x``, per class (a tensor on the model's device)."""
        _check_count("number of samples", num)
        _check_count("batch size", batch_size)
        counts = None
        autocast = torch.autocast(self.device.type, dtype=PRECISIONS[self.precision],
                                  enabled=PRECISIONS[self.precision] is not None)
        # the noise is drawn in place into the float32 buffer, so autocast changes only the classifier's arithmetic
        with torch.inference_mode(), autocast, self._compiler_settings():
            x = torch.as_tensor(x).to(self.device, self.dtype)
            buffer = torch.empty((min(batch_size, num), *x.shape), dtype=self.dtype, device=self.device)
            if self.channels_last and buffer.dim() == 4:
                buffer = buffer.to(memory_format=torch.channels_last)
            remaining = num
            while remaining > 0:
                noisy = buffer[:min(batch_size, remaining)]
                noisy.normal_(0.0, self.sigma, generator=self.generator).add_(x)
                logits = self.classifier(noisy)
                if self.num_classes is None:
                    self.num_classes = logits.shape[-1]
                batch_counts = torch.bincount(logits.argmax(-1), minlength=self.num_classes)
                counts = batch_counts if counts is None else counts + batch_counts
                remaining -= len(noisy)
        return counts
