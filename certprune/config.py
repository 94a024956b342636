"""Experiment configuration: a YAML file -> dataclasses, with ``section.key=value`` overrides.

The resolved configuration is saved with every run (``config.yaml``), so a run directory says how it was made.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class PhaseConfig:
    """One training phase. ``loss`` overrides the experiment's loss parameters in this phase (e.g. its eps ramp)."""

    epochs: int = 0
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | constant
    loss: dict[str, Any] = field(default_factory=dict)


@dataclass
class VerifyConfig:
    """IBP / CROWN verification of the final model; ``eps`` defaults to the training loss's eps."""

    eps: float | None = None
    methods: list[str] = field(default_factory=lambda: ["IBP", "CROWN"])
    max_examples: int | None = None
    batch_size: int = 256


@dataclass
class SmoothingConfig:
    """Randomized-smoothing certification (Cohen et al. 2019) of the final model; see certprune.certify.smoothing.

    ``sigma`` defaults to the training loss's sigma. ``skip`` / ``max`` choose the test images (every skip-th,
    at most max of them); ``radii`` are the L2 radii at which certified accuracy is reported. ``precision``
    (``fp32`` or ``bf16``) and ``compile`` trade exactness of the fp32 classifier for GPU speed (see
    certprune.certify.smoothing); on a GPU, ``batch`` 10 000 is much faster than the default.
    """

    sigma: float | None = None
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch: int = 1000
    precision: str = "fp32"
    compile: bool = False
    skip: int = 1
    max: int | None = None
    radii: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])


@dataclass
class AttackConfig:
    """PGD evaluation of the final model (certprune.certify.empirical): clean and robust accuracy (``pgd_acc``).

    ``eps`` and ``step_size`` take numbers or fractions like ``8/255``; ``eps`` defaults to the training loss's
    eps, ``step_size`` to ``2.5 * eps / steps``. ``max_examples`` attacks only the first test images.
    """

    norm: str = "linf"
    eps: float | str | None = None
    steps: int = 50
    step_size: float | str | None = None
    restarts: int = 1
    objective: str = "ce"
    max_examples: int | None = None
    batch_size: int = 500


@dataclass
class Config:
    dataset: str = "mnist-embedded"
    data_dir: str | None = None
    model: str = "cnn-small"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:<index> (certprune.devices); torchrun: each process its GPU
    batch_size: int = 128  # under torchrun the whole batch, shared out over the processes
    train_examples: int | None = None  # train on the first N training images only (quick runs and tests)
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "crown-ibp", "eps": 0.1})
    pretrain: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=30, lr=1e-3))
    prune: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=10, lr=3e-4))
    finetune: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=10, lr=5e-4))
    train_norm_in_prune: bool = True
    k: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.01])
    methods: list[str] = field(default_factory=lambda: ["hydra", "lwm"])
    verify: VerifyConfig | None = field(default_factory=VerifyConfig)
    certify: SmoothingConfig | None = None
    attack: AttackConfig | None = None
    report_metric: str = "verified_acc"  # the metric of results.md's main column and of sparsity.png
    report_columns: list[str] = field(default_factory=lambda: ["verified_acc_ibp", "verified_extra_crown"])
    report_note: str = ""

    @property
    def loss_name(self) -> str:
        return self.loss["name"]

    def phase_loss(self, phase: str) -> tuple[str, dict[str, Any]]:
        """The loss's name and parameters in one phase: the experiment's loss with the phase's overrides."""
        params = {**self.loss, **getattr(self, phase).loss}
        return params.pop("name"), params

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {', '.join((where + '.' if where else '') + u for u in unknown)}")
    values = {}
    for name, value in data.items():
        nested = _NESTED.get((cls, name))
        values[name] = _build(nested, value, name) if nested and value is not None else value
    return cls(**values)


_NESTED = {(Config, "pretrain"): PhaseConfig, (Config, "prune"): PhaseConfig, (Config, "finetune"): PhaseConfig,
           (Config, "verify"): VerifyConfig, (Config, "certify"): SmoothingConfig,
           (Config, "attack"): AttackConfig}


def _merge(base: dict, update: dict) -> dict:
    """Recursive update; a mapping that names a different ``name`` (another loss) replaces the old one whole."""
    if "name" in update and update["name"] != base.get("name"):
        return dict(update)
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """``"prune.epochs=5"`` -> ``{"prune": {"epochs": 5}}``; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    for key in reversed(dotted.strip().split(".")):
        value = {key: value}
    return value


def load_config(path: str | Path | None = None, overrides: list[dict[str, Any]] | None = None) -> Config:
    """Defaults, then the YAML file, then each override (nested dicts, later ones win)."""
    data = Config().to_dict()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        data = _merge(data, loaded)
    for override in overrides or []:
        data = _merge(data, override)
    return _build(Config, data, "")


def save_config(config: Config, path: Path) -> None:
    from .runs import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
