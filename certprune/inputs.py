"""What a user's model expects of its images: ``inputs`` (range, mean, std), as one Normalize in front of it.

The data are held in [0, 1], and eps is in those units always, whatever the model was trained on: a model that
takes [0, 255] or normalised images gets a :class:`~certprune.models.Normalize` layer that maps [0, 1] there, so
every bound and attack still perturbs the images as stored. A registry model normalises its own inputs.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .models import Normalize

Finite = Annotated[float, Field(allow_inf_nan=False)]


class InputConfig(BaseModel):
    """The config's ``inputs``: ``range`` maps images in [0, 1] linearly onto the values the model was trained on
    (e.g. [0, 255]), then ``mean`` and ``std`` normalise them per channel."""

    model_config = ConfigDict(extra="forbid")
    range: tuple[Finite, Finite] = (0.0, 1.0)
    mean: list[Finite] | None = Field(None, min_length=1)
    std: list[Finite] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "InputConfig":
        if not self.range[0] < self.range[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {list(self.range)}")
        if self.std is not None and min(self.std) <= 0:  # a decreasing map would swap the bounds of every box
            raise ValueError(f"std must be > 0, got {self.std}")
        return self


IDENTITY_INPUTS = InputConfig().model_dump(mode="json")  # images in [0, 1] as the model takes them


def inputs_of(config) -> dict[str, Any] | None:
    """The config's ``inputs`` as recorded with a model, or None when the model takes images in [0, 1] as they are."""
    inputs = config.inputs.model_dump(mode="json")
    return None if inputs == IDENTITY_INPUTS else inputs


def prepared(model: nn.Module, inputs: dict[str, Any] | None, channels: int) -> nn.Module:
    """``model`` behind one :class:`Normalize` that maps images in [0, 1] to what it expects: linearly onto
    ``inputs["range"]``, then ``(x - mean) / std`` per channel. A Sequential's layers stay flat (the MILP and channel
    pruning need that); any other module becomes the second layer, named ``model``."""
    if inputs is None:
        return model
    low, high = inputs["range"]
    mean, std = (torch.tensor(inputs[key] or [default], dtype=torch.float32) for key, default in (("mean", 0.0),
                                                                                                   ("std", 1.0)))
    if any(len(values) not in (1, channels) for values in (mean, std)):
        raise ValueError(f"inputs.mean and inputs.std need one value for all {channels} channels or one per channel, "
                         f"got {len(mean)} and {len(std)}")
    scale = high - low  # ((low + scale * x) - mean) / std = (x - (mean - low) / scale) / (std / scale)
    first = Normalize((mean - low) / scale, std / scale)
    layers = model.named_children() if isinstance(model, nn.Sequential) else [("model", model)]
    return nn.Sequential(OrderedDict([("inputs", first), *layers]))
