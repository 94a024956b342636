"""Multi-process runs through PyTorch's own engine: ``torchrun --nproc_per_node=N -m certprune ...``.

:func:`setup` joins torchrun's process group (``env://``; gloo on CPU, nccl on CUDA) only when ``WORLD_SIZE > 1``.
Without it every helper here is the single-process identity, so there is one code path:

- training wraps the model in ``DistributedDataParallel`` (:func:`wrap`); each rank takes a disjoint share of every
  batch, and DDP's gradient all-reduce keeps scores and weights (so masks) identical on every rank;
- evaluations take this rank's share of the test set (:func:`shard`) and :func:`merge` the per-example results,
  so every rank ends with the single-process result;
- only rank 0 writes files (:func:`is_main`); the others wait at a :func:`barrier`.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def launched() -> bool:
    """Started by torchrun (or a launcher like it) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> None:
    """Join the process group from torchrun's environment when ``WORLD_SIZE > 1``; nothing otherwise. Idempotent."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(teardown)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier(**({"device_ids": [torch.cuda.current_device()]} if dist.get_backend() == "nccl" else {}))


def wrap(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(model)`` over the parameters that require grad now (so wrap after
    ``masking.set_phase``); ``model`` itself in a single process."""
    if not active():
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (what auto_LiRPA's proxy and the run files need)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def shard(n: int, block: int = 1) -> torch.Tensor | slice:
    """This rank's share of ``n`` examples: blocks of ``block`` consecutive positions, block ``b`` going to rank
    ``b % world_size`` (``block=1``: position ``p`` to rank ``p % world_size``). All of them (a slice) in one process."""
    if not active():
        return slice(None)
    positions = torch.arange(n)
    return positions[(positions // max(1, block)) % world_size() == rank()]


def merge(values: torch.Tensor, positions: torch.Tensor | slice, n: int) -> torch.Tensor:
    """Per-example ``values`` this rank computed at ``positions`` (from :func:`shard`) -> all ``n`` of them, in order,
    on every rank. Exact: the shares are disjoint, so the sum of zero-padded shares only copies each value."""
    if isinstance(positions, slice):
        return values
    dtype = values.dtype
    full = torch.zeros(n, dtype=torch.float64 if dtype.is_floating_point else torch.int64, device=_comm_device())
    full[positions.to(full.device)] = values.to(full.device, full.dtype)
    dist.all_reduce(full)
    return full.to(values.device, dtype)


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the ranks (the same keys on every rank)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    stacked = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(stacked)
    return {key: float(value) / world_size() for key, value in zip(keys, stacked.tolist())}
