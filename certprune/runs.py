"""Run directories: the files a run leaves behind, written atomically, read back safely, one writer at a time.

A run directory holds ``model.pt`` (the final plain model: pruned weights exactly 0), ``config.yaml`` (the resolved
configuration, written once when the run starts), ``metrics.json`` and, while training, ``checkpoint.pt``
(everything needed to resume). ``metrics.json`` holds the run's facts (method, k, sparsity, seed, seconds) and an
``evaluations`` mapping: each record says which test images and which settings its figures cover, so a figure of
one setting never replaces another's. Every checkpoint is loaded with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from torch import nn

from . import masking
from .atomic import atomic_torch_save, atomic_write_text, remove_stale_temporaries
from .config import Config, ConfigError, config_text, load_config
from .models import create_model
from .sources import rebuild

FORMAT = "certprune/1"
MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE, CONFIG_FILE = "model.pt", "checkpoint.pt", "metrics.json", "config.yaml"
LOCK_FILE = ".lock"


class RunError(RuntimeError):
    """A run directory or checkpoint cannot be used; the message says why in one line."""


# ---- one writer per run directory ------------------------------------------------------------------------------


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def locked(run_dir: str | Path, create: bool = True) -> Iterator[Path]:
    """Hold ``run_dir``'s lock while writing into it; a second process is refused in one line naming the first.

    Taking the lock is also the first write, so an unwritable directory fails here, before any work."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file, not a run directory")
    try:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
        handle = _open_lock(run_dir / LOCK_FILE)
    except OSError as error:
        raise RunError(f"cannot write into {run_dir}: {error.strerror}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunError(f"{run_dir} is in use by another certprune process (pid {holder}); "
                           "wait for it to finish") from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, str(os.getpid()).encode(), 0)
        remove_stale_temporaries(run_dir)
        yield run_dir
    finally:
        os.close(handle)  # closing releases the lock


def check_writable(run_dir: Path) -> None:
    """Fail before any work when the run's files could not be written afterwards (atomic writes need the
    directory itself to be writable)."""
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunError(f"cannot write into {run_dir}: permission denied")
    for name in (METRICS_FILE, CONFIG_FILE):
        path = Path(run_dir) / name
        if path.exists() and not os.access(path, os.W_OK):
            raise RunError(f"cannot write {path}: permission denied")


# ---- config and metrics ----------------------------------------------------------------------------------------


def write_config(run_dir: Path, config: Config) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, config_text(config))


def read_config(run_dir: str | Path) -> Config | None:
    """The config a run was made with, or None when the directory has none (a bare model file)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return load_config(path)
    except ConfigError as error:
        raise RunError(f"{path} cannot be read: {error}") from None


def _finite(value: Any, path: str = "") -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"metric {path} is {value}, which JSON cannot hold")
    if isinstance(value, dict):
        for key, inner in value.items():
            _finite(inner, f"{path}.{key}" if path else str(key))


def code_version() -> dict[str, Any]:
    """What computed a run: torch's version and the certprune source's git commit (``+dirty`` with uncommitted
    changes; None outside a git checkout). A sweep reuses finished runs by their settings, and code that reorders
    arithmetic changes the weights bit for bit, so the record says which code it was."""
    import torch

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(Path(__file__).parent), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "commit": commit}


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    _finite(metrics)
    atomic_write_text(Path(run_dir) / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"{path} is not valid JSON ({getattr(error, 'msg', error)}); move it away to rebuild it") from None
    if not isinstance(metrics, dict):
        raise RunError(f"{path} does not hold a JSON object; move it away to rebuild it")
    return metrics


def record_evaluation(run_dir: Path, key: str, record: dict[str, Any]) -> dict[str, Any]:
    """Store one evaluation's record under ``key`` (a rerun of the same evaluation replaces its own record only)."""
    metrics = read_metrics(run_dir)
    metrics.setdefault("evaluations", {})[key] = record
    write_metrics(run_dir, metrics)
    return metrics


def evaluation(metrics: dict[str, Any], key: str) -> dict[str, Any]:
    """A run's record ``key`` (``verify``, ``attack``, ``smoothing``: the ones its config asked for), or {}."""
    return metrics.get("evaluations", {}).get(key, {})


