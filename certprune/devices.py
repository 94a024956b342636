"""Which device a command computes on: ``--device auto|cpu|cuda[:i]`` (config key ``device``).

Under torchrun, ``auto`` and ``cuda`` mean this process's GPU (``LOCAL_RANK``); ``cuda:i`` is taken as given.
Bad requests are ``ValueError`` with one line (the CLI prints it as ``Error: ...``).
"""
from __future__ import annotations

import os

import torch

HINT = "use --device cpu or --device auto"


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA when there is a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:<index>`` -> a ``torch.device``."""
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    index = None
    if text.startswith("cuda:") and text[5:].isdigit():
        index = int(text[5:])
    elif text not in ("auto", "cuda"):
        raise ValueError(f"unknown device {spec!r}; choose auto, cpu, cuda or cuda:<index>")
    if not torch.cuda.is_available():
        reason = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {text} requested but {reason}; {HINT}")
    count = torch.cuda.device_count()
    if index is None:  # auto or cuda: this process's GPU under torchrun, else the first
        index = _local_rank()
        if index >= count:
            raise ValueError(f"process {index} of this node has no GPU of its own (the machine has {count}); "
                             "start at most that many processes per node, or use --device cpu")
    elif index >= count:
        raise ValueError(f"device {text} does not exist: this machine has {count} CUDA device(s) (0..{count - 1})")
    return torch.device("cuda", index)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's first parameter or buffer lives (CPU for a model without tensors)."""
    tensor = next(iter([*model.parameters(), *model.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def deterministic() -> int:
    """Ask torch for deterministic kernels (where one exists; the others warn instead of failing) and return the
    thread count. With the run's seeds this makes the same command on the same machine give the same model and
    figures. What still varies: the CPU thread count and the device (float sums taken in another order can move
    a borderline image), the torch version, and the number of torchrun processes (the batch is shared out)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.get_num_threads()
