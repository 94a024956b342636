"""Verifying a run's test images with the cascade: one TSV line per image, written as it goes, and resume.

The algorithm is :mod:`certprune.certify.verify`; this module is its run driver. The selected images go through the
whole cascade a chunk at a time, and each chunk's lines are appended and flushed as soon as it is decided, so an
interrupted verification (the MILP can take minutes) resumes without losing or repeating an image. The figures are
computed from the file's lines, so a resumed verification reports what an uninterrupted one would.

A record's files are named after its key (:func:`certprune.evaluation.record_key`): ``verify.tsv`` for the default
settings, ``verify[eps=0.2].tsv`` for another eps; beside it ``<key>.json`` (the settings and model the lines belong
to) and ``<key>.counterexamples.pt`` (the falsifying inputs, each re-checked by a forward pass before it counted).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from certprune import distributed
from certprune.atomic import atomic_torch_save, atomic_write_text
from certprune.config import VerifyConfig
from certprune.runs import RunError, model_fingerprint, read_image_table

from . import verify
from .cascade import COMPLETE, MILP_CHUNK  # images per flush when the MILP runs: an interruption loses at most their work

TSV_COLUMNS = ("index", "label", "prediction", "verified_by", "falsified", "falsified_by", "margin_lower_bound",
               "seconds")


def file_stem(key: str) -> str:
    return key.replace("/", "_").replace(" ", "")


def _format_row(row: dict[str, Any]) -> str:
    margin = row["margin_lower_bound"]
    # repr() round-trips the bound exactly: rounding could only move it past 0
    return "\t".join([str(row["index"]), str(row["label"]), str(row["prediction"]), row["verified_by"],
                      str(int(row["falsified"])), row["falsified_by"], "" if margin is None else repr(margin),
                      f"{row['seconds']:.4f}"]) + "\n"


def _parse(fields: list[str]) -> dict[str, Any]:
    index, label, prediction, verified_by, falsified, falsified_by, margin, seconds = fields
    return {"index": int(index), "label": int(label), "prediction": int(prediction), "verified_by": verified_by,
            "falsified": bool(int(falsified)), "falsified_by": falsified_by,
            "margin_lower_bound": float(margin) if margin else None, "seconds": float(seconds)}


def read_rows(path: Path) -> dict[int, dict[str, Any]]:
    """Finished lines of a verification TSV by test index (a last line an interruption cut off is dropped)."""
    return read_image_table(path, TSV_COLUMNS, _parse, "verification TSV")


def summarize(rows: list[dict[str, Any]], methods: list[str], stage_seconds: dict[str, float]) -> dict[str, Any]:
    """The verification figures of ``rows`` (fractions of all of them): the union and each stage's share."""
    n = len(rows)
    figures = verify.figures_of(rows, methods)
    figures.update({f"seconds_{verify.method_key(m)}": stage_seconds.get(m, 0.0) for m in methods})
    figures["seconds_per_image"] = sum(row["seconds"] for row in rows) / n if n else 0.0
    return figures


def _save_counterexamples(path: Path, found: torch.Tensor, where: list[int]) -> None:
    """Append this chunk's counterexamples to the record's file (one tensor of inputs, one of test indices)."""
    if not where:
        return
    stored = torch.load(path, weights_only=True) if path.exists() else {"inputs": found[:0].cpu(),
                                                                         "index": torch.zeros(0, dtype=torch.long)}
    atomic_torch_save({"inputs": torch.cat([stored["inputs"], found.cpu()]),
                       "index": torch.cat([stored["index"], torch.tensor(where, dtype=torch.long)])}, path)


