"""The verification suite of issue 21's goals: 784-256xL-10 fully connected MNIST networks (L = 2, 4, 6), trained
normally, as ONNX, with VNN-LIB L-inf robustness properties at eps 0.03 and 0.05 around 15 test images, and an
``instances.csv`` (timeouts 120 s for L = 2, 300 s for L = 4 and 6), laid out as VNN-COMP benchmarks ship.

    python benchmarks/make_verify_suite.py --out /tmp/verify-suite
    certprune verify --instances /tmp/verify-suite/instances.csv --out verdicts.tsv

Training: plain cross-entropy (the natural loss) with Adam on the embedded MNIST's 8,500 training images, a few
epochs, one thread, seeded: the same files on every run of the same torch version. The images are the first test
images that all three networks classify correctly, so the three networks answer the same questions. The networks
take pixels in [0, 1] (no normalisation layer) and are exported by certprune's exporter (``certify/export.py``:
opset 13, checked operators); each VNN-LIB box is the clipped L-inf ball, printed outward from the exact eps.

Files: ``mnist-256x<L>.onnx``, ``vnnlib/img_<index>_eps_<eps>.vnnlib`` (shared by the networks: the box depends on
the image alone), ``instances.csv`` (90 rows: network, property, timeout) and ``suite.json`` (the settings, each
network's clean test accuracy and training seconds, the images).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from certprune.atomic import atomic_write_bytes
from certprune.certify.export import check_output_dir, exact_eps, onnx_model, vnnlib_text
from certprune.data import load_dataset

DEPTHS = {2: 120, 4: 300, 6: 300}  # hidden layers -> seconds per instance (issue 21's limits)
EPS = ("0.03", "0.05")
WIDTH = 256


def network(depth: int) -> nn.Sequential:
    layers, width = [nn.Flatten()], 784
    for _ in range(depth):
        layers += [nn.Linear(width, WIDTH), nn.ReLU()]
        width = WIDTH
    return nn.Sequential(*layers, nn.Linear(width, 10))


def train(depth: int, data, epochs: int, seed: int) -> nn.Sequential:
    """Natural training: cross-entropy, Adam (lr 1e-3), batch 128, ``epochs`` passes over the training images."""
    torch.manual_seed(seed + depth)
    model = network(depth)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed + depth)
    for _ in range(epochs):
        for batch in torch.randperm(len(data.train_x), generator=order).split(128):
            loss = nn.functional.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def make_suite(out: Path, images: int = 15, epochs: int = 8, seed: int = 0) -> dict:
    """Train, export and write the suite into ``out``; returns what ``suite.json`` says."""
    out = check_output_dir(out)
    data = load_dataset("mnist-embedded")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order, the same weights on every run
    try:
        models, figures = {}, {}
        for depth in DEPTHS:
            started = time.perf_counter()
            models[depth] = train(depth, data, epochs, seed)
            with torch.no_grad():
                predictions = models[depth](data.test_x).argmax(1)
            figures[depth] = {"clean_accuracy": round(float((predictions == data.test_y).double().mean()), 4),
                              "train_seconds": round(time.perf_counter() - started, 1), "correct": predictions ==
                              data.test_y}
    finally:
        torch.set_num_threads(threads)
    correct = torch.stack([f.pop("correct") for f in figures.values()]).all(0)
    chosen = torch.nonzero(correct).flatten()[:images].tolist()
    rows = []
    for depth, timeout in DEPTHS.items():
        name = f"mnist-{WIDTH}x{depth}.onnx"
        atomic_write_bytes(out / name, onnx_model(models[depth], data.test_x[:1]).SerializeToString())
        for eps in EPS:
            rows += [f"{name},vnnlib/img_{index}_eps_{eps}.vnnlib,{timeout}\n" for index in chosen]
    for index in chosen:
        label = int(data.test_y[index])
        for eps in EPS:
            comment = f"make_verify_suite.py: embedded MNIST test image {index}, label {label}, L-inf eps {eps}"
            atomic_write_bytes(out / "vnnlib" / f"img_{index}_eps_{eps}.vnnlib",
                               vnnlib_text(data.test_x[index], label, 10, exact_eps(eps), comment).encode())
    atomic_write_bytes(out / "instances.csv", "".join(rows).encode())
    summary = {"networks": {f"mnist-{WIDTH}x{depth}.onnx": {"hidden_layers": depth, "timeout": DEPTHS[depth],
                                                            **figures[depth]} for depth in DEPTHS},
               "eps": list(EPS), "images": chosen, "instances": len(rows), "epochs": epochs, "seed": seed,
               "data": "mnist-embedded", "torch": torch.__version__}
    atomic_write_bytes(out / "suite.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the suite's folder (created)")
    parser.add_argument("--images", type=int, default=15, help="test images per network and eps")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs per network")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1 or args.epochs < 1:
        parser.error("--images and --epochs must be positive")
    summary = make_suite(Path(args.out), args.images, args.epochs, args.seed)
    for name, figures in summary["networks"].items():
        print(f"{name}: clean accuracy {100 * figures['clean_accuracy']:.1f} % on the 1,500 test images, trained in "
              f"{figures['train_seconds']} s; timeout {figures['timeout']} s")
    print(f"{summary['instances']} instances ({len(summary['images'])} images x {len(summary['eps'])} eps x "
          f"{len(summary['networks'])} networks) in {args.out}/instances.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
