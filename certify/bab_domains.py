"""Branch and bound's open subdomains: a batch of them as tensors (:class:`Domains`), and the pool that holds them
while the search takes the lowest bounds first (:class:`Pool`)."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Domains:
    """Open subdomains, compact over the root's unstable ReLUs (``U`` of them): each one's spec ``row`` (an index),
    ``splits (N, U)`` in {-1, 0, 1}, slopes ``alpha`` and multipliers ``beta (N, U)``, lower ``bound`` and
    ``depth`` (the number of splits)."""
    row: torch.Tensor
    splits: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    bound: torch.Tensor
    depth: torch.Tensor

    def __len__(self) -> int:
        return len(self.row)

    def select(self, index) -> "Domains":
        return Domains(*(getattr(self, f.name)[index] for f in fields(self)))

    def extend(self, other: "Domains") -> "Domains":
        return Domains(*(torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))


class Pool:
    """The open domains in storage that grows by doubling: taking a batch frees its slots, adding fills free slots
    first, so a round costs a scan of the bounds, not a copy of every open domain (0.5 s at 100,000 domains of 500
    unstable ReLUs)."""

    def __init__(self, domains: Domains):
        self.store, self.used = domains, torch.ones(len(domains), dtype=torch.bool)

    def __len__(self) -> int:
        return int(self.used.sum())

    def take(self, count: int, deepest: bool) -> Domains:
        """The ``count`` open domains of lowest bound (``deepest``: of most splits)."""
        key = -self.store.depth.double() if deepest else self.store.bound
        index = torch.topk(torch.where(self.used, key, torch.inf), min(count, len(self)), largest=False).indices
        self.used[index] = False
        return self.store.select(index)

    def add(self, domains: Domains) -> None:
        free = torch.nonzero(~self.used).flatten()
        if len(free) < len(domains):
            grown = max(len(domains) - len(free), len(self.used))
            self.store = self.store.extend(self.store.select(torch.zeros(grown, dtype=torch.long)))
            self.used = torch.cat([self.used, torch.zeros(grown, dtype=torch.bool)])
            free = torch.nonzero(~self.used).flatten()
        slots = free[:len(domains)]
        for item in fields(Domains):
            getattr(self.store, item.name)[slots] = getattr(domains, item.name)
        self.used[slots] = True

    def lowest(self) -> float:
        return float(torch.where(self.used, self.store.bound, torch.inf).min()) if len(self) else torch.inf
