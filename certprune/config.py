"""Typed experiment settings, validated once at the boundary: YAML + ``section.key=value`` overrides -> :class:`Config`.

Every quantity has one type (:data:`Eps` takes ``8/255`` everywhere, :data:`K`, :data:`Sigma`, :data:`Alpha`,
:data:`PositiveInt`), and a config is checked whole, losses included, before any work starts; the layers below
trust what they are given. pydantic v2 does the checking: it gives typed, nested, strict validation with the path
of each bad key for a few lines per section, which hand-written checks repeated in every command did not.
The resolved configuration is saved with every run (``config.yaml``), so a run directory says how it was made.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator

from .quantities import Alpha, Epochs, Eps, K, NonNegativeFloat, PositiveFloat, PositiveInt, Sigma

log = logging.getLogger("certprune")


class ConfigError(ValueError):
    """A configuration cannot be used; the message names the key and says why in one line."""


BOUND_METHODS = ("IBP", "CROWN", "CROWN-IBP", "alpha-CROWN", "MILP")
BOUND_LOSSES = ("ibp", "crown-ibp")
PRETRAIN_RAMP = 0.4  # a bound loss pretrained without an eps ramp stays at chance: ramp over the first 40 %


def _bound_method(name: str) -> str:
    for method in BOUND_METHODS:
        if str(name).lower() == method.lower():
            return method
    raise ValueError(f"unknown bound method {name!r}; choose from {', '.join(BOUND_METHODS)}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhaseConfig(Section):
    """One training phase. ``loss`` overrides the experiment's loss parameters in this phase (e.g. its eps ramp)."""

    epochs: Epochs = 0
    lr: PositiveFloat = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: NonNegativeFloat = 0.9
    weight_decay: NonNegativeFloat = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    loss: dict[str, Any] = Field(default_factory=dict)


class PruneConfig(PhaseConfig):
    """HYDRA's score phase; ``allocation`` says how the budget k is shared between layers (certprune.masking)."""

    allocation: str = "layerwise"
    rate_lr: PositiveFloat = 1e-2  # the learned allocation's per-layer rates (their own learning rate)


class ImageSelection(Section):
    """Which test images an evaluation covers: every ``skip``-th from the first, at most ``max`` of them."""

    skip: PositiveInt = 1
    max: PositiveInt | None = None


class VerifyConfig(ImageSelection):
    """Bound verification of the final model, a cascade of sound stages; ``eps`` defaults to the loss's eps."""

    eps: Eps | None = None
    bound_methods: list[Annotated[str, AfterValidator(_bound_method)]] = Field(
        default_factory=lambda: ["IBP", "CROWN"], min_length=1)
    batch_size: PositiveInt = 256
    timeout: PositiveFloat = 10.0  # seconds per image of the complete (MILP) stage
    alpha_iterations: PositiveInt = 20
    alpha_lr: PositiveFloat = 0.5


class SmoothingConfig(ImageSelection):
    """Randomized-smoothing certification (Cohen et al. 2019); ``sigma`` defaults to the training loss's sigma.

    ``radii`` are the L2 radii at which certified accuracy is reported. ``precision`` bf16 and ``compile`` trade
    exactness of the fp32 classifier for GPU speed (see certprune.certify.smoothing); on a GPU, ``batch`` 10 000 is
    much faster than the default.
    """

    sigma: Sigma | None = None
    n0: PositiveInt = 100
    n: PositiveInt = 100_000
    alpha: Alpha = 0.001
    batch: PositiveInt = 1000
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: StrictBool = False
    radii: list[NonNegativeFloat] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)


class AttackConfig(ImageSelection):
    """PGD evaluation of the final model: robust accuracy ``pgd_acc``, an upper bound on true robust accuracy.

    ``eps`` defaults to the training loss's eps, ``step_size`` to ``2.5 * eps / steps``.
    """

    norm: Literal["linf", "l2"] = "linf"
    eps: Eps | None = None
    steps: PositiveInt = 50
    step_size: Eps | None = None
    restarts: PositiveInt = 1
    objective: Literal["ce", "margin"] = "ce"
    batch_size: PositiveInt = 500
    seed: StrictInt | None = None  # of the random starts; None: the run's seed


EVALUATION_SECTIONS = ("verify", "smoothing", "attack")
NOT_TRAINING = (*EVALUATION_SECTIONS, "device", "k", "seeds", "prune_methods", "report_metric", "report_columns")
_RENAMED = {"methods": "prune_methods", "certify": "smoothing"}
_RENAMED_IN_SECTION = {"methods": "bound_methods", "max_examples": "max"}


