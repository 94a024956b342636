"""Run directories: the files a run leaves behind, written atomically, and read back safely.

A run directory holds ``model.pt`` (the final plain model: pruned weights exactly 0), ``config.yaml`` (the resolved
configuration), ``metrics.json`` and, while training, ``checkpoint.pt`` (everything needed to resume). Every file
is written to a temporary name and renamed, so an interrupted run never leaves a half-written file; every
checkpoint is loaded with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import masking
from .models import create_model

FORMAT = "certprune/1"
MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE, CONFIG_FILE = "model.pt", "checkpoint.pt", "metrics.json", "config.yaml"


class RunError(RuntimeError):
    """A run directory or checkpoint cannot be used; the message says why in one line."""


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda stream: stream.write(text.encode()))


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic(path, lambda stream: torch.save(obj, stream))


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunError(f"{path} is not valid JSON ({error.msg})") from None


def update_metrics(run_dir: Path, **values: Any) -> dict[str, Any]:
    metrics = {**read_metrics(run_dir), **values}
    write_metrics(run_dir, metrics)
    return metrics


def safe_load(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors for missing, corrupt or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise RunError(f"cannot read checkpoint {path}: {str(error).splitlines()[0][:200]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RunError(f"{path} is not a certprune checkpoint (no '{FORMAT}' format tag)")
    return data


def save_model(model: nn.Module, path: Path, architecture: dict[str, Any]) -> None:
    """Save the plain model (masks baked in, pruned weights exactly 0) with what is needed to rebuild it."""
    dense = masking.dense_copy(model)
    state = {name: tensor.detach().cpu() for name, tensor in dense.state_dict().items()}
    atomic_torch_save({"format": FORMAT, "architecture": architecture, "state_dict": state}, path)


def build_model(architecture: dict[str, Any]) -> nn.Module:
    return create_model(architecture["name"], **architecture["kwargs"])


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise RunError(f"{source} does not fit this architecture: {first}") from None


def load_model_file(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    data = safe_load(path)
    try:
        model = build_model(data["architecture"])
    except (KeyError, TypeError, ValueError) as error:
        raise RunError(f"{path} names an architecture certprune cannot build: {error}") from None
    load_state(model, data["state_dict"], path)
    return model.eval(), data["architecture"]


def resolve_model_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise RunError(f"no trained model at {path} (a run directory holds {MODEL_FILE} once it has finished)")
    return path


def load_run_config(run_dir: str | Path):
    """The resolved config a run was made with (``config.yaml``); the defaults for a bare model file without one."""
    from .config import load_config

    path = Path(run_dir) / CONFIG_FILE
    return load_config(path if path.exists() else None)


def load_saved_run(source: str | Path, device: str | torch.device = "cpu", max_examples: int | None = None):
    """What evaluating a finished run needs: its model path, its config, its model and its data set's test images
    and labels (the first ``max_examples`` of them when given), model and images on ``device``."""
    from .data import load_dataset

    model_path = resolve_model_path(source)
    config = load_run_config(model_path.parent)
    data = load_dataset(config.dataset, config.data_dir)
    x, y = (data.test_x[:max_examples], data.test_y[:max_examples]) if max_examples else (data.test_x, data.test_y)
    return model_path, config, load_run(model_path).to(device), x.to(device), y.to(device)


def load_run(path: str | Path) -> nn.Module:
    """The model of a finished run (a directory or its ``model.pt``): a plain ``nn.Module`` in eval mode that maps
    images in [0, 1] to logits, its pruned weights exactly 0."""
    model, _ = load_model_file(resolve_model_path(path))
    return model
