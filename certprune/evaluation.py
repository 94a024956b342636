"""The one evaluation driver: it picks a run's test images once, calls evaluators, and records their figures.

Every evaluator is a function ``evaluate(model, x, y, settings) -> dict`` in :mod:`certprune.certify`. This driver
selects the images (every ``skip``-th test image, at most ``max``), computes clean accuracy once per image set, and
writes one record per evaluation into the run's ``metrics.json`` under ``evaluations``. A record says which images
and which settings its figures cover, and its key is a function of those settings alone (the section's name and
every setting that differs from the section's defaults, e.g. ``verify[max=20, eps=0.1]``). So a rerun of the same
evaluation replaces its own record, and nothing else ever does: a subset or another eps is another key. Everything
is checked, and the run directory locked, before the first image is evaluated.
"""
from __future__ import annotations

import contextlib
import logging
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import distributed
from .certify import attack, autoattack, smoothing_run, verify, verify_run
from .config import AttackConfig, AutoAttackConfig, Config, SmoothingConfig, VerifyConfig, validate
from .data import Dataset, load_dataset, select_images
from .model_checks import check_milp
from .runs import (RunError, check_writable, load_run, locked, read_config, read_metrics,
                   record_evaluation, resolve_model_path)

log = logging.getLogger("certprune")
EVALUATORS = {"verify": verify_run, "smoothing": smoothing_run, "attack": attack,  # each module's evaluate()
              "autoattack": autoattack}
SECTIONS = {"verify": VerifyConfig, "smoothing": SmoothingConfig, "attack": AttackConfig,
            "autoattack": AutoAttackConfig}
IMAGE_KEYS = ("skip", "max")


def describe_images(indices: list[int], total: int, skip: int) -> dict[str, Any]:
    return {"set": "test", "count": len(indices), "of": total, "skip": skip,
            "first": indices[0] if indices else None, "last": indices[-1] if indices else None}


def resolve_settings(config: Config, section: str, requested: dict[str, Any] | None = None):
    """The section's settings: the run's config section (or its defaults), then ``requested`` on top, validated
    as one config would be; eps and sigma default to the training loss's."""
    own = getattr(config, section)
    base = own.model_dump() if own is not None else SECTIONS[section]().model_dump()
    merged = {**base, **{key: value for key, value in (requested or {}).items() if value is not None}}
    settings = getattr(validate({**config.to_dict(), section: merged}), section)
    if section in ("verify", "attack", "autoattack") and settings.eps is None:  # validate() saw the loss has one
        settings = settings.model_copy(update={"eps": config.loss["eps"]})
    if section == "smoothing" and settings.sigma is None:
        sigma = smoothing_run.resolve_sigma(None, smoothing_run.training_sigmas(config))
        settings = settings.model_copy(update={"sigma": sigma})
    return settings


def record_key(section: str, settings) -> str:
    """``section[every setting that differs from the section's defaults]``; ``section`` alone for the defaults."""
    defaults, wanted = SECTIONS[section]().model_dump(mode="json"), settings.model_dump(mode="json")
    changed = [f"{key}={'+'.join(map(str, value)) if isinstance(value, list) else value}"
               for key, value in wanted.items() if defaults.get(key) != value]
    return f"{section}[{', '.join(changed)}]" if changed else section


def reportable(config: Config) -> set[str]:
    """The per-run figures this config's evaluations (and every run) record: what a sweep's table can show."""
    names = {"sparsity", "seconds"}
    if config.verify is not None:
        stages = [verify.method_key(method) for method in config.verify.bound_methods]
        names |= {"clean_acc", "verified_acc", "falsified_acc", "unknown_acc", "decided_fraction", "predicted_classes",
                  "robust_acc_exact", "falsified_by_attack_acc", "seconds_per_image",
                  *(f"verified_{kind}_{stage}" for kind in ("acc", "extra") for stage in stages)}
    if config.smoothing is not None:
        names |= {"clean_acc", "abstain_rate", "acr", "seconds_per_image",
                  *(f"certified_acc_{radius:g}" for radius in config.smoothing.radii)}
    if config.attack is not None:
        names |= {"clean_acc", "pgd_acc"}
    if config.autoattack is not None:
        names |= {"clean_acc", "autoattack_acc"}
    return names


def configured_keys(config: Config) -> dict[str, str]:
    """The record key of each evaluation ``config`` asks for (what a sweep's table reads)."""
    return {section: record_key(section, resolve_settings(config, section))
            for section in SECTIONS if getattr(config, section) is not None}


