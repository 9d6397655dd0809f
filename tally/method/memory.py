"""Running class prototypes and domain statistics (METHOD.md, "Memories").

They are buffers of one nn.Module, so they live on the training device, move with `.to()`, are saved in
the method's state_dict and never receive gradients (the reference kept them in the dataset: defects 5, 7).
Updates are scatter ops (index_add_), with no per-class Python loop and no host round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn


class MemorySync(Protocol):
    """How DDP workers combine their memory updates and loss normalisers (tally.training.distributed implements it)."""

    gather_classes: bool  # share the global batch's rows, not dense per-class sums
    world_size: int

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None: ...  # in place

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor: ...  # every worker's rows, rank order


class FeatureMemory(nn.Module):
    """prototypes (K, C, H, W): running mean of zhat per class; domain_mean / domain_std (D, C): running
    means of mu and sigma per domain. *_seen flags mark entries that hold an observation: the first
    observation of an entry replaces it (no noise init, the reference's defect 2); later ones blend in
    with momentum m: P <- m * P + (1 - m) * batch_mean.
    """

    def __init__(self, num_classes: int, num_domains: int, stem_shape: Sequence[int], momentum: float = 0.8):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:  # 1 keeps each entry's first observation
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        c, h, w = (int(s) for s in stem_shape)
        self.momentum = float(momentum)
        # channels_last, the layout of the stem's maps in training on either device (augmented batches are
        # gathered as (B, H, W, C); CUDA training converts the model): the mix and the class update then
        # read one layout, not two (ResNet-50 at 224 px on the CPU: the mix 58 -> 42 ms, no copy of zhat)
        prototypes = torch.empty(num_classes, c, h, w, memory_format=torch.channels_last).zero_()
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("domain_mean", torch.zeros(num_domains, c))
        self.register_buffer("domain_std", torch.ones(num_domains, c))
        self.register_buffer("class_seen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("domain_seen", torch.zeros(num_domains, dtype=torch.bool))

    @torch.no_grad()
    def fill_noise(self, generator: torch.Generator) -> None:
        """The reference's start (dataset.py:205-207, `torch.randn` for every memory): N(0, 1) noise, every
        entry marked seen, so the first observation blends into noise with momentum m (its defect 2: a
        stored "std" can be negative). Drawn on the CPU from `generator`, so a seeded run repeats."""
        for buf in (self.prototypes, self.domain_std, self.domain_mean):  # the reference's draw order
            buf.copy_(torch.randn(buf.shape, generator=generator))
        self.class_seen.fill_(True)
        self.domain_seen.fill_(True)

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def num_domains(self) -> int:
        return self.domain_mean.shape[0]

    def _class_sums(self, zhat: torch.Tensor | None, y: torch.Tensor | None) -> list[torch.Tensor]:
        p = self.prototypes
        class_sum, class_count = torch.zeros_like(p), p.new_zeros(self.num_classes)
        if zhat is not None:
            class_sum.index_add_(0, y, zhat.detach().to(p.dtype))
            class_count.index_add_(0, y, p.new_ones(y.shape[0]))
        return [class_sum, class_count]

    def _domain_sums(self, mu: torch.Tensor | None, sigma: torch.Tensor | None, d: torch.Tensor | None):
        m = self.domain_mean
        mean_sum, std_sum, domain_count = (
            torch.zeros_like(m),
            torch.zeros_like(m),
            m.new_zeros(self.num_domains),
        )
        if mu is not None:
            mean_sum.index_add_(0, d, mu.detach().reshape(d.shape[0], -1).to(m.dtype))
            std_sum.index_add_(0, d, sigma.detach().reshape(d.shape[0], -1).to(m.dtype))
            domain_count.index_add_(0, d, m.new_ones(d.shape[0]))
        return [mean_sum, std_sum, domain_count]

    @torch.no_grad()
    def batch_sums(
        self,
        zhat: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        mu: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
        d: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """[class_sum (K,C,H,W), class_count (K,), mean_sum (D,C), std_sum (D,C), domain_count (D,)].

        Dense float32 sums, so that an all-reduce SUM over workers gives the sums of the global batch.
        A part left as None contributes zeros (every worker still returns the same shapes).
        """
        return self._class_sums(zhat, y) + self._domain_sums(mu, sigma, d)

    @staticmethod
    def _blend(mem: torch.Tensor, seen: torch.Tensor, total: torch.Tensor, count: torch.Tensor, m: float):
        """In place: entries with count > 0 become total/count if unseen, else m*mem + (1-m)*total/count."""
        shape = (-1,) + (1,) * (mem.dim() - 1)
        mean = total / count.clamp_min(1).reshape(shape)
        new = torch.where(seen.reshape(shape), torch.lerp(mean, mem, m), mean)
        mem.copy_(torch.where((count > 0).reshape(shape), new, mem))

    def _apply_domains(self, mean_sum: torch.Tensor, std_sum: torch.Tensor, count: torch.Tensor) -> None:
        self._blend(self.domain_mean, self.domain_seen, mean_sum, count, self.momentum)
        self._blend(self.domain_std, self.domain_seen, std_sum, count, self.momentum)
        self.domain_seen |= count > 0

    @torch.no_grad()
    def apply(self, sums: Sequence[torch.Tensor]) -> None:
        """Blend (possibly all-reduced) `batch_sums` into the memories; entries with count 0 are untouched."""
        class_sum, class_count, mean_sum, std_sum, domain_count = sums
        self._blend(self.prototypes, self.class_seen, class_sum, class_count, self.momentum)
        self.class_seen |= class_count > 0
        self._apply_domains(mean_sum, std_sum, domain_count)

    @torch.no_grad()
    def _update_classes_local(self, zhat: torch.Tensor, y: torch.Tensor) -> None:
        """One process's class update: a matmul when there are no more classes than rows, else sparse."""
        if self.num_classes <= y.shape[0]:
            self._update_classes_matmul(zhat, y)
        else:
            self._update_classes_sparse(zhat, y)

    @torch.no_grad()
    def _update_classes_matmul(self, zhat: torch.Tensor, y: torch.Tensor) -> None:
        """Same result as batch_sums + apply for the class part: P <- keep * P + W @ zhat, in place.

        W (K x B) holds each row's weight in its class's new prototype ((1-m)/n_c, or 1/n_c on a first
        observation), keep is m, 0 (first observation) or 1 (class absent). One GEMM reads the batch once
        and two passes touch the K prototypes, where the sparse path gathers, subtracts, scales and
        scatters B maps (ResNet-50 at 224 px on the CPU: ~30 -> ~5 ms). Pays off while K <= B.
        """
        p, m = self.prototypes, self.momentum
        k = self.num_classes
        members = (y[None, :] == torch.arange(k, device=y.device)[:, None]).to(p.dtype)  # (K, B)
        count = members.sum(1)
        weight = torch.where(self.class_seen, 1.0 - m, 1.0) / count.clamp_min(1)
        keep = torch.where(count > 0, torch.where(self.class_seen, m, 0.0), 1.0)
        order = sorted(range(1, p.dim()), key=lambda dim: -p.stride(dim))  # p's memory order (NCHW or NHWC)
        rows = p.permute(0, *order).view(k, -1)  # a view: the update lands in p
        batch = zhat.detach().to(p.dtype).permute(0, *order).reshape(y.shape[0], -1)
        rows.mul_(keep[:, None]).addmm_(members * weight[:, None], batch)
        self.class_seen |= count > 0

    @torch.no_grad()
    def _update_classes_sparse(self, zhat: torch.Tensor, y: torch.Tensor) -> None:
        """Same result as batch_sums + apply for the class part, in O(B*C*H*W) rather than O(K*C*H*W).

        P[c] <- P[c] + sum_{i: y_i = c} w_c * (zhat_i - P[c]), w_c = (1-m)/n_c if seen else 1/n_c,
        which equals m*P[c] + (1-m)*mean_c (or mean_c on first observation). Pays off for many classes
        (DomainNet: 345 x 512 x 28 x 28 floats = 550 MB of prototypes) where a dense pass per step is slow.
        """
        p = self.prototypes
        count = p.new_zeros(self.num_classes).index_add_(0, y, p.new_ones(y.shape[0]))
        w = torch.where(self.class_seen[y], 1.0 - self.momentum, 1.0) / count[y]
        delta = (zhat.detach().to(p.dtype) - p[y]).mul_(w.reshape(-1, 1, 1, 1))
        p.index_add_(0, y, delta)
        self.class_seen.index_fill_(0, y, True)

    @torch.no_grad()
    def _update_classes_gathered(self, zhat: torch.Tensor, y: torch.Tensor) -> None:
        """The class update from the global batch (every worker's rows), bit-identical on every worker.

        Per-class sums are a matmul rather than index_add_: CUDA's atomic adds may sum in a different
        order on each worker, the same matmul of the same inputs does not. Full float32 precision: TF32
        would round the sums. No host synchronisation: torch.unique's output size depends on the data
        (the host must read it back); instead each class is represented by its first row in the batch,
        a (rows x rows) 0/1 matrix sums every class into its representative row, and each row then
        copies its representative's new prototype, so all rows of a class write identical values.
        """
        p = self.prototypes
        n = y.shape[0]
        rows = torch.arange(n, device=y.device)
        same = y[:, None] == y[None, :]
        first = torch.where(same, rows, n).amin(1)  # each row's class representative
        members = (first[None, :] == rows[:, None]).to(p.dtype)  # (n, n): representative r <- rows of its class
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            sums = members @ zhat.reshape(n, -1).to(p.dtype)
        finally:
            torch.set_float32_matmul_precision(precision)
        mean = (sums[first] / members.sum(1)[first, None]).reshape(n, *p.shape[1:])
        seen = self.class_seen[y].reshape(-1, *(1,) * (p.dim() - 1))
        p.index_put_((y,), torch.where(seen, torch.lerp(mean, p[y], self.momentum), mean))
        self.class_seen.index_fill_(0, y, True)

    @torch.no_grad()
    @torch.compiler.disable  # in-place buffer updates and collectives stay out of compiled graphs
    def update(
        self,
        class_part: tuple[torch.Tensor, torch.Tensor] | None = None,
        domain_part: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        sync: MemorySync | None = None,
    ) -> None:
        """Update from class_part = (zhat, y) and domain_part = (mu, sigma, d); inputs are detached.

        Without sync (one process) the class part is a matmul (K <= B) or a sparse path that touches only
        the batch's classes. With sync (DDP) every worker applies the same global update and keeps identical
        memories: either the dense per-class and per-domain sums are all-reduced, or (gather_classes,
        which moves less when the global batch has fewer rows than twice the classes) the batch's
        rows are all-gathered and the small domain sums all-reduced. Every worker must call update in the same
        order with the same parts given.

        Always float32 and outside autocast: under bf16 autocast the gathered path's matmul would
        otherwise run in bf16 and round every prototype to 3 significant digits.
        """
        with torch.autocast(self.prototypes.device.type, enabled=False):
            self._update(class_part, domain_part, sync)

    def _update(self, class_part, domain_part, sync) -> None:
        if sync is None:
            if class_part is not None:
                self._update_classes_local(*class_part)
            if domain_part is not None:
                self._apply_domains(*self._domain_sums(*domain_part))
            return
        mu, sigma, d = domain_part if domain_part is not None else (None, None, None)
        if sync.gather_classes:
            if class_part is not None:
                zhat, y = class_part
                rows = zhat.detach().to(self.prototypes.dtype).contiguous()
                self._update_classes_gathered(sync.all_gather(rows), sync.all_gather(y))
            sums = self._domain_sums(mu, sigma, d)
            sync.all_reduce_sum(sums)
            self._apply_domains(*sums)
            return
        zhat, y = class_part if class_part is not None else (None, None)
        sums = self.batch_sums(zhat, y, mu, sigma, d)
        sync.all_reduce_sum(sums)
        self.apply(sums)
