"""The one-call Python API for a model already in memory: :func:`prune` and :func:`verify`.

A thin layer over what the command line runs: the pipeline's prune phase (:func:`certprune.pipeline.prune`, HYDRA's
score training and fine-tuning, or LWM) and the evaluation driver (:func:`certprune.evaluation.evaluate_run`, the
verification cascade), on a run directory: ``out``, or a temporary one that is removed afterwards. The settings are
the config's keys (:class:`certprune.config.Config`), validated whole before any work; the data are a
:class:`certprune.data.Dataset`, a data set's name (``"npz:PATH"`` too), a pair of tensors ``(images, labels)``, or
a torch dataset of such pairs, images in [0, 1] (the unit of eps).

The example ``examples/prune_and_verify.py`` runs both in a few seconds::

    pruned, record = certprune.prune(model, (x_train, y_train), k=0.1, loss="ibp", eps=0.02,
                                     prune={"epochs": 1, "lr": 0.01}, finetune={"epochs": 2, "lr": 0.005})
    report = certprune.verify(pruned, (x_test, y_test), eps=0.02, methods=("IBP", "CROWN"))
    print(record["sparsity"], report["clean_acc"], report["verified_acc"])
"""
from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn


def _dataset(data, model: nn.Module, split: str):
    """``data`` as a :class:`Dataset`: itself, a data set's name loaded, or tensors (a torch dataset's pairs stacked)
    as ``split``, checked as an npz file's arrays are, with one class per output of ``model``."""
    from .data import IN_MEMORY, Dataset, from_arrays, load_dataset
    from .devices import model_device

    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, Path)):
        return load_dataset(str(data))
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        images, labels = data
    elif isinstance(data, torch.utils.data.Dataset):
        pairs = [data[i] for i in range(len(data))]
        images, labels = torch.stack([torch.as_tensor(p[0]) for p in pairs]), torch.tensor([int(p[1]) for p in pairs])
    else:
        raise ValueError(f"data: a certprune Dataset, a data set's name, (images, labels) tensors or a torch dataset "
                         f"of (image, label) pairs, not a {type(data).__name__}")
    dataset = from_arrays(f"{IN_MEMORY}:{type(data).__name__}", **{f"x_{split}": images, f"y_{split}": labels})
    x = dataset.train_x if split == "train" else dataset.test_x
    with torch.no_grad():
        classes = int(copy.deepcopy(model).eval()(x[:1].to(model_device(model))).shape[-1])
    if dataset.num_classes > classes:
        raise ValueError(f"{dataset.name}: label {dataset.num_classes - 1} is outside the model's {classes} classes")
    dataset.num_classes = classes
    return dataset


def _config(model: nn.Module, data, settings: dict[str, Any]):
    """The config of a run on ``model`` (named by its class) and ``data``, with ``settings`` on top, validated whole."""
    from .config import load_config
    from .data import IN_MEMORY, check_dataset_name
    from .sources import MEMORY, with_origin

    try:
        check_dataset_name(data.name)
        name = data.name
    except ValueError:  # a Dataset the caller made, under a name of its own
        name = f"{IN_MEMORY}:{data.name}"
    model_name = f"{MEMORY}:{type(model).__module__}.{type(model).__qualname__}"
    return with_origin(load_config(None, [{"model": model_name, "dataset": name}, settings]))


@contextlib.contextmanager
def _run_dir(out: str | Path | None) -> Iterator[Path]:
    if out is not None:
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="certprune-") as directory:
        yield Path(directory) / "run"


def prune(model: nn.Module, train_set, k: float = 0.05, loss: str | dict = "crown-ibp", eps: float | str | None = 0.1,
          *, method: str = "hydra", out: str | Path | None = None, device: str = "auto", seed: int = 0,
          **settings) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``model`` to a fraction ``k`` of its weights under ``loss`` at ``eps`` and fine-tune it on
    ``train_set``; returns the pruned model (a copy of ``model``, pruned weights exactly 0) and the run's record
    (sparsity, kept weights per layer, settings, seconds). ``model`` itself is not changed.

    ``loss`` is a loss's name (``eps`` is its budget; None for a loss without one, e.g. ``natural``) or a dict of its
    parameters. ``settings`` are any further config keys, e.g. ``prune={"epochs": 4}``, ``finetune={"epochs": 4}``,
    ``batch_size=64``, ``inputs={"range": [0, 255]}``. ``out`` keeps the run directory (its ``model.pt``,
    ``config.yaml``, ``metrics.json``, ``history.csv``); resume it with ``resume=True``.
    """
    from .pipeline import prune as run_prune
    from .runs import MODEL_FILE, load_state, safe_load
    from .sources import prepared

    data = _dataset(train_set, model, "train")
    resume = settings.pop("resume", False)
    loss = dict(loss) if isinstance(loss, dict) else {"name": loss, **({"eps": eps} if eps is not None else {})}
    config = _config(model, data, {"loss": loss, "device": device, "seed": seed, "verify": None, **settings})
    with _run_dir(out) as run_dir:
        record = run_prune(config, run_dir, k, method, model, resume=resume, data=data)
        pruned = prepared(copy.deepcopy(model), record.get("inputs"), data.channels)
        load_state(pruned, safe_load(run_dir / MODEL_FILE)["state_dict"], run_dir / MODEL_FILE)
    return pruned.eval(), record


def verify(model: nn.Module, test_set, eps: float | str = 0.1, methods: Sequence[str] = ("IBP", "CROWN"), *,
           max: int | None = None, skip: int | None = None, batch_size: int | None = None,
           timeout: float | None = None, out: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Verified accuracy of ``model`` on ``test_set`` under an L-inf budget ``eps`` (images in [0, 1]), through the
    cascade of sound ``methods`` (IBP, CROWN-IBP, CROWN, alpha-CROWN, MILP), as ``certprune verify`` computes it.

    Returns the evaluation record: ``clean_acc``, ``verified_acc``, each stage's share, ``falsified_acc`` and
    ``unknown_acc`` with the MILP, the images and settings it covers. ``out`` keeps the run directory (its
    ``verify*.tsv`` has a line per image). ``model`` itself is not changed.
    """
    from .devices import resolve_device
    from .evaluation import evaluate_run
    from .runs import MODEL_FILE, RunError, locked, save_model, write_config

    data = _dataset(test_set, model, "test")
    config = _config(model, data, {"loss": {"name": "natural"}, "device": device, "verify": {"eps": eps}})
    requested = {"eps": eps, "bound_methods": list(methods), "max": max, "skip": skip, "batch_size": batch_size,
                 "timeout": timeout}
    if out is not None and Path(out, MODEL_FILE).exists():
        raise RunError(f"{out} already holds a model; verify into a new directory")
    copied = copy.deepcopy(model).eval()
    with _run_dir(out) as run_dir:
        with locked(run_dir):
            write_config(run_dir, config)
            save_model(copied, run_dir / MODEL_FILE, {"name": config.model, "kwargs": data.shape(),
                                                      "origin": config.model_origin})
        (record,) = evaluate_run(run_dir, {"verify": requested}, resolve_device(device), data=data, config=config,
                                 model=copied).values()
    return record
