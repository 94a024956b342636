"""GPU benchmark (issue 5), one command, JSON on stdout; 132 s on one H200 (a minute of it compiling).

    python benchmarks/bench_gpu.py [--device cuda] [--images 2] [--no-compile] [--train-batches 256 1024]

1. Randomized-smoothing certification of ``cohen-resnet110`` on CIFAR-shaped inputs at n = 100 000 (n0 = 100,
   sigma 0.25; an untrained model: the speed does not depend on the weights), in seconds per image:
   ``baseline``, Cohen et al.'s loop in plain PyTorch (fp32, batch 400, noise from ``randn_like`` per batch and
   counts copied to the host per batch, as their ``core.py``), and certprune's ``Smooth.certify`` (the code path of
   ``certprune certify --device cuda``) in each setting of ``SETTINGS``: fp32 at the baseline's batch, then larger
   noise batches, channels_last, ``--precision bf16`` and ``--compile``. The fastest is compared with the baseline
   against the goals (<= 0.6 s per image, >= 4.5x faster). ``bare_forward``: the model's own throughput in plain
   PyTorch, fp32 at batch 400 and bf16 + channels_last at the fast batch, to show what the certifier adds.
2. One training step of ``cnn-7layer`` (CIFAR shape, eps 2/255) per batch size: natural, and IBP / CROWN-IBP
   (kappa = beta = 0.5) through certprune's masked core (HYDRA score training, k = 0.05), against the same
   CROWN-IBP loss bounded directly by auto_LiRPA on the plain network (goal: masked <= 1.05x direct); milliseconds
   (median of interleaved repeats) and peak GPU memory. ``soundness``: sampled points of the eps box that fall
   outside the masked model's IBP / CROWN-IBP bounds on the GPU (TF32 off for that check; expect 0).

``--device cpu --images 1 --n 200 --fast-batch 100 --train-batches 4 --steps 1 --repeats 1`` runs every code path
without a GPU (about 5 minutes on 2 cores, most of it bf16 and compiling); its timings mean nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

with warnings.catch_warnings():  # auto_LiRPA's imports warn about torch APIs; keep the output to the JSON
    warnings.simplefilter("ignore")
    from certprune import masking
    from certprune.certify.smoothing import Smooth, lower_confidence_bound
    from certprune.devices import resolve_device
    from certprune.boxes import input_box
    from certprune.lirpa import BoundedModule, BoundedProxy
    from certprune.losses import BoundLoss
    from certprune.models import create_model
    from bench_masked_bounds import direct_step, masked_step  # the same steps as the CPU benchmark (same folder)

SIGMA, N0, ALPHA = 0.25, 100, 0.001
EPS, KAPPA, BETA, K = 2 / 255, 0.5, 0.5, 0.05
CIFAR = {"in_channels": 3, "image_size": 32, "num_classes": 10}
BASELINE_BATCH = 400
# certprune certify settings, timed in this order; "fast" stands for --fast-batch
SETTINGS = [
    {"precision": "fp32", "batch": BASELINE_BATCH, "channels_last": False, "compile": False},
    {"precision": "fp32", "batch": "fast", "channels_last": True, "compile": False},
    {"precision": "bf16", "batch": "fast", "channels_last": True, "compile": False},
    {"precision": "bf16", "batch": "fast", "channels_last": True, "compile": True},
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work) -> float:
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - started


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# ---- 1. certification ------------------------------------------------------------------------------------------

def cohen_counts(model, x: torch.Tensor, num: int, batch: int) -> torch.Tensor:
    """Cohen et al.'s ``Smooth._sample_noise``: fp32, ``randn_like`` per batch, counts summed on the host."""
    counts = torch.zeros(10, dtype=torch.long)
    with torch.no_grad():
        remaining = num
        while remaining > 0:
            size = min(batch, remaining)
            remaining -= size
            repeated = x.repeat((size, 1, 1, 1))
            predictions = model(repeated + torch.randn_like(repeated) * SIGMA).argmax(1)
            counts += torch.bincount(predictions.cpu(), minlength=10)
    return counts


