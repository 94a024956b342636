"""Channel granularity: one score per output channel of every ``Conv2d`` / ``Linear`` but the last, and the surgery
that removes pruned channels from a plain model.

A :class:`ChannelMask` multiplies every tensor of its channels by the same 0/1 mask: the layer's weight rows and
bias, and the affine weight and bias of the norm layers between it and the next prunable layer. A pruned channel so
reaches the next layer as exactly 0, which is what makes compaction exact: a merely constant channel (a bias left
on, or batch norm's shift) could not be folded into the next convolution's bias, whose zero padding sees the
constant everywhere but at the border.

Only plain ``nn.Sequential`` models qualify (every ``certprune`` CNN and VGG16-BN), with nothing between two prunable
layers but channel-wise modules (:data:`CHANNELWISE`). Residual networks (ResNet-18, ResNet-110, WRN-28-4) are
refused: an addition ties a block's output channels to its input's, so they cannot be removed one layer at a time.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .core import PRUNABLE, TopKMask, dense_copy, is_masked, mask_of, prunable_layers, scaled_scores

CHANNELWISE = (nn.ReLU, nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
               nn.Dropout, nn.Identity)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
CHANNEL_SCORES = ("channel", "weight-l1")  # one score per channel, or HYDRA's per weight ranked by channel L1


class ChannelMask(TopKMask):
    """Parametrization ``tensor -> tensor * mask[channel]`` with one score per output channel; the same instance
    masks every tensor of a :class:`ChannelGroup`, so its channels live or die together."""

    def __init__(self, scores: torch.Tensor, k: float, weights_per_channel: int):
        super().__init__(scores, k)
        self.weights_per_channel = weights_per_channel

    @property
    def kept_weights(self) -> int:
        return self.count * self.weights_per_channel

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * self.mask().view(-1, *[1] * (tensor.dim() - 1))


class WeightL1ChannelMask(ChannelMask):
    """HYDRA's per-weight scores ranked per channel (Sehwag et al. 2020, App. C.9; ``channel_scores="weight-l1"``):
    ``scores`` has the weight's shape, and a channel's rank is the L1 norm of its weights' scores. The top-k over
    those norms is straight-through, so each score gets ``sign(score)`` times its channel's mask gradient."""

    @property
    def size(self) -> int:
        return self.scores.shape[0]

    def magnitude(self) -> torch.Tensor:
        return self.scores.abs().flatten(1).sum(1)


@dataclass
class ChannelGroup:
    """A prunable layer's output channels: the layer, the norm layers after it, and the layer that reads them
    (``positions`` input columns per channel: the feature map's size after a ``Flatten``, else 1)."""

    name: str
    layer: nn.Module
    consumer: nn.Module
    positions: int
    norms: list[nn.Module] = field(default_factory=list)

    def tensors(self) -> list[tuple[nn.Module, str]]:
        """Every (module, tensor name) indexed by these channels on its first dimension."""
        owned = [(self.layer, "weight")] + ([(self.layer, "bias")] if self.layer.bias is not None else [])
        return owned + [(norm, name) for norm in self.norms if norm.affine for name in ("weight", "bias")]


def _refuse(reason: str) -> ValueError:
    return ValueError(f"channel granularity {reason}; use granularity weight")


def _channels(layer: nn.Module, inputs: bool = False) -> int:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels if inputs else layer.out_channels
    return layer.in_features if inputs else layer.out_features


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """One group per prunable layer but the last, in order; a one-line ``ValueError`` for a model that has none or
    whose channels cannot be removed one layer at a time (see the module doc)."""
    if not isinstance(model, nn.Sequential):
        raise _refuse(f"needs a plain nn.Sequential model; a {type(model).__name__} ties channels across its "
                      "residual additions")
    children = list(model.named_children())
    for name, child in children:
        if not isinstance(child, PRUNABLE) and any(isinstance(m, PRUNABLE) for m in child.modules()):
            raise _refuse(f"needs a flat nn.Sequential; {name} ({type(child).__name__}) nests prunable layers")
    prunable = [i for i, (_, child) in enumerate(children) if isinstance(child, PRUNABLE)]
    if len(prunable) < 2:
        raise _refuse("needs two or more Conv2d / Linear layers (the last one is never pruned)")
    groups = []
    for a, b in zip(prunable, prunable[1:]):
        (name, layer), (next_name, consumer) = children[a], children[b]
        between = [child for _, child in children[a + 1:b]]
        odd = next((type(m).__name__ for m in between if not isinstance(m, CHANNELWISE)), None)
        if odd is not None:
            raise _refuse(f"cannot prune through {odd} (between layers {name} and {next_name})")
        if any(getattr(m, "groups", 1) != 1 for m in (layer, consumer)):
            raise _refuse(f"does not handle grouped convolutions ({name}, {next_name})")
        channels, inputs = _channels(layer), _channels(consumer, inputs=True)
        if inputs % channels or (inputs != channels and not isinstance(consumer, nn.Linear)):
            raise _refuse(f"cannot map layer {name}'s {channels} channels onto {next_name}'s {inputs} inputs")
        groups.append(ChannelGroup(name, layer, consumer, inputs // channels, [m for m in between
                                                                              if isinstance(m, NORMS)]))
    return groups


