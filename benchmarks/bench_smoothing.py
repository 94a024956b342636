"""Randomized-smoothing certification speed against the bare forward pass, measured in one run.

For the same model, the same batch size and the same number of inputs (images x (n0 + n)), it times
``Smooth.certify`` (noise drawn on the device, votes counted with bincount, Clopper-Pearson bound) and a bare
forward pass over a fixed batch, alternating the two in short pairs so that load from other processes hits both
alike, and prints noisy samples per second, the ratio certify / forward (goal <= 1.2) and seconds per image at
n = 100,000. Run it with OMP_NUM_THREADS=1 on a shared machine (oversubscribed threads make both timings erratic).

    .venv/bin/python benchmarks/bench_smoothing.py [--from RUN] [--images 4] [--n 2000] [--rounds 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from certprune.certify.smoothing import Smooth
from certprune.data import load_dataset
from certprune.models import create_model
from certprune.runs import load_run


def time_certify(smooth: Smooth, images: torch.Tensor, n0: int, n: int, batch: int) -> float:
    started = time.perf_counter()
    for image in images:
        smooth.certify(image, n0, n, 0.001, batch)
    return time.perf_counter() - started


def time_forward(model: torch.nn.Module, images: torch.Tensor, n0: int, n: int, batch: int) -> float:
    """The same number of inputs in the same batch sizes (n0, then n, per image), without noise or counting."""
    full = images[0].expand(batch, *images.shape[1:]).contiguous()
    sizes = [min(batch, count - start) for count in (n0, n) for start in range(0, count, batch)]
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in images:
            for size in sizes:
                model(full[:size])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", help="a run to load (default: an untrained cnn-small; speed "
                        "does not depend on the weights)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--big-n", type=int, default=100_000, help="n of the seconds-per-image figure")
    parser.add_argument("--big-images", type=int, default=2)
    args = parser.parse_args()

    data = load_dataset("mnist-embedded")
    model = load_run(args.source) if args.source else create_model("cnn-small", **data.shape()).eval()
    images = data.test_x[:args.images]
    smooth = Smooth(model, sigma=0.25, seed=0)
    print(f"cnn-small, {args.images} images x (n0={args.n0} + n={args.n}) samples, batch {args.batch}, "
          f"{torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.2f}")
    time_certify(smooth, images[:1], args.n0, args.batch, args.batch)  # warm-up
    time_forward(model, images[:1], args.n0, args.batch, args.batch)
    # Short pairs (one image each), alternating which goes first, so that other processes' load hits both alike.
    certify_times, forward_times = [], []
    for pair in range(args.rounds * args.images):
        image = images[pair % args.images:pair % args.images + 1]
        timings = [lambda: time_certify(smooth, image, args.n0, args.n, args.batch),
                   lambda: time_forward(model, image, args.n0, args.n, args.batch)]
        if pair % 2:
            forward_times.append(timings[1]())
            certify_times.append(timings[0]())
        else:
            certify_times.append(timings[0]())
            forward_times.append(timings[1]())
    samples = args.n0 + args.n
    certify_s, forward_s = sum(certify_times), sum(forward_times)
    print(f"certify: {samples * len(certify_times) / certify_s:10.0f} noisy samples/s (fastest image: "
          f"{samples / min(certify_times):.0f})")
    print(f"forward: {samples * len(forward_times) / forward_s:10.0f} samples/s       (fastest image: "
          f"{samples / min(forward_times):.0f})")
    print(f"ratio certify / forward time: {statistics.median(c / f for c, f in zip(certify_times, forward_times)):.3f} "
          f"median of {len(certify_times)} pairs, {certify_s / forward_s:.3f} in total, "
          f"{min(certify_times) / min(forward_times):.3f} fastest against fastest  (goal <= 1.2)")
    big = time_certify(smooth, data.test_x[:args.big_images], args.n0, args.big_n, args.batch) / args.big_images
    print(f"seconds per image at n={args.big_n}: {big:.2f}")


if __name__ == "__main__":
    main()