# ---- checkpoints and models ------------------------------------------------------------------------------------


def safe_load(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors for missing, corrupt, foreign or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or unsafe file
        unsafe = "Unsupported global" in str(error) or "GLOBAL" in str(error)  # a class or function, not a tensor
        reason = ("it holds Python objects beyond tensors, which certprune never loads (it is not a certprune "
                  "checkpoint, or not a safe one)" if unsafe else "it is damaged or not a checkpoint at all")
        raise RunError(f"cannot read {path}: {reason}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RunError(f"{path} is not a certprune checkpoint (no '{FORMAT}' format tag)")
    return data


def save_checkpoint(path: Path, architecture: dict[str, Any], **state: Any) -> None:
    atomic_torch_save({"format": FORMAT, "architecture": architecture, **state}, path)


def save_model(model: nn.Module, path: Path, architecture: dict[str, Any]) -> None:
    """Save the plain model (masks baked in, pruned weights exactly 0) with what is needed to rebuild it."""
    dense = masking.dense_copy(model)
    state = {name: tensor.detach().cpu() for name, tensor in dense.state_dict().items()}
    save_checkpoint(path, architecture, state_dict=state)


def build_model(architecture: dict[str, Any]) -> nn.Module:
    """The registry's model, or a user's rebuilt from the ``origin`` it records (:func:`certprune.sources.rebuild`),
    narrowed to the stored ``widths`` (output channels per layer) of a compact run."""
    if "origin" in architecture:
        model = rebuild(architecture)
    else:
        model = create_model(architecture["name"], **architecture["kwargs"])
    widths = architecture.get("widths")
    return masking.narrowed(model, {name: range(width) for name, width in widths.items()}) if widths else model


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise RunError(f"{source} does not fit this architecture ({detail.rstrip('.')})") from None


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


def load_run(path: str | Path) -> nn.Module:
    """The model of a finished run (a directory or its ``model.pt``): a plain ``nn.Module`` in eval mode that maps
    images in [0, 1] to logits, its pruned weights exactly 0."""
    model, _ = load_model_file(resolve_model_path(path))
    return model


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's weights: per-image result files of one model are never resumed with another."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def read_image_table(path: Path, columns: tuple[str, ...], parse, kind: str) -> dict[int, dict[str, Any]]:
    """The finished lines of a per-image TSV (``certify.tsv``, ``verify.tsv``) by test index, each turned into a
    row by ``parse(fields)``. A last line cut off by an interruption is dropped from the file, so a resume redoes
    that image; a foreign header, a malformed line or an index twice is a one-line error that names --restart."""
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        atomic_write_text(path, text)
    lines = text.splitlines()
    if not lines or tuple(lines[0].split("\t")) != columns:
        raise RunError(f"{path} is not a {kind} (its header is not {' '.join(columns)}); pass --restart to overwrite it")
    rows: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            if len(fields) != len(columns):
                raise ValueError
            row = parse(fields)
        except ValueError:
            raise RunError(f"{path} line {number} is malformed; pass --restart to start over") from None
        if row["index"] in rows:
            raise RunError(f"{path} holds index {row['index']} twice; pass --restart to start over")
        rows[row["index"]] = row
    return rows


def is_finished(run_dir: Path) -> bool:
    """A run that wrote its model and metrics and has no training left (no checkpoint)."""
    run_dir = Path(run_dir)
    written = all((run_dir / name).exists() for name in (MODEL_FILE, METRICS_FILE))
    return written and not (run_dir / CHECKPOINT_FILE).exists()


def _inline(value: Any) -> str:
    """A setting as one line of YAML (``0.1``, ``[IBP, CROWN]``, ``null``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """``key saved -> wanted`` for every leaf where two nested settings differ (for one-line refusals)."""
    changes = []
    for key in sorted(set(saved) | set(wanted), key=str):
        old, new = saved.get(key), wanted.get(key)
        name = f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            changes += differences(old, new, name + ".")
        elif old != new:
            changes.append(f"{name} {_inline(old)} -> {_inline(new)}")
    return changes
