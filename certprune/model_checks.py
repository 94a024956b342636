"""What each path can take: a model is checked once it is built, before any work, and refused in one line.

Any module whose prunable layers are ``Conv2d`` / ``Linear`` is pruned at weight granularity, residual networks
included (IBP and CROWN bound any such graph through auto_LiRPA). Refused: a model that does not take the data set's
images or gives another number of logits than it has classes (:func:`check_fits`); weights in any other kind of layer,
which would stay dense while the sparsity counted only the rest; channel granularity on anything but a flat
``nn.Sequential`` (:func:`certprune.masking.check_granularity`); the MILP on anything but a plain Sequential of the
layers it encodes (:func:`check_milp`).
"""
from __future__ import annotations

import torch
from torch import nn

from . import masking
from .devices import model_device
from .models import Normalize

# The layers certify/milp_encoding.py encodes (its SUPPORTED; a test keeps the two equal): the core names them
# itself rather than import a certifier.
MILP_LAYERS = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, Normalize)


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


def check_fits(model: nn.Module, data, spec: str) -> None:
    """One forward pass of a training image: the model takes the data set's images and gives one logit per class."""
    sample = data.train_x[:2].to(model_device(model))  # the data may already sit on the GPU, the model not yet
    training = model.training
    try:
        with torch.no_grad():
            output = model.eval()(sample)
    except Exception as error:  # a shape mismatch surfaces as whatever the first layer raises
        raise ValueError(f"model {spec} cannot take {data.name}'s images of shape {tuple(sample.shape[1:])} "
                         f"({type(error).__name__}: {first_line(error)})") from None
    finally:
        model.train(training)
    if not isinstance(output, torch.Tensor) or output.shape != (len(sample), data.num_classes):
        got = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else type(output).__name__
        hint = " (one more than its largest label; an npz file may store num_classes)" if data.name[:4] == "npz:" else ""
        raise ValueError(f"model {spec} gives outputs of shape {got} per image, but {data.name} has "
                         f"{data.num_classes} classes{hint}")


def check_milp(model: nn.Module, spec: str) -> None:
    """The complete stages (the MILP and branch and bound) read the network as one chain of affine maps and ReLUs."""
    if not (isinstance(model, nn.Sequential) and all(isinstance(layer, MILP_LAYERS) for layer in model)):
        raise ValueError(f"the complete stages (MILP, BaB) take a plain nn.Sequential of "
                         f"{', '.join(t.__name__ for t in MILP_LAYERS)} only, which model {spec} is not; drop them "
                         "from verify.bound_methods")


def check(model: nn.Module, config) -> None:
    """Refuse, in one line, a model a configured path cannot handle (see the module doc)."""
    if next(masking.prunable_layers(model), None) is None:
        raise ValueError(f"model {config.model} has no Conv2d or Linear layer to prune")
    odd = next(((name, type(module).__name__) for name, module in model.named_modules()
                if not isinstance(module, masking.PRUNABLE) and any(p.dim() >= 2 for p in module.parameters(False))),
               None)
    if odd is not None:
        raise ValueError(f"model {config.model}: {odd[0]} ({odd[1]}) holds weights certprune cannot prune; its "
                         "prunable layers must be Conv2d or Linear")
    for allocation in dict.fromkeys([config.prune.allocation, *(config.allocations or [])]):
        masking.check_granularity(config.prune.granularity, allocation, model, config.prune.channel_scores)
    if config.verify is not None and {"BaB", "MILP"} & set(config.verify.bound_methods):
        check_milp(model, config.model)
