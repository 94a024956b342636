"""Smoke runs of the paper configs (configs/paper/*.yaml) at their real shapes, on CPU, in seconds.

Why: none of these configs can be trained here (each needs a GPU for days), so nothing else shows that they run at
all. Each run keeps what makes the config itself: its model at 32 x 32 x 3, its loss with its attack or noise, its
augmentation, optimiser and schedule, its data set read through the real loader from files in the published
on-disk formats (CIFAR-10 pickle batches, SVHN .mat, written by tests/test_data_formats.py's writers). Only the
amounts shrink: 16 training images in batches of 8, one epoch per phase, one k, and evaluation on 4 test images
with few attack steps or noise samples.

In the suite, which must stay fast, only the representative config runs, and ``quick``: 4 training images (one
batch per phase) and a one-step training attack; a VGG16-BN step at 32 x 32 still costs about a second on a CPU.
``CERTPRUNE_SMOKE_ALL=1`` runs every config; benchmarks/smoke_paper_configs.py runs them all with the configs' own
10-step attacks, and times them (about 100 CPU seconds per config).
"""
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.io import savemat

from certprune import load_run
from certprune.augment import BatchAugment
from certprune.config import load_config
from certprune.pipeline import pretrain, prune
from test_data_formats import CIFAR_FILES, tiny_images, write_cifar_batch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
REPRESENTATIVE = "cifar10-vgg16-bn.yaml"  # the paper's main table: TRADES, augmentation, PGD evaluation
RUN_ALL = os.environ.get("CERTPRUNE_SMOKE_ALL") == "1"
TRAIN_PER_FILE, TEST_IMAGES = 4, 8  # 5 CIFAR training batches of 4 = 20 training images; 8 test images


def write_synthetic(dataset: str, directory: Path) -> Path:
    """Random images and labels in the data set's published file format under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    if dataset == "cifar10":
        root = directory / "cifar-10-batches-py"
        root.mkdir(exist_ok=True)
        for seed, name in enumerate(CIFAR_FILES):
            count = TEST_IMAGES if name == "test_batch" else TRAIN_PER_FILE
            write_cifar_batch(root / name, tiny_images(count, seed), [(seed + i) % 10 for i in range(count)])
    elif dataset == "svhn":
        for seed, (split, count) in enumerate((("train", 5 * TRAIN_PER_FILE), ("test", TEST_IMAGES))):
            labels = np.array([[(seed + i) % 10 + 1] for i in range(count)], dtype=np.uint8)  # 10 stands for 0
            savemat(directory / f"{split}_32x32.mat", {"X": tiny_images(count, seed).transpose(1, 2, 3, 0),
                                                        "y": labels})
    else:
        raise ValueError(f"no synthetic writer for {dataset}")
    return directory


def tiny_overrides(raw: dict, data_dir: Path, quick: bool = False) -> dict:
    """The config, shrunk: same model, loss, augmentation and optimiser; tiny amounts of data and evaluation.
    ``quick``: one batch of 4 per phase and a one-step training attack (the suite's setting)."""
    overrides = {"data_dir": str(data_dir), "device": "cpu", "train_examples": 4 if quick else 16,
                 "batch_size": 4 if quick else 8, "k": [0.1],
                 "pretrain": {"epochs": 1}, "prune": {"epochs": 1}, "finetune": {"epochs": 1}}
    if quick and "steps" in raw["loss"]:
        overrides["loss"] = {"steps": 1}
    if raw.get("attack") is not None:
        overrides["attack"] = {"max": 4, "steps": 2}
    if raw.get("smoothing") is not None:
        overrides["smoothing"] = {"max": 4, "n0": 8, "n": 32, "batch": 32, "skip": 1}
    return overrides


def smoke_run(config_path: Path, workdir: Path, quick: bool = False) -> dict:
    """Pretrain, prune with HYDRA (score phase, then fine-tuning) and evaluate one config; seconds per stage."""
    raw = yaml.safe_load(config_path.read_text())
    data_dir = write_synthetic(raw["dataset"], workdir / "data")
    config = load_config(config_path, [tiny_overrides(raw, data_dir, quick)])
    seconds = {}
    started = time.perf_counter()
    dense = pretrain(config, workdir / "dense")
    seconds["pretrain"] = time.perf_counter() - started
    started = time.perf_counter()
    pruned = prune(config, workdir / "hydra", k=0.1, method="hydra", source=workdir / "dense")
    seconds["prune+finetune"] = time.perf_counter() - started
    started = time.perf_counter()
    evaluation = evaluate(config, workdir / "hydra")
    seconds["evaluate"] = time.perf_counter() - started
    return {"config": config, "dense": dense, "pruned": pruned, "evaluation": evaluation, "seconds": seconds}


def evaluate(config, run_dir: Path) -> dict:
    """The config's own evaluations (attack or smoothing) of a finished run, through the one evaluation driver."""
    from certprune.evaluation import evaluate_configured

    return evaluate_configured(run_dir, config, device="cpu")


def selected() -> list[Path]:
    """The suite runs the representative config; every config runs with CERTPRUNE_SMOKE_ALL=1 or as the benchmark
    benchmarks/smoke_paper_configs.py (too slow for the suite on 2 CPU cores, never skipped: simply not listed)."""
    return [path for path in CONFIGS if RUN_ALL or path.name == REPRESENTATIVE]


def test_every_paper_config_loads_with_the_papers_augmentation():
    assert len(CONFIGS) >= 5
    for path in CONFIGS:
        config = load_config(path)
        assert config.augment == ["crop", "flip"], path.name  # HYDRA's data/cifar.py and data/svhn.py do both
        assert config.dataset in ("cifar10", "svhn") and config.batch_size == 128


@pytest.mark.parametrize("config_path", selected(), ids=lambda path: path.stem)
def test_a_paper_config_runs_every_phase_at_real_shapes(config_path, tmp_path, monkeypatch):
    augmented = []  # the shape of every batch the training loop augments, before and after

    def recorded(self, x, generator=None):
        out = original(self, x, generator)
        augmented.append((tuple(x.shape), tuple(out.shape), generator is not None))
        return out

    original = BatchAugment.__call__
    monkeypatch.setattr(BatchAugment, "__call__", recorded)
    result = smoke_run(config_path, tmp_path, quick=not RUN_ALL)
    config = result["config"]
    assert config.augment == ["crop", "flip"]
    batches = -(-config.train_examples // config.batch_size)
    assert len(augmented) == 3 * batches  # every batch of pretrain, prune and finetune, once
    assert all(before == after and before[1:] == (3, 32, 32) and seeded for before, after, seeded in augmented)
    assert result["dense"]["k"] == 1.0
    assert result["pruned"]["sparsity"] == pytest.approx(0.9, abs=0.01)  # k = 0.1 of every prunable layer
    history = (tmp_path / "hydra" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["prune", "finetune"]
    for run in ("dense", "hydra"):
        assert not (tmp_path / run / "checkpoint.pt").exists()  # finished, not left resumable
    metrics = yaml.safe_load((tmp_path / "hydra" / "metrics.json").read_text())
    figures = repr(metrics) + repr(result["evaluation"])
    assert ("pgd_acc" in figures) if config.attack is not None else ("certified_acc" in figures)
    x = torch.rand(2, 3, 32, 32)
    assert load_run(tmp_path / "hydra")(x).shape == (2, 10)
