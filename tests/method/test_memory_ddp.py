"""Memories under real torch.distributed (gloo, 2 processes): both ways of sharing an update, the
dense all-reduce and the gathered batch, leave identical memories on both workers, equal to one
process seeing the whole global batch, and equal to the previous implementation (size exchange before
the gather, torch.unique over the classes, one all-reduce per sum), which synchronised with the host
at every step. The sync-free path reads nothing back to the host: the workers forbid it."""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tally.method.memory import FeatureMemory
from tally.training.distributed import DistributedSync, gather_is_cheaper

K, D, SHAPE, M = 6, 3, (2, 3, 3), 0.8
ROWS = 6  # rows per worker: ranks share the batch size
STEPS = 4


def _batch(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    zhat = torch.randn(ROWS, *SHAPE, generator=g)
    y = torch.randint(K - 1, (ROWS,), generator=g)  # class K-1 is never seen
    mu = torch.randn(ROWS, SHAPE[0], 1, 1, generator=g)
    sigma = torch.rand(ROWS, SHAPE[0], 1, 1, generator=g) + 0.1
    d = torch.randint(D, (ROWS,), generator=g)
    return zhat, y, mu, sigma, d


class OldSync:
    """The implementation before the sync-free one: sizes exchanged and read back (int(...)) before a
    padded gather, one all-reduce per tensor."""

    world_size = 2

    def __init__(self, gather_classes):
        self.gather_classes = gather_classes

    def all_reduce_sum(self, tensors):
        for t in tensors:
            dist.all_reduce(t)

    def all_gather(self, tensor):
        size = torch.tensor([tensor.shape[0]])
        sizes = [torch.empty_like(size) for _ in range(2)]
        dist.all_gather(sizes, size)
        sizes = [int(s) for s in sizes]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(2)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class OldMemory(FeatureMemory):
    """The class update of the gathered path as it was: torch.unique (a host sync) and a one-hot matmul."""

    @torch.no_grad()
    def _update_classes_gathered(self, zhat, y):
        p = self.prototypes
        classes, inverse = torch.unique(y, return_inverse=True)
        onehot = F.one_hot(inverse, classes.numel()).T.to(p.dtype)
        sums = onehot @ zhat.reshape(zhat.shape[0], -1).to(p.dtype)
        mean = (sums / onehot.sum(1, keepdim=True)).reshape(-1, *p.shape[1:])
        seen = self.class_seen[classes].reshape(-1, *(1,) * (p.dim() - 1))
        p.index_copy_(0, classes, torch.where(seen, torch.lerp(mean, p[classes], self.momentum), mean))
        self.class_seen[classes] = True


@contextlib.contextmanager
def no_host_reads():
    """Reading a tensor's value on the host (what makes a CUDA step wait) raises; torch.unique too."""
    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation on the memory sync path")

    saved = {name: getattr(torch.Tensor, name) for name in ("__int__", "__bool__", "item", "tolist")}
    unique = torch.unique
    for name in saved:
        setattr(torch.Tensor, name, refuse)
    torch.unique = refuse
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.unique = unique


def _worker(rank, rendezvous, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        states = {}
        for gather in (False, True):
            for kind in ("new", "old"):
                if kind == "new":
                    mem, sync, guard = FeatureMemory(K, D, SHAPE, M), DistributedSync(gather, rows=ROWS), no_host_reads
                else:
                    mem, sync, guard = OldMemory(K, D, SHAPE, M), OldSync(gather), contextlib.nullcontext
                for step in range(STEPS):
                    zhat, y, mu, sigma, d = _batch(rank, step)
                    with guard():
                        mem.update((zhat, y), (mu, sigma, d), sync)
                states[("gather" if gather else "dense") + "/" + kind] = mem.state_dict()
        torch.save(states, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_sync_free_paths_keep_workers_identical_and_equal_the_old_path_and_one_big_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    reference = FeatureMemory(K, D, SHAPE, M)
    for step in range(STEPS):
        parts = [_batch(rank, step) for rank in range(2)]
        zhat, y, mu, sigma, d = (torch.cat(t) for t in zip(*parts, strict=True))
        reference.update((zhat, y), (mu, sigma, d))

    for path in ("dense", "gather"):
        a, b, old = ranks[0][f"{path}/new"], ranks[1][f"{path}/new"], ranks[0][f"{path}/old"]
        for key in a:
            assert torch.equal(a[key], b[key]), f"{path}: {key} differs between workers"
            torch.testing.assert_close(a[key], old[key], rtol=1e-6, atol=1e-6, msg=f"{path}: {key} != old path")
            torch.testing.assert_close(a[key], reference.state_dict()[key], msg=f"{path}: {key}")
        assert not a["class_seen"][K - 1] and torch.all(a["prototypes"][K - 1] == 0)


def test_the_guard_catches_a_host_read():
    with no_host_reads(), pytest.raises(AssertionError, match="host synchronisation"):
        int(torch.tensor(1))


def test_gather_only_when_it_moves_less():
    assert gather_is_cheaper(num_classes=345, world_size=8, batch_size=32)  # DomainNet
    assert not gather_is_cheaper(num_classes=10, world_size=2, batch_size=32)  # embedded digits
