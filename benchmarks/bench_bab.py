"""Branch and bound against the MILP on a normally trained fully connected MNIST net: decided counts and seconds.

Trains ``784 - width x depth - 10`` (ReLU) on certprune's embedded MNIST for a few epochs (seeded, in the script,
single-threaded torch), then decides the L-inf ball of radius eps (clipped to [0, 1]) of the first correctly
classified test images twice, each with the same per-image time limit: ``milp.decide_box`` (PGD, then the MILP over
CROWN's ReLU bounds; the limit is the MILP's per property, its attack and CROWN come on top) and ``bab.verify_box``
(PGD with restarts, alpha-CROWN, then BaB; the limit covers all of them). Seconds are wall-clock per image, the
attack and CROWN included for both. Prints one line per image and method, then a summary and the ratio of MILP
seconds to BaB seconds per image.

    python benchmarks/bench_bab.py --images 20 --eps 0.05 --timeout 10 --out bab.json
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from torch import nn

from certprune.certify import bab, milp
from certprune.data import load_dataset
from certprune.boxes import input_box


def train(width: int, depth: int, epochs: int, seed: int, data) -> nn.Sequential:
    """A plain ReLU MLP trained with Adam on cross-entropy, batch 128."""
    torch.manual_seed(seed)
    layers, features = [nn.Flatten()], 28 * 28
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    model = nn.Sequential(*layers, nn.Linear(features, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(data.train_x))
        for start in range(0, len(order), 128):
            batch = order[start:start + 128]
            loss = nn.functional.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def run_milp(model, x, y, eps, timeout):
    started = time.perf_counter()
    outcome = milp.decide_box(model, *input_box(x[None], eps), y[None], None, timeout,
                              inner=input_box(x[None], eps, outward=False))[0]
    return outcome, time.perf_counter() - started


def run_bab(model, x, y, eps, timeout):
    started = time.perf_counter()
    outcome = bab.verify_box(model, *input_box(x, eps), int(y), None, timeout, inner=input_box(x, eps, outward=False))
    return outcome, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="correctly classified test images to decide")
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per image, for each method")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the per-image records and the summary as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    data = load_dataset("mnist-embedded")
    model = train(args.width, args.depth, args.epochs, args.seed, data)
    with torch.no_grad():
        correct = torch.nonzero(model(data.test_x).argmax(1) == data.test_y).flatten()[:args.images]
        accuracy = float((model(data.test_x).argmax(1) == data.test_y).float().mean())
    print(f"# 784-{args.width}x{args.depth}-10, {args.epochs} epochs, test accuracy {accuracy:.3f}; eps {args.eps}, "
          f"{len(correct)} images, {args.timeout} s each")
    records = []
    for i in correct.tolist():
        for name, method in (("MILP", run_milp), ("BaB", run_bab)):
            outcome, seconds = method(model, data.test_x[i], data.test_y[i], args.eps, args.timeout)
            records.append({"image": i, "method": name, "status": outcome.status, "seconds": seconds,
                            "margin_lower_bound": outcome.margin_lower_bound,
                            "stats": {k: v for k, v in outcome.stats.items() if isinstance(v, (int, float, str))}})
            print(f"image {i:5d} {name:5s} {outcome.status:9s} {seconds:7.2f} s  bound "
                  f"{outcome.margin_lower_bound:9.4f}  {records[-1]['stats']}", flush=True)
    summary = {}
    for name in ("MILP", "BaB"):
        mine = [r for r in records if r["method"] == name]
        summary[name] = {status: sum(r["status"] == status for r in mine) for status in ("verified", "falsified",
                                                                                          "unknown")}
        summary[name]["seconds_per_image"] = sum(r["seconds"] for r in mine) / max(1, len(mine))
    disagree = [r["image"] for r in records if r["method"] == "MILP" and r["status"] != "unknown" and any(
        o["image"] == r["image"] and o["method"] == "BaB" and o["status"] not in ("unknown", r["status"])
        for o in records)]
    for name, counts in summary.items():
        decided = counts["verified"] + counts["falsified"]
        print(f"# {name:5s} decided {decided}/{len(correct)} (verified {counts['verified']}, falsified "
              f"{counts['falsified']}, unknown {counts['unknown']}), {counts['seconds_per_image']:.2f} s per image")
    ratio = summary["MILP"]["seconds_per_image"] / max(summary["BaB"]["seconds_per_image"], 1e-9)
    print(f"# MILP / BaB seconds per image: {ratio:.2f}; contradicting verdicts: {disagree or 'none'}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "accuracy": accuracy, "summary": summary, "ratio": ratio,
                       "contradictions": disagree, "records": records}, handle, indent=1)


if __name__ == "__main__":
    main()
