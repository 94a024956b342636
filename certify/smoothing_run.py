"""Certifying a run's test images by randomized smoothing: ``certify.tsv``, its settings sidecar, resume, shard merge.

The algorithm is :mod:`certprune.certify.smoothing`; this module is its run driver. Each image's line is written
and flushed as soon as it is certified, so an interrupted certification resumes without losing or repeating one.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from certprune import distributed
from certprune.atomic import atomic_write_text
from certprune.config import SmoothingConfig
from certprune.data import select_images
from certprune.devices import model_device
from certprune.quantities import check_sigma
from certprune.runs import RunError, model_fingerprint, read_image_table

from .smoothing import ABSTAIN, Smooth, max_certifiable_radius

TSV_FILE, SETTINGS_FILE = "certify.tsv", "certify.json"
SHARD_FILES = "certify.rank*.tsv"  # under torchrun, each process's rows until they are merged into certify.tsv
TSV_COLUMNS = ("index", "label", "prediction", "radius", "correct", "seconds")
PHASES = ("pretrain", "prune", "finetune")


class SigmaMismatchWarning(UserWarning):
    """Certifying with a noise level the model was not trained for (legal, but usually far weaker)."""


def training_sigmas(config) -> list[float]:
    """The noise levels a run's model was trained with: the ``sigma`` of every phase with epochs that trains under
    a noise loss (its config holds it, so it is stored with the run). Empty when no phase used noise."""
    sigmas = set()
    for phase in PHASES:
        if getattr(config, phase).epochs > 0:
            _, params = config.phase_loss(phase)
            if params.get("sigma") is not None:
                sigmas.add(float(params["sigma"]))
    return sorted(sigmas)


def resolve_sigma(sigma: float | None, trained: list[float]) -> float:
    """``sigma`` itself, or else the run's training sigma when it has exactly one."""
    if sigma is not None:
        return check_sigma(sigma)
    if len(trained) == 1:
        return trained[0]
    raise ValueError("pass --sigma: the run was " + ("trained without Gaussian noise" if not trained else
                     f"trained with several noise levels ({', '.join(f'{s:g}' for s in trained)})"))


def _parse(fields: list[str]) -> dict[str, Any]:
    index, label, prediction, radius, correct, seconds = fields
    return {"index": int(index), "label": int(label), "prediction": int(prediction), "radius": float(radius),
            "correct": int(correct), "seconds": float(seconds)}


def _read_rows(path: Path) -> dict[int, dict[str, Any]]:
    """Finished rows of ``certify.tsv`` by index (a last line an interruption cut off is dropped)."""
    return read_image_table(path, TSV_COLUMNS, _parse, "certify.tsv")


def _read_all_rows(run_dir: Path, labels: dict[int, int]) -> dict[int, dict[str, Any]]:
    """The rows of certify.tsv and of the shard files an interrupted torchrun left; a row of a selected image must
    carry that image's label (``labels``: test index -> label)."""
    rows: dict[int, dict[str, Any]] = {}
    for path in (run_dir / TSV_FILE, *sorted(run_dir.glob(SHARD_FILES))):
        for index, row in _read_rows(path).items():
            if index in rows:
                raise RunError(f"{path} holds index {index} twice; pass --restart to start over")
            if index < 0 or (index in labels and row["label"] != labels[index]):
                raise RunError(f"{path} row {index} does not match this data set; pass --restart")
            rows[index] = row
    return rows


def _format_row(row: dict[str, Any]) -> str:
    # repr() round-trips the radius exactly: rounding it could only push a radius up past a reported threshold
    return "\t".join([str(row["index"]), str(row["label"]), str(row["prediction"]), repr(row["radius"]),
                      str(row["correct"]), f"{row['seconds']:.4f}"]) + "\n"


def summarize(rows: Iterable[dict[str, Any]], radii: Iterable[float]) -> dict[str, Any]:
    """Certified accuracy at each radius (correct and radius >= r; an abstention is never correct), the abstain
    rate and the average certified radius (ACR: mean radius of correct predictions, 0 for the others)."""
    rows = list(rows)
    if not rows:
        raise ValueError("no certified example to summarise")
    count = len(rows)
    accuracy = {f"{r:g}": sum(row["correct"] and row["radius"] >= r for row in rows) / count for r in radii}
    return {"certified_acc": accuracy,
            **{f"certified_acc_{radius}": value for radius, value in accuracy.items()},
            "abstain_rate": sum(row["prediction"] == ABSTAIN for row in rows) / count,
            "acr": sum(row["radius"] * row["correct"] for row in rows) / count,
            "certified_examples": count,
            "certify_seconds": sum(row["seconds"] for row in rows),
            "seconds_per_image": sum(row["seconds"] for row in rows) / count}


def _warn(message: str) -> None:
    warnings.warn(SigmaMismatchWarning(message), stacklevel=3)


