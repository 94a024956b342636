"""A user's own images: ``npz:PATH`` and ``folder:DIR`` give the same Dataset as the named sets, images in [0, 1];
every malformed file is one line that says what is wrong, before any work."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from certprune.data import DatasetNotFound, load_dataset
from helpers import assert_one_line_error, run

TINY = Path(__file__).parent / "data" / "tiny.npz"
USER_NET = f"{Path(__file__).parent / 'data' / 'user_net.py'}:make"


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def good_arrays(**changes):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8), "y_train": np.array([0, 1, 2, 0, 1, 2]),
              "x_test": rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8), "y_test": np.array([2, 0])}
    arrays.update(changes)
    return {key: value for key, value in arrays.items() if value is not None}


def test_npz_reads_uint8_nhwc_as_nchw_in_the_unit_interval(tmp_path):
    arrays = good_arrays()
    data = load_dataset(write_npz(tmp_path / "d.npz", **arrays))
    assert data.shape() == {"in_channels": 3, "image_size": 5, "num_classes": 3}
    assert torch.equal(data.train_x[1], torch.from_numpy(arrays["x_train"][1].transpose(2, 0, 1)).float() / 255)
    assert data.test_y.tolist() == [2, 0] and data.train_y.dtype == torch.int64 and data.name == f"npz:{tmp_path}/d.npz"


def test_npz_takes_float_nchw_and_grey_nhw_and_a_stored_class_count(tmp_path):
    x = np.random.default_rng(1).random((4, 2, 6, 6)).astype(np.float32)
    data = load_dataset(write_npz(tmp_path / "f.npz", x_train=x, y_train=np.arange(4), x_test=x[:1], y_test=[3]))
    assert torch.equal(data.train_x, torch.from_numpy(x)) and data.num_classes == 4
    grey = load_dataset(write_npz(tmp_path / "g.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=[0, 1],
                                  x_test=np.zeros((1, 4, 4), np.uint8), y_test=[1], num_classes=10))
    assert grey.train_x.shape == (2, 1, 4, 4) and grey.num_classes == 10


def test_the_committed_tiny_set_is_what_its_script_describes():
    data = load_dataset(f"npz:{TINY}")
    assert data.train_x.shape == (300, 1, 7, 7) and data.test_x.shape == (100, 1, 7, 7) and data.num_classes == 10
    assert set(data.train_y.tolist()) == set(range(10))
    assert 0 <= float(data.train_x.min()) < float(data.train_x.max()) <= 1


@pytest.mark.parametrize("changes, fragment", [
    ({"y_test": None}, "lacks array y_test (it holds x_train, y_train, x_test; it needs x_train, y_train, x_test, "
                       "y_test)"),
    ({"x_train": np.zeros((6, 5, 4, 3), np.uint8)}, "x_train has shape (6, 5, 4, 3); images are (N, H, W), "
                                                    "(N, C, H, W) or (N, H, W, C) with H = W"),
    ({"x_train": np.zeros((6, 5, 5, 3, 1), np.uint8)}, "x_train has shape (6, 5, 5, 3, 1)"),
    ({"x_test": np.zeros((2, 4, 4, 3), np.uint8)}, "x_test holds images of shape (3, 4, 4), x_train of (3, 5, 5)"),
    ({"y_train": np.array([0, 1, 2, 0, 1])}, "y_train has 5 labels for the 6 images of x_train"),
    ({"y_test": np.array([2, -1])}, "y_test holds label -1, outside 0..2 (3 classes)"),
    ({"y_test": np.array([2, 7]), "num_classes": 3}, "y_test holds label 7, outside 0..2 (3 classes)"),
    ({"y_train": np.array([0, 1, 2, 0, 1, 2.5])}, "y_train must be a vector of integer class labels, got float64"),
    ({"x_train": np.full((6, 5, 5, 3), 1.5)}, "x_train holds values in [1.5, 1.5], outside [0, 1]: store floats in "
                                              "[0, 1] or uint8"),
    ({"x_train": np.full((6, 5, 5, 3), np.nan, np.float32)}, "x_train holds NaN or infinite values"),
    ({"x_train": np.zeros((6, 5, 5, 3), np.int32)}, "x_train holds int32 values; store images as uint8 (0 to 255) "
                                                    "or floats in [0, 1]"),
    ({"x_test": np.zeros((0, 5, 5, 3), np.uint8), "y_test": np.zeros(0, int)}, "x_test holds no images"),
    ({"num_classes": np.array([2, 3])}, "num_classes must be one positive integer"),
])
def test_a_malformed_npz_is_one_line_before_any_work(tmp_path, monkeypatch, changes, fragment):
    spec = write_npz(tmp_path / "bad.npz", **good_arrays(**changes))
    monkeypatch.chdir(tmp_path)
    result = run("prune", "--model", USER_NET, "--dataset", spec, "--k", 0.1, "--out", tmp_path / "out")
    assert_one_line_error(result, fragment)
    assert f"Error: {spec}" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_files_that_are_not_npz_arrays_say_so(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"is not an \.npz file \(the zip of \.npy arrays numpy\.savez writes\)"):
        load_dataset(f"npz:{tmp_path}/text.npz")
    spec = write_npz(tmp_path / "objects.npz", **good_arrays(x_train=np.array([{"a": 1}] * 6, dtype=object)))
    with pytest.raises(ValueError, match="holds Python objects, which certprune never loads"):
        load_dataset(spec)
    with pytest.raises(DatasetNotFound, match="^npz:nowhere.npz: nowhere.npz does not exist$"):
        load_dataset("npz:nowhere.npz")


def write_images(root, split, cls, arrays, mode):
    folder = root / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    for index, array in enumerate(arrays):
        Image.fromarray(array, mode=mode).save(folder / f"{index}.png")


def test_folder_reads_one_subfolder_per_class_with_pillow(tmp_path):
    rng = np.random.default_rng(2)
    pixels = {(split, cls): rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8) for split in ("train", "test")
              for cls in ("cat", "dog")}
    for (split, cls), arrays in pixels.items():
        write_images(tmp_path, split, cls, arrays, "RGB")
    (tmp_path / "train" / "cat" / ".DS_Store").write_text("hidden files are skipped")
    data = load_dataset(f"folder:{tmp_path}")
    assert data.shape() == {"in_channels": 3, "image_size": 4, "num_classes": 2}
    assert data.train_y.tolist() == [0, 0, 1, 1] and data.test_y.tolist() == [0, 0, 1, 1]  # cat, dog: sorted names
    expected = torch.from_numpy(pixels["train", "dog"][1].transpose(2, 0, 1)).float() / 255
    assert torch.equal(data.train_x[3], expected)
    grey = tmp_path / "grey"
    for split in ("train", "test"):
        write_images(grey, split, "a", np.full((1, 3, 3), 51, np.uint8), "L")
    grey_x = load_dataset(f"folder:{grey}").train_x
    assert grey_x.shape == (1, 1, 3, 3) and torch.allclose(grey_x, torch.full((1, 1, 3, 3), 0.2))


@pytest.mark.parametrize("breakage, fragment", [
    (lambda root: __import__("shutil").rmtree(root / "test"), "needs {root}/train and {root}/test, each with one "
                                                               "subfolder per class"),
    (lambda root: write_images(root, "test", "zebra", np.zeros((1, 4, 4, 3), np.uint8), "RGB"),
     "test/zebra is a class train/ does not have"),
    (lambda root: (root / "train" / "cat" / "notes.txt").write_text("x"), "train/cat/notes.txt is not an image Pillow "
                                                                            "can read"),
    (lambda root: Image.new("RGB", (6, 4)).save(root / "train" / "cat" / "wide.png"),
     "train/cat/wide.png is 6x4, the first image 4x4; every image needs one size"),
])
def test_a_malformed_folder_is_one_line(tmp_path, breakage, fragment):
    root = tmp_path / "set"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            write_images(root, split, cls, np.zeros((1, 4, 4, 3), np.uint8), "RGB")
    breakage(root)
    result = run("pretrain", "--dataset", f"folder:{root}", "--out", tmp_path / "out", "--set", "pretrain.epochs=1")
    assert_one_line_error(result, fragment.format(root=root))
    assert not (tmp_path / "out").exists()


def test_an_unknown_data_set_form_names_the_forms():
    assert_one_line_error(run("pretrain", "--dataset", "csv:x.csv"), "unknown dataset 'csv:x.csv'; choose from "
                          "mnist-embedded, mnist, fashion-mnist, cifar10, svhn, npz:PATH or folder:DIR")
