"""The pre-resized uint8 cache, compared like with like, side by side in one process:

  start-up:     what a run waits for before its first step: decode + resize every image into a bank
                (no cache) against opening the memory-mapped bank `tally data cache` left (cache);
  steady state: the same training batches (index, augment) drawn from the in-memory bank that the
                decode produced against the memory-mapped cached bank: the cache must cost nothing here.

    .venv/bin/python bench/data_cache.py [--images 480] [--source-px 400] [--size 224] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_jpegs(root: Path, n_images: int, px: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    domains, classes = ("photo", "sketch", "cartoon", "art"), ("a", "b", "c", "d", "e", "f")
    yy, xx = np.mgrid[0:px, 0:px]
    for i in range(n_images):
        folder = root / domains[i % len(domains)] / classes[(i // len(domains)) % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        freq = rng.uniform(0.01, 0.1, size=3)
        base = np.stack([np.sin(xx * f + yy * f * 0.7 + rng.uniform(0, 6)) for f in freq], -1)
        pixels = ((base + rng.normal(0, 0.25, base.shape)) * 60 + 128).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--source-px", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=36, help="TALLY draws 18 + 18 per step")
    args = parser.parse_args()

    from tally.data.augment import augment
    from tally.data.bank import build_bank, cached_bank
    from tally.data.folder import read_folder

    def batches_per_s(bank) -> float:
        gen = torch.Generator().manual_seed(0)
        steps = max(20, 4 * len(bank) // args.batch)
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(bank), (args.batch,), generator=gen)
            augment(bank.images[idx], gen, flip=True, crop_padding=8)
        return steps * args.batch / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_jpegs(root, args.images, args.source_px)
        ds = read_folder(root)
        cached_bank(ds, args.size, Path(tmp) / "cache", workers=args.workers)  # `tally data cache`, once

        t0 = time.perf_counter()
        decoded = build_bank(ds, args.size, workers=args.workers)  # a run without the cache
        start_decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        mapped = cached_bank(ds, args.size, Path(tmp) / "cache")  # a later run finds the cache
        start_cache = time.perf_counter() - t0
        assert torch.equal(decoded.images, mapped.images)  # the same bank either way

        batches_per_s(decoded), batches_per_s(mapped)  # warm both (allocator, page cache) before timing
        in_memory, memmap = batches_per_s(decoded), batches_per_s(mapped)

    print(f"{len(ds)} JPEGs of {args.source_px}px -> {args.size}px, {args.workers} decode workers, "
          f"batch {args.batch}")
    print(f"start-up, decode into a bank : {start_decode:8.3f} s")
    print(f"start-up, open the cache     : {start_cache:8.3f} s   ({start_decode / start_cache:.0f}x faster)")
    print(f"batches, in-memory bank      : {in_memory:8.1f} images/s")
    print(f"batches, memory-mapped cache : {memmap:8.1f} images/s   (ratio {memmap / in_memory:.2f})")


if __name__ == "__main__":
    main()
