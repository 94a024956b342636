"""``certprune`` command line: each command is a few lines over the Python API."""
from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

import click

from .config import ConfigError, load_config, parse_override
from .data import DatasetNotFound
from .runs import RunError

USER_ERRORS = (ValueError, RunError, ConfigError, DatasetNotFound, FileNotFoundError)


def _one_line_errors(command):
    """Turn expected failures into ``Error: <one line>`` and exit status 1, never a traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise click.ClickException(message) from None
        except KeyboardInterrupt:
            click.echo("interrupted; the last finished epoch is checkpointed (rerun with --resume)", err=True)
            sys.exit(130)
    return wrapper


def experiment_options(command):
    """Options shared by every command that trains: a config file and flags that override it."""
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML experiment file."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key, e.g. --set prune.epochs=5 (repeatable)."),
        click.option("--dataset", help="mnist-embedded (default), fashion-mnist, mnist, cifar10, svhn."),
        click.option("--data-dir", type=click.Path(), help="Where the data set's files are."),
        click.option("--model", help="Registered model name, e.g. cnn-small."),
        click.option("--loss", help="Training loss, e.g. crown-ibp, ibp, natural."),
        click.option("--eps", type=float, help="Perturbation budget of the loss (L-inf, pixel space)."),
        click.option("--sigma", type=float, help="Gaussian noise level of a smoothing loss (gaussian, stability)."),
        click.option("--seed", type=int),
        click.option("--device", help="auto (default: CUDA if there is a GPU), cpu, cuda or cuda:<index>."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_config(config_path, overrides, dataset=None, data_dir=None, model=None, loss=None, eps=None, seed=None,
                 sigma=None, device=None, **_):
    updates = [parse_override(text) for text in overrides]
    flags = {"dataset": dataset, "data_dir": data_dir, "model": model, "seed": seed, "device": device}
    updates.append({key: value for key, value in flags.items() if value is not None})
    if loss is not None:
        updates.append({"loss": {"name": loss}})
    if eps is not None:
        updates.append({"loss": {"eps": eps}})
    if sigma is not None:
        updates.append({"loss": {"sigma": sigma}})
    return load_config(config_path, updates)


def _pretrain_cache_dir(config) -> Path:
    """Where ``prune`` without ``--from`` keeps the dense model it pretrains: keyed by what shapes that model."""
    key = {name: getattr(config, name) for name in ("dataset", "data_dir", "model", "seed", "batch_size", "loss")}
    key["pretrain"] = config.pretrain.__dict__
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path("runs") / "cache" / f"dense-{config.model}-{digest}"


def _start(device_spec):
    """The device to compute on; under torchrun (WORLD_SIZE > 1) also join the process group."""
    from .devices import resolve_device
    from .distributed import setup

    device = resolve_device(device_spec)
    setup(device)
    return device


def _main_process() -> bool:
    """Rank 0 under torchrun (it alone prints and writes metrics.json); always True in a single process."""
    from .distributed import is_main

    return is_main()


DEVICE_OPTION = click.option("--device", default="auto", show_default=True,
                             help="auto (CUDA if there is a GPU), cpu, cuda or cuda:<index>.")


def _record(model_path: Path, result: dict) -> None:
    """Merge an evaluation's figures into the run's metrics.json and print them (rank 0 only under torchrun)."""
    from .runs import update_metrics

    if _main_process():
        if model_path.parent.is_dir():
            update_metrics(model_path.parent, **result)
        click.echo(json.dumps(result, indent=2, sort_keys=True))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Prune neural networks with HYDRA while keeping them certifiably robust."""


