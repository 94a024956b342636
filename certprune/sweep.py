"""Several k x methods from one config: a dense run, then HYDRA and LWM at every k, a table and a plot.

Finished runs are reused only when their training settings are this config's (otherwise the sweep refuses in one
line); unfinished ones resume; evaluations whose settings changed run again on the finished models. So an
interrupted sweep is simply started again, and a table never shows a figure of another setting.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import distributed
from .atomic import atomic_write_text
from .config import Config
from .devices import resolve_device
from .evaluation import SECTIONS, evaluate_configured, missing_evaluations
from .pipeline import load_data, prune, pretrain
from .plots import plot_vs_radius, plot_vs_sparsity
from .runs import RunError, differences, evaluation, is_finished, read_config, read_metrics

DENSE = "dense"
log = logging.getLogger("certprune")


def run_name(method: str, k: float) -> str:
    return f"{method}-k{k:g}"


def _check_reusable(run_dir: Path, config: Config) -> None:
    saved = read_config(run_dir)
    if saved is None:
        return
    changed = differences(saved.training_dict(), config.training_dict())
    if changed:
        raise RunError(f"{run_dir} was trained with other settings ({'; '.join(changed[:3])}); "
                       "sweep into another --out")


def sweep(config: Config, out: str | Path, source: str | Path | None = None) -> list[dict[str, Any]]:
    """Run the sweep into ``out`` and write ``results.md`` and ``sparsity.png``; returns every run's metrics."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file")
    plan = [(DENSE, None, None)] + [(run_name(m, k), m, k) for k in config.k for m in config.prune_methods]
    dense_dir = Path(source) if source is not None else out / DENSE
    if source is not None and not is_finished(dense_dir):
        raise RunError(f"--from {dense_dir} holds no finished run")
    for name, _, _ in plan:  # refuse before any training, not after hours of it
        if name != DENSE or source is None:
            _check_reusable(out / name, config)
    data = load_data(config)
    device = resolve_device(config.device)
    rows = []
    for number, (name, method, k) in enumerate(plan, start=1):
        run_dir = dense_dir if name == DENSE else out / name
        if not is_finished(run_dir):
            log.info("sweep %s: training %s (%d of %d)", out, name, number, len(plan))
            if method is None:
                pretrain(config, run_dir, resume=True, data=data)
            else:
                prune(config, run_dir, k, method, dense_dir, resume=True, data=data)
        missing = missing_evaluations(run_dir, config)
        if missing:
            log.info("sweep %s: evaluating %s (%s)", out, name, ", ".join(missing))
            evaluate_configured(run_dir, config, device, sections=missing, data=data)
        rows.append({**read_metrics(run_dir), "run": name})
    if distributed.is_main():  # under torchrun rank 0 writes the report
        write_report(rows, out, config)
    return rows


def figure(row: dict[str, Any], metric: str) -> tuple[str | None, Any]:
    """The section whose record holds ``metric`` (verify, smoothing, attack in that order) and its value."""
    for section in SECTIONS:
        record = evaluation(row, section)
        if metric in record:
            return section, record[metric]
    return (None, row[metric]) if metric in row else (None, None)


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "seconds":
        return f"{value:.0f}"
    if column == "k":
        return f"{value:g}"
    return f"{100 * value:.1f}" if isinstance(value, float) else str(value)


def describe(config: Config, section: str, record: dict[str, Any]) -> str:
    """One line saying what a section's figures cover: method, budget, images, seed."""
    settings, images = record.get("settings", {}), record.get("images", {})
    covered = f"{images.get('count')} of {images.get('of')} test images" + (
        f" (every {images['skip']}th)" if images.get("skip", 1) > 1 else "")
    if section == "verify":
        what = f"bounds {' then '.join(settings.get('bound_methods', []))} at L-inf eps {settings.get('eps')}"
    elif section == "attack":
        what = (f"PGD-{settings.get('steps')} ({settings.get('norm')}, eps {settings.get('eps')}, step "
                f"{settings.get('step_size') or 'auto'}, {settings.get('restarts')} restart(s), seed {settings.get('seed')})")
    else:
        what = (f"randomized smoothing, sigma {settings.get('sigma')}, n0 {settings.get('n0')}, n {settings.get('n')},"
                f" alpha {settings.get('alpha')}, {settings.get('precision')}")
    return f"- `{section}`: {what}; {covered}."


def write_report(rows: list[dict[str, Any]], out: Path, config: Config) -> None:
    metric = config.report_metric
    section = next((figure(r, metric)[0] for r in rows if figure(r, metric)[0]), None)
    columns = ["run", "method", "k", "sparsity", "clean_acc", metric, *config.report_columns, "seconds"]
    columns = [c for c in dict.fromkeys(columns) if c in ("run", "clean_acc") or any(figure(r, c)[1] is not None
                                                                                   for r in rows)]
    loss = {key: value for key, value in config.loss.items() if key in ("name", "eps", "sigma", "beta")}
    lines = [f"# certprune sweep: {config.model} on {config.dataset}", "",
             f"Loss {loss}; epochs pretrain {config.pretrain.epochs}, prune {config.prune.epochs}, finetune "
             f"{config.finetune.epochs} (LWM: prune + finetune of fine-tuning); allocation {config.prune.allocation};"
             f" seed {config.seed}.", "",
             f"Accuracies and sparsity in %; `clean_acc` is on the images of `{metric}`'s evaluation; seconds are "
             "training plus evaluation per run. Each evaluation covers:", ""]
    for name in SECTIONS:
        record = next((evaluation(r, name) for r in rows if evaluation(r, name)), None)
        if record:
            lines.append(describe(config, name, record))
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        records = [evaluation(row, s) for s in SECTIONS]
        cells = []
        for column in columns:
            if column == "clean_acc":
                value = evaluation(row, section).get("clean_acc") if section else None
            elif column == "seconds":
                value = row.get("seconds", 0.0) + sum(r.get("seconds", 0.0) for r in records)
            else:
                value = figure(row, column)[1]
            cells.append(_fmt(column, value))
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    plot_rows = [{**row, metric: figure(row, metric)[1]} for row in rows]
    plot_vs_sparsity(plot_rows, metric, out / "sparsity.png", title=f"{config.model}, {config.dataset}: {metric}")
    smoothing = [{**row, **evaluation(row, "smoothing")} for row in rows]
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
    rows = [{**row, metric: figure(row, metric)[1]} for row in map(read_metrics, runs)]
    values = [row[metric] for row in rows if row[metric] is not None]
    if not values:
        raise RunError(f"no run in {sweep_dir} has the metric {metric!r}")
    if any(isinstance(v, (dict, list, str)) for v in values):
        raise RunError(f"{metric!r} is not a number per run; plot one radius, e.g. {metric}_0.5")
    return plot_vs_sparsity(rows, metric, out_path or sweep_dir / "sparsity.png")
