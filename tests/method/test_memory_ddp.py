"""Memories under real torch.distributed (gloo, 2 processes): both ways of sharing an update, the
dense all-reduce and the gathered batch, leave identical memories on both workers, equal to one
process seeing the whole global batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tally.distributed import DistributedSync, gather_is_cheaper
from tally.method.memory import FeatureMemory

K, D, SHAPE, M = 6, 3, (2, 3, 3), 0.8
SIZES = (5, 7)  # rows per worker: unequal, so the gathered path pads and trims
STEPS = 4


def _batch(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    b = SIZES[rank]
    zhat = torch.randn(b, *SHAPE, generator=g)
    y = torch.randint(K - 1, (b,), generator=g)  # class K-1 is never seen
    mu = torch.randn(b, SHAPE[0], 1, 1, generator=g)
    sigma = torch.rand(b, SHAPE[0], 1, 1, generator=g) + 0.1
    d = torch.randint(D, (b,), generator=g)
    return zhat, y, mu, sigma, d


def _worker(rank, rendezvous, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        states = {}
        for gather in (False, True):
            mem, sync = FeatureMemory(K, D, SHAPE, M), DistributedSync(gather_classes=gather)
            for step in range(STEPS):
                zhat, y, mu, sigma, d = _batch(rank, step)
                mem.update((zhat, y), (mu, sigma, d), sync)
            states["gather" if gather else "dense"] = mem.state_dict()
        torch.save(states, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_both_sync_paths_keep_workers_identical_and_equal_one_big_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    reference = FeatureMemory(K, D, SHAPE, M)
    for step in range(STEPS):
        parts = [_batch(rank, step) for rank in range(2)]
        zhat, y, mu, sigma, d = (torch.cat(t) for t in zip(*parts, strict=True))
        reference.update((zhat, y), (mu, sigma, d))

    for path in ("dense", "gather"):
        a, b = ranks[0][path], ranks[1][path]
        for key in a:
            assert torch.equal(a[key], b[key]), f"{path}: {key} differs between workers"
            torch.testing.assert_close(a[key], reference.state_dict()[key], msg=f"{path}: {key}")
        assert not a["class_seen"][K - 1] and torch.all(a["prototypes"][K - 1] == 0)


def test_gather_only_when_it_moves_less():
    assert gather_is_cheaper(num_classes=345, world_size=8, batch_size=32)  # DomainNet
    assert not gather_is_cheaper(num_classes=10, world_size=2, batch_size=32)  # embedded digits
