"""What every ``certprune`` command shares: one-line errors, the training options, and building the config.

Kept apart from :mod:`certprune.cli` (the commands) so each file stays small; validation itself lives in
:mod:`certprune.config`.
"""
from __future__ import annotations

import functools
import sys

import click

from .config import ConfigError, load_config, parse_override
from .data import DatasetNotFound
from .runs import RunError
from .sources import with_origin
from .train import TrainingDiverged

USER_ERRORS = (ValueError, RunError, ConfigError, DatasetNotFound, TrainingDiverged, OSError)
RESUME_HINT = "interrupted; the last finished epoch is checkpointed (rerun with --resume)"


def message(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line_errors(interrupted: str):
    """Expected failures become ``Error: <one line>`` with exit status 1, never a traceback; Ctrl-C (and SIGTERM)
    print what was kept, ``interrupted``, and exit 130."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except USER_ERRORS as error:
                raise click.ClickException(message(error)) from None
            except KeyboardInterrupt:
                click.echo(interrupted, err=True)
                sys.exit(130)
        return wrapper
    return decorate


def experiment_options(command):
    """Options shared by every command that trains: a config file and flags that override it."""
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML experiment file."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key, e.g. --set prune.epochs=5 (repeatable)."),
        click.option("--dataset", help="mnist-embedded (default), fashion-mnist, mnist, cifar10, svhn; or your own: "
                     "npz:PATH (x_train, y_train, x_test, y_test) or folder:DIR (train/ and test/, a folder per "
                     "class)."),
        click.option("--data-dir", type=click.Path(), help="Where the data set's files are."),
        click.option("--model", help="Registered model name (e.g. cnn-small), or your own: model.onnx, or a callable "
                     "returning an nn.Module as package.module:factory or path/to/file.py:factory."),
        click.option("--weights", type=click.Path(), help="A state_dict file (torch.save) for the --model callable "
                     "(or registry model) to start from; read with weights_only=True."),
        click.option("--loss", help="Training loss, e.g. crown-ibp, ibp, natural."),
        click.option("--eps", help="Perturbation budget of the loss (L-inf, pixel space): 0.1 or 8/255."),
        click.option("--sigma", help="Gaussian noise level of a smoothing loss (gaussian, stability)."),
        click.option("--seed", type=int),
        click.option("--device", help="auto (default: CUDA if there is a GPU), cpu, cuda or cuda:<index>."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_config(config_path, overrides, dataset=None, data_dir=None, model=None, weights=None, loss=None, eps=None,
                 seed=None, sigma=None, device=None, base=None, extra=None, **_):
    """The validated config: defaults (or a resumed run's own ``base`` config), the file, then every flag; with the
    model's origin as its files are now (a resume of a run whose file has changed is then refused)."""
    updates = [base.to_dict()] if base is not None else []
    if base is not None and config_path is not None:  # the file may only repeat the resumed run's settings
        updates.append(load_config(config_path).to_dict())
        config_path = None
    # the loss flags before --set: a loss named anew replaces the whole loss, and would drop --set loss.KEY=...
    loss_flags = {"name": loss, "eps": eps, "sigma": sigma}
    if any(value is not None for value in loss_flags.values()):
        updates.append({"loss": {key: value for key, value in loss_flags.items() if value is not None}})
    updates += [parse_override(text) for text in overrides]
    flags = {"dataset": dataset, "data_dir": data_dir, "model": model, "weights": weights, "seed": seed,
             "device": device}
    updates.append({key: value for key, value in flags.items() if value is not None})
    updates += extra or []
    return with_origin(load_config(config_path, updates))


def default_help(section, name) -> str:
    """A section's default as help text: the settings types hold the defaults, the CLI never restates them."""
    field = section.model_fields[name]
    value = field.default_factory() if field.default_factory else field.default
    return f"[{'+'.join(map(str, value)) if isinstance(value, list) else value}]"
