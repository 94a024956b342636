"""Typed experiment settings, validated once at the boundary: YAML + ``section.key=value`` overrides -> :class:`Config`.

Every quantity has one type (:data:`Eps` takes ``8/255`` everywhere, :data:`K`, :data:`Sigma`, :data:`Alpha`,
:data:`PositiveInt`), and a config is checked whole, losses included, before any work starts; the layers below
trust what they are given. pydantic v2 does the checking: it gives typed, nested, strict validation with the path
of each bad key for a few lines per section, which hand-written checks repeated in every command did not.
The resolved configuration is saved with every run (``config.yaml``), so a run directory says how it was made.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator

from .overrides import EVALUATION_SECTIONS, ConfigError, merge, parse_override, renamed  # noqa: F401  (parse_override: the API's)
from .quantities import Alpha, Epochs, Eps, K, NonNegativeFloat, PositiveFloat, PositiveInt, Sigma, parse_eps
from .inputs import InputConfig
from .sources import REGISTRY, check_settings

log = logging.getLogger("certprune")


BOUND_METHODS = ("IBP", "CROWN", "CROWN-IBP", "alpha-CROWN", "BaB", "MILP")
BOUND_LOSSES = ("ibp", "crown-ibp", "sabr", "mtl-ibp", "cc-ibp", "exp-ibp")  # ramp eps in pretraining
PRETRAIN_RAMP = 0.4  # a bound loss pretrained without an eps ramp stays at chance: ramp over the first 40 %


def _bound_method(name: str) -> str:
    for method in BOUND_METHODS:
        if str(name).lower() == method.lower():
            return method
    raise ValueError(f"unknown bound method {name!r}; choose from {', '.join(BOUND_METHODS)}")


def _unique(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"lists each value once, got {values}")
    return values


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
    granularity: str = "weight"  # weight | channel (whole output channels; certprune.masking.channel)
    channel_scores: str = "channel"  # channel | weight-l1 (HYDRA App. C.9: per-weight scores, ranked by channel L1)
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
    timeout: PositiveFloat = 10.0  # seconds per image of the complete stages (BaB, MILP), shared
    alpha_iterations: PositiveInt = 10  # alpha-CROWN's steps and lr, measured in certprune/lirpa.py
    alpha_lr: PositiveFloat = 0.5
    milp_attack_steps: Annotated[StrictInt, Field(ge=0)] = 20  # PGD before each MILP (0: the MILP alone)


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
    step_size: Annotated[Eps, Field(gt=0)] | None = None
    restarts: PositiveInt = 1
    objective: Literal["ce", "margin"] = "ce"
    batch_size: PositiveInt = 500
    seed: StrictInt | None = None  # of the random starts; None: the run's seed


class AutoAttackConfig(ImageSelection):
    """AutoAttack (Croce and Hein 2020, the standard suite) of the final model: ``autoattack_acc``."""

    norm: Literal["linf", "l2"] = "linf"
    eps: Eps | None = None
    version: Literal["standard", "plus"] = "standard"
    batch_size: PositiveInt = 500
    seed: StrictInt | None = None  # None: the run's seed


NOT_TRAINING = (*EVALUATION_SECTIONS, "device", "k", "seeds", "allocations", "prune_methods", "report_metric",
                "report_columns")


class Config(Section):
    dataset: str = "mnist-embedded"
    data_dir: str | None = None
    model: str = "cnn-small"  # a registry name, a file.onnx, or module:factory / file.py:factory (certprune.sources)
    weights: str | None = None  # a state_dict file the model starts from (a callable's or a registry model's)
    inputs: InputConfig = Field(default_factory=InputConfig)
    model_origin: dict[str, Any] | None = None  # not a setting: the model's files and sha256 when the run started
    weight_init: str = "default"  # the dense model's weights before pretraining: default (torch's) | ibp (Shi et al.)
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
    k: Annotated[list[K], AfterValidator(_unique)] = Field(default_factory=lambda: [0.1, 0.05, 0.01], min_length=1)
    seeds: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(None, min_length=1)  # a sweep's, one per run
    # a sweep's: prune with each of these in turn (prune.allocation is then ignored); None: prune.allocation alone
    allocations: Annotated[list[str], AfterValidator(_unique)] | None = Field(None, min_length=1)
    prune_methods: Annotated[list[Literal["hydra", "lwm"]], AfterValidator(_unique)] = Field(
        default_factory=lambda: ["hydra", "lwm"], min_length=1)
    verify: VerifyConfig | None = Field(default_factory=VerifyConfig)
    smoothing: SmoothingConfig | None = None
    attack: AttackConfig | None = None
    autoattack: AutoAttackConfig | None = None
    report_metric: str = "verified_acc"  # the metric of results.md's main column and of sparsity.png
    report_columns: list[str] = Field(default_factory=lambda: ["verified_acc_ibp", "verified_extra_crown"])

    @model_validator(mode="after")
    def _check_names(self) -> "Config":
        from .data import check_dataset_name
        from .losses import check_loss
        from .masking import ALLOCATIONS

        try:
            check_dataset_name(self.dataset)
        except ValueError as error:
            raise ValueError(f"dataset: {error}") from None
        registry = check_settings(self) == REGISTRY
        if not isinstance(self.loss.get("name"), str):
            raise ValueError("loss: needs a name, e.g. loss.name=crown-ibp")
        self.loss = _numeric_budgets(self.loss)
        for phase in ("pretrain", "prune", "finetune"):
            getattr(self, phase).loss = _numeric_budgets(getattr(self, phase).loss)
        for phase in ("pretrain", "prune", "finetune"):
            name, params = self.phase_loss(phase)
            try:
                check_loss(name, params)
            except ValueError as error:  # name the phase only where its own override may be the cause
                raise ValueError(f"{phase}.loss: {error}" if getattr(self, phase).loss else str(error)) from None
        for section in ("verify", "attack", "autoattack"):
            if getattr(self, section) is not None and getattr(self, section).eps is None and "eps" not in self.loss:
                raise ValueError(f"{section} needs an eps: the loss {self.loss_name!r} has none "
                                 f"(set {section}.eps, or {section}=null)")
        if self.smoothing is not None and self.smoothing.sigma is None and "sigma" not in self.loss:
            raise ValueError(f"smoothing needs a sigma: the loss {self.loss_name!r} has none (set smoothing.sigma, or --sigma)")
        for allocation in [self.prune.allocation, *(self.allocations or [])]:
            if allocation not in ALLOCATIONS:
                raise ValueError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
            _check_granularity(self.prune.granularity, allocation, self.model if registry else None,
                               self.prune.channel_scores)  # a user's model is checked once built (certprune.sources)
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


def _numeric_budgets(loss: dict[str, Any]) -> dict[str, Any]:
    """A loss's eps ("8/255" too) as the number it means, so every record states one form."""
    loss = dict(loss)
    if isinstance(loss.get("eps"), str):
        loss["eps"] = parse_eps(loss["eps"])
    return loss


@functools.lru_cache(maxsize=None)
def _check_granularity(granularity: str, allocation: str, model: str | None, channel_scores: str = "channel") -> None:
    """An unknown granularity, an allocation it does not take, channel scores unknown or without channels, or a
    registry ``model`` whose channels cannot be removed one layer at a time (residual networks), refused here, before
    any pretraining."""
    from . import masking
    from .models import create_model

    masking.check_granularity(granularity, allocation, create_model(model) if granularity == "channel" and model
                              else None, channel_scores)


def _check_augment(names: list[str], dataset: str) -> None:
    if not names:
        return
    try:
        from .augment import make_augment
    except ImportError:
        raise ValueError("augment: this build has no augmentation") from None
    make_augment(names, dataset)


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
        data = merge(data, renamed(loaded, str(path)))
    for override in overrides or []:
        data = merge(data, renamed(override, "override"))
    return validate(data)


def config_text(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
