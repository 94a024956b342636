"""The three HYDRA phases as runs: pretrain -> prune (scores) -> finetune (weights), and the LWM baseline.

Each function trains a model, checkpoints after every epoch (``--resume`` continues from the last one), evaluates
the final model and leaves a complete run directory (see :mod:`certprune.runs`).
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import distributed, masking
from .config import Config, PhaseConfig, save_config
from .data import Dataset, load_dataset
from .devices import model_device, resolve_device
from .losses import make_loss
from .runs import (CHECKPOINT_FILE, CONFIG_FILE, FORMAT, METRICS_FILE, MODEL_FILE, RunError, atomic_torch_save,
                   atomic_write_text, build_model, load_model_file, load_state, read_metrics, resolve_model_path,
                   safe_load, save_model, write_metrics)
from .train import fit, make_optimizer, make_scheduler

METHODS = ("hydra", "lwm")
Evaluation = Callable[[nn.Module, Config, Dataset, Path], dict[str, Any]]


def load_data(config: Config) -> Dataset:
    """The config's data set, cut to ``train_examples`` training images when that is set."""
    data = load_dataset(config.dataset, config.data_dir)
    if config.train_examples is not None:
        if config.train_examples <= 0:
            raise ValueError(f"train_examples must be positive, got {config.train_examples}")
        data.train_x, data.train_y = data.train_x[:config.train_examples], data.train_y[:config.train_examples]
    return data


def data_on(data: Dataset, device: torch.device) -> Dataset:
    """Move the data set's tensors to ``device`` (in place): in-memory data sets are small enough to hold there."""
    for name in ("train_x", "train_y", "test_x", "test_y"):
        setattr(data, name, getattr(data, name).to(device))
    return data


def _verify(model: nn.Module, config: Config, data: Dataset, run_dir: Path) -> dict[str, Any]:
    from .certify.verify import verify  # certifiers load only when a run is evaluated

    if config.verify is None:
        return {}
    settings = config.verify
    eps = settings.eps if settings.eps is not None else config.loss.get("eps", 0.0)
    x, y = data.test_x, data.test_y
    if settings.max_examples is not None:
        x, y = x[:settings.max_examples], y[:settings.max_examples]
    return verify(model, x, y, eps, settings.methods, settings.batch_size)


# Every evaluation runs on each finished model and adds its figures to metrics.json; each does nothing when its
# config section is absent. Other certification paths register theirs here.
EVALUATIONS: list[Evaluation] = [_verify]


def _certify_smoothed(model: nn.Module, config: Config, data: Dataset, run_dir: Path) -> dict[str, Any]:
    """Randomized-smoothing certification of the test images into run_dir/certify.tsv (resumable)."""
    if config.certify is None:
        return {}
    from .certify.smoothing import certify_run, training_sigmas

    return certify_run(model, data.test_x, data.test_y, run_dir, config.certify, seed=config.seed,
                       trained_sigmas=training_sigmas(config))


EVALUATIONS.append(_certify_smoothed)


def _attack(model: nn.Module, config: Config, data: Dataset, run_dir: Path) -> dict[str, Any]:
    """PGD evaluation (config.attack): clean_acc, pgd_acc and the attack's settings."""
    from .certify.empirical import evaluate_attack

    return evaluate_attack(model, config, data, run_dir)


EVALUATIONS.append(_attack)


def evaluate(model: nn.Module, config: Config, data: Dataset, run_dir: Path) -> dict[str, Any]:
    model.eval()
    metrics: dict[str, Any] = {}
    for evaluation in EVALUATIONS:
        metrics.update(evaluation(model, config, data, run_dir))
    if "clean_acc" not in metrics:
        with torch.no_grad():
            metrics["clean_acc"] = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    return metrics


def is_finished(run_dir: Path) -> bool:
    """A run that wrote its model and metrics and has no training left (no checkpoint)."""
    run_dir = Path(run_dir)
    written = all((run_dir / name).exists() for name in (MODEL_FILE, METRICS_FILE))
    return written and not (run_dir / CHECKPOINT_FILE).exists()


def _prepare_run_dir(run_dir: Path, config: Config, resume: bool) -> dict[str, Any] | None:
    """Create the run directory; return the checkpoint to resume from (if any). Never overwrites a run."""
    run_dir = Path(run_dir)
    checkpoint = run_dir / CHECKPOINT_FILE
    if not resume and (checkpoint.exists() or (run_dir / MODEL_FILE).exists()):
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if distributed.is_main():  # under torchrun only rank 0 writes the run directory
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE)
    distributed.barrier()
    return safe_load(checkpoint) if resume and checkpoint.exists() else None


