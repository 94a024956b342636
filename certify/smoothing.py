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
one, and its certified radii belong to it. :func:`certify_run` certifies a run's test images
into ``certify.tsv`` (one line per image, written as it goes, resumable) and summarises them; the ``certprune
certify`` command and the pipeline's evaluation both call it.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from scipy.stats import beta, binomtest, norm
from torch import nn
from tqdm.auto import tqdm

from certprune import distributed
from certprune.config import PhaseConfig, SmoothingConfig
from certprune.devices import model_device
from certprune.losses_noise import check_sigma
from certprune.masking import PHASES
from certprune.runs import RunError, atomic_write_text, load_saved_run, update_metrics

ABSTAIN = -1
TSV_FILE, SETTINGS_FILE = "certify.tsv", "certify.json"
SHARD_FILES = "certify.rank*.tsv"  # under torchrun, each process's rows until they are merged into certify.tsv
TSV_COLUMNS = ("index", "label", "prediction", "radius", "correct", "seconds")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # None: the model's own dtype, no autocast


class SigmaMismatchWarning(UserWarning):
    """Certifying with a noise level the model was not trained for (legal, but usually far weaker)."""


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a whole number > 0, got {value!r}")
    return value


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def _check_alpha(alpha: float) -> float:
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}") from None
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) (the failure probability), got {alpha}")
    return alpha


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
        alpha = _check_alpha(alpha)
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
        alpha = _check_alpha(alpha)
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


# ---- certifying a run's test images: certify.tsv, resume, summary ----------------------------------------------


def training_sigmas(config) -> list[float]:
    """The noise levels a run's model was trained with: the ``sigma`` of every phase with epochs that trains under
    a noise loss (its config holds it, so it is stored with the run). Empty when no phase used noise."""
    sigmas = set()
    for phase in PHASES:
        settings: PhaseConfig = getattr(config, phase)
        if settings.epochs > 0:
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


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's weights: certify.tsv rows of one model are never resumed with another."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_settings(settings: SmoothingConfig) -> None:
    check_sigma(settings.sigma)
    check_precision(settings.precision)
    _check_count("n0", settings.n0)
    _check_count("n", settings.n)
    _check_alpha(settings.alpha)
    _check_count("batch", settings.batch)
    _check_count("skip", settings.skip)
    if settings.max is not None:
        _check_count("max", settings.max)
    if any(not (isinstance(r, (int, float)) and r >= 0) for r in settings.radii):
        raise ValueError(f"radii must be numbers >= 0, got {settings.radii}")


def selected_indices(total: int, skip: int, maximum: int | None) -> list[int]:
    """Every ``skip``-th test index from 0, at most ``maximum`` of them."""
    return list(range(0, total, skip))[:maximum]


def _read_rows(path: Path) -> dict[int, dict[str, Any]]:
    """Finished rows of ``certify.tsv`` by index. A last line cut off by an interruption is dropped from the file."""
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        atomic_write_text(path, text)
    lines = text.splitlines()
    if not lines or tuple(lines[0].split("\t")) != TSV_COLUMNS:
        raise RunError(f"{path} is not a certify.tsv (its header is not {' '.join(TSV_COLUMNS)}); "
                       "pass --restart to overwrite it")
    rows = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            index, label, prediction, radius, correct, seconds = line.split("\t")
            row = {"index": int(index), "label": int(label), "prediction": int(prediction), "radius": float(radius),
                   "correct": int(correct), "seconds": float(seconds)}
        except ValueError:
            raise RunError(f"{path} line {number} is malformed; pass --restart to start over") from None
        if row["index"] in rows:
            raise RunError(f"{path} holds index {row['index']} twice; pass --restart to start over")
        rows[row["index"]] = row
    return rows


def _read_all_rows(run_dir: Path, y: torch.Tensor) -> dict[int, dict[str, Any]]:
    """The rows of certify.tsv and of the shard files an interrupted torchrun left, checked against the labels."""
    rows: dict[int, dict[str, Any]] = {}
    labels = y.cpu()
    for path in (run_dir / TSV_FILE, *sorted(run_dir.glob(SHARD_FILES))):
        for index, row in _read_rows(path).items():
            if index in rows:
                raise RunError(f"{path} holds index {index} twice; pass --restart to start over")
            if not (0 <= index < len(labels)) or row["label"] != int(labels[index]):
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
                warn: Callable[[str], None] = _warn, progress: bool = True) -> dict[str, Any]:
    """Certify the selected images of ``(x, y)`` into ``run_dir/certify.tsv`` and return the summary.

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
    settings = SmoothingConfig(**{**settings.__dict__, "sigma": resolve_sigma(settings.sigma, trained_sigmas or [])})
    check_settings(settings)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    if trained_sigmas is not None and settings.sigma not in trained_sigmas:
        warn(f"certifying with sigma={settings.sigma:g}, but the model was trained "
             + (f"with sigma={', '.join(f'{s:g}' for s in trained_sigmas)}" if trained_sigmas else "without noise")
             + "; the certified radii will be far smaller than at its own sigma")
    indices = selected_indices(len(x), settings.skip, settings.max)
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
    rows = _read_all_rows(run_dir, y)
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
            prediction, radius = smooth.certify(x[index], settings.n0, settings.n, settings.alpha, settings.batch)
            label = int(y[index])
            row = {"index": index, "label": label, "prediction": prediction, "radius": radius,
                   "correct": int(prediction == label), "seconds": time.perf_counter() - started}
            stream.write(_format_row(row))
            stream.flush()
            rows[index] = row
            bar.update(1)
    distributed.barrier()
    if main and any(run_dir.glob(SHARD_FILES)):  # merge the processes' rows into certify.tsv, in index order
        merged = _read_all_rows(run_dir, y)
        text = "".join(_format_row(merged[index]) for index in sorted(merged))
        atomic_write_text(tsv, "\t".join(TSV_COLUMNS) + "\n" + text)
        for path in run_dir.glob(SHARD_FILES):
            path.unlink()
    distributed.barrier()
    rows = _read_all_rows(run_dir, y) if world > 1 else rows
    summary = summarize((rows[i] for i in indices), settings.radii)
    summary.update(sigma=settings.sigma, n0=settings.n0, n=settings.n, alpha=settings.alpha,
                   precision=settings.precision, certifiable_radius_max=max_certifiable_radius(settings.sigma, settings.n, settings.alpha))
    if trained_sigmas is not None and len(trained_sigmas) == 1:
        summary["train_sigma"] = trained_sigmas[0]
    return summary


def certify_saved_run(source: str | Path, settings: SmoothingConfig, restart: bool = False,
                      warn: Callable[[str], None] = _warn, device: str | torch.device = "cpu") -> dict[str, Any]:
    """``certprune certify``: certify the test images of a finished run (a directory or its model.pt) with the data
    set and training sigma its config.yaml names, and merge the summary into its metrics.json. Under torchrun the
    processes share the images (:func:`certify_run`) and rank 0 writes metrics.json."""
    model_path, config, model, x, y = load_saved_run(source, device)
    run_dir = model_path.parent
    summary = certify_run(model, x, y, run_dir, settings, seed=config.seed, trained_sigmas=training_sigmas(config),
                          restart=restart, warn=warn)
    if distributed.is_main():
        update_metrics(run_dir, **summary)
    return summary
