"""What a model costs to run: parameters and FLOPs, for tables that put them beside verified accuracy.

FLOPs are counted as 2 per multiply-accumulate of every ``Conv2d`` and ``Linear`` for one image (biases, ReLUs,
pooling and batch norm are left out: well under 1 % of the total for certprune's CNNs). A channel-pruned run is
measured as the compact network it becomes (:mod:`certprune.compact`), so its figures are what it really costs; a
weight-pruned run costs its dense network's FLOPs, and ``nonzero_params`` says how sparse it is.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import masking
from .runs import load_model_file, read_metrics, resolve_model_path


def complexity(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """``params``, ``nonzero_params`` and ``flops`` of the plain (or masked: its effective weights) ``model`` for one
    input of ``input_shape`` (C, H, W)."""
    plain = masking.dense_copy(model) if any(masking.is_masked(m) for m in model.modules()) else model
    macs = []

    def count(layer, inputs, output):
        per_output = layer.weight[0].numel() if isinstance(layer, nn.Conv2d) else layer.in_features
        macs.append(output[0].numel() * per_output)

    hooks = [layer.register_forward_hook(count) for _, layer in masking.prunable_layers(plain)]
    try:
        with torch.no_grad():
            device = next(plain.parameters()).device
            was_training = plain.training
            plain.eval()(torch.zeros(1, *input_shape, device=device))
            plain.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        params = [p for p in plain.parameters()]
        return {"params": sum(p.numel() for p in params),
                "nonzero_params": sum(int(torch.count_nonzero(p)) for p in params), "flops": 2 * sum(macs)}


LATENCY_BATCHES = (1, 256)
LATENCY_REPEATS = 20


def forward_seconds(model, x: torch.Tensor, repeats: int, warmup: int = 3) -> list[float]:
    """Seconds of each of ``repeats`` forward passes of ``x`` after ``warmup`` untimed ones (a GPU is synchronised
    after each). ``model`` is any callable: an ``nn.Module`` or a frozen TorchScript graph."""
    times = []
    with torch.no_grad():
        for repeat in range(repeats + warmup):
            started = time.perf_counter()
            model(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            if repeat >= warmup:
                times.append(time.perf_counter() - started)
    return times


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> float:
    """The fastest of :data:`LATENCY_REPEATS` forward passes of ``batch`` images on the model's device with torch's
    threads as they are, in milliseconds: on shared cores the fastest pass is the model's cost, the median carries
    other jobs' scheduling delays."""
    device = next(model.parameters()).device
    model.eval()
    return 1e3 * min(forward_seconds(model, torch.zeros(batch, *input_shape, device=device), LATENCY_REPEATS))


def input_shape(architecture: dict[str, Any]) -> tuple[int, int, int]:
    kwargs = architecture["kwargs"]
    return kwargs.get("in_channels", 1), kwargs.get("image_size", 28), kwargs.get("image_size", 28)


def run_complexity(run_dir: str | Path) -> dict[str, Any]:
    """:func:`complexity` and :func:`latency_ms` at each of :data:`LATENCY_BATCHES` (``latency_b1_ms``, ...) of a
    finished run's model, on this machine now; a channel-pruned run is compacted first (in memory)."""
    path = resolve_model_path(run_dir)
    model, architecture = load_model_file(path)
    if read_metrics(path.parent).get("granularity") == "channel":
        model, _ = masking.compacted(model)
    shape = input_shape(architecture)
    return {**complexity(model, shape), "torch_threads": torch.get_num_threads(), "latency_repeats": LATENCY_REPEATS,
            **{f"latency_b{batch}_ms": latency_ms(model, shape, batch) for batch in LATENCY_BATCHES}}
