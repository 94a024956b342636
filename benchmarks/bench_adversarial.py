"""Cost of a training step under PGD adversarial training and TRADES, relative to a natural step of the same model.

All three losses are timed in one run, interleaved round by round (so load from other processes hits them alike),
on the same batches; the report is each loss's median seconds per step and its ratio to the natural step.

    .venv/bin/python benchmarks/bench_adversarial.py [--model cnn-small] [--k 0.1] [--steps 10] [--rounds 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from certprune import masking
from certprune.data import load_dataset
from certprune.losses import make_loss
from certprune.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--dataset", default="mnist-embedded")
    parser.add_argument("--data-dir")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eps", default="0.1")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps of both attacks")
    parser.add_argument("--k", type=float, default=None, help="also mask the model to this k (prune phase)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_dataset(args.dataset, args.data_dir)
    model = create_model(args.model, **data.shape())
    phase = "pretrain"
    if args.k is not None:
        masking.apply_masks(model, args.k)
        phase = "prune"
    masking.set_phase(model, phase)
    model.train()
    losses = {"natural": make_loss("natural"),
              f"pgd-{args.steps}": make_loss("pgd", eps=args.eps, steps=args.steps),
              f"trades-{args.steps}": make_loss("trades", eps=args.eps, steps=args.steps)}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = data.train_x[:args.batch_size], data.train_y[:args.batch_size]
    times: dict[str, list[float]] = {name: [] for name in losses}
    for round_ in range(args.rounds + 2):  # two warm-up rounds
        for name, loss in losses.items():
            started = time.perf_counter()
            value, _ = loss(model, x, y, 0.0)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            if round_ >= 2:
                times[name].append(time.perf_counter() - started)
    natural = statistics.median(times["natural"])
    print(f"{args.model} on {args.dataset}, batch {args.batch_size}, phase {phase}"
          f"{f' (k={args.k})' if args.k is not None else ''}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} steps")
    print(f"{'loss':<12} {'s/step':>9} {'x natural':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<12} {median:>9.4f} {median / natural:>10.2f}")


if __name__ == "__main__":
    main()
