"""Figures: a metric (certified / verified / robust accuracy) against sparsity, one line per method."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"hydra": "tab:blue", "lwm": "tab:orange", "dense": "black"}
LINE_STYLES = ("-", "--", ":", "-.")  # one per allocation of a sweep


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def is_fraction(metric: str) -> bool:
    """Accuracies and rates are fractions shown in %; anything else (seconds, radii, ACR) is shown as it is."""
    return (metric.endswith("_acc") or "_acc_" in metric or metric.startswith("verified_extra_")
            or metric.endswith(("_rate", "_fraction")))


def _allocation_label(method: str, allocation: str) -> str:
    """LWM has no score phase, so its learned rates never leave their ERK start: say so in the legend."""
    return "learned = ERK" if method == "lwm" and allocation == "learned" else allocation


def plot_vs_sparsity(rows: list[dict[str, Any]], metric: str, path: Path, label: str | None = None,
                     title: str | None = None) -> Path:
    """``rows`` are runs' metrics (method, sparsity and ``metric``); dense is drawn as a horizontal reference."""
    label = label or metric.replace("_", " ")
    scale, unit = (100, " (%)") if is_fraction(metric) else (1, "")
    figure, axis = plt.subplots(figsize=(6, 4))
    allocations = sorted({r.get("allocation") for r in rows if r.get("method") in ("hydra", "lwm")}, key=str)
    for method in ("hydra", "lwm"):
        for style, allocation in zip(LINE_STYLES, allocations):
            by_k: dict[float, list[tuple[float, float]]] = {}
            for r in rows:
                if r.get("method") == method and r.get("allocation") == allocation and r.get(metric) is not None:
                    by_k.setdefault(r["k"], []).append((r["sparsity"], r[metric]))
            if not by_k:
                continue
            # one point per k: the mean over seeds, the sample standard deviation as an error bar
            points = sorted((statistics.mean(s for s, _ in group), [scale * v for _, v in group])
                            for group in by_k.values())
            for group in by_k.values():  # every seed's own point, under the mean
                axis.scatter([100 * s for s, _ in group], [scale * v for _, v in group], s=10, alpha=0.35,
                             color=COLORS[method])
            axis.errorbar([100 * s for s, _ in points], [statistics.mean(v) for _, v in points],
                          yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points], fmt="o",
                          linestyle=style, capsize=3, color=COLORS[method],
                          label=method.upper() + (f" ({_allocation_label(method, allocation)})"
                                                  if len(allocations) > 1 else ""))
    dense = [scale * row[metric] for row in rows if row.get("method") == "dense" and row.get(metric) is not None]
    if dense:
        axis.axhline(statistics.mean(dense), color=COLORS["dense"], linestyle="--",
                     label="dense" + (f" (mean of {len(dense)})" if len(dense) > 1 else ""))
    axis.set_xlabel("sparsity (% of prunable weights removed)")
    axis.set_ylabel(f"{label}{unit}")
    axis.set_title(title or f"{label} against sparsity")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path)


LADDER = {  # lower to upper: what is proven, what is exactly true, what the attacks leave
    "verified_acc": ("verified (sound bounds)", "-", "o"),
    "robust_acc_exact": ("exact (MILP, every image decided)", "", "*"),
    "autoattack_acc": ("AutoAttack", ":", "^"),
    "pgd_acc": ("PGD", "--", "v"),
}


def ladder_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The robustness figures of :data:`LADDER` that some run has."""
    return [metric for metric in LADDER if any(isinstance(row.get(metric), (int, float)) for row in rows)]


def ladder_points(rows: list[dict[str, Any]], method: str) -> dict[str, dict[float, float]]:
    """Per ladder metric, sparsity (%) -> the mean over seeds (%), for ``method``'s runs and the dense ones."""
    lines = {}
    for metric in ladder_metrics(rows):
        by_k: dict[float, list[tuple[float, float]]] = {}
        for row in rows:
            if row.get("method") in (method, "dense") and isinstance(row.get(metric), (int, float)):
                by_k.setdefault(row["k"], []).append((100 * row["sparsity"], 100 * row[metric]))
        if by_k:
            lines[metric] = dict(sorted((statistics.mean(s for s, _ in group), statistics.mean(v for _, v in group))
                                        for group in by_k.values()))
    return lines


