"""``certprune compact``: a channel-pruned run as a physically smaller network, written as a run of its own.

A hand-written pass over plain ``nn.Sequential`` CNNs (:func:`certprune.masking.compacted`), not Torch-Pruning's
dependency graphs: certprune prunes channels only in such models (residual ones are refused at config time), where
the next layer, and the batch norm between, are all a removed channel touches, and Torch-Pruning would be a
dependency (with its own torch pin) for a few dozen lines. The compact run's ``model.pt`` stores the registry name
plus ``widths`` (output channels per layer), from which :func:`certprune.runs.load_run` rebuilds it; its
``config.yaml`` is the source run's, so ``verify``, ``certify``, ``evaluate`` and ``export`` read it as any run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import masking
from .atomic import atomic_write_text
from .complexity import complexity, input_shape
from .runs import (MODEL_FILE, RunError, load_model_file, locked, read_config, read_metrics, resolve_model_path,
                   save_model, write_config, write_metrics)

TOLERANCE = 1e-4  # the compact model's logits may differ from the masked model's by float rounding only
FACTS = ("method", "k", "allocation", "granularity", "channel_scores", "dataset", "model", "loss", "seed",
         "kept_channels_per_layer")


def _check_source(path: Path, metrics: dict[str, Any]) -> None:
    granularity = metrics.get("granularity", "weight")
    if metrics.get("method", "dense") == "dense":
        raise RunError(f"{path.parent} is a dense run: nothing to compact; prune it with --granularity channel first")
    if granularity != "channel":
        raise RunError(f"{path.parent} was pruned with granularity {granularity}: its zeros are scattered, no channel "
                       f"is empty; prune with --granularity channel (certprune prune --from DENSE --granularity "
                       f"channel), then compact that run")


def compact_run(source: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the compact form of channel-pruned run ``source`` into the new run directory ``out``; returns its
    metrics (the source's facts, ``widths``, and ``params`` / ``flops`` before and after)."""
    path = resolve_model_path(source)
    metrics = read_metrics(path.parent)
    _check_source(path, metrics)
    out = Path(out)
    if (out / MODEL_FILE).exists():
        raise RunError(f"{out} already holds a run; choose another --out")
    config = read_config(path.parent)
    model, architecture = load_model_file(path)
    small, widths = masking.compacted(model)
    shape = input_shape(architecture)
    probe = torch.rand(8, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = float((small(probe) - model(probe)).abs().max())
    if gap > TOLERANCE:  # a model whose structure the pass misread; never write it
        raise RunError(f"the compact model's logits differ from {path}'s by {gap:.2g}; not written")
    before, after = complexity(model, shape), complexity(small, shape)
    facts = {key: metrics[key] for key in FACTS if key in metrics}
    result = {**facts, "compacted_from": str(path.parent.resolve()), "widths": widths, **after,
              "source_params": before["params"], "source_flops": before["flops"]}
    identity = {"command": "compact", "source": str(path.parent.resolve()), **{k: facts[k] for k in ("method", "k")
                                                                               if k in facts}}
    with locked(out):
        if config is not None:
            write_config(out, config)
        atomic_write_text(out / "run.json", json.dumps(identity, indent=2) + "\n")
        save_model(small, out / MODEL_FILE, {**architecture, "widths": widths})
        write_metrics(out, result)
    return result
