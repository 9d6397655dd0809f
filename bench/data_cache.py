"""Images/s of the training data path with and without the pre-resized uint8 cache.

Writes a folder-layout dataset of photo-sized JPEGs (textured, so they compress like photos), then
measures, side by side in one process:
  without cache: decode JPEG + resize to the training size (DataLoader with --workers processes),
                 what every run pays before it can train when no cache exists;
  with cache:    draw random training batches from the memory-mapped uint8 cache (index, to float,
                 augment, normalise), what `tally data cache` leaves for every later run and trial.

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

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_jpegs(root, args.images, args.source_px)
        ds = read_folder(root)

        t0 = time.perf_counter()
        build_bank(ds, args.size, workers=args.workers)
        no_cache = len(ds) / (time.perf_counter() - t0)

        cached_bank(ds, args.size, Path(tmp) / "cache", workers=args.workers)  # `tally data cache`
        bank = cached_bank(ds, args.size, Path(tmp) / "cache")  # what a later run finds
        gen = torch.Generator().manual_seed(0)
        steps = max(20, 4 * len(ds) // args.batch)
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(bank), (args.batch,), generator=gen)
            augment(bank.images[idx], gen, flip=True, crop_padding=8)
        with_cache = steps * args.batch / (time.perf_counter() - t0)

    print(f"{len(ds)} JPEGs of {args.source_px}px -> {args.size}px, {args.workers} decode workers, "
          f"batch {args.batch}")
    print(f"without cache (decode + resize): {no_cache:9.1f} images/s")
    print(f"with cache (memmap batches)    : {with_cache:9.1f} images/s")
    print(f"ratio                          : {with_cache / no_cache:9.1f}x")


if __name__ == "__main__":
    main()
