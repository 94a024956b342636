"""``certprune compact``: a channel-pruned run without its pruned channels (:mod:`certprune.compact`).

A click command of its own file, attached to the main group with ``main.add_command(compact)``.
"""
from __future__ import annotations

import json

import click

from .cli_common import one_line_errors


@click.command("compact", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--from", "source", type=click.Path(), required=True, help="Channel-pruned run directory (or model.pt).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="The compact run's directory.")
@one_line_errors("interrupted; rerun the same command")
def compact(source, out_dir):
    """Write a run whose model physically lacks the pruned channels: same logits, fewer parameters and FLOPs."""
    from .compact import compact_run

    click.echo(json.dumps(compact_run(source, out_dir), indent=2, sort_keys=True))
