"""``certprune`` command line: each command is a few lines over the Python API; validation happens in the config."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import signal
import warnings
from pathlib import Path

import click

from . import __version__
from .cli_common import RESUME_HINT, build_config, default_help as _default, experiment_options, one_line_errors
from .cli_compact import compact
from .cli_export import export
from .config import AttackConfig, SmoothingConfig, VerifyConfig, validate
from .logs import setup_logging
from .runs import CONFIG_FILE, read_config, read_metrics


def _pretrain_cache_dir(config) -> Path:
    """Where ``prune`` without ``--from`` keeps the dense model it pretrains: keyed by what shapes that model."""
    key = config.training_dict(dense=True)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(config.model).name)  # a file's or callable's name, as a folder
    return Path("runs") / "cache" / f"dense-{name}-{digest}"


def _with_source_model(config, source):
    """``config`` with the model of run ``source``: its name, and for a user's model its weights file, inputs and
    origin, so that the pipeline's comparison of the two agrees."""
    from .runs import load_model_file, resolve_model_path

    architecture = load_model_file(resolve_model_path(source))[1]
    origin = architecture.get("origin") or {}
    return validate({**config.to_dict(), "model": architecture["name"], "inputs": architecture.get("inputs") or {},
                     "weights": origin.get("weights", {}).get("file"), "model_origin": architecture.get("origin")})


def _start(device_spec):
    """The device to compute on; under torchrun (WORLD_SIZE > 1) also join the process group."""
    from .devices import resolve_device
    from .distributed import setup

    device = resolve_device(device_spec)
    setup(device)
    return device


def _show(result) -> None:
    from .distributed import is_main

    if is_main():
        click.echo(json.dumps(result, indent=2, sort_keys=True))


def _resumed_config(out, resume):
    """With ``--resume``, the run's own config is the base that flags may only repeat (the pipeline refuses a
    difference in one line)."""
    return read_config(out) if resume and out is not None and Path(out, CONFIG_FILE).is_file() else None


