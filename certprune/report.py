"""A sweep's report: ``results.md`` and its figures, every number saying which images, eps, method and seeds it covers.

Figures are read from the runs' evaluation records (:mod:`certprune.evaluation`); the clean accuracy beside a
metric is the one of the same record, so one row never mixes image sets. With several seeds, the first table gives
the mean and the sample standard deviation over seeds, and the plot draws them as error bars.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .config import Config
from .evaluation import SECTIONS, configured_keys
from .plots import (LADDER, is_fraction, ladder_metrics, plot_ladder, plot_vs_cost, plot_vs_radius,
                    plot_vs_sparsity)
from .runs import RunError, evaluation, read_config, read_metrics


def with_records(rows: list[dict[str, Any]], config: Config) -> list[dict[str, Any]]:
    """Each run's metrics with ``records``: per section, the record made with ``config``'s settings (or {})."""
    keys = configured_keys(config)
    return [{**row, "records": {section: evaluation(row, key) for section, key in keys.items()}} for row in rows]


def with_ladder(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (with ``records``) that carry every robustness figure of :data:`LADDER` at the top, for the plots."""
    return [{**row, **{name: figure(row, name)[1] for name in LADDER}} for row in rows]


def record(row: dict[str, Any], section: str | None) -> dict[str, Any]:
    return row.get("records", {}).get(section, {}) if section else {}


def figure(row: dict[str, Any], metric: str) -> tuple[str | None, Any]:
    """The section whose record holds ``metric`` (verify, smoothing, attack in that order) and its value."""
    for section in SECTIONS:
        if metric in record(row, section):
            return section, record(row, section)[metric]
    return (None, row[metric]) if metric in row else (None, None)


def _percent(column: str) -> bool:
    return column != "seconds" and (is_fraction(column) or column == "sparsity")


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "seconds":
        return f"{value:.0f}"
    if column == "k":
        return f"{value:g}"
    if isinstance(value, float):
        return f"{100 * value:.1f}" if _percent(column) else f"{value:.4g}"
    return str(value)


def describe(config: Config, section: str, made: dict[str, Any]) -> str:
    """One line saying what a section's figures cover: method, budget, images, seed."""
    settings, images = made.get("settings", {}), made.get("images", {})
    covered = f"{images.get('count')} of {images.get('of')} test images" + (
        f" (every {images['skip']}th)" if images.get("skip", 1) > 1 else "")
    if section == "verify":
        what = f"bounds {' then '.join(settings.get('bound_methods', []))} at L-inf eps {settings.get('eps')}"
    elif section == "attack":
        what = (f"PGD-{settings.get('steps')} ({settings.get('norm')}, eps {settings.get('eps')}, step "
                f"{settings.get('step_size') or 'auto'}, {settings.get('restarts')} restart(s), "
                f"{_attack_seed(config, section, settings)})")
    elif section == "autoattack":
        what = (f"AutoAttack {settings.get('version')} ({settings.get('norm')}, eps {settings.get('eps')}, "
                f"{_attack_seed(config, section, settings)})")
    else:
        what = (f"randomized smoothing, sigma {settings.get('sigma')}, n0 {settings.get('n0')}, n {settings.get('n')},"
                f" alpha {settings.get('alpha')}, {settings.get('precision')}")
    return f"- `{section}`: {what}; {covered}."


CONSTANT_MIN_IMAGES = 50  # one class for a handful of images can be chance; for 50 it is a collapse


def _attack_seed(config: Config, section: str, settings: dict[str, Any]) -> str:
    """An attack without a seed of its own uses each run's: one run's record must not speak for a sweep's seeds."""
    configured = getattr(config, section, None)
    return "each run's seed" if configured is not None and configured.seed is None else f"seed {settings.get('seed')}"


