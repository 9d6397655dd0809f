"""Tiny synthetic folder-layout datasets for tests and examples (no real data needed).

Each image is a flat colour that encodes (domain, class, index), so tests can check decoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_folder_dataset(root: str | Path, domains=("a", "b", "c"), classes=("x", "y", "z"),
                        per_pair: int | dict = 10, size: int = 8, ext: str = ".png") -> Path:
    """Write ROOT/<domain>/<class>/<i><ext>; per_pair may map (domain, class) -> count."""
    from PIL import Image

    root = Path(root)
    for d_idx, d in enumerate(domains):
        for c_idx, c in enumerate(classes):
            n = per_pair.get((d, c), 0) if isinstance(per_pair, dict) else per_pair
            folder = root / d / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = np.array([40 * d_idx + 10, 20 * c_idx + 10, i % 256], dtype=np.uint8)
                pixels = np.broadcast_to(colour, (size, size, 3)).copy()
                Image.fromarray(pixels).save(folder / f"{i:04d}{ext}")
    return root


def make_many_images(root: str | Path, n: int, domains: int = 4, classes: int = 10, size: int = 32,
                     processes: int = 2) -> Path:
    """n small PNGs in the folder layout, written by ``processes`` processes (200,000 in about a minute
    here): the scale tests' stand-in for DomainNet. Image i goes to domain i % D, class (i // D) % C;
    its colours encode i, so a decoded bank can be checked."""
    from concurrent.futures import ProcessPoolExecutor

    root = Path(root)
    for d in range(domains):
        for c in range(classes):
            (root / f"d{d}" / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, processes * 4 + 1).astype(int)
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_write_range, *zip(*[(str(root), int(a), int(b), domains, classes, size)
                                           for a, b in zip(bounds[:-1], bounds[1:], strict=True)], strict=True)))
    return root


def _write_range(root: str, start: int, stop: int, domains: int, classes: int, size: int) -> None:
    import io
    import os

    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.float32)[None, :, None]
    for i in range(start, stop):
        colour = np.array([i % 251, (i // 251) % 251, (i // 63001) % 251], dtype=np.float32)
        pixels = np.broadcast_to((0.75 * colour + 0.25 * ramp).astype(np.uint8), (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
        d, c = i % domains, (i // domains) % classes
        fd = os.open(f"{root}/d{d}/c{c:03d}/{i:07d}.png",  # never through a link: O_NOFOLLOW
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, buffer.getbuffer())
        finally:
            os.close(fd)
