"""The embedded default dataset: scikit-learn's 1,797 real 8x8 digit scans in four visual styles.

No download: the scans ship with scikit-learn. Each scan is assigned (seeded, round-robin within its
class) to exactly one domain and drawn in that domain's style, upscaled to 32x32 RGB PNG, and
written once into the folder layout under a cache directory, so it goes through the same reader and
split generator as real data. The styles differ in colour and contrast statistics, i.e. in the
per-channel feature mean / std that TALLY treats as domain nuisance.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from tally.data.atomic import make_readable
from tally.errors import TallyError

VERSION = "embedded-v1"
SEED = 20230  # fixed: the materialised images never depend on a run's seeds
SIZE = 32
CLASS_NAMES = [str(i) for i in range(10)]
# name -> (background RGB, ink RGB, background noise std); all in [0, 1]
STYLES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    "ink": ((0.96, 0.90, 0.70), (0.10, 0.12, 0.42), 0.0),          # dark blue ink on cream paper
    "inverted": ((0.05, 0.04, 0.12), (0.98, 0.86, 0.35), 0.0),     # light amber digit on near-black
    "noisy": ((0.42, 0.72, 0.48), (0.55, 0.05, 0.38), 0.18),      # magenta digit on green noise texture
    "lowcontrast": ((0.60, 0.60, 0.68), (0.44, 0.44, 0.54), 0.0),  # washed-out bluish grey
}
DOMAIN_NAMES = list(STYLES)  # folder names are sorted by the reader; this is the style order
# split generator defaults for the embedded data: ~45 images per pair -> 5 test, 5 val, <= 35 train
SPLIT_DEFAULTS = {"imbalance": "exp", "imbalance_factor": 20.0, "max_per_class": 35, "n_val": 5,
                  "n_test": 5}
MARKER = "embedded.json"


def default_dir() -> Path:
    base = os.environ.get("TALLY_CACHE") or "~/.cache/tally"
    return Path(base).expanduser() / VERSION


def assign_domains(labels: np.ndarray, n_domains: int, rng: np.random.Generator) -> np.ndarray:
    """Domain of each scan: seeded shuffle within each class, then round-robin (equal per class)."""
    keys = rng.random(len(labels))
    order = np.lexsort((keys, labels))
    counts = np.bincount(labels)
    start = np.cumsum(counts) - counts
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - start[labels[order]]
    return rank % n_domains


def render(images8: np.ndarray, domains: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 8, 8) scans in [0, 16] -> (N, 32, 32, 3) uint8 in each scan's domain style."""
    import torch
    import torch.nn.functional as F

    ink = torch.from_numpy(images8.astype(np.float32) / 16.0)[:, None]
    ink = F.interpolate(ink, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0].numpy()
    ink = np.clip(ink, 0.0, 1.0)[..., None]  # (N, S, S, 1): how much ink each pixel holds
    noise = rng.standard_normal((len(images8), SIZE, SIZE, 1)).astype(np.float32)
    out = np.empty((len(images8), SIZE, SIZE, 3), dtype=np.float32)
    for d, (bg, fg, noise_std) in enumerate(STYLES.values()):  # four styles, vectorised within each
        sel = domains == d
        paper = np.asarray(bg, dtype=np.float32) + noise_std * noise[sel]
        out[sel] = paper * (1.0 - ink[sel]) + np.asarray(fg, dtype=np.float32) * ink[sel]
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def build_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, domain index into STYLES, (N, 32, 32, 3) uint8 pixels): everything, from the fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    rng = np.random.Generator(np.random.PCG64(SEED))
    domains = assign_domains(labels, len(STYLES), rng)
    return labels, domains, render(digits.images, domains, rng)


def materialise(target: str | Path | None = None) -> Path:
    """Build the folder-layout dataset once (atomically) and return its root; reuse it if present."""
    from PIL import Image

    target = Path(target).expanduser() if target else default_dir()
    if (target / MARKER).is_file():
        return target
    if target.exists() and any(target.iterdir()):
        raise TallyError(f"{target}: exists but is not a complete embedded dataset (no {MARKER}); remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    labels, domains, pixels = build_arrays()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for d in DOMAIN_NAMES:
            for c in CLASS_NAMES:
                (tmp / d / c).mkdir(parents=True)
        for i in range(len(labels)):  # one-off materialisation, 1,797 small files
            path = tmp / DOMAIN_NAMES[domains[i]] / CLASS_NAMES[labels[i]] / f"{i:04d}.png"
            Image.fromarray(pixels[i]).save(path, optimize=False, compress_level=1)
        info = {"version": VERSION, "seed": SEED, "source": "sklearn.datasets.load_digits",
                "n_images": int(len(labels)), "size": SIZE, "domains": DOMAIN_NAMES,
                "styles": {k: {"background": v[0], "ink": v[1], "noise_std": v[2]} for k, v in STYLES.items()}}
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        make_readable(tmp)
        try:
            if target.exists():
                target.rmdir()  # empty (checked above)
            os.rename(tmp, target)
        except OSError:
            if not (target / MARKER).is_file():  # not a concurrent builder winning the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_embedded(target: str | Path | None = None):
    """The embedded data as one MultiDomainDataset (all 1,797 images)."""
    from tally.data.folder import read_folder

    return read_folder(materialise(target))