@main.command()
@experiment_options
@click.option("--out", type=click.Path(file_okay=False), default="runs/pretrain", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last epoch.")
@_one_line_errors
def pretrain(out, resume, **options):
    """Train the dense model."""
    from .pipeline import pretrain as run

    config = build_config(**options)
    _start(config.device)
    metrics = run(config, out, resume=resume)
    if _main_process():
        click.echo(json.dumps(metrics, indent=2, sort_keys=True))


@main.command()
@experiment_options
@click.option("--k", "k", type=float, required=True, help="Fraction of weights kept per layer, in (0, 1].")
@click.option("--method", type=click.Choice(["hydra", "lwm"]), default="hydra", show_default=True)
@click.option("--from", "source", type=click.Path(), help="Run directory (or model.pt) to prune; default: "
              "pretrain the config's dense model once and cache it under runs/cache.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory [runs/<method>-<loss>-k<k>].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last epoch.")
@_one_line_errors
def prune(k, method, source, out, resume, **options):
    """Prune to a fraction k of the weights (score training, then fine-tuning)."""
    from .masking import check_k
    from .pipeline import pretrain as run_pretrain, prune as run_prune

    k = check_k(k)
    config = build_config(**options)
    _start(config.device)
    if source is None:
        source = _pretrain_cache_dir(config)
        if not (source / "model.pt").exists():
            if _main_process():
                click.echo(f"no --from given: pretraining the dense model into {source}", err=True)
            run_pretrain(config, source, resume=True)
    out = out or f"runs/{method}-{config.loss_name}-k{k:g}"
    metrics = run_prune(config, out, k, method, source, resume=resume)
    if _main_process():
        click.echo(json.dumps(metrics, indent=2, sort_keys=True))


@main.command()
@click.option("--from", "source", type=click.Path(), required=True, help="Run directory to verify.")
@click.option("--eps", type=float, help="L-inf budget [the run's training eps].")
@click.option("--method", "methods", multiple=True, type=click.Choice(["IBP", "CROWN", "CROWN-IBP"],
              case_sensitive=False), help="Bound methods (repeatable) [IBP, CROWN].")
@click.option("--max", "max_examples", type=int, help="Verify only the first N test images.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@DEVICE_OPTION
@_one_line_errors
def verify(source, eps, methods, max_examples, batch_size, device):
    """Verified accuracy of a run from IBP / CROWN bounds; written into its metrics.json."""
    from .certify.verify import verify as run_verify
    from .runs import load_saved_run

    device = _start(device)
    model_path, config, model, x, y = load_saved_run(source, device, max_examples)
    eps = eps if eps is not None else config.loss.get("eps", 0.0)
    _record(model_path, run_verify(model, x, y, eps, methods or ("IBP", "CROWN"), batch_size))


@main.command()
@click.option("--from", "source", type=click.Path(), required=True, help="Run directory (or model.pt) to certify.")
@click.option("--sigma", type=float, help="Noise level of the smoothed classifier [the run's training sigma].")
@click.option("--n0", type=int, default=100, show_default=True, help="Samples that choose the top class.")
@click.option("--n", "n", type=int, default=100_000, show_default=True, help="Samples that bound its probability.")
@click.option("--alpha", type=float, default=0.001, show_default=True, help="Failure probability per image.")
@click.option("--batch", type=int, default=1000, show_default=True,
              help="Noisy samples per forward pass (10000 suits a GPU).")
@click.option("--precision", default="fp32", show_default=True,
              help="fp32 or bf16: bf16 certifies the classifier as computed under bf16 autocast (faster on a GPU).")
@click.option("--compile", "compile_model", is_flag=True, help="Run the classifier through torch.compile.")
@click.option("--skip", type=int, default=1, show_default=True, help="Certify every skip-th test image.")
@click.option("--max", "max_examples", type=int, help="Certify at most N of the selected test images.")
@click.option("--restart", is_flag=True, help="Discard the run's certify.tsv instead of resuming it.")
@DEVICE_OPTION
@_one_line_errors
def certify(source, sigma, n0, n, alpha, batch, precision, compile_model, skip, max_examples, restart, device):
    """Randomized-smoothing certified L2 radii (Cohen et al.) of a run's test images.

    Writes RUN/certify.tsv as it goes (rerun the same command to resume) and the summary into RUN/metrics.json.
    """
    from .certify.smoothing import certify_saved_run
    from .config import SmoothingConfig

    settings = SmoothingConfig(sigma=sigma, n0=n0, n=n, alpha=alpha, batch=batch, precision=precision,
                               compile=compile_model, skip=skip, max=max_examples)
    device = _start(device)
    main_process = _main_process()
    try:
        summary = certify_saved_run(source, settings, restart, device=device,
                                    warn=lambda text: main_process and click.echo(f"Warning: {text}", err=True))
    except KeyboardInterrupt:
        click.echo("interrupted; certified images are kept in certify.tsv (rerun the same command to resume)", err=True)
        sys.exit(130)
    if main_process:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))


