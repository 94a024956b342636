"""The three HYDRA phases as runs: pretrain -> prune (scores) -> finetune (weights), and the LWM baseline.

Each function validates everything it can before it writes a file, takes the run directory's lock, trains with a
checkpoint after every epoch, and leaves ``model.pt`` and ``metrics.json`` with the run's facts. ``resume`` continues
the same run: the settings are the run's own, and a request that differs from them is refused in one line. The
run's evaluations (:mod:`certprune.evaluation`) are a separate step; this module imports no certifier.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, masking, model_checks, sources
from .atomic import atomic_write_text
from .config import Config, PhaseConfig
from .data import Dataset, load_dataset
from .devices import deterministic, model_device, resolve_device
from .losses import make_loss
from .runs import (CHECKPOINT_FILE, MODEL_FILE, RunError, code_version, differences, is_finished,
                   load_model_file, load_state, locked, read_config, read_metrics, resolve_model_path, safe_load,
                   save_checkpoint, save_model, write_config, write_metrics)
from .train import fit

PRUNE_METHODS = ("hydra", "lwm")
IDENTITY_FILE = "run.json"
log = logging.getLogger("certprune")
PRETRAIN_REMEDY = "a natural epoch before the eps ramp (pretrain.loss.ramp_start: 1)"  # what helped cnn-large
PHASE_REMEDY = "a natural-to-robust ramp in this phase (loss: {ramp_start: 0, ramp_epochs: 2})"


def make_optimizer(params, phase: PhaseConfig) -> torch.optim.Optimizer:
    """``params``: tensors, or parameter groups (dicts) that may set their own ``lr``."""
    params = [group for group in params if not isinstance(group, dict) or group["params"]]
    if not params:
        raise ValueError("nothing to train in this phase (no parameter requires grad)")
    if phase.optimizer == "adam":
        return torch.optim.Adam(params, lr=phase.lr, weight_decay=phase.weight_decay)
    return torch.optim.SGD(params, lr=phase.lr, momentum=phase.momentum, weight_decay=phase.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, phase: PhaseConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule: cosine to 0 over the phase (HYDRA's choice), or constant."""
    if phase.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: 0.5 * (1 + math.cos(math.pi * epoch / max(1, phase.epochs))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def load_data(config: Config) -> Dataset:
    """The config's data set, cut to ``train_examples`` training images when that is set."""
    data = load_dataset(config.dataset, config.data_dir)
    if config.train_examples is not None:
        data.train_x, data.train_y = data.train_x[:config.train_examples], data.train_y[:config.train_examples]
    return data


def data_on(data: Dataset, device: torch.device) -> Dataset:
    """Move the data set's tensors to ``device`` (in place): in-memory data sets are small enough to hold there."""
    for name in ("train_x", "train_y", "test_x", "test_y"):
        setattr(data, name, getattr(data, name).to(device))
    return data


def stored_identity(run_dir: str | Path) -> dict[str, Any]:
    """What a run directory's ``run.json`` says the run is (command, method, k, source); {} when it has none."""
    path = Path(run_dir) / IDENTITY_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunError(f"{path} is not valid JSON") from None


def _check_resumable(run_dir: Path, config: Config, identity: dict[str, Any], resume: bool) -> bool:
    """Whether ``run_dir`` holds this run to continue; refuse another run's directory or other settings."""
    started = (run_dir / CHECKPOINT_FILE).exists() or (run_dir / MODEL_FILE).exists()
    if not started:
        return False
    if not resume:
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    saved = read_config(run_dir)
    stored = stored_identity(run_dir)
    if saved is None or not stored:
        raise RunError(f"{run_dir} has no config.yaml or {IDENTITY_FILE} to resume from")
    dense = identity.get("command") == "pretrain"
    changed = differences(stored, identity) + differences(saved.training_dict(dense), config.training_dict(dense))
    if changed:
        raise RunError(f"{run_dir} was made with other settings ({'; '.join(changed[:3])}"
                       f"{'; ...' if len(changed) > 3 else ''}); resume with the run's own settings")
    return True


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
    completed: list[str] = []
    history: list[dict[str, Any]] = []
    seconds = 0.0
    device = model_device(model)
    augment = _augment(config)
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
        optimizer = make_optimizer(_parameter_groups(model, config), settings)
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

        def on_epoch_end(epoch: int, means: dict[str, float], tag=tag, optimizer=optimizer,
                         scheduler=scheduler, generator=generator, settings=settings, phase=phase) -> None:
            history.append({"phase": phase, "epoch": epoch + 1, **means})
            if not distributed.is_main():
                return
            done = completed + [tag] if epoch + 1 == settings.epochs else completed
            cuda_rng = {"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
            save_checkpoint(run_dir / CHECKPOINT_FILE, architecture, completed=done, phase=tag, epoch=epoch,
                            model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), generator=generator.get_state(),
                            rng=torch.get_rng_state(), history=history,
                            seconds=seconds + time.perf_counter() - started, **cuda_rng)
            atomic_write_text(run_dir / "history.csv", _history_csv(history))

        fit(distributed.wrap(model), loss, optimizer, data.train_x, data.train_y, settings.epochs, config.batch_size,
            scheduler=scheduler, generator=generator, start_epoch=start_epoch, on_epoch_end=on_epoch_end,
            desc=f"{run_dir.name}: {phase}", augment=augment)
        completed.append(tag)
        accuracy = history[-1].get("acc", 1.0) if history else 1.0
        if accuracy <= 1.5 / data.num_classes:  # the epoch's mean training accuracy: a collapse, said while it's fresh
            remedy = PRETRAIN_REMEDY if phase == "pretrain" else PHASE_REMEDY
            log.warning("%s: %s ended at %.1f %% training accuracy, near chance for %d classes; try %s, or a lower lr",
                        run_dir, phase, 100 * accuracy, data.num_classes, remedy)
    return {"train_seconds": seconds + time.perf_counter() - started}


def _parameter_groups(model: nn.Module, config: Config) -> list[dict[str, Any]]:
    """What trains in this phase; learned layer rates (allocation ``learned``) get ``prune.rate_lr``, since at the
    scores' learning rate they barely move."""
    rates = {id(p) for p in masking.rate_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if id(p) not in rates]},
            {"params": [p for p in trainable if id(p) in rates], "lr": config.prune.rate_lr}]


