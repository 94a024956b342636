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
import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from certprune.atomic import atomic_write_text
from certprune.certify.cascade import COMPLETE, STAGES, Cascade, complete_stage
from certprune.certify.onnx_import import load_onnx
from certprune.certify.vnnlib import read_vnnlib
from certprune.lirpa import canonical_method

log = logging.getLogger("certprune")
RESULT = {"verified": "holds", "falsified": "violated", "unknown": "unknown"}  # VNN-COMP's words (unsat / sat)
DEFAULT_TIMEOUT = 10.0  # seconds per instance, all stages, when neither --timeout nor instances.csv gives one
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
            names.append(complete_stage(method) or canonical_method(method))
        except ValueError:
            raise ValueError(f"unknown verification method {method}; choose from {', '.join(STAGES)}") from None
    return sorted(set(names), key=STAGES.index)


def _record(cascade: Cascade, i: int) -> dict:
    """The verdict of box ``i`` as it stands."""
    return {"verdict": "verified" if cascade.stage[i] else "falsified" if cascade.falsified[i] else "unknown",
            "verified_by": STAGES[int(cascade.stage[i]) - 1] if cascade.stage[i] else "",
            "falsified_by": cascade.falsified_by[i],
            "margin_lower_bound": float(cascade.margin[i]) if torch.isfinite(cascade.margin[i]) else None,
            "seconds": float(cascade.seconds[i]),
            "counterexample": cascade.counterexamples[i] if cascade.falsified[i] else None}


def _properties(model, shape, instances) -> list:
    """The instances' properties, each checked against the network's input and output sizes."""
    props = [read_vnnlib(instance.vnnlib) for instance in instances]
    with torch.no_grad():
        classes = int(model(torch.zeros(1, *shape)).shape[-1])
    for instance, prop in zip(instances, props):
        if prop.lower.numel() != torch.Size(shape).numel() or prop.num_outputs != classes:
            raise ValueError(f"{instance.vnnlib} has {prop.lower.numel()} inputs and {prop.num_outputs} outputs;"
                             f" {instance.onnx} takes {torch.Size(shape).numel()} and gives {classes}")
    return props


def _decide(model, shape, props, methods, limits, batch_size, alpha_iterations, alpha_lr, attack_steps, emit):
    """The cascade on the properties of one network, after a forward pass at each box's centre (a violation there
    is a counterexample). ``emit(position, record)`` is called for each property the moment a stage decides it,
    and for the rest at the end. A bound stage's time is shared among the properties it ran on; ``limits`` (seconds
    per property) cover all its stages, so the complete stage gets what the earlier ones left."""
    stack = lambda boxes: torch.stack([box.view(shape) for box in boxes])  # noqa: E731
    cascade = Cascade(model, stack([p.lower for p in props]), stack([p.upper for p in props]),
                      torch.tensor([p.label for p in props]), [list(p.others) for p in props],
                      (stack([p.inner_lower for p in props]), stack([p.inner_upper for p in props])))
    emitted = set()

    def emit_decided(final=()):
        """Emit each property a stage decided, and those of ``final`` (no later stage will run on them)."""
        for i in range(len(props)):
            if i not in emitted and (cascade.stage[i] or cascade.falsified[i] or i in final):
                emitted.add(i)
                emit(i, _record(cascade, i))

    for method in ("centre", *methods):
        todo, started = cascade.open(), time.perf_counter()
        if method == "centre":
            for i in todo.tolist():
                cascade.falsify(i, (cascade.lower[i] + cascade.upper[i]) / 2, "centre")
        elif method in COMPLETE:
            last = method == [m for m in methods if m in COMPLETE][-1]
            for i in todo.tolist():  # one at a time: each property has its own time left
                cascade.complete(method, torch.tensor([i]), torch.tensor(limits, dtype=torch.float64)
                                 - cascade.seconds, attack_steps)
                emit_decided({i} if last else ())  # after the last complete stage, unknown is its final verdict
        else:
            cascade.bound(method, todo, batch_size, "MILP" in methods, alpha_iterations, alpha_lr)
        if method not in COMPLETE and len(todo):
            cascade.seconds[todo] += (time.perf_counter() - started) / len(todo)
        emit_decided()
    for i in range(len(props)):
        if i not in emitted:
            emit(i, _record(cascade, i))


def verify_instances(instances: list[Instance], methods=("IBP", "CROWN"), timeout: float | None = None,
                     batch_size: int = 256, alpha_iterations: int = 10, alpha_lr: float = 0.5,
                     attack_steps: int = 20, on_record=None) -> list[dict]:
    """One record per instance (``instance``, ``onnx``, ``verdict``, ``result``, ``verified_by``, ``falsified_by``,
    ``margin_lower_bound``, ``seconds`` (its own and its share of its network's batched stages), ``counterexample``),
    in their order. ``on_record(record)`` sees each as soon as it is decided. The time limit per instance is
    ``timeout``, else its own from instances.csv, else :data:`DEFAULT_TIMEOUT`."""
    methods = check_instances(instances, methods)
    records: list[dict | None] = [None] * len(instances)
    networks = {}  # every file read and checked before any work, so bad input is one line and nothing else
    for onnx in dict.fromkeys(instance.onnx for instance in instances):
        model, shape = load_onnx(onnx)
        index = [i for i, instance in enumerate(instances) if instance.onnx == onnx]
        networks[onnx] = model, shape, index, _properties(model, shape, [instances[i] for i in index])
    for onnx, (model, shape, index, props) in networks.items():

        def emit(position, record, index=index, onnx=onnx):
            i = index[position]
            records[i] = {"instance": str(instances[i].vnnlib), "onnx": str(onnx), **record,
                          "result": RESULT[record["verdict"]]}
            if on_record is not None:
                on_record(records[i])

        limits = [timeout or instances[i].timeout or DEFAULT_TIMEOUT for i in index]
        _decide(model, shape, props, methods, limits, batch_size, alpha_iterations, alpha_lr, attack_steps, emit)
    return records


