"""Exact robustness of pruned networks: the verify cascade with complete (MILP) verification, per run, as JSON.

For each run it reports what :func:`certprune.certify.verify.evaluate` reports (clean, verified, falsified, unknown
accuracy, ``robust_acc_exact`` when every image is decided, seconds per stage) plus what the claim "sparser
verifies faster" needs: seconds per image of the images the MILP stage reached, how the MILP stage ended them
(verified by the MILP, falsified by the attack or by the MILP, unknown), and the mean count of unstable ReLUs per
image under CROWN's bounds (a binary each in the program). ``--alpha`` adds the alpha-CROWN stage's gain over
IBP + CROWN and its cost; ``--milp-only`` runs the MILP alone (no bound stage, no attack) on every correct image,
which times the solver against the unstable ReLUs; ``--alpha-grid`` times alpha-CROWN's iterations and learning rate (its defaults).

    python benchmarks/bench_milp.py RUN_DIR [RUN_DIR ...] --images 200 --eps 0.1 --timeout 10 --out milp.json
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import types

import torch

from certprune.certify.verify import evaluate
from certprune.data import load_dataset
from certprune.lirpa import BoundedProxy
from certprune.runs import load_run


def unstable_relus(model, x, y, eps: float, batch: int = 100) -> list[float]:
    """Mean count per image of ReLUs whose input CROWN cannot give one sign, per layer."""
    proxy, counts = BoundedProxy(model, x[:1]), []
    for i in range(0, len(x), batch):
        _, relus = proxy.relu_input_bounds(x[i:i + batch], y[i:i + batch], eps)
        counts.append(torch.stack([((low < 0) & (up > 0)).flatten(1).sum(1) for low, up in relus], 1).double())
    return torch.cat(counts).mean(0).tolist()


def settings(args, methods):
    return types.SimpleNamespace(eps=args.eps, bound_methods=methods, batch_size=args.batch_size,
                                 timeout=args.timeout, alpha_iterations=args.alpha_iterations,
                                 alpha_lr=args.alpha_lr, milp_attack_steps=0 if args.milp_only else 20)


def bench_run(path: str, x, y, args) -> dict:
    model = load_run(path).eval()
    sparsity = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight")) / sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    started = time.perf_counter()
    figures = evaluate(model, x, y, settings(args, ["MILP"] if args.milp_only else ["IBP", "CROWN", "MILP"]))
    records, wall = figures.pop("_per_image"), time.perf_counter() - started
    figures.pop("_counterexamples"), figures.pop("_counterexample_index")
    reached = [r for r in records if r["prediction"] == r["label"] and r["verified_by"] in ("", "MILP")]
    result = {"run": path, "images": len(x), "eps": args.eps, "timeout": args.timeout, "sparsity": sparsity,
              **figures, "seconds_total": wall, "seconds_per_image": wall / len(x),
              "milp_stage": {"images": len(reached),
                             "verified": sum(r["verified_by"] == "MILP" for r in reached),
                             "falsified_by_attack": sum(r["falsified_by"] == "PGD" for r in reached),
                             "falsified_by_milp": sum(r["falsified_by"] == "MILP" for r in reached),
                             "unknown": sum(not r["verified_by"] and not r["falsified"] for r in reached),
                             "seconds_per_image": sum(r["seconds"] for r in reached) / max(1, len(reached)),
                             "seconds_max": max([r["seconds"] for r in reached], default=0.0)},
              "unstable_relus_per_layer": unstable_relus(model, x, y, args.eps)}
    if args.alpha:
        alpha = evaluate(model, x, y, settings(args, ["IBP", "CROWN", "alpha-CROWN"]))
        result["alpha"] = {key: alpha[key] for key in ("verified_acc", "verified_extra_alpha_crown",
                                                       "seconds_alpha_crown", "unknown_acc")}
    return result


def alpha_grid(path: str, x, y, args) -> list[dict]:
    """Margin bounds of the images IBP and CROWN leave open, per (iterations, lr): mean and verified count."""
    model = load_run(path).eval()
    proxy = BoundedProxy(model, x[:1])
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    crown = proxy.margin_lower_bounds(x[correct], y[correct], args.eps, "CROWN").min(1).values
    todo_x, todo_y = x[correct][crown <= 0], y[correct][crown <= 0]
    rows = [{"iterations": 0, "lr": None, "images": len(todo_x), "verified": 0,
             "mean_bound": float(crown[crown <= 0].mean()) if len(todo_x) else None}]
    for iterations in (5, 10, 20, 50):
        for lr in (0.1, 0.5, 1.0):
            started = time.perf_counter()
            bound = proxy.margin_lower_bounds(todo_x, todo_y, args.eps, "alpha-CROWN", iterations=iterations,
                                              lr=lr).min(1).values
            rows.append({"iterations": iterations, "lr": lr, "images": len(todo_x), "verified": int((bound > 0).sum()),
                         "mean_bound": float(bound.mean()), "seconds": time.perf_counter() - started})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--images", type=int, default=200, help="the first N test images")
    parser.add_argument("--skip", type=int, default=0, help="start at this test image")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=10.0, help="MILP seconds per image")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--milp-only", action="store_true", help="the MILP on every correct image, no attack first")
    parser.add_argument("--alpha", action="store_true", help="also the alpha-CROWN stage's gain and cost")
    parser.add_argument("--alpha-grid", action="store_true", help="only time alpha-CROWN's iterations and lr")
    parser.add_argument("--alpha-iterations", type=int, default=20)
    parser.add_argument("--alpha-lr", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (the MILP solver is HiGHS's own)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist-embedded")
    x, y = data.test_x[args.skip:args.skip + args.images], data.test_y[args.skip:args.skip + args.images]
    bench = alpha_grid if args.alpha_grid else bench_run
    results = {"device": "cpu", "torch_threads": torch.get_num_threads(),  # models and images stay on the CPU
               "args": vars(args), "runs": []}
    for path in args.runs:  # written after each run, so a run cut short keeps the ones before it
        results["runs"].append(bench(path, x, y, args))
        if args.out:
            with open(args.out, "w") as handle:
                handle.write(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