def certify_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, run_dir: str | Path, settings: SmoothingConfig,
                seed: int = 0, trained_sigmas: list[float] | None = None, restart: bool = False,
                warn: Callable[[str], None] = _warn, progress: bool = True,
                indices: list[int] | None = None) -> dict[str, Any]:
    """Certify the selected images of ``(x, y)`` into ``run_dir/certify.tsv`` and return the summary.

    ``indices``: the test-set indices of ``x``'s rows when the caller has already selected them (the evaluation
    driver does); without it, every ``settings.skip``-th image of ``x``, at most ``settings.max``.

    One line per image is appended and flushed as soon as it is certified. Rerunning continues where it stopped:
    images already in the file are not certified again and none is lost; each image's noise is seeded by
    ``(seed, index)``, so a resumed run gives the lines an uninterrupted one would. Resuming with other settings
    (sigma, n0, n, alpha, seed) or another model is an error unless ``restart``. ``trained_sigmas`` are the run's
    training noise levels (see :func:`training_sigmas`); certifying with another sigma warns once.

    Under torchrun each process certifies every world_size-th selected image into its own ``certify.rank<r>.tsv``;
    rank 0 then merges them into ``certify.tsv`` in index order: the rows of a single-process run, since each
    image's noise depends only on ``(seed, index)``. Every process returns the same summary.
    """
    run_dir = Path(run_dir)
    settings = settings.model_copy(update={"sigma": resolve_sigma(settings.sigma, trained_sigmas or [])})
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    if indices is None:
        indices = select_images(len(x), settings.skip, settings.max)
        x, y = x[indices], y[indices]
    position = {index: place for place, index in enumerate(indices)}
    labels = dict(zip(indices, y.cpu().tolist()))
    if trained_sigmas is not None and settings.sigma not in trained_sigmas:
        warn(f"certifying with sigma={settings.sigma:g}, but the model was trained "
             + (f"with sigma={', '.join(f'{s:g}' for s in trained_sigmas)}" if trained_sigmas else "without noise")
             + "; the certified radii will be far smaller than at its own sigma")
    if not indices:
        raise ValueError("no test image selected (check --skip / --max)")
    identity = {"sigma": settings.sigma, "n0": settings.n0, "n": settings.n, "alpha": settings.alpha,
                "seed": int(seed), "model": model_fingerprint(model), "precision": settings.precision}
    tsv, sidecar = run_dir / TSV_FILE, run_dir / SETTINGS_FILE
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    if restart and main:
        for path in (tsv, sidecar, *run_dir.glob(SHARD_FILES)):
            path.unlink(missing_ok=True)
    if tsv.exists() and not restart:  # every process checks (read-only): they all stop alike
        try:
            stored = {"precision": "fp32", **json.loads(sidecar.read_text())}  # files from before bf16 existed
        except (OSError, json.JSONDecodeError):
            raise RunError(f"{tsv} has no readable {SETTINGS_FILE} beside it; pass --restart to start over") from None
        if stored != identity:
            changed = ", ".join(f"{key} {stored.get(key)} -> {value}" for key, value in identity.items()
                                if stored.get(key) != value)
            raise RunError(f"{tsv} was made with other settings or another model ({changed}); "
                           "certify with the same settings to resume, or pass --restart to start over")
    if main:
        if tsv.exists():
            for path in (tsv, *run_dir.glob(SHARD_FILES)):
                _read_rows(path)  # drops a last line an interruption cut off
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(sidecar, json.dumps(identity, indent=2) + "\n")
            atomic_write_text(tsv, "\t".join(TSV_COLUMNS) + "\n")
    distributed.barrier()
    rows = _read_all_rows(run_dir, labels)
    mine = indices[rank::world]  # under torchrun: every world_size-th selected image
    todo = [i for i in mine if i not in rows]
    out = tsv if world == 1 else run_dir / SHARD_FILES.replace("*", str(rank))
    if not out.exists():
        atomic_write_text(out, "\t".join(TSV_COLUMNS) + "\n")
    smooth = Smooth(model, settings.sigma, precision=settings.precision, compile=settings.compile,
                    channels_last=model_device(model).type == "cuda" and x.dim() == 4)
    with open(out, "a") as stream, tqdm(total=len(mine), initial=len(mine) - len(todo), unit="img",
                                        desc=f"certify sigma={settings.sigma:g} n={settings.n}",
                                        disable=None if progress and main else True, dynamic_ncols=True) as bar:
        for index in todo:
            started = time.perf_counter()
            smooth.manual_seed(int(seed) * 1_000_003 + index)
            prediction, radius = smooth.certify(x[position[index]], settings.n0, settings.n, settings.alpha,
                                                settings.batch)
            label = labels[index]
            row = {"index": index, "label": label, "prediction": prediction, "radius": radius,
                   "correct": int(prediction == label), "seconds": time.perf_counter() - started}
            stream.write(_format_row(row))
            stream.flush()
            rows[index] = row
            bar.update(1)
    distributed.barrier()
    if main and any(run_dir.glob(SHARD_FILES)):  # merge the processes' rows into certify.tsv, in index order
        merged = _read_all_rows(run_dir, labels)
        text = "".join(_format_row(merged[index]) for index in sorted(merged))
        atomic_write_text(tsv, "\t".join(TSV_COLUMNS) + "\n" + text)
        for path in run_dir.glob(SHARD_FILES):
            path.unlink()
    distributed.barrier()
    rows = _read_all_rows(run_dir, labels) if world > 1 else rows
    summary = summarize((rows[i] for i in indices), settings.radii)
    summary.update(sigma=settings.sigma, n0=settings.n0, n=settings.n, alpha=settings.alpha,
                   precision=settings.precision, certifiable_radius_max=max_certifiable_radius(settings.sigma, settings.n, settings.alpha))
    if trained_sigmas is not None and len(trained_sigmas) == 1:
        summary["train_sigma"] = trained_sigmas[0]
    return summary


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings) -> dict[str, Any]:
    """The evaluator: certified accuracy of the smoothed ``model`` on the selected images ``(x, y)``.

    Beyond the smoothing section's fields, ``settings`` carries the run: ``run_dir`` (for certify.tsv),
    ``indices`` (the test indices of ``x``), ``seed``, ``trained_sigmas``, ``restart`` and ``warn``."""
    section = SmoothingConfig(**{name: getattr(settings, name) for name in SmoothingConfig.model_fields})
    return certify_run(model, x, y, settings.run_dir, section, seed=settings.seed,
                       trained_sigmas=settings.trained_sigmas, restart=settings.restart, warn=settings.warn,
                       indices=settings.indices)
