"""Sharing memory updates under DDP: dense all-reduce of per-class sums vs all-gather of the batch.

Two gloo processes on this machine, DomainNet-sized memories by default (345 classes x ResNet-50
layer2 maps, 512 x 28 x 28: 550 MB of prototypes). Prints the time of one memory update per path,
the bytes each worker sends, and their ratio; both paths must leave identical memories.

    .venv/bin/python bench/memory_sync.py [--classes 345] [--channels 512] [--size 28] [--batch 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DOMAINS = 6


def _worker(rank: int, args, rendezvous: str, out: dict) -> None:
    from tally.method.memory import FeatureMemory
    from tally.training.distributed import DistributedSync

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    shape = (args.channels, args.size, args.size)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(args.batch, *shape, generator=g), torch.randint(args.classes, (args.batch,), generator=g),
                torch.randn(args.batch, args.channels, 1, 1, generator=g),
                torch.rand(args.batch, args.channels, 1, 1, generator=g) + 0.1,
                torch.randint(DOMAINS, (args.batch,), generator=g)) for _ in range(args.steps + 1)]
    results = {}
    for gather in (False, True):
        mem, sync = FeatureMemory(args.classes, DOMAINS, shape), DistributedSync(gather_classes=gather)
        zhat, y, mu, sigma, d = batches[0]
        mem.update((zhat, y), (mu, sigma, d), sync)  # warm-up: first observations, allocations
        dist.barrier()
        t0 = time.perf_counter()
        for zhat, y, mu, sigma, d in batches[1:]:
            mem.update((zhat, y), (mu, sigma, d), sync)
        dist.barrier()
        results["gather" if gather else "dense"] = ((time.perf_counter() - t0) / args.steps, mem.prototypes.clone())
    if rank == 0:
        out["dense"], out["gather"] = results["dense"][0], results["gather"][0]
        out["same"] = torch.allclose(results["dense"][1], results["gather"][1], rtol=1e-5, atol=1e-6)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classes", type=int, default=345)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=32, help="rows per worker")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    maps = args.channels * args.size * args.size * 4  # bytes of one float32 map
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(args, f"{tmp}/rendezvous", out), nprocs=2, join=True)
        dense, gather, same = out["dense"], out["gather"], out["same"]
    print(f"{args.classes} classes, maps {args.channels}x{args.size}x{args.size}, batch {args.batch} per worker, 2 workers")
    print(f"dense all-reduce : {dense * 1e3:8.1f} ms per update, sends ~{args.classes * maps / 2**20:7.1f} MB (ring: 2(w-1)/w x K maps)")
    print(f"gathered batch   : {gather * 1e3:8.1f} ms per update, sends ~{args.batch * maps / 2**20:7.1f} MB ((w-1) x B maps)")
    print(f"speed-up         : {dense / gather:8.1f}x   (same memories: {same})")


if __name__ == "__main__":
    main()
