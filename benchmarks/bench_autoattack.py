"""AutoAttack against certprune's PGD on every run of a sweep, on the same test images (issue 13's figures).

For each run directory of SWEEP_DIR (one with model.pt): PGD as the run's config ``attack:`` section says (the
adversarial demo's PGD-50, step 0.01, eps 0.1) and the standard AutoAttack (certprune.certify.autoattack) at the
same norm and eps, both on the first --max test images with seed 0. It prints a table (clean, PGD, AutoAttack,
seconds per image of each) and HYDRA - LWM at each k under both attacks, and writes everything as JSON to --out
after each run, so an interrupted benchmark keeps what it measured.

    python benchmarks/bench_autoattack.py runs/demo-adversarial --max 1500 --out benchmarks/results/autoattack.json
"""
from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

import torch

from certprune.attacks import PGD, parse_eps
from certprune.certify import autoattack
from certprune.config import load_config
from certprune.data import load_dataset
from certprune.certify.attack import attack_accuracy
from certprune.runs import load_run


def bench_run(run_dir: Path, maximum: int, batch_size: int, device: str) -> dict:
    config = load_config(run_dir / "config.yaml")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    section = config.attack
    eps = parse_eps(section.eps if section.eps is not None else config.loss["eps"])
    data = load_dataset(config.dataset, config.data_dir)
    x, y = data.test_x[:maximum].to(device), data.test_y[:maximum].to(device)
    model = load_run(run_dir).to(device)
    pgd = PGD(eps, section.norm, section.steps, section.step_size, section.restarts, section.objective)
    start = time.perf_counter()
    pgd_result = attack_accuracy(model, x, y, pgd, batch_size, seed=0)
    pgd_seconds = time.perf_counter() - start
    settings = types.SimpleNamespace(norm=section.norm, eps=eps, batch_size=batch_size, seed=0, version="standard")
    aa = autoattack.evaluate(model, x, y, settings)
    return {"run": run_dir.name, "method": metrics.get("method"), "k": metrics.get("k"), "images": len(x),
            "clean_acc": aa["clean_acc"], "pgd_acc": pgd_result["pgd_acc"], "autoattack_acc": aa["autoattack_acc"],
            "pgd": pgd_result["attack"], "autoattack": aa["autoattack"],
            "seconds_per_image_pgd": pgd_seconds / len(x),
            "seconds_per_image_autoattack": aa["seconds_autoattack"] / len(x), "device": str(device),
            "device_name": torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"}


def differences(rows: list[dict]) -> list[dict]:
    """HYDRA - LWM (percentage points) at every k where both ran."""
    out = []
    for k in sorted({row["k"] for row in rows if row["method"] == "hydra"}, reverse=True):
        hydra = next((r for r in rows if r["method"] == "hydra" and r["k"] == k), None)
        lwm = next((r for r in rows if r["method"] == "lwm" and r["k"] == k), None)
        if hydra and lwm:
            out.append({"k": k, "pgd": 100 * (hydra["pgd_acc"] - lwm["pgd_acc"]),
                        "autoattack": 100 * (hydra["autoattack_acc"] - lwm["autoattack_acc"])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--max", type=int, default=200, help="first N test images [200]")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", nargs="*", help="run names to bench, in this order [all, k=0.01 first]")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args()
    found = {d.name: d for d in sorted(args.sweep_dir.iterdir()) if (d / "model.pt").exists()}
    names = args.runs or sorted(found, key=lambda name: ("0.01" not in name, name))
    rows = []
    for name in names:
        rows.append(bench_run(found[name], args.max, args.batch_size, args.device))
        row = rows[-1]
        print(f"{name:16} clean {100 * row['clean_acc']:5.1f}  PGD {100 * row['pgd_acc']:5.1f}  "
              f"AutoAttack {100 * row['autoattack_acc']:5.1f}  s/image PGD {row['seconds_per_image_pgd']:.4f} "
              f"AA {row['seconds_per_image_autoattack']:.4f}", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"runs": rows, "hydra_minus_lwm": differences(rows)}, indent=2) + "\n")
    for diff in differences(rows):
        print(f"HYDRA - LWM at k = {diff['k']}: PGD {diff['pgd']:+.1f}, AutoAttack {diff['autoattack']:+.1f} points")
    print("autoattack_acc <= pgd_acc on every run:", all(row["autoattack_acc"] <= row["pgd_acc"] for row in rows))


if __name__ == "__main__":
    main()