def _cell(value) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def row(record: dict) -> str:
    """One tab-separated line of :data:`COLUMNS`."""
    return "\t".join(_cell(record[c]) for c in COLUMNS) + "\n"


HEADER = "\t".join(COLUMNS) + "\n"


class VerdictFile:
    """``--out`` as it grows: the settings line and the header once, then one line per instance, appended and
    flushed the moment it is decided, so a stopped run keeps what it decided. A rerun with the same settings keeps
    those lines and skips their instances; other settings are refused (the file would mix two runs)."""

    def __init__(self, path: Path | None, settings: str, restart: bool):
        self.path, self.done = path, {}
        if path is None:
            return
        if path.exists() and not restart and path.stat().st_size:
            lines = path.read_text().splitlines(keepends=True)
            if lines[:2] != [settings, HEADER]:
                raise ValueError(f"--out {path} holds verdicts of other settings or is not a verdict file "
                                 f"(its first line: {lines[0].strip()[:80]!r}); pass --restart or another --out")
            whole = [line.rstrip("\n").split("\t") for line in lines[2:] if line.endswith("\n")]
            self.done = {(fields[0], fields[-1]): dict(zip(COLUMNS, fields)) for fields in whole
                         if len(fields) == len(COLUMNS)}
        atomic_write_text(path, settings + HEADER + "".join(row(record) for record in self.done.values()))

    def kept(self, instance: Instance) -> dict | None:
        return self.done.get((str(instance.vnnlib), str(instance.onnx)))

    def add(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as stream:
                stream.write(row(record))
                stream.flush()
                os.fsync(stream.fileno())


def settings_line(methods, timeout, batch_size) -> str:
    limit = f"{timeout:g} s" if timeout else f"each instance's own, else {DEFAULT_TIMEOUT:g} s"
    return f"# certprune verify: methods {' '.join(methods)}; time limit per instance {limit}; batch {batch_size}\n"


def verify_command(source, onnx, vnnlibs, instances_csv, out, eps=None, methods=(), maximum=None, skip=None,
                   batch_size=None, timeout=None, device="auto", restart=False,
                   echo=functools.partial(print, end="")) -> None:
    """``certprune verify`` on (ONNX, VNN-LIB) pairs: checks the flags (one-line errors before any work), then
    verifies, passing ``echo`` the header, one line per instance as it is decided (resumed ones first) and a summary
    line, while ``out`` grows the same way (:class:`VerdictFile`) and a progress bar counts the verdicts."""
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
    if restart and out is None:
        raise ValueError("--restart needs --out: with --onnx/--instances only the --out file keeps verdicts")
    chosen = read_instances(instances_csv) if instances_csv else [Instance(Path(onnx), Path(v)) for v in vnnlibs]
    chosen = chosen[::skip or 1][:maximum]
    defaults = VerifyConfig()
    methods = check_instances(chosen, methods or defaults.bound_methods)
    batch_size = batch_size or defaults.batch_size
    verdicts = VerdictFile(None if out is None else Path(out), settings_line(methods, timeout, batch_size), restart)
    kept = [verdicts.kept(instance) for instance in chosen]
    counts = {verdict: sum(k is not None and k["verdict"] == verdict for k in kept) for verdict in RESULT}
    started, header = time.perf_counter(), [HEADER]  # printed with the first verdict: errors come before any output

    def show(line: str) -> None:
        echo(header.pop() + line if header else line)

    for record in kept:
        if record is not None:
            show(row(record))
    todo = [instance for instance, record in zip(chosen, kept) if record is None]
    with tqdm(total=len(chosen), initial=len(chosen) - len(todo), desc="verify", leave=False, disable=None) as bar:
        def decided(record):
            verdicts.add(record)
            counts[record["verdict"]] += 1
            bar.clear()
            show(row(record))
            bar.update(1)
            bar.set_postfix({RESULT[v]: n for v, n in counts.items()})

        if todo:
            verify_instances(todo, methods, timeout, batch_size, defaults.alpha_iterations, defaults.alpha_lr,
                             defaults.milp_attack_steps, decided)
    resumed = f" ({len(chosen) - len(todo)} kept from {out})" if len(todo) < len(chosen) else ""
    show(f"# {len(chosen)} properties: {counts['verified']} verified, {counts['falsified']} falsified, "
         f"{counts['unknown']} unknown{resumed} in {time.perf_counter() - started:.1f} s\n")
