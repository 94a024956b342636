"""Several k x methods from one config: a dense run, then HYDRA and LWM at every k, a table and a plot.

Finished runs are skipped and unfinished ones resumed, so an interrupted sweep is simply started again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import distributed
from .config import Config
from .pipeline import is_finished, load_data, prune, pretrain
from .plots import plot_vs_radius, plot_vs_sparsity
from .runs import RunError, atomic_write_text, read_metrics

DENSE = "dense"


def run_name(method: str, k: float) -> str:
    return f"{method}-k{k:g}"


def sweep(config: Config, out: str | Path, source: str | Path | None = None) -> list[dict[str, Any]]:
    """Run the sweep into ``out`` and write ``results.md`` and ``sparsity.png``; returns every run's metrics."""
    out = Path(out)
    data = load_data(config)
    dense_dir = Path(source) if source is not None else out / DENSE
    if source is None and not is_finished(dense_dir):
        pretrain(config, dense_dir, resume=True, data=data)
    elif not is_finished(dense_dir):
        raise RunError(f"--from {dense_dir} holds no finished run")
    rows = [{**read_metrics(dense_dir), "run": DENSE}]
    for k in config.k:
        for method in config.methods:
            run_dir = out / run_name(method, k)
            if not is_finished(run_dir):
                prune(config, run_dir, k, method, dense_dir, resume=True, data=data)
            rows.append({**read_metrics(run_dir), "run": run_dir.name})
    if distributed.is_main():  # under torchrun rank 0 writes the report
        write_report(rows, out, config)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{100 * value:.1f}"
    return "" if value is None else str(value)


def write_report(rows: list[dict[str, Any]], out: Path, config: Config) -> None:
    metric = config.report_metric
    columns = [c for c in ["run", "method", "k", "sparsity", "clean_acc", metric, *config.report_columns, "seconds"]
               if any(c in r for r in rows)]
    columns = list(dict.fromkeys(columns))
    lines = [f"# certprune sweep: {config.model} on {config.dataset}, loss {config.loss_name}", "",
             "Accuracies and sparsity in %; seconds of wall time per run (training + evaluation).", ""]
    if config.report_note:
        lines += [config.report_note, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.0f}" if c == "seconds" and c in row else
                 f"{row[c]:g}" if c == "k" and c in row else _fmt(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    plot_vs_sparsity(rows, metric, out / "sparsity.png", title=f"{config.model}, {config.dataset}, {config.loss_name}")
    if any(isinstance(row.get("certified_acc"), dict) for row in rows):  # randomized smoothing: one figure per k
        for k in config.k:
            plot_vs_radius(rows, k, out / f"radius-k{k:g}.png",
                           title=f"{config.model}, {config.dataset}: certified accuracy, k = {k:g}")