def _raise_sigterm(signum, frame):
    raise KeyboardInterrupt


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="certprune")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and results, no progress lines.")
def main(quiet):
    """Prune neural networks with HYDRA while keeping them certifiably robust."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=DeprecationWarning)
    signal.signal(signal.SIGTERM, _raise_sigterm)  # a kill runs the same cleanup as Ctrl-C: no temporaries left
    setup_logging(quiet)


@main.command()
@experiment_options
@click.option("--out", type=click.Path(file_okay=False), default="runs/pretrain", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last epoch, with its settings.")
@one_line_errors(RESUME_HINT)
def pretrain(out, resume, **options):
    """Train the dense model, then run the evaluations its config asks for."""
    from .evaluation import evaluate_configured
    from .pipeline import pretrain as run

    config = build_config(**options, base=_resumed_config(out, resume))
    device = _start(config.device)
    run(config, out, resume=resume)
    evaluate_configured(out, config, device)
    _show(read_metrics(out))


@main.command()
@experiment_options
@click.option("--k", "k", help="Fraction of weights kept, in (0, 1] [a resumed run's own].")
@click.option("--method", type=click.Choice(["hydra", "lwm"]), help="Pruning method [hydra; a resumed run's own].")
@click.option("--allocation", help="How k is shared between layers: layerwise (default), global, erk, learned.")
@click.option("--granularity", help="What a mask keeps: weight (default) or channel (whole output channels).")
@click.option("--from", "source", type=click.Path(), help="Run directory (or model.pt) to prune; default: "
              "pretrain the config's dense model once and cache it under runs/cache.")
@click.option("--pretrain", "train_dense", is_flag=True, help="Without --from, train a model of your own (a file, "
              "a callable or --weights) with the config's pretrain phase first; else its own weights are the dense "
              "starting point. A registry model is always pretrained.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory [runs/<method>-<loss>-k<k>].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last epoch, with its settings.")
@one_line_errors(RESUME_HINT)
def prune(k, method, allocation, granularity, source, train_dense, out, resume, **options):
    """Prune to a fraction k of the weights (score training, then fine-tuning), then evaluate."""
    from .evaluation import evaluate_configured
    from .pipeline import pretrain as run_pretrain, prune as run_prune, stored_identity
    from .quantities import check_k
    from .sources import is_given

    stored = stored_identity(out) if resume and out else {}
    if k is None and "k" not in stored:
        raise ValueError("--k is required: the fraction of weights to keep, in (0, 1]")
    k = check_k(k if k is not None else stored["k"])
    method = method or stored.get("method", "hydra")
    if source is not None and (train_dense or options.get("weights")):
        raise ValueError(f"--from gives the dense model; {'--pretrain' if train_dense else '--weights'} is for a "
                         "prune without it")
    source = source or stored.get("source")
    extra = [{"prune": {"allocation": allocation}}] if allocation else []
    extra += [{"prune": {"granularity": granularity}}] if granularity else []
    resumed = _resumed_config(out, resume)
    config = build_config(**options, base=resumed, extra=extra)
    device = _start(config.device)
    if source is not None and options.get("model") is None and resumed is None:  # the model is the source's
        config = _with_source_model(config, source)
    if source is None:
        own = is_given(config.model, config.weights) and not train_dense
        if own:  # the model's own weights are the dense starting point: a dense run of no epochs keeps them
            config = config.model_copy(update={"pretrain": config.pretrain.model_copy(update={"epochs": 0})})
        source = _pretrain_cache_dir(config)
        if not (source / "model.pt").exists():
            run_pretrain(config, source, resume=True)  # said once it is there: a bad model or data stays one line
            logging.getLogger("certprune").info("no --from given: the dense model (%s) is in %s", "its own weights"
                                                if own else "pretrained", source)
    out = out or f"runs/{method}-{config.loss_name}-k{k:g}"
    run_prune(config, out, k, method, source, resume=resume)
    evaluate_configured(out, config, device)
    _show(read_metrics(out))


def _evaluate(source, section, requested, device, restart=False):
    from .evaluation import evaluate_run

    _show(evaluate_run(source, {section: requested}, _start(device), restart=restart))


DEVICE_OPTION = click.option("--device", default="auto", show_default=True,
                             help="auto (CUDA if there is a GPU), cpu, cuda or cuda:<index>.")
SOURCE_OPTION = click.option("--from", "source", type=click.Path(), required=True, help="Run directory or model.pt.")
MAX_OPTION = click.option("--max", "max", type=int, help="Evaluate at most N of the selected test images [all].")
SKIP_OPTION = click.option("--skip", type=int, help="Evaluate every skip-th test image [1].")
NOT_RECORDED = "interrupted; nothing was recorded"


@main.command()
@click.option("--from", "source", type=click.Path(), help="Run directory or model.pt.")
@click.option("--onnx", type=click.Path(), help="Instead of --from: an ONNX model to verify on each --vnnlib property.")
@click.option("--vnnlib", "vnnlibs", multiple=True, type=click.Path(), help="A VNN-LIB property file (repeatable).")
@click.option("--instances", type=click.Path(), help="Instead of --from: a VNN-COMP instances.csv.")
@click.option("--out", type=click.Path(), help="With --onnx or --instances: a tab-separated file of the verdicts.")
@click.option("--eps", help="L-inf budget, 0.1 or 8/255 [the run's verify.eps, else its training eps].")
@click.option("--method", "methods", multiple=True,
              help="Verification stages in cascade order (repeatable): IBP, CROWN, CROWN-IBP, alpha-CROWN, BaB, MILP "
              + _default(VerifyConfig, "bound_methods"))
@MAX_OPTION
@SKIP_OPTION
@click.option("--batch-size", type=int, help="Images bounded at once " + _default(VerifyConfig, "batch_size"))
@click.option("--timeout", type=float, help="Seconds per image of the complete stages (BaB, MILP) "
              + _default(VerifyConfig, "timeout")
              + "; with --onnx/--instances, per instance over all stages [instances.csv's, else 10].")
@click.option("--restart", is_flag=True, help="Discard the verdicts already in the run's verify TSV (or the --out "
              "file of --onnx/--instances) instead of resuming them.")
@DEVICE_OPTION
@one_line_errors("interrupted; decided images are kept in the run's verify TSV (rerun the same command to resume)")
def verify(source, onnx, vnnlibs, instances, out, eps, methods, max, skip, batch_size, timeout, restart, device):
    """Verified accuracy from sound bounds and complete verification; recorded in the run's metrics.json with the
    images and settings, and per image in verify.tsv (verify[<settings>].tsv for non-default settings).
    With --onnx and --vnnlib, or --instances: a verdict per (ONNX, VNN-LIB) pair, on stdout and in --out."""
    if onnx or vnnlibs or instances or out:
        from .certify.instances import verify_command

        return verify_command(source, onnx, vnnlibs, instances, out, eps, methods, max, skip, batch_size, timeout,
                              device, restart, functools.partial(click.echo, nl=False))
    if source is None:
        raise ValueError("--from is required: a run directory (or --onnx with --vnnlib, or --instances)")
    requested = {"eps": eps, "bound_methods": list(methods) or None, "max": max, "skip": skip,
                 "batch_size": batch_size, "timeout": timeout}
    _evaluate(source, "verify", requested, device, restart)


@main.command()
@SOURCE_OPTION
@click.option("--sigma", help="Noise level of the smoothed classifier [the run's training sigma].")
@click.option("--n0", type=int, help="Samples that choose the top class " + _default(SmoothingConfig, "n0"))
@click.option("--n", "n", type=int, help="Samples that bound its probability " + _default(SmoothingConfig, "n"))
@click.option("--alpha", help="Failure probability per image " + _default(SmoothingConfig, "alpha"))
@click.option("--batch", type=int, help="Noisy samples per forward pass (10000 suits a GPU) " + _default(SmoothingConfig, "batch"))
@click.option("--precision", help="fp32 or bf16: bf16 certifies the classifier as computed under bf16 autocast.")
@click.option("--compile", "compile_model", is_flag=True, default=None, help="Run the classifier through torch.compile.")
@SKIP_OPTION
@MAX_OPTION
@click.option("--restart", is_flag=True, help="Discard the run's certify.tsv instead of resuming it.")
@DEVICE_OPTION
@one_line_errors("interrupted; certified images are kept in certify.tsv (rerun the same command to resume)")
def certify(source, sigma, n0, n, alpha, batch, precision, compile_model, skip, max, restart, device):
    """Randomized-smoothing certified L2 radii (Cohen et al.) of a run's test images.

    Writes RUN/certify.tsv as it goes (rerun the same command to resume) and the summary into RUN/metrics.json.
    """
    requested = {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "batch": batch, "precision": precision,
                 "compile": compile_model, "skip": skip, "max": max}
    _evaluate(source, "smoothing", requested, device, restart=restart)


@main.command()
@SOURCE_OPTION
@click.option("--attack", type=click.Choice(["pgd", "autoattack"]), default="pgd", show_default=True,
              help="pgd, or the standard AutoAttack suite (pip install certprune[attacks]).")
@click.option("--norm", type=click.Choice(["linf", "l2"]), help=_default(AttackConfig, "norm"))
@click.option("--eps", help="Budget in pixel space, 0.1 or 8/255 [the run's attack.eps, else its training eps].")
@click.option("--steps", type=int, help=_default(AttackConfig, "steps"))
@click.option("--step-size", help="Step size, a number or a fraction [2.5 * eps / steps].")
@click.option("--restarts", type=int, help="Random starts; the worst counts " + _default(AttackConfig, "restarts"))
@click.option("--objective", type=click.Choice(["ce", "margin"]), help=_default(AttackConfig, "objective"))
@MAX_OPTION
@SKIP_OPTION
@click.option("--batch-size", type=int, help=_default(AttackConfig, "batch_size"))
@click.option("--seed", type=int, help="Seed of the random starts [the run's seed].")
@DEVICE_OPTION
@one_line_errors(NOT_RECORDED)
def evaluate(source, attack, norm, eps, steps, step_size, restarts, objective, max, skip, batch_size, seed, device):
    """Clean and robust accuracy under PGD or AutoAttack; recorded in the run's metrics.json with images and settings."""
    requested = {"norm": norm, "eps": eps, "max": max, "skip": skip, "batch_size": batch_size, "seed": seed}
    pgd_only = {"steps": steps, "step_size": step_size, "restarts": restarts, "objective": objective}
    if attack == "autoattack" and any(value is not None for value in pgd_only.values()):
        raise ValueError(f"--{next(k for k, v in pgd_only.items() if v is not None).replace('_', '-')} "
                               "is a PGD setting; AutoAttack's standard suite fixes its own")
    _evaluate(source, "attack" if attack == "pgd" else "autoattack", {**requested, **pgd_only}
              if attack == "pgd" else requested, device)


@main.command()
@experiment_options
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Sweep directory.")
@click.option("--from", "source", type=click.Path(), help="Dense run to prune instead of pretraining one.")
@one_line_errors("interrupted; rerun the same sweep command to continue (finished runs are kept)")
def sweep(out, source, **options):
    """Dense, then HYDRA and LWM at every k of the config; results.md and sparsity.png."""
    from .distributed import is_main
    from .sweep import sweep as run_sweep

    config = build_config(**options)
    _start(config.device)
    run_sweep(config, out, source)
    if is_main():
        click.echo(Path(out, "results.md").read_text())


main.add_command(export)
main.add_command(compact)


@main.command()
@click.argument("sweep_dir", type=click.Path(file_okay=False))
@click.option("--metric", help="Metric to plot [the sweep's report_metric].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="PNG file [SWEEP_DIR/sparsity.png].")
@one_line_errors("interrupted")
def plot(sweep_dir, metric, out_path):
    """Plot a metric of a sweep's runs against sparsity (PNG)."""
    from .report import plot_sweep

    click.echo(str(plot_sweep(Path(sweep_dir), metric, Path(out_path) if out_path else None)))