def write_report(rows: list[dict[str, Any]], out: Path, config: Config) -> None:
    rows = with_records(rows, config)
    metric = config.report_metric
    section = next((figure(r, metric)[0] for r in rows if figure(r, metric)[0]), None)
    ladder = [name for name in LADDER if name != metric]  # verified, exact and attacked accuracy side by side
    columns = ["run", "method", "k", "sparsity", "clean_acc", metric, *ladder, *config.report_columns, "params",
               "mflops", "latency_b1_ms", "latency_b256_ms", "seconds"]
    rows = [{**row, "mflops": row["flops"] / 1e6} if "flops" in row else row for row in rows]
    columns = [c for c in dict.fromkeys(columns) if c in ("run", "clean_acc") or any(figure(r, c)[1] is not None
                                                                                   for r in rows)]
    loss = {key: value for key, value in config.loss.items() if key in ("name", "eps", "sigma", "beta")}
    seeds = sorted({row.get("seed") for row in rows})
    lines = [f"# certprune sweep: {config.model} on {config.dataset}", "",
             f"Loss {loss}; epochs pretrain {config.pretrain.epochs}, prune {config.prune.epochs}, finetune "
             f"{config.finetune.epochs} (LWM: prune + finetune of fine-tuning); {_pruning_phrase(config, rows)}; "
             f"{_seeds_phrase(seeds)}.", "",
             f"Accuracies and sparsity in %; `clean_acc` is on the images of `{metric}`'s evaluation; seconds are "
             "training plus evaluation per run. Each evaluation covers:", ""]
    for name in SECTIONS:
        made = next((record(r, name) for r in rows if record(r, name)), None)
        if made:
            lines.append(describe(config, name, made))
    timed = next((row for row in rows if "latency_b1_ms" in row), None)
    if timed:
        lines.append(f"- `params`, `mflops` (one image), `latency_b1_ms`, `latency_b256_ms`: each run's network as it "
                     f"runs (a channel-pruned run compacted), latency the fastest of {timed['latency_repeats']} forward passes "
                     f"when this report was written, on this machine with {timed['torch_threads']} torch thread(s).")
    if len(seeds) > 1:
        lines += ["", f"Mean ± sample standard deviation over seeds {', '.join(map(str, seeds))} "
                  "(n = the number of seeds each row has):", ""] + _mean_table(rows, section, metric, columns)
    paired = _paired_table(rows, section, metric)
    if paired:
        lines += ["", f"HYDRA − LWM in points of `{metric}`, paired by seed (both pruned from that seed's dense "
                  "model): the mean ± sample sd of the per-seed differences.", "", *paired]
    if len(seeds) > 1 or paired:
        lines += ["", "Every run:"]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(column, _value(row, column, section)) for column in columns) + " |")
    constant = [row["run"] for row in rows if _value(row, "predicted_classes", section) == 1
                and record(row, section).get("images", {}).get("count", 0) >= CONSTANT_MIN_IMAGES]
    if constant:
        lines += ["", f"Constant output: {', '.join(constant)} predict(s) one class for every one of the evaluated "
                  "images (training collapsed to chance; verified at any eps, as a constant function is)"
                  + ("; the means above include them." if len(seeds) > 1 else ".")]
    ladder_rows = with_ladder(rows)
    if len(ladder_metrics(ladder_rows)) > 1:
        attacked = any(m in ("pgd_acc", "autoattack_acc") for m in ladder_metrics(ladder_rows))
        lines += ["", "`robustness.png`: " + ", ".join(f"`{m}`" for m in ladder_metrics(ladder_rows)) + " against "
                  "sparsity" + ("; the true robust accuracy lies between the verified figure and the strongest "
                                "attack's." if attacked else ".")]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "summary.json",
                      json.dumps(summary(rows, section, metric), indent=2) + "\n")
    plot_rows = [{**row, metric: figure(row, metric)[1]} for row in rows]
    made = next((record(r, section) for r in rows if record(r, section)), {})
    covered = _covers(section, made)
    title = f"{config.model}, {config.dataset}: {metric}{covered}" + (f", {len(seeds)} seeds" if len(seeds) > 1 else "")
    plot_vs_sparsity(plot_rows, metric, out / "sparsity.png", title=title)
    if any("flops" in row for row in rows):
        plot_vs_cost(plot_rows, metric, out / "flops.png", title=f"{config.model}, {config.dataset}: {metric}{covered}"
                     + (f", {len(seeds)} seeds (one point each)" if len(seeds) > 1 else ""))
    if len(ladder_metrics(ladder_rows)) > 1:
        plot_ladder(ladder_rows, out / "robustness.png", title=f"{config.model}, {config.dataset}: verified, exact "
                    "and attacked accuracy" + (f" (means over {len(seeds)} seeds)" if len(seeds) > 1 else ""))
    smoothing = [{**row, **record(row, "smoothing")} for row in rows]
    if any(isinstance(row.get("certified_acc"), dict) for row in smoothing):  # one figure per k
        for k in config.k:
            plot_vs_radius(smoothing, k, out / f"radius-k{k:g}.png",
                           title=f"{config.model}, {config.dataset}: certified accuracy, k = {k:g}")


