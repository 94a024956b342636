"""Cost of a training step under each certified-training loss, relative to an IBP step of the same model.

Every loss is timed in one run, interleaved round by round (so load from other processes hits them alike), on the
same batch; a step is the loss, its backward pass and an optimizer step, as the training loop takes it. The report
is each loss's median seconds per step and its ratio to the IBP step; ``--out`` writes them as JSON.
The expressive losses run at their papers' attack steps (SABR 8, the others 1) unless ``--steps`` says otherwise;
``crown-ibp`` is timed at beta 1 (its cost during the eps ramp; after it, beta 0 costs an IBP step), IBP with Shi et
al.'s warm-up regularisers halfway up its ramp (at full eps they cost nothing).

    .venv/bin/python benchmarks/bench_losses.py [--model cnn-small] [--k 0.1] [--rounds 20] [--out losses.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from certprune import masking
from certprune.data import load_dataset
from certprune.devices import resolve_device
from certprune.losses import make_loss
from certprune.models import create_model


def losses(eps: float, steps: int | None) -> dict:
    """The losses to time, by the name the report gives them, each with the epoch it is called at; IBP at kappa 0
    (the robust loss alone)."""
    attack = {} if steps is None else {"steps": steps}
    sabr_steps, mixed_steps = (8, 1) if steps is None else (steps, steps)
    return {"ibp": (make_loss("ibp", eps=eps, kappa_end=0.0), 0.0),
            "natural": (make_loss("natural"), 0.0),
            "crown-ibp (beta 1)": (make_loss("crown-ibp", eps=eps, kappa_end=0.0, beta_end=1.0), 0.0),
            "ibp + warm-up reg": (make_loss("ibp", eps=eps, kappa_end=0.0, ramp_epochs=2, warmup_reg=0.5), 1.0),
            f"pgd-{mixed_steps}": (make_loss("pgd", eps=eps, steps=mixed_steps), 0.0),
            f"sabr (pgd-{sabr_steps})": (make_loss("sabr", eps=eps, lam=0.4, **attack), 0.0),
            **{f"{name} (pgd-{mixed_steps})": (make_loss(name, eps=eps, alpha=0.5, **attack), 0.0)
               for name in ("mtl-ibp", "cc-ibp", "exp-ibp")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--dataset", default="mnist-embedded")
    parser.add_argument("--data-dir")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=None, help="PGD steps of every attacking loss [each paper's]")
    parser.add_argument("--k", type=float, default=None, help="mask the model to this k and time the prune phase")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, args.data_dir)
    model = create_model(args.model, **data.shape())
    phase = "pretrain"
    if args.k is not None:
        masking.apply_masks(model, args.k)
        phase = "prune"
    masking.set_phase(model, phase)
    model.to(device).train()
    timed = losses(args.eps, args.steps)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = data.train_x[:args.batch_size].to(device), data.train_y[:args.batch_size].to(device)
    times: dict[str, list[float]] = {name: [] for name in timed}
    for round_ in range(args.rounds + 2):  # two warm-up rounds
        for name, (loss, epoch) in timed.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            value, _ = loss(model, x, y, epoch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ >= 2:
                times[name].append(time.perf_counter() - started)
    ibp = statistics.median(times["ibp"])
    result = {"arguments": vars(args), "phase": phase, "threads": torch.get_num_threads(), "device": str(device),
              "torch": torch.__version__,
              "losses": {name: {"median_s": statistics.median(values), "min_s": min(values),
                                "over_ibp": statistics.median(values) / ibp} for name, values in times.items()}}
    print(f"{args.model} on {args.dataset}, batch {args.batch_size}, eps {args.eps}, phase {phase}"
          f"{f' (k={args.k})' if args.k is not None else ''}, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} steps")
    print(f"{'loss':<24} {'s/step':>9} {'x IBP':>7}")
    for name, figures in result["losses"].items():
        print(f"{name:<24} {figures['median_s']:>9.4f} {figures['over_ibp']:>7.2f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
