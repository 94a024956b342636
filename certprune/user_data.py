"""A user's own images: ``npz:PATH``, ``folder:DIR`` and the Python API's tensors, read and checked in one place.

``npz:PATH`` holds arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optionally ``num_classes``);
``folder:DIR`` holds ``train/`` and ``test/``, one subfolder per class, read with Pillow (the image library
matplotlib already installs). Every array passes :func:`checked`: images become float ``(N, C, H, W)`` in [0, 1]
(uint8 divided by 255; floats must already lie there), which is the unit of every eps; labels become int64 within
the classes. Each defect is one line naming the array and what is wrong with it. :mod:`certprune.data` wraps the
tensors into its :class:`~certprune.data.Dataset`.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]  # train x, y, test x, y, classes


def _images(array: np.ndarray, where: str, channels_last: bool | None = None) -> torch.Tensor:
    """Images as float ``(N, C, H, W)`` in [0, 1]: uint8 divided by 255, floats as they are (checked to lie in
    [0, 1]). ``(N, H, W)`` is one channel; a 4-d array is NCHW when its last two sizes are equal, NHWC when its middle
    two are (NCHW when all three are), unless ``channels_last`` says."""
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{where} holds {array.dtype} values; store images as uint8 (0 to 255) or floats in [0, 1]")
    shape = array.shape
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and (channels_last or channels_last is None and array.shape[1] == array.shape[2]
                              and array.shape[2] != array.shape[3]):
        array = array.transpose(0, 3, 1, 2)
    if array.ndim != 4 or array.shape[2] != array.shape[3]:
        raise ValueError(f"{where} has shape {shape}; images are (N, H, W), (N, C, H, W) or (N, H, W, C) "
                         "with H = W")
    if len(array) == 0:
        raise ValueError(f"{where} holds no images")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0)
    if not np.isfinite(array).all():
        raise ValueError(f"{where} holds NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise ValueError(f"{where} holds values in [{low:g}, {high:g}], outside [0, 1]: store floats in [0, 1] or "
                         "uint8 (a model that expects another range says so with inputs.range)")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _labels(array: np.ndarray, count: int, num_classes: int, where: str, images: str) -> torch.Tensor:
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{where} must be a vector of integer class labels, got {array.dtype} of shape {array.shape}")
    if len(array) != count:
        raise ValueError(f"{where} has {len(array)} labels for the {count} images of {images}")
    outside = array[(array < 0) | (array >= num_classes)]
    if len(outside):
        raise ValueError(f"{where} holds label {int(outside[0])}, outside 0..{num_classes - 1} ({num_classes} classes)")
    return torch.from_numpy(array.astype(np.int64))


def checked(name: str, x_train=None, y_train=None, x_test=None, y_test=None, num_classes: int | None = None,
            channels_last: bool | None = None) -> Split:
    """A user's arrays (numpy or torch) checked in one line each: images as :func:`_images` takes them, the same shape
    in both splits, integer labels in ``0..num_classes-1`` (by default one more than the largest label). A split given
    no arrays comes back empty."""
    arrays = {key: value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
              for key, value in (("x_train", x_train), ("y_train", y_train), ("x_test", x_test), ("y_test", y_test))
              if value is not None}
    splits = [split for split in ("train", "test") if f"x_{split}" in arrays]
    images = {split: _images(arrays[f"x_{split}"], f"{name}: x_{split}", channels_last) for split in splits}
    if len(images) == 2 and images["test"].shape[1:] != images["train"].shape[1:]:
        raise ValueError(f"{name}: x_test holds images of shape {tuple(images['test'].shape[1:])}, x_train of "
                         f"{tuple(images['train'].shape[1:])}")
    labels = [arrays.get(f"y_{split}", np.zeros(0)) for split in splits]
    if num_classes is None:
        whole = [y for y in labels if y.size and np.issubdtype(y.dtype, np.integer)]
        num_classes = max(int(y.max()) for y in whole) + 1 if whole else 1
    tensors = {split: (images[split], _labels(y, len(images[split]), num_classes, f"{name}: y_{split}", f"x_{split}"))
               for split, y in zip(splits, labels)}
    first = tensors[splits[0]]
    empty = (first[0][:0], first[1][:0])
    return (*tensors.get("train", empty), *tensors.get("test", empty), num_classes)


NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def read_npz(name: str, path: str) -> Split:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{name} is not an .npz file (the zip of .npy arrays numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as stored:
            missing = [key for key in NPZ_ARRAYS if key not in stored.files]
            if missing:
                held = ", ".join(stored.files) or "none"
                raise ValueError(f"{name} lacks array {', '.join(missing)} (it holds {held}; it needs "
                                 f"{', '.join(NPZ_ARRAYS)})")
            arrays = {key: stored[key] for key in (*NPZ_ARRAYS, "num_classes") if key in stored.files}
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{name} cannot be read ({type(error).__name__}: {str(error).strip()[:200]})") from None
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise
        raise ValueError(f"{name} holds Python objects, which certprune never loads; store plain numeric arrays"
                         ) from None
    classes = arrays.pop("num_classes", None)
    if classes is not None and (classes.size != 1 or not np.issubdtype(classes.dtype, np.integer) or classes < 1):
        raise ValueError(f"{name}: num_classes must be one positive integer, got {classes!r}")
    return checked(name, **arrays, num_classes=None if classes is None else int(classes))


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # Pillow's one-channel modes (LA: with alpha, which is dropped)


def read_folder(name: str, directory: str) -> Split:
    """``DIR/train/<class>/*`` and ``DIR/test/<class>/*``: classes are train/'s subfolders in sorted order, every
    image of one size; one channel when all are grey, else RGB."""
    from PIL import Image, UnidentifiedImageError

    root = Path(directory)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise ValueError(f"{name}: needs {root / 'train'} and {root / 'test'}, each with one subfolder per class")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    extra = sorted({p.name for p in (root / "test").iterdir() if p.is_dir() and not p.name.startswith(".")}
                   - set(classes))
    if not classes or extra:
        raise ValueError(f"{name}: test/{extra[0]} is a class train/ does not have" if extra else
                         f"{name}: train/ has no class subfolders")
    splits = {}
    for split in ("train", "test"):
        images, labels = [], []
        for label, cls in enumerate(classes):
            folder = root / split / cls
            for path in sorted(folder.iterdir()) if folder.is_dir() else []:
                if path.name.startswith(".") or not path.is_file():
                    continue
                try:
                    with Image.open(path) as image:
                        image.load()
                        images.append((path, image.copy()))
                except (UnidentifiedImageError, OSError):
                    raise ValueError(f"{name}: {path.relative_to(root)} is not an image Pillow can read") from None
                labels.append(label)
        if not images:
            raise ValueError(f"{name}: {split}/ holds no images")
        splits[split] = (images, np.array(labels))
    everything = splits["train"][0] + splits["test"][0]
    mode = "L" if all(image.mode in GRAY_MODES for _, image in everything) else "RGB"
    size = everything[0][1].size
    odd = next(((path, image.size) for path, image in everything if image.size != size), None)
    if odd is not None:
        raise ValueError(f"{name}: {odd[0].relative_to(root)} is {odd[1][0]}x{odd[1][1]}, the first image "
                         f"{size[0]}x{size[1]}; every image needs one size")
    pixels = {split: np.stack([np.asarray(image.convert(mode), np.uint8) for _, image in images])
              for split, (images, _) in splits.items()}
    return checked(name, pixels["train"], splits["train"][1], pixels["test"], splits["test"][1],
                   num_classes=len(classes), channels_last=True if mode == "RGB" else None)


READERS: dict[str, Callable[[str, str], Split]] = {"npz": read_npz, "folder": read_folder}  # "npz:PATH", "folder:DIR"