def cohen_certify(model, x: torch.Tensor, n: int, batch: int) -> None:
    top = int(cohen_counts(model, x, N0, batch).argmax())
    lower_confidence_bound(int(cohen_counts(model, x, n, batch)[top]), n, ALPHA)


def certification(device: torch.device, images: int, n: int, fast_batch: int, compile_model: bool) -> dict:
    torch.manual_seed(0)
    model = create_model("cohen-resnet110", **CIFAR).to(device).eval()
    xs = torch.rand(images, 3, 32, 32, device=device)
    result = {"model": "cohen-resnet110", "n0": N0, "n": n, "sigma": SIGMA, "images": images}

    cohen_certify(model, xs[0], 2 * BASELINE_BATCH, BASELINE_BATCH)  # warm-up (cuDNN autotuning, allocator)
    seconds = timed(device, lambda: [cohen_certify(model, x, n, BASELINE_BATCH) for x in xs]) / images
    result["baseline"] = {"what": "Cohen et al.'s loop, plain PyTorch, fp32", "batch": BASELINE_BATCH,
                          "seconds_per_image": round(seconds, 3)}

    timings = []
    for setting in SETTINGS:
        if setting["compile"] and not compile_model:
            continue
        setting = {**setting, "batch": fast_batch if setting["batch"] == "fast" else setting["batch"]}
        reset_peak_memory(device)
        started = time.perf_counter()
        try:
            smooth = Smooth(model, SIGMA, num_classes=10, seed=0, precision=setting["precision"],
                            channels_last=setting["channels_last"], compile=setting["compile"])
            smooth.certify(xs[0], N0, 2 * setting["batch"], ALPHA, setting["batch"])  # warm-up, compiles
        except Exception as error:  # a missing compiler toolchain should not sink the whole benchmark
            timings.append({**setting, "error": str(error).splitlines()[0][:300]})
            continue
        warm_up = time.perf_counter() - started
        per_image = timed(device, lambda: [smooth.certify(x, N0, n, ALPHA, setting["batch"]) for x in xs]) / images
        timings.append({**setting, "seconds_per_image": round(per_image, 3), "warm_up_seconds": round(warm_up, 1),
                        "peak_memory_gib": peak_memory_gib(device)})
    fastest = min((t for t in timings if "seconds_per_image" in t), key=lambda t: t["seconds_per_image"])
    speedup = result["baseline"]["seconds_per_image"] / fastest["seconds_per_image"]
    result["certprune"] = timings
    result["certprune_fastest"] = {**fastest, "speedup_vs_baseline": round(speedup, 2),
                                   "goal_seconds_per_image": 0.6, "goal_speedup": 4.5,
                                   "goal_met": fastest["seconds_per_image"] <= 0.6 and speedup >= 4.5}
    result["bare_forward"] = bare_forward(model, device, n, fast_batch)
    return result