@main.command()
@experiment_options
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Sweep directory.")
@click.option("--from", "source", type=click.Path(), help="Dense run to prune instead of pretraining one.")
@_one_line_errors
def sweep(out, source, **options):
    """Dense, then HYDRA and LWM at every k of the config; results.md and sparsity.png."""
    from .sweep import sweep as run_sweep

    config = build_config(**options)
    _start(config.device)
    run_sweep(config, out, source)
    if _main_process():
        click.echo(Path(out, "results.md").read_text())


@main.command()
@click.option("--from", "source", type=click.Path(), required=True, help="Run directory (or model.pt) to attack.")
@click.option("--attack", type=click.Choice(["pgd"]), default="pgd", show_default=True)
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--eps", help="Budget in pixel space, a number or a fraction like 8/255 [the run's training eps].")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--step-size", help="Step size, a number or a fraction [2.5 * eps / steps].")
@click.option("--restarts", type=int, default=1, show_default=True, help="Random starts; the worst counts.")
@click.option("--objective", type=click.Choice(["ce", "margin"]), default="ce", show_default=True)
@click.option("--max", "max_examples", type=int, help="Attack only the first N test images.")
@click.option("--batch-size", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random starts.")
@DEVICE_OPTION
@_one_line_errors
def evaluate(source, attack, norm, eps, steps, step_size, restarts, objective, max_examples, batch_size, seed, device):
    """Clean and PGD (robust) accuracy of a run; written into its metrics.json as pgd_acc and attack."""
    from .certify.empirical import attack_accuracy, make_attack
    from .config import AttackConfig
    from .runs import load_saved_run

    settings = AttackConfig(norm=norm, eps=eps, steps=steps, step_size=step_size, restarts=restarts,
                            objective=objective, max_examples=max_examples, batch_size=batch_size)
    if eps is not None:
        make_attack(settings, None)  # bad settings fail before any file is read
    if max_examples is not None and max_examples <= 0:
        raise ValueError(f"--max must be a positive number of images, got {max_examples}")
    device = _start(device)
    model_path, config, model, x, y = load_saved_run(source, device, max_examples)
    pgd = make_attack(settings, config.loss.get("eps"))
    _record(model_path, attack_accuracy(model, x, y, pgd, batch_size, seed=seed))


@main.command()
@click.argument("sweep_dir", type=click.Path(file_okay=False))
@click.option("--metric", help="Metric to plot [the sweep's report_metric].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="PNG file [SWEEP_DIR/sparsity.png].")
@_one_line_errors
def plot(sweep_dir, metric, out_path):
    """Plot a metric of a sweep's runs against sparsity (PNG)."""
    from .plots import plot_vs_sparsity
    from .runs import CONFIG_FILE, read_metrics

    sweep_dir = Path(sweep_dir)
    runs = [d for d in sorted(sweep_dir.iterdir()) if (d / "metrics.json").exists()] if sweep_dir.is_dir() else []
    if not runs:
        raise RunError(f"{sweep_dir} holds no finished runs")
    rows = [read_metrics(d) for d in runs]
    config_file = next((d / CONFIG_FILE for d in runs if (d / CONFIG_FILE).exists()), None)
    metric = metric or (load_config(config_file).report_metric if config_file else "verified_acc")
    if not any(metric in row for row in rows):
        raise RunError(f"no run in {sweep_dir} has the metric {metric!r}")
    path = plot_vs_sparsity(rows, metric, Path(out_path) if out_path else sweep_dir / "sparsity.png")
    click.echo(str(path))


if __name__ == "__main__":
    main()