def _history_csv(history: list[dict[str, Any]]) -> str:
    keys = ["phase", "epoch"] + sorted({key for row in history for key in row} - {"phase", "epoch"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def train_phases(model: nn.Module, phases: list[tuple[str, PhaseConfig]], config: Config, data: Dataset,
                 run_dir: Path, checkpoint: dict[str, Any] | None, architecture: dict[str, Any]) -> dict[str, Any]:
    """Run ``phases`` in order on ``model``, checkpointing after every epoch; resume from ``checkpoint``."""
    run_dir = Path(run_dir)
    completed: list[str] = []
    history: list[dict[str, Any]] = []
    seconds = 0.0
    device = model_device(model)
    if checkpoint is not None:
        load_state(model, checkpoint["model"], run_dir / CHECKPOINT_FILE)
        completed, history, seconds = list(checkpoint["completed"]), list(checkpoint["history"]), checkpoint["seconds"]
    started = time.perf_counter()
    for index, (phase, settings) in enumerate(phases):
        tag = f"{index}:{phase}"
        if tag in completed or settings.epochs == 0:
            continue
        masking.set_phase(model, phase, config.train_norm_in_prune)
        name, params = config.phase_loss(phase)
        loss = make_loss(name, **params)
        optimizer = make_optimizer((p for p in model.parameters() if p.requires_grad), settings)
        scheduler = make_scheduler(optimizer, settings)
        generator = torch.Generator().manual_seed(config.seed * 1000 + index)
        start_epoch = 0
        if checkpoint is not None and checkpoint["phase"] == tag:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            generator.set_state(checkpoint["generator"])
            torch.set_rng_state(checkpoint["rng"])
            if device.type == "cuda" and "cuda_rng" in checkpoint:
                torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
            start_epoch = checkpoint["epoch"] + 1

        def save_checkpoint(epoch: int, means: dict[str, float], tag=tag, optimizer=optimizer,
                            scheduler=scheduler, generator=generator, settings=settings) -> None:
            history.append({"phase": phase, "epoch": epoch + 1, **means})
            if not distributed.is_main():
                return
            done = completed + [tag] if epoch + 1 == settings.epochs else completed
            cuda_rng = {"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
            atomic_torch_save({
                "format": FORMAT, "architecture": architecture, "completed": done, "phase": tag, "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "rng": torch.get_rng_state(), "history": history,
                "seconds": seconds + time.perf_counter() - started, **cuda_rng,
            }, run_dir / CHECKPOINT_FILE)
            atomic_write_text(run_dir / "history.csv", _history_csv(history))

        fit(distributed.wrap(model), loss, optimizer, data.train_x, data.train_y, settings.epochs, config.batch_size,
            scheduler=scheduler, generator=generator, start_epoch=start_epoch, on_epoch_end=save_checkpoint,
            desc=phase)
        completed.append(tag)
    return {"train_seconds": seconds + time.perf_counter() - started}


def _finish(model: nn.Module, config: Config, data: Dataset, run_dir: Path, architecture: dict[str, Any],
            facts: dict[str, Any]) -> dict[str, Any]:
    """Save and evaluate the final model; ``seconds`` is training (over every resumed session) plus evaluation."""
    started = time.perf_counter()
    if distributed.is_main():
        save_model(model, run_dir / MODEL_FILE, architecture)
    distributed.barrier()
    final, _ = load_model_file(run_dir / MODEL_FILE)  # evaluate exactly what was saved (each rank its share)
    final = final.to(model_device(model))
    metrics = {**facts, **evaluate(final, config, data, run_dir), "sparsity": masking.sparsity(final),
               "dataset": config.dataset, "model": architecture["name"], "loss": config.loss_name,
               "seed": config.seed}
    metrics["seconds"] = metrics.pop("train_seconds", 0.0) + time.perf_counter() - started
    if distributed.is_main():
        write_metrics(run_dir, metrics)
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    distributed.barrier()
    return metrics


def pretrain(config: Config, run_dir: str | Path, resume: bool = False, data: Dataset | None = None) -> dict[str, Any]:
    """Train the dense model (phase ``pretrain``) and evaluate it."""
    run_dir = Path(run_dir)
    if resume and is_finished(run_dir):
        return read_metrics(run_dir)
    device = resolve_device(config.device)
    checkpoint = _prepare_run_dir(run_dir, config, resume)
    data = data_on(data or load_data(config), device)
    torch.manual_seed(config.seed)
    architecture = {"name": config.model, "kwargs": data.shape()}
    model = build_model(architecture).to(device)
    facts = train_phases(model, [("pretrain", config.pretrain)], config, data, run_dir, checkpoint, architecture)
    return _finish(model, config, data, run_dir, architecture, {**facts, "method": "dense", "k": 1.0})


def prune(config: Config, run_dir: str | Path, k: float, method: str, source: str | Path, resume: bool = False,
          data: Dataset | None = None) -> dict[str, Any]:
    """Prune the model of run ``source`` to a fraction ``k`` of its weights and fine-tune it.

    ``hydra``: scores (scaled init) trained under the loss for ``prune.epochs``, then weights for
    ``finetune.epochs``. ``lwm``: the least-weight-magnitude mask, then weights for the same total number of
    epochs, so that both methods get the same budget.
    """
    k = masking.check_k(k)
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS)}")
    if resume and is_finished(run_dir):
        return read_metrics(run_dir)
    device = resolve_device(config.device)
    model, architecture = load_model_file(resolve_model_path(source))
    model = model.to(device)
    data = data_on(data or load_data(config), device)
    if architecture["kwargs"] != data.shape():
        raise RunError(f"{source} was trained on inputs {architecture['kwargs']}, but {config.dataset} has {data.shape()}")
    run_dir = Path(run_dir)
    checkpoint = _prepare_run_dir(run_dir, config, resume)
    torch.manual_seed(config.seed)
    masking.apply_masks(model, k, init="scaled" if method == "hydra" else "magnitude")
    if method == "hydra":
        phases = [("prune", config.prune), ("finetune", config.finetune)]
    else:
        total = config.prune.epochs + config.finetune.epochs
        phases = [("finetune", PhaseConfig(**{**config.finetune.__dict__, "epochs": total}))]
    facts = train_phases(model, phases, config, data, run_dir, checkpoint, architecture)
    facts.update(method=method, k=k, source=str(source))
    return _finish(model, config, data, run_dir, architecture, facts)
