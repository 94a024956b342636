"""``certprune verify --onnx MODEL --vnnlib PROP`` and ``--instances CSV``: verify (ONNX, VNN-LIB) pairs, such as
``certprune export`` writes them or a VNN-COMP benchmark ships them, with the same cascade as a run's images.

Each property's box and classes come from its file (:mod:`certprune.certify.vnnlib`), the network from the ONNX
file (:mod:`certprune.certify.onnx_import`). The cascade, cheapest first, each stage only on the properties still
open: a forward pass at the box's centre (a violation there is a counterexample), the bound methods (IBP, CROWN,
alpha-CROWN: verified when every ``logit_label - logit_j`` is proven > 0 over the box), then the MILP (PGD inside
the box, then the exact program; verified, falsified or unknown at its time limit). Every counterexample is
re-checked by a plain forward pass of the converted network at a float32 point of the file's exact box (the box
the bounds cover is rounded outward, so a point found at its edge is first moved inside). The MILP's time limit per property
is ``--timeout``, else the instance's timeout from instances.csv, else 10 s.
"""
from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from certprune.atomic import atomic_write_text
from certprune.certify.cascade import STAGES, Cascade
from certprune.certify.onnx_import import load_onnx
from certprune.certify.vnnlib import read_vnnlib
from certprune.lirpa import canonical_method

log = logging.getLogger("certprune")
RESULT = {"verified": "holds", "falsified": "violated", "unknown": "unknown"}  # VNN-COMP's words (unsat / sat)
COLUMNS = ("instance", "verdict", "verified_by", "margin_lower_bound", "seconds", "result", "falsified_by", "onnx")


@dataclass
class Instance:
    onnx: Path
    vnnlib: Path
    timeout: float | None = None


