"""Several k x methods (x allocations x seeds) from one config: a dense run per seed, then HYDRA and LWM at every k
under every allocation, pruned from that seed's dense model; a table and plots.

Finished runs are reused only when their training settings are this config's (otherwise the sweep refuses in one
line); unfinished ones resume; evaluations whose settings changed run again on the finished models. So an
interrupted sweep is simply started again, and a table never shows a figure of another setting.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import distributed
from .complexity import run_complexity
from .config import Config
from .devices import resolve_device
from .evaluation import evaluate_configured, missing_evaluations, reportable
from .pipeline import load_data, prune, pretrain
from .report import write_report
from .runs import RunError, differences, is_finished, read_config, read_metrics

DENSE = "dense"
log = logging.getLogger("certprune")


def run_name(method: str, k: float | None, seed: int | None = None, allocation: str | None = None) -> str:
    """``hydra-k0.05``, ``dense``; with a sweep's seeds ``hydra-k0.05-s1``, ``dense-s1``; with its allocations
    ``hydra-erk-k0.05``."""
    base = DENSE if method == DENSE else f"{method}-{allocation}-k{k:g}" if allocation else f"{method}-k{k:g}"
    return base if seed is None else f"{base}-s{seed}"


def _check_reusable(run_dir: Path, config: Config, dense: bool) -> None:
    saved = read_config(run_dir)
    if saved is None:
        return
    changed = differences(saved.training_dict(dense), config.training_dict(dense))
    if changed:
        raise RunError(f"{run_dir} was trained with other settings ({'; '.join(changed[:3])}); "
                       "sweep into another --out")


def _variant(config: Config, seed: int | None, allocation: str | None) -> Config:
    """The config of one seed's runs under one allocation (the sweep's own where it names neither)."""
    update = {"seed": seed} if seed is not None else {}
    if allocation is not None:
        update["prune"] = config.prune.model_copy(update={"allocation": allocation})
    return config.model_copy(update=update) if update else config


def sweep(config: Config, out: str | Path, source: str | Path | None = None) -> list[dict[str, Any]]:
    """Run the sweep into ``out`` and write ``results.md`` and ``sparsity.png``; returns every run's metrics.

    With ``seeds``, every run (dense included) is made once per seed, and the report gives mean and spread. With
    ``allocations``, every pruned run is made once per allocation, each from the same dense model."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file")
    if config.report_metric not in reportable(config):  # the table's main column: refused now, not after training
        raise RunError(f"report_metric: no configured evaluation gives {config.report_metric!r}; choose from "
                       f"{', '.join(sorted(reportable(config)))}")
    if source is not None and config.seeds is not None:
        raise RunError("--from gives one dense run; a sweep with seeds pretrains one per seed")
    seeds = config.seeds if config.seeds is not None else [None]
    allocations = config.allocations or [None]
    plan = [(seed, name, method, k, allocation) for seed in seeds
            for name, method, k, allocation in [(run_name(DENSE, None, seed), DENSE, None, None)]
            + [(run_name(m, k, seed, a), m, k, a) for k in config.k for a in allocations for m in config.prune_methods]]
    configs = {(seed, allocation): _variant(config, seed, allocation)  # None: the dense run's
               for seed in seeds for allocation in {None, *allocations}}
    if source is not None and not is_finished(Path(source)):
        raise RunError(f"--from {source} holds no finished run")
    for seed, name, method, _, allocation in plan:  # refuse before any training, not after hours of it
        if method != DENSE or source is None:
            _check_reusable(out / name, configs[seed, allocation], dense=method == DENSE)
    data = load_data(config)
    device = resolve_device(config.device)
    rows = []
    for number, (seed, name, method, k, allocation) in enumerate(plan, start=1):
        dense_dir = Path(source) if source is not None else out / run_name(DENSE, None, seed)
        run_dir, run_config = (dense_dir if method == DENSE else out / name), configs[seed, allocation]
        if not is_finished(run_dir):
            log.info("sweep %s: training %s (%d of %d)", out, name, number, len(plan))
            if method == DENSE:
                pretrain(run_config, run_dir, resume=True, data=data)
            else:
                prune(run_config, run_dir, k, method, dense_dir, resume=True, data=data)
        missing = missing_evaluations(run_dir, run_config)
        if missing:
            log.info("sweep %s: evaluating %s (%s)", out, name, ", ".join(missing))
            evaluate_configured(run_dir, run_config, device, sections=missing, data=data)
        costs = run_complexity(run_dir) if config.prune.granularity == "channel" else {}  # what compaction buys
        rows.append({**read_metrics(run_dir), **costs, "run": name})
    if distributed.is_main():  # under torchrun rank 0 writes the report
        write_report(rows, out, config)
    return rows