def plot_sweep(sweep_dir: Path, metric: str | None, out_path: Path | None) -> Path:
    """``certprune plot``: ``metric`` of a sweep's finished runs against sparsity."""
    runs = [d for d in sorted(sweep_dir.iterdir()) if (d / "metrics.json").exists()] if sweep_dir.is_dir() else []
    if not runs:
        raise RunError(f"{sweep_dir} holds no finished runs")
    config = next((c for c in map(read_config, runs) if c is not None), None)
    metric = metric or (config.report_metric if config else "verified_acc")
    rows = with_records(list(map(read_metrics, runs)), config or Config())
    rows = [{**row, metric: figure(row, metric)[1]} for row in rows]
    values = [row[metric] for row in rows if row[metric] is not None]
    if not values:
        raise RunError(f"no run in {sweep_dir} has the metric {metric!r}")
    if any(isinstance(v, (dict, list, str)) for v in values):
        raise RunError(f"{metric!r} is not a number per run; plot one radius, e.g. {metric}_0.5")
    return plot_vs_sparsity(rows, metric, out_path or sweep_dir / "sparsity.png")


def _covers(section: str | None, made: dict[str, Any]) -> str:
    """A plot title's short statement of a record's budget, method and images."""
    if not made:
        return ""
    settings, images = made.get("settings", {}), made.get("images", {})
    budget = f"eps {settings['eps']:.4g}" if settings.get("eps") is not None else f"sigma {settings.get('sigma')}"
    method = "+".join(settings.get("bound_methods", [])) or section
    return f"\n{method}, {budget}, {images.get('count')} of {images.get('of')} test images"


def _value(row: dict[str, Any], column: str, section: str | None) -> Any:
    if column == "clean_acc":
        return record(row, section).get("clean_acc")
    if column == "seconds":
        return row.get("seconds", 0.0) + sum(record(row, s).get("seconds", 0.0) for s in SECTIONS)
    return figure(row, column)[1]


def _allocation(row: dict[str, Any]) -> str | None:
    return None if row.get("method") == "dense" else row.get("allocation", "layerwise")


def _groups(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Runs by (method, allocation, k): the seeds of one setting (every run of a seed is pruned from that seed's
    dense model)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row.get("method"), _allocation(row), row.get("k")), []).append(row)
    return groups


def summary(rows: list[dict[str, Any]], section: str | None, metric: str) -> list[dict[str, Any]]:
    """``summary.json``'s rows: the report metric's mean, sample sd (0 for one seed), n and values per setting."""
    out = []
    for (method, allocation, k), members in _groups(rows).items():
        values = [v for v in (_value(r, metric, section) for r in members) if isinstance(v, (int, float))]
        out.append({"method": method, "allocation": allocation, "k": k,
                    "metric": metric, "mean": statistics.mean(values) if values else None,
                    "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values),
                    "values": values, "seeds": [r.get("seed") for r in members]})
    return out


