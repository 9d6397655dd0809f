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