def channel_scores(weight: torch.Tensor, init: str) -> torch.Tensor:
    """One score per output channel from the L1 norm of its filter: ``magnitude`` is the norm itself (Li et al.
    2017's filter pruning, the LWM baseline); ``scaled`` is HYDRA's scaled init on the norms,
    ``sqrt(6 / fan_in) * norm / max(norm)``. Both rank channels alike before score training."""
    norms = weight.detach().abs().flatten(1).sum(1)
    if init == "magnitude":
        return norms
    peak = norms.max().clamp_min(torch.finfo(norms.dtype).tiny)
    return math.sqrt(6.0 / weight[0].numel()) * norms / peak


def channel_mask(weight: torch.Tensor, k: float, init: str, scores: str = "channel") -> ChannelMask:
    """The mask of one layer's channels. ``scores="channel"``: one score per channel (:func:`channel_scores`);
    ``"weight-l1"``: HYDRA's per-weight scores ranked by their channel's L1 norm (:class:`WeightL1ChannelMask`).
    Only HYDRA's ``scaled`` init differs between the two: LWM (``magnitude``) ignores ``scores``, since the L1
    norm of ``|w|`` per channel is the filter norm that its one score per channel already holds."""
    if scores == "weight-l1" and init == "scaled":
        return WeightL1ChannelMask(scaled_scores(weight.detach()), k, weight[0].numel())
    return ChannelMask(channel_scores(weight, init), k, weight[0].numel())


def channel_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer name: (kept channels, channels)}`` for every prunable layer: a channel mask's count, else the
    output channels whose weights or bias are not all 0 (so a baked model reports what it kept)."""
    counts = {}
    with torch.no_grad():
        for name, layer in prunable_layers(model):
            if is_masked(layer) and isinstance(mask_of(layer), ChannelMask):
                counts[name] = (mask_of(layer).count, mask_of(layer).size)
            else:
                counts[name] = (int(_alive(layer, []).sum()), _channels(layer))
    return counts


def _alive(layer: nn.Module, norms: list[nn.Module]) -> torch.Tensor:
    """Which output channels may be nonzero after ``norms``: a channel is dead when its weights and bias are 0 and
    so are the affine weight and bias of each norm layer after it (the exact 0 a :class:`ChannelMask` leaves)."""
    tensors = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    tensors += [t for norm in norms if norm.affine for t in (norm.weight, norm.bias)]
    return torch.stack([(t.detach() != 0).flatten(1).any(1) if t.dim() > 1 else t.detach() != 0
                        for t in tensors]).any(0)


def kept_channels(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: indices of its live output channels}`` of a plain model, for :func:`narrowed` (a layer with
    none alive keeps its first channel, so no layer becomes empty)."""
    kept = {}
    for group in channel_groups(model):
        index = _alive(group.layer, group.norms).nonzero().flatten()
        kept[group.name] = index if len(index) else torch.zeros(1, dtype=torch.long)
    return kept


def _take(module: nn.Module, name: str, index: torch.Tensor, dim: int = 0) -> None:
    tensor = getattr(module, name)
    if tensor is None:
        return
    taken = tensor.detach().index_select(dim, index.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(taken, requires_grad=tensor.requires_grad))
    else:
        setattr(module, name, taken)


def narrowed(model: nn.Module, keep: dict[str, Sequence[int] | torch.Tensor]) -> nn.Module:
    """A copy of the plain model in which layer ``name`` has only the output channels ``keep[name]`` (and the
    norm layers after it and the next layer's inputs follow); ``range(n)`` rebuilds a stored compact shape."""
    if any(is_masked(m) for m in model.modules()):
        raise ValueError("narrowed takes a plain model; bake its masks first (masking.dense_copy)")
    model = copy.deepcopy(model)
    for group in channel_groups(model):
        if group.name not in keep:
            continue
        index = torch.as_tensor(list(keep[group.name]), dtype=torch.long)
        if not 1 <= len(index) <= _channels(group.layer) or len(set(index.tolist())) != len(index):
            raise ValueError(f"layer {group.name} cannot keep channels {index.tolist()} of {_channels(group.layer)}")
        for name in ("weight", "bias"):
            _take(group.layer, name, index)
        for norm in group.norms:
            for name in ("weight", "bias", "running_mean", "running_var"):
                _take(norm, name, index)
            norm.num_features = len(index)
        columns = (index[:, None] * group.positions + torch.arange(group.positions)).flatten()
        _take(group.consumer, "weight", columns, dim=1)
        if isinstance(group.layer, nn.Conv2d):
            group.layer.out_channels = len(index)
        else:
            group.layer.out_features = len(index)
        if isinstance(group.consumer, nn.Conv2d):
            group.consumer.in_channels = len(columns)
        else:
            group.consumer.in_features = len(columns)
    return model


def compacted(model: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """The plain or masked model without its pruned channels (which reach the next layer as exactly 0, so the
    outputs are the same up to float rounding), and its ``{layer name: output channels}``."""
    plain = dense_copy(model) if any(is_masked(m) for m in model.modules()) else model
    keep = kept_channels(plain)
    return narrowed(plain, keep).eval(), {name: len(index) for name, index in keep.items()}
