"""What DDP workers share besides gradients (memory updates, loss normalisers, the kept epoch, sampler
states), and the random streams they must not share.

Plain torch.distributed (gloo on CPU, NCCL on GPU); every worker must make the same calls in the
same order. Single-process runs never make these calls, but draw from the same streams as rank 0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from tally.errors import TallyError

# the consumers of randomness that each rank owns a stream for
RANK_STREAMS = ("class_balanced", "domain_balanced", "augment", "mixing")
_SHARED, _PER_RANK = 0, 1


def stream_seed(seed: int, rank: int | None, stream: str) -> int:
    """A torch seed for one consumer's stream: rank None = shared by every rank (the uniform sampler's
    permutations, which the ranks shard), else that rank's own.

    numpy SeedSequence spawn keys (seed; shared/per-rank, rank, consumer) make every stream statistically
    independent of every other; `seed + rank`-style offsets would make one rank's stream another's.
    Rank r's streams do not depend on the number of ranks, so rank 0 of any run draws what a
    one-process run draws.
    """
    if rank is None:
        key = (_SHARED, ("uniform", *RANK_STREAMS).index(stream))
    else:
        key = (_PER_RANK, int(rank), RANK_STREAMS.index(stream))
    state = np.random.SeedSequence(int(seed), spawn_key=key).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))  # 63 bits: torch.Generator.manual_seed takes any of them


def gather_is_cheaper(num_classes: int, world_size: int, batch_size: int) -> bool:
    """Ship the global batch (world * B maps) rather than dense per-class sums (K maps)?

    A ring all-reduce moves about 2K maps per worker, an all-gather about world * B: gathering wins
    when world * B < 2K (DomainNet: K = 345 -> 550 MB of ResNet-50 layer2 sums per step otherwise).
    """
    return world_size * batch_size < 2 * num_classes


class DistributedSync:
    """tally.method.memory.MemorySync over torch.distributed, with no host synchronisation per step.

    Ranks share the batch size, so a gather needs no size exchange (which would read a tensor back to
    the host: `int(size)` waits for the queued step): every rank sends exactly `rows` rows into a
    preallocated buffer. The dense sums are packed into one all-reduce (one collective per step,
    not five). Collectives are excluded from torch.compile (train.compile): they run eagerly between
    the compiled regions.
    """

    def __init__(self, gather_classes: bool, rows: int | None = None):
        self.gather_classes = gather_classes
        self.world_size = dist.get_world_size()
        self.rows = rows  # every rank's row count in all_gather (None: whatever the first call sends)
        self._gathered: dict[tuple, torch.Tensor] = {}

    @torch.compiler.disable
    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place, in one collective (one flat buffer; one dtype)."""
        if len(tensors) == 1:
            dist.all_reduce(tensors[0], op=dist.ReduceOp.SUM)
            return
        if len({t.dtype for t in tensors}) != 1:
            raise ValueError("all_reduce_sum packs its tensors into one buffer: they must share a dtype")
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(part.view_as(t))

    @torch.compiler.disable
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, concatenated in rank order. Every rank sends the same number of rows.

        The result lives in a buffer reused by the next gather of the same shape: use it before then.
        """
        if self.rows is None:
            self.rows = tensor.shape[0]
        if tensor.shape[0] != self.rows:
            raise ValueError(f"all_gather: every rank sends {self.rows} rows (the batch size), got {tensor.shape[0]}")
        key = (tensor.dtype, tensor.device, tuple(tensor.shape))
        out = self._gathered.get(key)
        if out is None:
            out = self._gathered[key] = tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor.contiguous())
        return out


def memory_sync(num_classes: int, world_size: int, batch_size: int) -> DistributedSync | None:
    """None for one process; else the cheaper of the two ways to share memory updates."""
    if world_size == 1:
        return None
    return DistributedSync(gather_classes=gather_is_cheaper(num_classes, world_size, batch_size), rows=batch_size)


def broadcast_object(obj, distributed: bool):
    """Rank 0's obj on every worker."""
    if not distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj, distributed: bool) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every worker."""
    if not distributed:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def use_sync_batchnorm(sync_bn: bool | None, world_size: int, device_type: str) -> tuple[bool, str | None]:
    """Whether a run's BatchNorm layers normalise over the global batch (SyncBatchNorm), and a warning
    line where the run cannot be what one process computes on the concatenated batch.

    sync_bn null (the default) is on wherever it can be: with several workers on CUDA. On the CPU
    (gloo) torch has no SyncBatchNorm: each worker's BatchNorm normalises its own batch, so N workers
    are not one big batch; the run goes ahead and says so, unless sync_bn is false, which says the
    user accepts it. sync_bn true on the CPU is refused.
    """
    if world_size <= 1:
        return False, None  # one process: its batch is the global batch already
    if device_type == "cuda":
        return sync_bn is not False, None
    if sync_bn:
        raise TallyError("train.sync_bn: SyncBatchNorm runs on CUDA devices only (torch); set it false on CPU")
    if sync_bn is None:
        return False, (f"warning: train.sync_bn: {world_size} CPU workers normalise BatchNorm over each "
                       "worker's own batch (no SyncBatchNorm on CPU), so the run is not one big batch; set "
                       "train.sync_bn false to accept this, or train on CUDA")
    return False, None
