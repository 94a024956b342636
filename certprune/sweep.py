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
from .config import Config
from .devices import resolve_device
from .evaluation import evaluate_configured, missing_evaluations
from .pipeline import load_data, prune, pretrain
from .report import write_report
from .runs import RunError, differences, is_finished, read_config, read_metrics

DENSE = "dense"
log = logging.getLogger("certprune")


def run_name(method: str, k: float | None, seed: int | None = None) -> str:
    """``hydra-k0.05``, ``dense``; with a sweep's seeds ``hydra-k0.05-s1``, ``dense-s1``."""
    base = DENSE if method == DENSE else f"{method}-k{k:g}"
    return base if seed is None else f"{base}-s{seed}"


def _check_reusable(run_dir: Path, config: Config, dense: bool) -> None:
    saved = read_config(run_dir)
    if saved is None:
        return
    changed = differences(saved.training_dict(dense), config.training_dict(dense))
    if changed:
        raise RunError(f"{run_dir} was trained with other settings ({'; '.join(changed[:3])}); "
                       "sweep into another --out")


def sweep(config: Config, out: str | Path, source: str | Path | None = None) -> list[dict[str, Any]]:
    """Run the sweep into ``out`` and write ``results.md`` and ``sparsity.png``; returns every run's metrics.

    With ``seeds``, every run (dense included) is made once per seed, and the report gives mean and spread."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file")
    if source is not None and config.seeds is not None:
        raise RunError("--from gives one dense run; a sweep with seeds pretrains one per seed")
    seeds = config.seeds if config.seeds is not None else [None]
    plan = [(seed, name, method, k) for seed in seeds
            for name, method, k in [(run_name(DENSE, None, seed), DENSE, None)]
            + [(run_name(m, k, seed), m, k) for k in config.k for m in config.prune_methods]]
    configs = {seed: config if seed is None else config.model_copy(update={"seed": seed}) for seed in seeds}
    if source is not None and not is_finished(Path(source)):
        raise RunError(f"--from {source} holds no finished run")
    for seed, name, method, _ in plan:  # refuse before any training, not after hours of it
        if method != DENSE or source is None:
            _check_reusable(out / name, configs[seed], dense=method == DENSE)
    data = load_data(config)
    device = resolve_device(config.device)
    rows = []
    for number, (seed, name, method, k) in enumerate(plan, start=1):
        dense_dir = Path(source) if source is not None else out / run_name(DENSE, None, seed)
        run_dir = dense_dir if method == DENSE else out / name
        if not is_finished(run_dir):
            log.info("sweep %s: training %s (%d of %d)", out, name, number, len(plan))
            if method == DENSE:
                pretrain(configs[seed], run_dir, resume=True, data=data)
            else:
                prune(configs[seed], run_dir, k, method, dense_dir, resume=True, data=data)
        missing = missing_evaluations(run_dir, configs[seed])
        if missing:
            log.info("sweep %s: evaluating %s (%s)", out, name, ", ".join(missing))
            evaluate_configured(run_dir, configs[seed], device, sections=missing, data=data)
        rows.append({**read_metrics(run_dir), "run": name})
    if distributed.is_main():  # under torchrun rank 0 writes the report
        write_report(rows, out, config)
    return rows
