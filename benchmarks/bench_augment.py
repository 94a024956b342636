"""Cost of the batch augmentation (random crop with padding 4 + horizontal flip) against a training step.

Issue 15's goal: augmentation costs <= 5 % of a training step. The step here is the cheapest one a paper config
takes, a natural forward + backward + SGD update of the model at the paper's batch (128, CIFAR shape); a TRADES-10
step costs about 11 of those, so the ratio against it is about 11 times smaller still. For scale it also times
the same crop + flip done image by image in a Python loop (what per-image transforms cost, before any host-to-device
copy). Everything is timed in one run, interleaved round by round, on the same batch; medians are reported.

    .venv/bin/python benchmarks/bench_augment.py [--models vgg16-bn wrn-28-4] [--batch-size 128] [--rounds 5]
        [--device cpu|cuda] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from certprune.augment import PADDING, make_augment
from certprune.devices import resolve_device
from certprune.models import create_model

CIFAR = {"in_channels": 3, "image_size": 32, "num_classes": 10}


def per_image_loop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Crop + flip one image at a time, as torchvision's per-image transforms do (the slow way, for scale)."""
    out = torch.empty_like(x)
    height, width = x.shape[2:]
    for i in range(len(x)):
        dy, dx, flip = (int(v) for v in torch.randint(0, 2 * PADDING + 1, (3,), generator=generator))
        image = F.pad(x[i], (PADDING,) * 4)[:, dy:dy + height, dx:dx + width]
        out[i] = image.flip(2) if flip % 2 else image
    return out


def timed(function, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16-bn", "wrn-28-4"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    augment = make_augment(["crop", "flip"], "cifar10")
    generator = torch.Generator().manual_seed(0)
    print(f"batch {args.batch_size}, CIFAR shape, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds after 2 warm-up rounds")
    print(f"{'model':<10} {'step s':>9} {'augment s':>10} {'augment/step':>13} {'loop s':>9} {'loop/step':>10}")
    for name in args.models:
        model = create_model(name, **CIFAR).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            loss = F.cross_entropy(model(augmented), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        times: dict[str, list[float]] = {"step": [], "augment": [], "loop": []}
        augmented = augment(x, generator)
        for round_ in range(args.rounds + 2):
            measured = {"augment": timed(lambda: augment(x, generator), device), "step": timed(step, device),
                        "loop": timed(lambda: per_image_loop(x, generator), device)}
            if round_ >= 2:
                for key, value in measured.items():
                    times[key].append(value)
        step_s, augment_s, loop_s = (statistics.median(times[key]) for key in ("step", "augment", "loop"))
        print(f"{name:<10} {step_s:>9.4f} {augment_s:>10.5f} {augment_s / step_s:>12.2%} {loop_s:>9.4f} "
              f"{loop_s / step_s:>9.1%}")


if __name__ == "__main__":
    main()