def band(lines: dict[str, dict[float, float]]) -> list[tuple[float, float, float]]:
    """``(sparsity, verified, strongest attack)`` where both are known: the true robust accuracy lies between."""
    attacks = [lines[m] for m in ("pgd_acc", "autoattack_acc") if m in lines]
    if "verified_acc" not in lines or not attacks:
        return []
    shared = sorted(set(lines["verified_acc"]).intersection(*attacks))
    return [(x, lines["verified_acc"][x], min(attack[x] for attack in attacks)) for x in shared]


def plot_ladder(rows: list[dict[str, Any]], path: Path, title: str | None = None) -> Path:
    """Every robustness figure the runs have against sparsity, one panel per method: the true robust accuracy lies in
    the shaded band between the verified figure (a proof, below) and the strongest attack's (above); the MILP's
    exact figure, where every image was decided, sits inside it. Points are means over seeds, dense at 0 %."""
    methods = [m for m in ("hydra", "lwm") if any(r.get("method") == m for r in rows)] or ["dense"]
    figure, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), sharey=True, squeeze=False)
    for axis, method in zip(axes[0], methods):
        lines = ladder_points(rows, method)
        for metric, points in lines.items():
            label, style, marker = LADDER[metric]
            axis.plot(list(points), list(points.values()), linestyle=style or "none", marker=marker,
                      color=COLORS[method], label=label)
        if band(lines):
            xs, lower, upper = zip(*band(lines))
            axis.fill_between(xs, lower, upper, color=COLORS[method], alpha=0.12,
                              label="true robust accuracy lies here")
        axis.set_title(method.upper())
        axis.set_xlabel("sparsity (% of prunable weights removed)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    axes[0][0].set_ylabel("accuracy (%)")
    figure.suptitle(title or "verified, exact and attacked accuracy against sparsity")
    return _save(figure, path)


def plot_vs_cost(rows: list[dict[str, Any]], metric: str, path: Path, title: str | None = None) -> Path:
    """``metric`` against the FLOPs of one image (log scale), every run a point, HYDRA and LWM in their colours:
    for channel pruning, where fewer channels make a network that is cheaper to run."""
    scale, unit = (100, " (%)") if is_fraction(metric) else (1, "")
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in ("dense", "hydra", "lwm"):
        points = sorted((row["flops"] / 1e6, scale * row[metric]) for row in rows
                        if row.get("method") == method and row.get(metric) is not None and "flops" in row)
        if points:
            axis.plot(*zip(*points), "o" if method != "dense" else "s", color=COLORS[method],
                      label=method.upper() if method != "dense" else "dense")
    axis.set_xscale("log")
    axis.set_xlabel("MFLOPs per image (compact network)")
    axis.set_ylabel(metric.replace("_", " ") + unit)
    axis.set_title(title or f"{metric} against FLOPs")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path)


def plot_vs_radius(rows: list[dict[str, Any]], k: float, path: Path, metric: str = "certified_acc",
                   title: str | None = None) -> Path:
    """Certified accuracy against L2 radius at one ``k``: HYDRA and LWM pruned to ``k``, dense dashed.

    ``rows`` are runs' metrics with ``method``, ``k`` and ``metric`` (a mapping radius string -> accuracy).
    """
    figure, axis = plt.subplots(figsize=(6, 4))
    order = ["dense", "hydra", "lwm"]  # the legend: the dense reference first
    for row in sorted(rows, key=lambda r: order.index(r["method"]) if r.get("method") in order else len(order)):
        method = row.get("method")
        if not isinstance(row.get(metric), dict) or method not in COLORS:
            continue
        if method != "dense" and row.get("k") != k:
            continue
        points = sorted((float(radius), value) for radius, value in row[metric].items())
        axis.plot([r for r, _ in points], [100 * v for _, v in points], "o--" if method == "dense" else "o-",
                  color=COLORS[method], label="dense" if method == "dense" else f"{method.upper()} k={k:g}")
    limits = [row["certifiable_radius_max"] for row in rows if "certifiable_radius_max" in row
              and (row.get("method") == "dense" or row.get("k") == k)]
    if limits:  # no radius beyond it can be certified with the number of samples used
        axis.axvline(min(limits), color="gray", linestyle=":", label=f"largest certifiable radius ({min(limits):.3g})")
    axis.set_xlabel("L2 radius (pixel space)")
    axis.set_ylabel("certified accuracy (%)")
    axis.set_title(title or f"certified accuracy against radius, k = {k:g}")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    axis.legend(loc="center right", fontsize="small")  # beyond the certifiable radius every curve is at 0
    return _save(figure, path)
