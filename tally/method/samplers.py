"""Seeded, vectorised index samplers over a training set (METHOD.md, "Training schedule").

Each sampler owns a CPU torch.Generator, so its stream does not depend on other consumers of the global
RNG, and its `state_dict()` / `load_state_dict()` make a resumed run draw exactly the same indices.
`draw(n)` returns n int64 indices into the training set (a CPU tensor).
"""

from __future__ import annotations

import abc

import torch

KINDS = ("uniform", "class_balanced", "domain_balanced")


def _as_index(t, name: str) -> torch.Tensor:
    t = torch.as_tensor(t).reshape(-1)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: nothing to sample from")
    if int(t.min()) < 0:
        raise ValueError(f"{name} has negative entries")
    return t.to(device="cpu", dtype=torch.int64)


class _Sampler(abc.ABC):
    def __init__(self, size: int, seed: int):
        self.size = int(size)
        self.generator = torch.Generator().manual_seed(int(seed))

    @abc.abstractmethod
    def draw(self, n: int) -> torch.Tensor:
        """n indices into the training set, from this sampler's own generator."""

    def state_dict(self) -> dict:
        return {"size": self.size, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(f"sampler state is for {state['size']} examples, this sampler has {self.size}")
        self.generator.set_state(state["generator"])


class UniformSampler(_Sampler):
    """Epoch permutations: every example once per pass, reshuffled at each pass; draws cross passes.

    Sharded for data parallelism (as torch's DistributedSampler): every rank holds the same permutation
    stream (the same seed on purpose) and a draw of n takes block `rank` of the next world_size * n
    entries, so the ranks' draws are disjoint and their concatenation in rank order is what one
    unsharded sampler draws with batch world_size * n: each example once per pass across all ranks.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if size < 1:
            raise ValueError("UniformSampler needs at least one example")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        super().__init__(size, seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.perm = torch.randperm(self.size, generator=self.generator)
        self.pos = 0
        self.epoch = 0

    def draw(self, n: int) -> torch.Tensor:
        if self.world_size == 1:
            return self._next(n)
        return self._next(n * self.world_size)[self.rank * n : (self.rank + 1) * n]

    def _next(self, n: int) -> torch.Tensor:
        """The next n entries of the permutation stream (all ranks see the same ones)."""
        parts = []
        while n > 0:
            if self.pos == self.size:
                self.perm = torch.randperm(self.size, generator=self.generator)
                self.pos, self.epoch = 0, self.epoch + 1
            take = min(n, self.size - self.pos)
            parts.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            n -= take
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def state_dict(self) -> dict:
        return super().state_dict() | {"perm": self.perm.clone(), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.perm, self.pos, self.epoch = state["perm"].clone(), int(state["pos"]), int(state["epoch"])


class GroupBalancedSampler(_Sampler):
    """Pick a group uniformly among the groups present, then one of its examples uniformly.

    Vectorised: examples sorted by group (`order`), each group's `start` offset and `count`;
    idx = order[start[g] + floor(u * count[g])] with u ~ U[0, 1).
    """

    def __init__(self, groups, seed: int = 0, name: str = "groups"):
        groups = _as_index(groups, name)
        super().__init__(groups.numel(), seed)
        self.order = torch.argsort(groups, stable=True)
        counts = torch.bincount(groups)
        self.present = torch.nonzero(counts > 0).reshape(-1)
        self.count = counts[self.present]
        self.start = torch.cumsum(counts, 0)[self.present] - self.count

    def draw(self, n: int) -> torch.Tensor:
        g = torch.randint(self.present.numel(), (n,), generator=self.generator)
        u = torch.rand(n, generator=self.generator, dtype=torch.float64)
        count = self.count[g]
        offset = torch.minimum((u * count).long(), count - 1)
        return self.order[self.start[g] + offset]


class ClassBalancedSampler(GroupBalancedSampler):
    """Batch A of TALLY: a class uniformly among the classes present in training, then an example."""

    def __init__(self, labels, seed: int = 0):
        super().__init__(labels, seed, name="labels")


class DomainBalancedSampler(GroupBalancedSampler):
    """Batch N of TALLY: a domain uniformly among the training domains, then an example."""

    def __init__(self, domains, seed: int = 0):
        super().__init__(domains, seed, name="domains")


def build_sampler(kind: str, labels, domains, seed: int = 0, rank: int = 0, world_size: int = 1) -> _Sampler:
    """kind in KINDS; labels and domains: int64 tensors over the training set (same length).

    rank / world_size shard the uniform sampler (see UniformSampler); the balanced samplers draw with
    replacement, so a rank needs only a seed of its own.
    """
    labels, domains = _as_index(labels, "labels"), _as_index(domains, "domains")
    if labels.numel() != domains.numel():
        raise ValueError(f"labels ({labels.numel()}) and domains ({domains.numel()}) differ in length")
    if kind == "uniform":
        return UniformSampler(labels.numel(), seed, rank, world_size)
    if kind == "class_balanced":
        return ClassBalancedSampler(labels, seed)
    if kind == "domain_balanced":
        return DomainBalancedSampler(domains, seed)
    raise ValueError(f"unknown sampler kind {kind!r}; expected one of {list(KINDS)}")