def _pruning_phrase(config, rows: list[dict[str, Any]]) -> str:
    """How the runs were pruned, with every setting that differs from the default named (a weight-l1 channel sweep
    and a channel one must not read alike), and what LWM's ``learned`` rows are: its rates never train, so ERK."""
    allocations = config.allocations or [config.prune.allocation]
    words = [f"allocation {', '.join(allocations)}"]
    if "learned" in allocations and any(row.get("method") == "lwm" for row in rows):
        words[0] += " (LWM under learned is ERK: LWM has no score phase, so its rates keep their ERK start)"
    if config.prune.granularity != "weight":
        words.append(f"granularity {config.prune.granularity}, HYDRA's channel scores {config.prune.channel_scores}")
    if config.weight_init != "default":
        words.append(f"dense weights initialised {config.weight_init}")
    return "; ".join(words)


def _seeds_phrase(seeds: list) -> str:
    """``seed 0`` or ``seeds 0, 1, 2``: the seeds the runs of this report were trained with, as their records say."""
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def _number(value: float) -> str:
    """A count or a cost: whole above 100 (parameters, seconds), else three significant digits (0.0231 MFLOPs)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _mean_table(rows: list[dict[str, Any]], section: str | None, metric: str, columns: list[str]) -> list[str]:
    groups = _groups(rows)
    shown = ["method", "allocation", "k", "n"] + [c for c in columns if c not in ("run", "method", "k")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for (method, allocation, k), members in groups.items():
        cells = [str(method), allocation or "", f"{k:g}", str(len(members))]
        for column in shown[4:]:
            values = [v for v in (_value(r, column, section) for r in members) if isinstance(v, (int, float))]
            show = (lambda v: f"{100 * v:.1f}") if _percent(column) else _number
            if not values:
                cells.append("")
            elif len(values) == 1:
                cells.append(show(values[0]))
            else:
                cells.append(f"{show(statistics.mean(values))} ± {show(statistics.stdev(values))}")
            if values and len(values) < len(members):  # e.g. robust_acc_exact exists only where every image was decided
                cells[-1] += f" (n = {len(values)})"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _spread(values: list[float]) -> str:
    """``mean ± sd`` in percentage points (the sd only with several values)."""
    mean = 100 * statistics.mean(values)
    return f"{mean:+.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:+.1f}"


def paired_differences(rows: list[dict[str, Any]], section: str | None, metric: str) -> list[dict[str, Any]]:
    """HYDRA against LWM at each (allocation, k), paired by seed (both pruned from that seed's dense model): against
    LWM under the same allocation, and against the best LWM at that k (the allocation with the highest mean)."""
    values = {key: {r.get("seed"): _value(r, metric, section) for r in members} for key, members in _groups(rows).items()}
    out = []
    for (method, allocation, k), hydra in values.items():
        if method != "hydra":
            continue
        lwm = {a: by_seed for (m, a, kk), by_seed in values.items() if m == "lwm" and kk == k}
        if not lwm:
            continue
        best = max(lwm, key=lambda a: statistics.mean(v for v in lwm[a].values() if v is not None))
        row = {"allocation": allocation, "k": k, "best_lwm_allocation": best}
        for name, other in (("same", lwm.get(allocation, {})), ("best", lwm[best])):
            row[name] = [hydra[seed] - other[seed] for seed in hydra
                         if seed in other and hydra[seed] is not None and other[seed] is not None]
        out.append(row)
    return out


def _paired_table(rows: list[dict[str, Any]], section: str | None, metric: str) -> list[str]:
    lines = ["| allocation | k | HYDRA − LWM, same allocation | n | HYDRA − best LWM | best LWM's allocation | n |",
             "|---|---|---|---|---|---|---|"]
    for row in paired_differences(rows, section, metric):
        same, best = row["same"], row["best"]
        lines.append(f"| {row['allocation']} | {row['k']:g} | {_spread(same) if same else ''} | {len(same)} | "
                     f"{_spread(best) if best else ''} | {row['best_lwm_allocation']} | {len(best)} |")
    return lines if len(lines) > 2 else []