class Config(Section):
    dataset: str = "mnist-embedded"
    data_dir: str | None = None
    model: str = "cnn-small"
    seed: Annotated[StrictInt, Field(ge=0)] = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:<index> (certprune.devices); torchrun: each process its GPU
    batch_size: PositiveInt = 128  # under torchrun the whole batch, shared out over the processes
    train_examples: PositiveInt | None = None  # train on the first N training images only (quick runs and tests)
    augment: list[str] = Field(default_factory=list)
    loss: dict[str, Any] = Field(default_factory=lambda: {
        "name": "crown-ibp", "eps": 0.1, "kappa_start": 1.0, "kappa_end": 0.0, "beta_start": 1.0, "beta_end": 0.0})
    pretrain: PhaseConfig = Field(default_factory=lambda: PhaseConfig(epochs=20, lr=1e-3))
    prune: PruneConfig = Field(default_factory=lambda: PruneConfig(epochs=8, lr=3e-4))
    finetune: PhaseConfig = Field(default_factory=lambda: PhaseConfig(epochs=8, lr=1e-3))
    train_norm_in_prune: StrictBool = True
    k: list[K] = Field(default_factory=lambda: [0.1, 0.05, 0.01], min_length=1)
    seeds: list[Annotated[StrictInt, Field(ge=0)]] | None = None  # a sweep's seeds (each run gets one as its seed)
    prune_methods: list[Literal["hydra", "lwm"]] = Field(default_factory=lambda: ["hydra", "lwm"], min_length=1)
    verify: VerifyConfig | None = Field(default_factory=VerifyConfig)
    smoothing: SmoothingConfig | None = None
    attack: AttackConfig | None = None
    report_metric: str = "verified_acc"  # the metric of results.md's main column and of sparsity.png
    report_columns: list[str] = Field(default_factory=lambda: ["verified_acc_ibp", "verified_extra_crown"])

    @model_validator(mode="after")
    def _check_names(self) -> "Config":
        from .data import DATASETS
        from .losses import check_loss
        from .models import MODELS

        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"model: unknown model {self.model!r}; choose from {', '.join(sorted(MODELS))}")
        if not isinstance(self.loss.get("name"), str):
            raise ValueError("loss: needs a name, e.g. loss.name=crown-ibp")
        for phase in ("pretrain", "prune", "finetune"):
            name, params = self.phase_loss(phase)
            try:
                check_loss(name, params)
            except ValueError as error:  # name the phase only where its own override may be the cause
                raise ValueError(f"{phase}.loss: {error}" if getattr(self, phase).loss else str(error)) from None
        _check_allocation(self.prune.allocation)
        _check_augment(self.augment, self.dataset)
        return self

    @property
    def loss_name(self) -> str:
        return self.loss["name"]

    def phase_loss(self, phase: str) -> tuple[str, dict[str, Any]]:
        """The loss's name and parameters in one phase: the experiment's loss with the phase's overrides.

        A bound loss trained from scratch at full eps never leaves chance, so pretraining ramps eps (and kappa,
        beta with it) over its first 40 % of epochs unless the config gives ``ramp_epochs``."""
        params = {**self.loss, **getattr(self, phase).loss}
        name = params.pop("name")
        if phase == "pretrain" and name in BOUND_LOSSES and "ramp_epochs" not in params:
            params["ramp_epochs"] = round(PRETRAIN_RAMP * self.pretrain.epochs)
        return name, params

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def training_dict(self, dense: bool = False) -> dict[str, Any]:
        """What shapes a trained model: every key but the evaluations, the device and the sweep's lists; for a
        ``dense`` (pretrained) model not the pruning phases either, so sweeps of other allocations can share it."""
        skip = NOT_TRAINING + (("prune", "finetune", "train_norm_in_prune") if dense else ())
        return {key: value for key, value in self.to_dict().items() if key not in skip}


def _check_allocation(allocation: str) -> None:
    from . import masking

    choices = getattr(masking, "ALLOCATIONS", ("layerwise",))
    if allocation not in choices:
        raise ValueError(f"prune.allocation: unknown allocation {allocation!r}; choose from {', '.join(choices)}")


def _check_augment(names: list[str], dataset: str) -> None:
    if not names:
        return
    try:
        from .augment import make_augment
    except ImportError:
        raise ValueError("augment: this build has no augmentation") from None
    make_augment(names, dataset)


def _renamed(data: Any, where: str) -> Any:
    """Old key names still load, with a warning: ``methods`` -> ``prune_methods``, ``certify`` -> ``smoothing``,
    a section's ``methods`` -> ``bound_methods`` and ``max_examples`` -> ``max``."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for old, new in _RENAMED.items():
        if old in data:
            log.warning("config key %r is now %r (%s)", old, new, where)
            data[new] = data.pop(old)
    for section in EVALUATION_SECTIONS:
        if isinstance(data.get(section), dict):
            inner = dict(data[section])
            for old, new in _RENAMED_IN_SECTION.items():
                if old in inner:
                    log.warning("config key %s.%s is now %s.%s (%s)", section, old, section, new, where)
                    inner[new] = inner.pop(old)
            data[section] = inner
    if "report_note" in data:
        log.warning("config key 'report_note' is ignored (%s): results.md now states every setting itself", where)
        data.pop("report_note")
    return data


def _merge(base: dict, update: dict) -> dict:
    """Recursive update; a mapping that names a different ``name`` (another loss) replaces the old one whole."""
    if "name" in update and update["name"] != base.get("name"):
        return dict(update)
    merged = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """``"prune.epochs=5"`` -> ``{"prune": {"epochs": 5}}``; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML") from None
    for key in reversed(dotted.strip().split(".")):
        value = {key: value}
    return value


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    if first["type"] == "extra_forbidden":
        return f"unknown config key {'.'.join(str(part) for part in first['loc'])}"
    where = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function-"))
    message = first["msg"].removeprefix("Value error, ")
    shown = first.get("input")
    got = f" (got {shown!r})" if not isinstance(shown, (dict, list)) and not message.endswith(repr(shown)) else ""
    joint = " " if message.startswith("must") else ": "
    return f"config {where}{joint}{message}{got}" if where else f"config: {message}"


def validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_one_line(error)) from None


def load_config(path: str | Path | None = None, overrides: list[dict[str, Any]] | None = None) -> Config:
    """Defaults, then the YAML file, then each override (nested dicts, later ones win); validated whole."""
    data = Config.model_construct().model_dump(mode="json")
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
        data = _merge(data, _renamed(loaded, str(path)))
    for override in overrides or []:
        data = _merge(data, _renamed(override, "override"))
    return validate(data)


def config_text(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