def _prepare(run_dir: Path, stem: str, identity: dict[str, Any], restart: bool) -> None:
    """Check that an existing TSV belongs to these settings and this model (or discard it on ``restart``)."""
    tsv, sidecar, found = (run_dir / f"{stem}{suffix}" for suffix in (".tsv", ".json", ".counterexamples.pt"))
    main = distributed.is_main()
    if restart and main:
        for path in (tsv, sidecar, found):
            path.unlink(missing_ok=True)
    if tsv.exists() and not restart:  # every process checks (read-only): they all stop alike
        try:
            stored = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            raise RunError(f"{tsv} has no readable {sidecar.name} beside it; pass --restart to start over") from None
        if {key: stored.get(key) for key in identity} != identity:
            raise RunError(f"{tsv} was made with other settings or another model; verify with the same settings "
                           "to resume, or pass --restart to start over")
    if main and tsv.exists():
        read_rows(tsv)  # drops a last line an interruption cut off, before any process reads the file
    elif main:
        atomic_write_text(sidecar, json.dumps({**identity, "stage_seconds": {}}, indent=2) + "\n")
        atomic_write_text(tsv, "\t".join(TSV_COLUMNS) + "\n")
    distributed.barrier()


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings) -> dict[str, Any]:
    """The evaluator: the cascade (:func:`certprune.certify.verify.evaluate`) on the selected images ``(x, y)``, a
    chunk at a time into ``run_dir/<key>.tsv``, resuming the images the file already holds.

    Beyond the verify section's fields, ``settings`` carries the run: ``run_dir``, ``key`` (the record's key),
    ``indices`` (the test indices of ``x``'s rows) and ``restart``. Under torchrun every process bounds its share
    of each chunk, and rank 0 writes the lines."""
    section = VerifyConfig(**{name: getattr(settings, name) for name in VerifyConfig.model_fields})
    methods = verify.ordered_methods(section.bound_methods)
    run_dir, stem, indices = Path(settings.run_dir), file_stem(settings.key), list(settings.indices)
    identity = {"settings": section.model_dump(mode="json"), "model": model_fingerprint(model)}
    _prepare(run_dir, stem, identity, settings.restart)
    tsv, sidecar = run_dir / f"{stem}.tsv", run_dir / f"{stem}.json"
    rows, labels = read_rows(tsv), dict(zip(indices, y.cpu().tolist()))
    if any(index in labels and row["label"] != labels[index] for index, row in rows.items()):
        raise RunError(f"{tsv} does not match this data set's labels; pass --restart to start over")
    stage_seconds = json.loads(sidecar.read_text()).get("stage_seconds", {})
    position = {index: place for place, index in enumerate(indices)}
    todo = [index for index in indices if index not in rows]
    chunk = (MILP_CHUNK if set(COMPLETE) & set(methods) else int(section.batch_size)) * distributed.world_size()
    main = distributed.is_main()
    counts = {outcome: 0 for outcome in ("verified", "falsified", "unknown")}
    with tqdm(total=len(indices), initial=len(indices) - len(todo), unit="img", desc=f"verify {'+'.join(methods)}",
              disable=None if main else True, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            places = torch.tensor([position[index] for index in part], device=x.device)
            figures = verify.evaluate(model, x[places], y[places], section)
            new = [{**row, "index": part[row["index"]]} for row in figures["_per_image"]]
            for method in methods:
                key = f"seconds_{verify.method_key(method)}"
                stage_seconds[method] = stage_seconds.get(method, 0.0) + figures[key]
            if main:
                _save_counterexamples(run_dir / f"{stem}.counterexamples.pt", figures["_counterexamples"],
                                      [part[i] for i in figures["_counterexample_index"]])
                with open(tsv, "a") as stream:
                    stream.write("".join(_format_row(row) for row in new))
                atomic_write_text(sidecar, json.dumps({**identity, "stage_seconds": stage_seconds}, indent=2) + "\n")
            rows.update({row["index"]: row for row in new})
            for row in new:
                outcome = ("verified" if row["verified_by"] else "falsified" if row["falsified"]
                           else "unknown" if row["prediction"] == row["label"] else None)
                if outcome:
                    counts[outcome] += 1
            bar.update(len(part))
            bar.set_postfix(counts)
    figures = summarize([rows[index] for index in indices], methods, stage_seconds)
    figures.update(eps=float(section.eps), verify_method="cascade " + "+".join(methods),
                   verified_examples=len(indices), resumed_examples=len(indices) - len(todo))
    return figures