def _augment(config: Config):
    if not config.augment:
        return None
    from .augment import make_augment

    return make_augment(config.augment, config.dataset)


def _start_run(run_dir: Path, config: Config, identity: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """Write a new run's config and identity once (never on resume); return the checkpoint to resume from."""
    resuming = _check_resumable(run_dir, config, identity, resume)
    if distributed.is_main() and not resuming:
        write_config(run_dir, config)
        atomic_write_text(run_dir / IDENTITY_FILE, json.dumps(identity, indent=2) + "\n")
    distributed.barrier()
    checkpoint = run_dir / CHECKPOINT_FILE
    return safe_load(checkpoint) if resuming and checkpoint.exists() else None


def _finish(model: nn.Module, config: Config, run_dir: Path, architecture: dict[str, Any],
            facts: dict[str, Any]) -> dict[str, Any]:
    """Save the final model and the run's facts; the checkpoint goes once both are written."""
    layers = {name: list(counts) for name, counts in masking.allocation_counts(model).items()}
    if facts.get("granularity") == "channel":
        facts["kept_channels_per_layer"] = {name: list(c) for name, c in masking.channel_counts(model).items()}
    seconds = facts.pop("train_seconds", 0.0)
    facts.update({name: architecture[key] for key, name in (("origin", "model_origin"), ("inputs", "inputs"))
                  if key in architecture})  # a user's model: where it came from, what it expects of its images
    metrics = {**facts, "sparsity": masking.sparsity(model), "kept_per_layer": layers, "dataset": config.dataset,
               "model": architecture["name"], "loss": config.loss_name, "seed": config.seed, "seconds": seconds,
               "torch_threads": torch.get_num_threads(), "code": code_version()}  # reproducible at the same of both
    if distributed.is_main():
        save_model(model, run_dir / MODEL_FILE, architecture)
        write_metrics(run_dir, metrics)
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    distributed.barrier()
    return metrics


def _run(run_dir: Path, config: Config, identity: dict[str, Any], resume: bool, build) -> dict[str, Any]:
    """The shared shape of a phase run: validate, lock, start or resume, train, finish."""
    run_dir = Path(run_dir)
    if resume and is_finished(run_dir):
        _check_resumable(run_dir, config, identity, resume)
        return read_metrics(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--out {run_dir} is a file")
    deterministic()
    model, architecture, data, phases, facts = build()  # loads and checks everything before a file is written
    with locked(run_dir) if distributed.is_main() else contextlib.nullcontext():
        checkpoint = _start_run(run_dir, config, identity, resume)
        facts.update(train_phases(model, phases, config, data, run_dir, checkpoint, architecture))
        return _finish(model, config, run_dir, architecture, facts)


def pretrain(config: Config, run_dir: str | Path, resume: bool = False, data: Dataset | None = None) -> dict[str, Any]:
    """Train the dense model (phase ``pretrain``)."""
    def build():
        device = resolve_device(config.device)
        loaded = data_on(data or load_data(config), device)
        torch.manual_seed(config.seed)
        model, architecture = sources.build(config, loaded)
        return model.to(device), architecture, loaded, [("pretrain", config.pretrain)], {"method": "dense", "k": 1.0}

    return _run(Path(run_dir), config, {"command": "pretrain"}, resume, build)


def prune(config: Config, run_dir: str | Path, k: float, method: str, source: str | Path | nn.Module,
          resume: bool = False, data: Dataset | None = None) -> dict[str, Any]:
    """Prune the model of run ``source`` (or a dense ``nn.Module``, the API's) to a fraction ``k`` of its weights.

    ``hydra``: scores (scaled init) trained under the loss for ``prune.epochs``, then weights for
    ``finetune.epochs``. ``lwm``: the least-weight-magnitude mask, then weights for the same total number of
    epochs, so that both methods get the same budget.
    """
    k = masking.check_k(k)
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {', '.join(PRUNE_METHODS)}")
    given = source if isinstance(source, nn.Module) else None  # the API's model: its config names it memory:<class>
    named = config.model if given is not None else None
    identity = {"command": "prune", "method": method, "k": k, "source": named or str(Path(source).resolve())}

    def load_source() -> tuple[nn.Module, dict[str, Any]]:
        model, architecture = load_model_file(resolve_model_path(source))
        if architecture["name"] != config.model:
            raise RunError(f"{source} holds a {architecture['name']} model, but the config asks for {config.model}")
        if changed := differences({"model_origin": architecture.get("origin"), "inputs": architecture.get("inputs")},
                                  {"model_origin": config.model_origin, "inputs": sources.inputs_of(config)}):
            raise RunError(f"{source} holds a model made otherwise than the config says ({'; '.join(changed[:2])})")
        trained = read_config(resolve_model_path(source).parent)
        if trained is not None and (trained.dataset, trained.data_dir) != (config.dataset, config.data_dir):
            raise RunError(f"{source} was trained on {trained.dataset}, but the config prunes on {config.dataset}")
        if trained is not None and trained.weight_init != config.weight_init:  # the pruned run records the config's
            raise RunError(f"{source} was pretrained with weight_init {trained.weight_init}, but the config says "
                           f"{config.weight_init}; set weight_init: {trained.weight_init}")
        model_checks.check(model, config)
        return model, architecture

    def build():
        device = resolve_device(config.device)
        model, architecture = load_source() if given is None else (None, None)
        loaded = data_on(data or load_data(config), device)
        model, architecture = (model, architecture) if given is None else sources.build(config, loaded, given)
        if architecture["kwargs"] != loaded.shape():  # a given model is built for the data's shape
            raise RunError(f"{source} was trained on inputs {architecture['kwargs']}, "
                           f"but {config.dataset} has {loaded.shape()}")
        model = model.to(device)
        torch.manual_seed(config.seed)
        init = "scaled" if method == "hydra" else "magnitude"
        masking.apply_masks(model, k, init=init, allocation=config.prune.allocation,
                            granularity=config.prune.granularity, channel_scores=config.prune.channel_scores)
        if method == "hydra":
            phases = [("prune", config.prune), ("finetune", config.finetune)]
        else:
            total = config.prune.epochs + config.finetune.epochs
            phases = [("finetune", config.finetune.model_copy(update={"epochs": total}))]
        facts = {"method": method, "k": k, "source": named or str(source), "allocation": config.prune.allocation,
                 "granularity": config.prune.granularity}
        if config.prune.granularity == "channel" and method == "hydra":  # LWM ranks filter L1 norms either way
            facts["channel_scores"] = config.prune.channel_scores
        return model, architecture, loaded, phases, facts

    return _run(Path(run_dir), config, identity, resume, build)
