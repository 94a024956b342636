"""Speed and memory of the paper configs' phases on a GPU, and the hours the full paper schedule would take.

Why: configs/paper/ asks for days of GPU time that nobody has spent yet; before anyone does, this says how long
each phase takes and whether it fits in memory, from one short command on a lent GPU.

    python benchmarks/bench_paper_gpu.py --out benchmarks/results/bench_paper_gpu-<gpu>.json
    python benchmarks/bench_paper_gpu.py --device cpu --steps 2 --out /tmp/smoke.json    # smoke run, no GPU

For each config (default: cifar10-vgg16-bn.yaml and cifar10-wrn-28-4.yaml) and each phase (pretrain: dense
weights; prune: HYDRA's scores at the config's first k; finetune: the masked weights), it trains ``--steps``
batches of the config's batch size with the config's loss, optimiser and augmentation through certprune's own
training loop (``certprune.train.fit``, the loop the pipeline runs), after ``--warmup`` batches that are not timed
(cuDNN autotuning, allocator growth). Images per second and ``torch.cuda.max_memory_allocated`` of the timed
steps per phase. The evaluation attack (``attack`` section: PGD-50) is timed on ``--eval-images`` test-shaped
images. Data are uniform random CIFAR-shaped tensors on the device: a step's cost does not depend on pixel values.

Projection, in hours, for ``certprune sweep`` of the config: pretrain epochs x 50,000 / pretrain images per second;
per k, HYDRA's prune and finetune epochs and LWM's prune + finetune epochs of fine-tuning (the same budget); plus the
attack on the 10,000 test images of each of the 1 + 2 x len(k) runs. The JSON is rewritten after every config, so
a run cut short keeps what it measured. On a CPU the defaults shrink to a smoke run whose timings mean nothing:
batch 8 (unless ``--batch-size``), 1 warm-up batch, 4 attacked images.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from certprune import masking
from certprune.attacks import PGD
from certprune.augment import make_augment
from certprune.config import load_config
from certprune.devices import resolve_device
from certprune.losses import make_loss
from certprune.models import create_model
from certprune.pipeline import make_optimizer, make_scheduler
from certprune.train import fit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["configs/paper/cifar10-vgg16-bn.yaml", "configs/paper/cifar10-wrn-28-4.yaml"]
CIFAR = {"in_channels": 3, "image_size": 32, "num_classes": 10}
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000  # CIFAR-10


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phase(model, config, phase: str, x, y, batch: int, warmup: int, device) -> dict:
    """Train ``model`` in ``phase`` through certprune's loop: ``warmup`` batches untimed, then ``len(x) // batch``
    timed ones (one "epoch" of exactly that many images). Images per second and peak memory of the timed part."""
    settings = getattr(config, phase)
    masking.set_phase(model, phase, config.train_norm_in_prune)
    name, params = config.phase_loss(phase)
    loss = make_loss(name, **params)
    optimizer = make_optimizer((p for p in model.parameters() if p.requires_grad), settings)
    scheduler = make_scheduler(optimizer, settings)
    augment = make_augment(config.augment, config.dataset)
    generator = torch.Generator().manual_seed(0)
    common = dict(scheduler=scheduler, generator=generator, desc=phase, augment=augment)
    fit(model, loss, optimizer, x[:warmup * batch], y[:warmup * batch], 1, batch, **common)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    history = fit(model, loss, optimizer, x, y, 1, batch, **common)
    synchronize(device)
    seconds = time.perf_counter() - started
    result = {"loss": name, "steps": len(x) // batch, "seconds": seconds, "images_per_s": len(x) / seconds,
              "final_loss": history[-1].get("loss")}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def time_attack(model, config, images: int, device) -> dict:
    """The config's evaluation attack (eval mode, batch of the attack section) on ``images`` random images."""
    settings = config.attack
    eps = settings.eps if settings.eps is not None else config.loss.get("eps")
    attack = PGD(eps, settings.norm, settings.steps, settings.step_size, settings.restarts, settings.objective)
    batch = min(settings.batch_size, images)
    x = torch.rand(images, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (images,), device=device)
    model.eval()
    attack.perturb(model, x[:batch], y[:batch])  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for start in range(0, images, batch):
        attack.perturb(model, x[start:start + batch], y[start:start + batch])
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"steps": settings.steps, "restarts": settings.restarts, "batch": batch, "images": images,
            "images_per_s": images / seconds}


def projection(config, phases: dict, attack: dict | None) -> dict:
    """Hours of the full paper schedule (certprune sweep of this config) at the measured speeds."""
    hours = lambda epochs, phase: epochs * TRAIN_IMAGES / phases[phase]["images_per_s"] / 3600  # noqa: E731
    ks = len(config.k)
    lwm_epochs = config.prune.epochs + config.finetune.epochs
    parts = {"pretrain": hours(config.pretrain.epochs, "pretrain"),
             "hydra_prune": ks * hours(config.prune.epochs, "prune"),
             "hydra_finetune": ks * hours(config.finetune.epochs, "finetune"),
             "lwm_finetune": ks * hours(lwm_epochs, "finetune")}
    if attack is not None:
        parts["attack"] = (1 + 2 * ks) * TEST_IMAGES / attack["images_per_s"] / 3600
    return {"hours": parts, "total_hours": sum(parts.values()),
            "schedule": {"pretrain_epochs": config.pretrain.epochs, "prune_epochs": config.prune.epochs,
                         "finetune_epochs": config.finetune.epochs, "lwm_epochs": lwm_epochs, "k": list(config.k)}}


def bench_config(path: str, args, device: torch.device) -> dict:
    config = load_config(ROOT / path if not Path(path).is_absolute() else path, [{"device": str(device)}])
    batch = args.batch_size or (config.batch_size if device.type == "cuda" else 8)
    torch.manual_seed(0)
    total = (args.steps) * batch
    x = torch.rand(total, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (total,), device=device)
    model = create_model(config.model, **CIFAR).to(device)
    result = {"config": path, "model": config.model, "loss": config.loss, "augment": config.augment,
              "batch_size": batch, "k": config.k[0], "phases": {}}
    result["phases"]["pretrain"] = time_phase(model, config, "pretrain", x, y, batch, args.warmup, device)
    masking.apply_masks(model, config.k[0], init="scaled", allocation=config.prune.allocation)
    for phase in ("prune", "finetune"):
        result["phases"][phase] = time_phase(model, config, phase, x, y, batch, args.warmup, device)
    attack = None
    if config.attack is not None and args.eval_images > 0:
        attack = result["attack"] = time_attack(model, config, args.eval_images, device)
    result["projection"] = projection(config, result["phases"], attack)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50, help="timed batches per phase")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches before each phase (3; 1 on a CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's (8 on a CPU)")
    parser.add_argument("--eval-images", type=int, default=1000, help="images the evaluation attack is timed on")
    parser.add_argument("--out", required=True, help="JSON file to write (rewritten after every config)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu" and args.eval_images == 1000:
        args.eval_images = 4
    if args.warmup is None:
        args.warmup = 3 if device.type == "cuda" else 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "steps": args.steps, "warmup": args.warmup,
              "train_images_per_epoch": TRAIN_IMAGES, "test_images": TEST_IMAGES, "results": []}
    started = time.perf_counter()
    for path in args.configs:
        try:
            report["results"].append(bench_config(path, args, device))
        except Exception as error:  # keep the other config's figures; say what failed
            report["results"].append({"config": path, "error": f"{type(error).__name__}: {error}",
                                      "traceback": traceback.format_exc(limit=5)})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if any("error" in result for result in report["results"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