def bare_forward(model, device: torch.device, n: int, fast_batch: int) -> dict:
    """Images per second of the bare forward pass (plain PyTorch), and what that means per image at n0 + n."""
    def throughput(forward, batch: int, memory_format=torch.contiguous_format) -> dict:
        x = torch.rand(batch, 3, 32, 32, device=device).to(memory_format=memory_format)
        with torch.inference_mode():
            for _ in range(3):
                forward(x)
            repeats = max(3, n // batch)
            seconds = timed(device, lambda: [forward(x) for _ in range(repeats)])
        rate = repeats * batch / seconds
        return {"batch": batch, "images_per_second": round(rate), "seconds_per_image_at_n": round((N0 + n) / rate, 3)}

    def bf16(module):
        def forward(x):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return module(x).argmax(1)
        return forward

    fast = create_model("cohen-resnet110", **CIFAR).to(device).eval().to(memory_format=torch.channels_last)
    return {"fp32": throughput(lambda x: model(x).argmax(1), BASELINE_BATCH),
            "bf16_channels_last": throughput(bf16(fast), fast_batch, torch.channels_last)}


# ---- 2. training steps -----------------------------------------------------------------------------------------

def natural_step(model, optimizer, x, y):
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def training(device: torch.device, batch: int, steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def masked(loss_fn):
        model = masking.apply_masks(create_model("cnn-7layer", **CIFAR).to(device), K)
        masking.set_phase(model, "prune")
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return lambda: masked_step(model, loss_fn, optimizer, x, y)

    natural_model = create_model("cnn-7layer", **CIFAR).to(device)
    natural_optimizer = torch.optim.Adam(natural_model.parameters(), lr=1e-4)
    dense = create_model("cnn-7layer", **CIFAR).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bounded = BoundedModule(dense[1:], dense[0](x[:1]), device=device)
    direct_optimizer = torch.optim.Adam(dense.parameters(), lr=1e-4)
    sides = {
        "natural": lambda: natural_step(natural_model, natural_optimizer, x, y),
        "masked_ibp": masked(BoundLoss(EPS, kappa_start=KAPPA, kappa_end=KAPPA, beta_start=0.0, beta_end=0.0)),
        "masked_crown_ibp": masked(BoundLoss(EPS, kappa_start=KAPPA, kappa_end=KAPPA, beta_start=BETA,
                                             beta_end=BETA)),
        "direct_crown_ibp": lambda: direct_step(dense, bounded, direct_optimizer, x, y, EPS, KAPPA, BETA),
    }
    for step in sides.values():  # warm-up of every side first: cuDNN's algorithm search allocates trial workspaces,
        for _ in range(2):        # which would otherwise count in the peak of whichever side meets a shape first
            step()
    memory = {}
    for name, step in sides.items():  # then each side's peak, with the same leftovers alive in every window
        reset_peak_memory(device)
        step()
        synchronize(device)
        memory[name] = peak_memory_gib(device)
    times = {name: [] for name in sides}
    for _ in range(repeats):  # interleaved, so that clock and thermal drift hit every side alike
        for name, step in sides.items():
            times[name].append(timed(device, lambda: [step() for _ in range(steps)]) / steps)
    ms = {name: round(1000 * statistics.median(values), 2) for name, values in times.items()}
    ratio = ms["masked_crown_ibp"] / ms["direct_crown_ibp"]
    return {"model": "cnn-7layer", "batch": batch, "eps": EPS, "ms_per_step": ms, "peak_memory_gib": memory,
            "masked_over_direct_crown_ibp": round(ratio, 3), "goal": 1.05, "goal_met": ratio <= 1.05}


def soundness(device: torch.device, batch: int = 32, samples: int = 64) -> dict:
    """Sampled points of the eps box outside the masked model's bounds (expect 0), TF32 off while checking."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(1)
        model = masking.apply_masks(create_model("cnn-7layer", **CIFAR).to(device), K).eval()
        x = torch.rand(batch, 3, 32, 32, device=device)
        proxy = BoundedProxy(model, x)
        lower_x, upper_x = input_box(x, EPS)
        result = {}
        for method in ("IBP", "CROWN-IBP"):
            lower, upper = proxy.output_bounds(x, EPS, method)
            violations, worst = 0, 0.0
            with torch.no_grad():
                for _ in range(samples):
                    point = lower_x + (upper_x - lower_x) * torch.rand_like(x)
                    logits = model(point)
                    excess = torch.maximum(lower - logits, logits - upper)
                    violations += int((excess > 1e-5 * (1 + logits.abs())).sum())
                    worst = max(worst, float(excess.max()))
            result[method] = {"violations": violations, "points": batch * samples, "max_excess": worst}
        return result
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=2, help="images certified per setting")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--fast-batch", type=int, default=10_000, help="noise batch of the fast certify settings")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile setting")
    parser.add_argument("--train-batches", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        sys.exit(f"bench_gpu: {error}")
    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (a smoke run: timings mean nothing)"
    report = {"device": name, "torch": torch.__version__,
              "cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32}
    report["certification"] = certification(device, args.images, args.n, args.fast_batch, not args.no_compile)
    report["training"] = [training(device, batch, args.steps, args.repeats) for batch in args.train_batches]
    report["soundness"] = soundness(device)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