def configured_record(metrics: dict[str, Any], config: Config, section: str) -> dict[str, Any]:
    """The record of ``section`` made with ``config``'s settings, or {} when the run has none."""
    key = configured_keys(config).get(section)
    return metrics.get("evaluations", {}).get(key, {}) if key else {}


def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    with torch.no_grad():
        correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                      for i in range(0, len(x), batch_size))
    return correct / max(1, len(x))


def evaluate_run(source: str | Path, requests: dict[str, dict[str, Any] | None], device: torch.device | str = "cpu",
                 restart: bool = False, warn: Callable[[str], None] | None = None,
                 data: Dataset | None = None, config: Config | None = None,
                 model: nn.Module | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate a finished run: ``requests`` maps a section to settings on top of the run's own (``{}`` = the run's
    own settings). ``config`` replaces the run's saved config as that base (a sweep evaluates with its own), ``data``
    the data set it names and ``model`` the run's model (API callers with their own tensors and module).
    Returns the records written, by key. Rank 0 writes; under torchrun every rank evaluates its share.
    """
    model_path = resolve_model_path(source)
    run_dir = model_path.parent
    config = config or read_config(run_dir) or Config()
    plans = []
    for section, requested in requests.items():
        settings = resolve_settings(config, section, requested)
        plans.append((section, settings, record_key(section, settings)))
    read_metrics(run_dir)  # a damaged metrics.json fails now, not after the evaluation
    check_writable(run_dir)
    with locked(run_dir, create=False) if distributed.is_main() else contextlib.nullcontext():
        data = data or load_dataset(config.dataset, config.data_dir)
        model = (model if model is not None else load_run(model_path)).to(device)
        for section, settings, _ in plans:  # before the first image: a stage the model cannot take
            if section == "verify" and {"BaB", "MILP"} & set(settings.bound_methods):
                check_milp(model, config.model)
        x_all, y_all = data.test_x.to(device), data.test_y.to(device)
        clean: dict[tuple, float] = {}
        records = {}
        for section, settings, key in plans:
            indices = select_images(len(x_all), settings.skip, settings.max)
            x, y = x_all[indices], y_all[indices]
            if (settings.skip, settings.max) not in clean:
                clean[(settings.skip, settings.max)] = clean_accuracy(model, x, y)
            fields = settings.model_dump()
            if fields.get("seed") is None:  # an attack without its own seed, and smoothing: the run's seed
                fields["seed"] = config.seed
            job = types.SimpleNamespace(**fields, run_dir=run_dir, key=key, indices=indices, restart=restart,
                                        warn=warn or log.warning, trained_sigmas=smoothing_run.training_sigmas(config))
            log.debug("%s: %s on %d test images", run_dir.name, key, len(indices))
            started = time.perf_counter()
            figures = EVALUATORS[section].evaluate(model.eval(), x, y, job)
            figures.pop("clean_acc", None)  # the driver's, once per image set
            record = {"images": describe_images(indices, len(x_all), settings.skip),
                      "settings": {**settings.model_dump(mode="json"),  # the seed used, not None for "the run's"
                                   **({"seed": fields["seed"]} if "seed" in type(settings).model_fields else {})},
                      "clean_acc": clean[(settings.skip, settings.max)],
                      **{name: value for name, value in figures.items() if not name.startswith("_")},
                      "seconds": time.perf_counter() - started}
            if distributed.is_main():
                record_evaluation(run_dir, key, record)
            records[key] = record
    return records


def evaluate_configured(run_dir: str | Path, config: Config, device: torch.device | str = "cpu",
                        sections: list[str] | None = None, data: Dataset | None = None) -> dict[str, Any]:
    """The evaluations ``config`` asks for (all, or ``sections`` of them): the records a sweep's table reads."""
    wanted = [s for s in SECTIONS if getattr(config, s) is not None and (sections is None or s in sections)]
    if not wanted:
        return {}
    records = evaluate_run(run_dir, {section: {} for section in wanted}, device, data=data, config=config)
    keys = configured_keys(config)
    return {section: records[keys[section]] for section in wanted}


def missing_evaluations(run_dir: Path, config: Config) -> list[str]:
    """The sections of ``config`` whose record the run does not have yet (to be evaluated)."""
    stored = read_metrics(run_dir).get("evaluations", {})
    return [section for section, key in configured_keys(config).items() if key not in stored]


__all__ = ["EVALUATORS", "RunError", "configured_record", "evaluate_configured", "evaluate_run", "missing_evaluations",
           "record_key", "select_images"]
