"""``certprune export``: a run as ONNX + VNN-LIB for external verifiers (:mod:`certprune.certify.export`).

A click command of its own file, attached to the main group with ``main.add_command(export)``; it shares the
CLI's one-line errors (:mod:`certprune.cli_common`).
"""
from __future__ import annotations

import json

import click

from .cli_common import one_line_errors


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--from", "source", type=click.Path(), required=True, help="Run directory (or model.pt) to export.")
@click.option("--out", "out_dir", type=click.Path(), required=True, help="Directory for the benchmark files.")
@click.option("--eps", help="L-inf budget in pixel space, a number or a fraction like 8/255 [the run's training eps].")
@click.option("--max", "max_examples", type=int, help="Export at most N of the selected test images [all].")
@click.option("--skip", type=int, default=1, show_default=True, help="Export every skip-th test image.")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds per instance, written into instances.csv.")
@one_line_errors("interrupted; the files written so far are whole, rerun to replace them")
def export(source, out_dir, eps, max_examples, skip, timeout):
    """Write DIR/model.onnx, DIR/vnnlib/prop_<index>.vnnlib (one robustness property per test image),
    DIR/instances.csv and DIR/README.md: a VNN-COMP style benchmark of the run for complete verifiers."""
    from .certify.export import export_saved_run

    summary = export_saved_run(source, out_dir, eps, max_examples, skip, timeout)
    click.echo(json.dumps(summary, indent=2, sort_keys=True))
