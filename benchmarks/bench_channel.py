"""Dense against compact: what removing channels buys at run time, in one run on this machine.

A channel-pruned model, compacted (:func:`certprune.masking.compacted`), is timed against its dense source in the
same process: CPU inference latency (median and fastest over repeats) at batch 1 and batch 256, each of the model as it is
(eager), frozen for inference (TorchScript ``freeze`` + ``optimize_for_inference``, which fuses each conv with
its ReLU) and eager on PyTorch's own conv kernels instead of oneDNN's (whose per-call set-up dominates a conv of a few
channels at batch 1), and each model's fastest form, as a deployer would pick it; IBP and CROWN margin bounds of
``--images`` test images (every image bounded by both methods, not the cascade: its cost does not then depend on
which images the model happens to verify), and optionally the complete MILP verifier on ``--milp`` images. It prints
each ratio dense / compact and writes everything as JSON.

    python benchmarks/bench_channel.py --out channel.json                      # random cnn-large, L1 filters k=0.25
    python benchmarks/bench_channel.py --dense RUN --pruned RUN --out f.json  # trained runs (pruned: channel run)

Without runs the models are a randomly initialised ``cnn-large`` and its L1-filter channel pruning at ``--k``: the
sizes and so the latencies are those of trained models; bound times may differ somewhat (they depend on how many
ReLUs are unstable), so prefer trained runs for the verification figures.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from certprune import masking
from certprune.complexity import complexity, forward_seconds
from certprune.data import load_dataset
from certprune.lirpa import BoundedProxy
from certprune.models import create_model
from certprune.runs import load_run


def latency(model, x, repeats: int) -> dict[str, float]:
    """Median and fastest seconds of one forward pass (after five warm-up passes: TorchScript's profiling executor
    specialises a frozen graph on the first calls of each shape): on shared, loaded cores the median of a
    millisecond pass carries scheduling delays, the fastest is the pass itself."""
    times = forward_seconds(model, x, repeats, warmup=5)
    return {"median": statistics.median(times), "min": min(times)}


FORMS = ("", "frozen_", "native_")  # eager with oneDNN, frozen TorchScript, eager with PyTorch's own conv kernels
FROZEN_TOLERANCE = 1e-4  # the frozen graph may differ from the eager model by float rounding only


def frozen(model, x):
    """The deployed form: a frozen TorchScript graph with conv + ReLU fused, refused if its logits on ``x`` are not
    the eager model's."""
    with torch.no_grad():
        deployed = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(model)))
        gap = float((deployed(x) - model(x)).abs().max())
    if not gap <= FROZEN_TOLERANCE:
        raise SystemExit(f"the frozen model's logits differ from the eager model's by {gap:.2e}")
    return deployed, gap


def bound_seconds(model, x, y, eps: float, method: str, batch: int) -> float:
    proxy = BoundedProxy(model, x[:1])
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            proxy.margin_lower_bounds(x[i:i + batch], y[i:i + batch], eps, method)
    return time.perf_counter() - started


def milp_seconds(model, x, y, eps: float, timeout: float) -> dict:
    from certprune.certify.milp import verify_image

    outcomes = [verify_image(model, image, int(label), eps, timeout) for image, label in zip(x, y)]
    return {"seconds_per_image": sum(o.seconds for o in outcomes) / len(outcomes),
            "status": [o.status for o in outcomes]}


def models(args):
    if args.dense:
        dense, pruned = load_run(args.dense), load_run(args.pruned)
    else:
        torch.manual_seed(0)
        dense = create_model("cnn-large").eval()
        masked = masking.apply_masks(copy.deepcopy(dense), args.k, init="magnitude", granularity="channel")
        pruned = masking.dense_copy(masked)
    compact, widths = masking.compacted(pruned)
    return dense.eval(), pruned.eval(), compact.eval(), widths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", help="dense run directory (with --pruned)")
    parser.add_argument("--pruned", help="channel-pruned run directory, pruned from --dense")
    parser.add_argument("--k", type=float, default=0.25, help="fraction of channels kept without runs [0.25]")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--bound-batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=30, help="latency repeats at batch 256 (x10 at batch 1)")
    parser.add_argument("--milp", type=int, default=0, help="images for the MILP timing [0: skip]")
    parser.add_argument("--milp-timeout", type=float, default=30.0)
    parser.add_argument("--threads", type=int, help="torch CPU threads [torch's default]")
    parser.add_argument("--out", help="JSON file")
    args = parser.parse_args()
    if bool(args.dense) != bool(args.pruned):
        parser.error("--dense and --pruned go together")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist-embedded")
    x, y = data.test_x[:args.images], data.test_y[:args.images]
    dense, pruned, compact, widths = models(args)
    with torch.no_grad():
        gap = float((compact(x) - pruned(x)).abs().max())
    result = {"arguments": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "images": len(x), "eps": args.eps,
              "source": {"dense": args.dense or "random cnn-large", "pruned": args.pruned or f"L1 filters k={args.k}"},
              "widths": widths, "max_logit_gap": gap}
    for name, model in (("dense", dense), ("compact", compact)):
        figures = complexity(model, tuple(x.shape[1:]))
        deployed, figures["frozen_max_logit_gap"] = frozen(model, x)
        for form in FORMS:
            runnable = deployed if form == "frozen_" else model
            with torch.backends.mkldnn.flags(enabled=form != "native_"):  # native_: PyTorch's conv kernels, not oneDNN's
                for batch, repeats in ((1, 10 * args.repeats), (256, args.repeats)):
                    for kind, seconds in latency(runnable, data.test_x[:batch], repeats).items():
                        figures[f"{form}latency_b{batch}_{kind}_s"] = seconds
        for batch in (1, 256):  # each model as its deployer would run it: its fastest form
            fastest = min(FORMS, key=lambda form: figures[f"{form}latency_b{batch}_min_s"])
            figures[f"best_latency_b{batch}_min_s"] = figures[f"{fastest}latency_b{batch}_min_s"]
            figures[f"best_latency_b{batch}_form"] = fastest.rstrip("_") or "eager"
        for method in ("IBP", "CROWN"):
            figures[f"{method.lower()}_s"] = bound_seconds(model, x, y, args.eps, method, args.bound_batch)
        figures["ibp_crown_s"] = figures["ibp_s"] + figures["crown_s"]
        if args.milp:
            figures["milp"] = milp_seconds(model, x[:args.milp], y[:args.milp], args.eps, args.milp_timeout)
        result[name] = figures
        print(name, json.dumps(figures), flush=True)
    keys = ["params", "flops"] + [f"{form}latency_b{b}_{kind}_s" for form in FORMS for b in (1, 256)
                                  for kind in ("median", "min")] + [f"best_latency_b{b}_min_s" for b in (1, 256)] + [
        "ibp_s", "crown_s", "ibp_crown_s"]
    result["dense_over_compact"] = {key: result["dense"][key] / result["compact"][key] for key in keys}
    if args.milp:
        result["dense_over_compact"]["milp_s"] = (result["dense"]["milp"]["seconds_per_image"]
                                                  / result["compact"]["milp"]["seconds_per_image"])
    for key, ratio in result["dense_over_compact"].items():
        print(f"{key:>28}: dense / compact = {ratio:.2f}x")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
