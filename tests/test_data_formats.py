"""Specification of the CIFAR-10 and SVHN readers on tiny files written in exactly the published formats."""
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.io import savemat

from certprune.cli import main
from certprune.data import DatasetNotFound, load_dataset

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar_batch(path, images_nhwc, labels):
    """cifar-10-batches-py: a pickled dict whose 'data' rows are 1024 red, 1024 green, 1024 blue bytes, each a
    row-major 32x32 plane, and whose 'labels' is a list of ints."""
    rows = images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), 3072)
    with open(path, "wb") as handle:
        pickle.dump({"batch_label": "tiny", "labels": [int(v) for v in labels], "data": rows,
                     "filenames": [f"{i}.png" for i in range(len(labels))]}, handle, protocol=2)


def tiny_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_cifar10_reads_the_python_pickle_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    images = {name: tiny_images(3, seed) for seed, name in enumerate(CIFAR_FILES)}
    for seed, name in enumerate(CIFAR_FILES):
        write_cifar_batch(root / name, images[name], [(seed + i) % 10 for i in range(3)])
    data = load_dataset("cifar10", tmp_path)  # the parent of cifar-10-batches-py works too
    assert data.shape() == {"in_channels": 3, "image_size": 32, "num_classes": 10}
    assert data.train_x.shape == (15, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert data.train_y.tolist() == [(s + i) % 10 for s in range(5) for i in range(3)]
    first = images["data_batch_1"][0]  # (H, W, C) bytes
    assert torch.equal(data.train_x[0], torch.from_numpy(first.transpose(2, 0, 1)).float() / 255)
    assert data.train_x[0, 2, 5, 7] == pytest.approx(first[5, 7, 2] / 255)  # blue plane, row 5, column 7
    assert torch.equal(data.test_x[2], torch.from_numpy(images["test_batch"][2].transpose(2, 0, 1)).float() / 255)


def test_svhn_reads_the_cropped_digit_mat_files_and_maps_label_10_to_digit_0(tmp_path):
    """train_32x32.mat / test_32x32.mat: X is (32, 32, 3, N) uint8, y is (N, 1) with digit 0 stored as 10."""
    arrays = {}
    for seed, split in enumerate(("train", "test")):
        images = tiny_images(4, 10 + seed)
        labels = np.array([[10], [1], [9], [10]], dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": labels})
        arrays[split] = images
    data = load_dataset("svhn", tmp_path)
    assert data.shape() == {"in_channels": 3, "image_size": 32, "num_classes": 10}
    assert data.train_y.tolist() == [0, 1, 9, 0] and data.test_y.dtype == torch.int64
    assert torch.equal(data.train_x[1], torch.from_numpy(arrays["train"][1].transpose(2, 0, 1)).float() / 255)
    assert data.test_x[3, 0, 31, 0] == pytest.approx(arrays["test"][3, 31, 0, 0] / 255)


def test_missing_files_name_what_is_missing(tmp_path):
    with pytest.raises(DatasetNotFound, match="data_batch_1"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DatasetNotFound, match="train_32x32.mat"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(DatasetNotFound, match="needs --data-dir"):
        load_dataset("cifar10", None)


@pytest.mark.parametrize("dataset, present, missing", [
    ("cifar10", [], "data_batch_1"), ("cifar10", CIFAR_FILES[:3], "data_batch_4"),
    ("svhn", [], "train_32x32.mat"), ("svhn", ["train_32x32.mat"], "test_32x32.mat")])
def test_the_cli_reports_missing_cifar_and_svhn_files_in_one_line(tmp_path, dataset, present, missing):
    for name in present:
        if dataset == "cifar10":
            write_cifar_batch(tmp_path / name, tiny_images(2, 0), [0, 1])
        else:
            savemat(tmp_path / name, {"X": tiny_images(2, 0).transpose(1, 2, 3, 0), "y": np.ones((2, 1))})
    result = CliRunner().invoke(main, ["pretrain", "--dataset", dataset, "--data-dir", str(tmp_path),
                                       "--out", str(tmp_path / "run"), "--model", "vgg16-bn", "--loss", "pgd",
                                       "--eps", "8/255"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and missing in lines[0]
