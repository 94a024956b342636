"""Cost of certprune's masked CROWN-IBP training step against the same dense network bounded directly.

Both sides compute the same loss (natural CE + CROWN-IBP/IBP mixed margin loss) and take an optimiser step on the
same batch; the direct side is auto_LiRPA's ``BoundedModule`` over the plain network (what a user of auto_LiRPA
would write), the masked side is certprune's ``BoundLoss`` over a HYDRA-masked model (score training and
fine-tuning). Timings are interleaved and the median of several repeats is reported, with ratios to direct.

    python benchmarks/bench_masked_bounds.py [--model cnn-small] [--batch 128] [--steps 10] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from certprune import masking
from certprune.boxes import input_box, margin_spec
from certprune.lirpa import BoundedModule, BoundedTensor, PerturbationLpNorm
from certprune.losses import BoundLoss, robust_cross_entropy
from certprune.models import create_model

EPS, BETA, KAPPA = 0.1, 0.5, 0.5


def direct_step(model, bounded, optimizer, x, y, eps=EPS, kappa=KAPPA, beta=BETA):
    """What one writes with auto_LiRPA alone: bound the plain network (normalisation folded into the box)."""
    normalize = model[0]
    logits = model(x)
    lower_x, upper_x = input_box(x, eps)
    box = BoundedTensor(normalize(x), PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=normalize(lower_x),
                                                         x_U=normalize(upper_x)))
    spec = margin_spec(y, logits.shape[1])
    ibp = bounded.compute_bounds(x=(box,), C=spec, method="IBP", bound_upper=False)[0]
    crown_ibp = bounded.compute_bounds(x=(box,), C=spec, method="CROWN-IBP", bound_upper=False)[0]
    loss = kappa * F.cross_entropy(logits, y) + (1 - kappa) * robust_cross_entropy(beta * crown_ibp + (1 - beta) * ibp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def masked_step(model, loss_fn, optimizer, x, y):
    """certprune's step, as its training loop takes it (each mask computed once per step)."""
    with masking.cached():
        loss, _ = loss_fn(model, x, y, 0.5)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=float, default=0.05)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))

    dense = create_model(args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bounded = BoundedModule(dense[1:], dense[0](x[:1]))
    direct_optimizer = torch.optim.Adam(dense.parameters(), lr=1e-4)

    sides = {}
    for phase in ("prune", "finetune"):
        model = masking.apply_masks(create_model(args.model), args.k)
        masking.set_phase(model, phase)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        loss_fn = BoundLoss(EPS, kappa_start=KAPPA, kappa_end=KAPPA, beta_start=BETA, beta_end=BETA)  # no ramp
        sides[f"masked_{phase}"] = (masked_step, model, loss_fn, optimizer)
    sides["direct"] = (direct_step, dense, bounded, direct_optimizer)

    times: dict[str, list[float]] = {name: [] for name in sides}
    for name, (step, model, extra, optimizer) in sides.items():  # warm-up (tracing, allocator)
        step(model, extra, optimizer, x, y)
    for _ in range(args.repeats):
        for name, (step, model, extra, optimizer) in sides.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(model, extra, optimizer, x, y)
            times[name].append((time.perf_counter() - start) / args.steps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    report = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(),
              "ms_per_step": {name: round(1000 * value, 2) for name, value in medians.items()},
              "ratio_to_direct": {name: round(value / medians["direct"], 3) for name, value in medians.items()}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