def read_instances(path: str | Path) -> list[Instance]:
    """The rows ``onnx,vnnlib[,timeout]`` of a VNN-COMP instances.csv, paths relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"instances file {path} does not exist")
    found = []
    for number, row in enumerate(csv.reader(path.read_text().splitlines()), 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) not in (2, 3):
            raise ValueError(f"{path} line {number}: expected onnx,vnnlib,timeout, got {','.join(row)}")
        try:
            timeout = float(row[2]) if len(row) == 3 else None
        except ValueError:
            raise ValueError(f"{path} line {number}: the timeout {row[2]!r} is not a number") from None
        found.append(Instance(path.parent / row[0].strip(), path.parent / row[1].strip(), timeout))
    if not found:
        raise ValueError(f"{path} lists no instances")
    return found


def check_instances(instances: list[Instance], methods) -> list[str]:
    """The methods' canonical names in cascade order; a one-line ValueError for a missing file or an unknown
    method, before any work."""
    for instance in instances:
        for file in (instance.onnx, instance.vnnlib):
            if not file.is_file():
                raise ValueError(f"{file} does not exist")
    names = []
    for method in methods:
        try:
            names.append("MILP" if str(method).upper() == "MILP" else canonical_method(method))
        except ValueError:
            raise ValueError(f"unknown verification method {method}; choose from {', '.join(STAGES)}") from None
    return sorted(set(names), key=STAGES.index)


def _decide(model, shape, instances, methods, timeout, batch_size, alpha_iterations, alpha_lr, attack_steps):
    """The cascade on the properties of one network, after a forward pass at each box's centre (a violation there
    is a counterexample); one record per instance. A stage's time is shared among the properties it ran on (the
    MILP's is each property's own)."""
    props = [read_vnnlib(instance.vnnlib) for instance in instances]
    with torch.no_grad():
        classes = int(model(torch.zeros(1, *shape)).shape[-1])
    for instance, prop in zip(instances, props):
        if prop.lower.numel() != torch.Size(shape).numel() or prop.num_outputs != classes:
            raise ValueError(f"{instance.vnnlib} has {prop.lower.numel()} inputs and {prop.num_outputs} outputs;"
                             f" {instance.onnx} takes {torch.Size(shape).numel()} and gives {classes}")
    stack = lambda boxes: torch.stack([box.view(shape) for box in boxes])  # noqa: E731
    cascade = Cascade(model, stack([p.lower for p in props]), stack([p.upper for p in props]),
                      torch.tensor([p.label for p in props]), [list(p.others) for p in props],
                      (stack([p.inner_lower for p in props]), stack([p.inner_upper for p in props])))
    for method in ("centre", *methods):
        todo, started = cascade.open(), time.perf_counter()
        if method == "centre":
            for i in todo.tolist():
                cascade.falsify(i, (cascade.lower[i] + cascade.upper[i]) / 2, "centre")
        elif method != "MILP":
            cascade.bound(method, todo, batch_size, "MILP" in methods, alpha_iterations, alpha_lr)
        else:
            limits = [timeout or instances[i].timeout or 10.0 for i in todo.tolist()]
            for limit in sorted(set(limits)):
                cascade.exact(todo[torch.tensor([t == limit for t in limits])], limit, attack_steps)
            continue
        if len(todo):
            cascade.seconds[todo] += (time.perf_counter() - started) / len(todo)
    return [{"verdict": "verified" if cascade.stage[i] else "falsified" if cascade.falsified[i] else "unknown",
             "verified_by": STAGES[int(cascade.stage[i]) - 1] if cascade.stage[i] else "",
             "falsified_by": cascade.falsified_by[i],
             "margin_lower_bound": float(cascade.margin[i]) if torch.isfinite(cascade.margin[i]) else None,
             "seconds": float(cascade.seconds[i]),
             "counterexample": cascade.counterexamples[i] if cascade.falsified[i] else None}
            for i in range(len(props))]


def verify_instances(instances: list[Instance], methods=("IBP", "CROWN"), timeout: float | None = None,
                     batch_size: int = 256, alpha_iterations: int = 10, alpha_lr: float = 0.5,
                     attack_steps: int = 20) -> list[dict]:
    """One record per instance (``instance``, ``onnx``, ``verdict``, ``result``, ``verified_by``, ``falsified_by``,
    ``margin_lower_bound``, ``seconds`` (its share of its network's time), ``counterexample``), in their order."""
    methods = check_instances(instances, methods)
    records: list[dict | None] = [None] * len(instances)
    for onnx in dict.fromkeys(instance.onnx for instance in instances):
        model, shape = load_onnx(onnx)
        index = [i for i, instance in enumerate(instances) if instance.onnx == onnx]
        for i, record in zip(index, _decide(model, shape, [instances[i] for i in index], methods, timeout,
                                            batch_size, alpha_iterations, alpha_lr, attack_steps)):
            records[i] = {"instance": str(instances[i].vnnlib), "onnx": str(onnx), **record,
                          "result": RESULT[record["verdict"]]}
    return records


def _cell(value) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def table(records: list[dict]) -> str:
    """Tab-separated :data:`COLUMNS`, a header first (``--out`` and stdout)."""
    return "".join("\t".join(row) + "\n" for row in [COLUMNS, *([_cell(r[c]) for c in COLUMNS] for r in records)])


def write_table(records: list[dict], path: str | Path) -> None:
    atomic_write_text(Path(path), table(records))


def verify_command(source, onnx, vnnlibs, instances_csv, out, eps=None, methods=(), maximum=None, skip=None,
                   batch_size=None, timeout=None, device="auto") -> str:
    """``certprune verify`` on (ONNX, VNN-LIB) pairs: checks the flags (one-line errors before any work), verifies,
    writes ``out`` (tab-separated) and returns the table and a summary line for stdout."""
    from certprune.config import VerifyConfig

    given = [flag for flag, value in (("--from", source), ("--onnx", onnx), ("--instances", instances_csv)) if value]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} exclude each other: verify a run, or an ONNX model with --vnnlib "
                         "properties, or an instances.csv")
    if bool(onnx) != bool(vnnlibs):
        raise ValueError("--onnx needs at least one --vnnlib property" if onnx else "--vnnlib needs --onnx MODEL")
    wrong = [flag for flag, value in (("--eps", eps), ("--device", None if device in (None, "auto", "cpu") else
                                                                         device)) if value is not None]
    if wrong:
        raise ValueError(f"{wrong[0]} does not apply to --onnx/--instances: each VNN-LIB file states its box, and "
                         "they are verified on the CPU")
    for flag, value in (("--max", maximum), ("--skip", skip), ("--batch-size", batch_size), ("--timeout", timeout)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if out is not None and Path(out).is_dir():
        raise ValueError(f"--out {out} is a directory; give a file")
    chosen = read_instances(instances_csv) if instances_csv else [Instance(Path(onnx), Path(v)) for v in vnnlibs]
    chosen = chosen[::skip or 1][:maximum]
    defaults = VerifyConfig()
    started = time.perf_counter()
    records = verify_instances(chosen, methods or defaults.bound_methods, timeout, batch_size or defaults.batch_size,
                               defaults.alpha_iterations, defaults.alpha_lr, defaults.milp_attack_steps)
    if out is not None:
        write_table(records, out)
    counts = {verdict: sum(r["verdict"] == verdict for r in records) for verdict in RESULT}
    return table(records) + (f"# {len(records)} properties: {counts['verified']} verified, {counts['falsified']} "
                             f"falsified, {counts['unknown']} unknown in {time.perf_counter() - started:.1f} s\n")
