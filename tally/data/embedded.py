"""The embedded default dataset: scikit-learn's 1,797 real 8x8 digit scans in three visual styles.

No download: the scans ship with scikit-learn. Each scan is assigned (seeded, round-robin within its
class) to exactly one domain and drawn in that domain's style, upscaled to 32x32 RGB PNG, and
written once into the folder layout under a cache directory. The styles differ in colour and
contrast statistics, i.e. in the per-channel feature mean / std that TALLY treats as domain nuisance.

Why this shape (issue 12): a benchmark must be able to tell methods apart, so
- every (domain, class) pair has 20 validation and 20 test images (worst-pair accuracy moves in
  steps of 0.05), each a DIFFERENT scan: about 58 scans per pair with three domains, so 40 go to
  evaluation and at most 18 remain for training;
- training is long tailed per domain with a zero-shot pair in each domain (exp profile over scans:
  18, 12, 9, 6, 4, 3, 2, 1, 1, 0 for ranks 0..9, each domain its own class order);
- each scan is drawn in VARIANTS versions: variant 0 is the scan itself, the others deterministic
  affine + elastic distortions of it. A training scan contributes all its variants (so a head pair
  has 72 training images, a tail pair 4); validation and test use variant 0 only, so every
  evaluation image is an independent scan. Splitting is done on scans, never on images, so all
  variants of a scan share its split and domain and nothing leaks (tests/data/test_embedded.py).

Hence, for this source, ``data.max_per_class`` counts training SCANS (each gives VARIANTS images),
and ``data.n_val`` / ``data.n_test`` count evaluation images (= scans).
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

VERSION = "embedded-v2"
SEED = 20230  # fixed: the materialised images never depend on a run's seeds
SIZE = 32
VARIANTS = 4  # versions of each scan: 0 = the scan, 1.. = affine + elastic distortions
CLASS_NAMES = [str(i) for i in range(10)]
# name -> (background RGB, ink RGB, background noise std); all in [0, 1]
STYLES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    "ink": ((0.96, 0.90, 0.70), (0.10, 0.12, 0.42), 0.0),          # dark blue ink on cream paper
    "inverted": ((0.05, 0.04, 0.12), (0.98, 0.86, 0.35), 0.0),     # light amber digit on near-black
    "noisy": ((0.42, 0.72, 0.48), (0.55, 0.05, 0.38), 0.18),      # magenta digit on green noise texture
}
DOMAIN_NAMES = list(STYLES)  # folder names are sorted by the reader; this is the style order
# split generator defaults (see the module docstring): 20 + 20 evaluation scans per pair, a long tail of
# at most 18 training scans (x VARIANTS images) down to 0
SPLIT_DEFAULTS = {"imbalance": "exp", "imbalance_factor": 20.0, "max_per_class": 18, "n_val": 20,
                  "n_test": 20}
MARKER = "embedded.json"
_V0 = "-v0.png"


def default_dir() -> Path:
    base = os.environ.get("TALLY_CACHE") or "~/.cache/tally"
    return Path(base).expanduser() / VERSION


def file_name(scan: int, variant: int) -> str:
    return f"{scan:04d}-v{variant}.png"


def assign_domains(labels: np.ndarray, n_domains: int, rng: np.random.Generator) -> np.ndarray:
    """Domain of each scan: seeded shuffle within each class, then round-robin (equal per class)."""
    keys = rng.random(len(labels))
    order = np.lexsort((keys, labels))
    counts = np.bincount(labels)
    start = np.cumsum(counts) - counts
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - start[labels[order]]
    return rank % n_domains


def ink_maps(images8: np.ndarray, variant: int) -> np.ndarray:
    """(N, S, S) ink in [0, 1] of every scan's ``variant``: 0 is the upscaled scan, others a random
    affine map (rotation, scale, shear, shift) plus a smooth elastic displacement, both drawn from a
    generator seeded by (SEED, variant) alone, so each variant is reproducible on its own."""
    import torch
    import torch.nn.functional as F

    ink = torch.from_numpy(images8.astype(np.float32) / 16.0)[:, None]
    ink = F.interpolate(ink, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    if variant > 0:
        n = len(images8)
        rng = np.random.Generator(np.random.PCG64([SEED, variant]))
        angle = np.deg2rad(rng.uniform(-15, 15, n))
        scale = rng.uniform(0.88, 1.12, n)
        shear = rng.uniform(-0.2, 0.2, n)
        shift = rng.uniform(-0.08, 0.08, (n, 2))  # in [-1, 1] image coordinates: about +-1.3 px
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        theta = np.stack([np.stack([cos, -sin + shear, shift[:, 0]], 1),
                          np.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(torch.from_numpy(theta.astype(np.float32)), [n, 1, SIZE, SIZE], align_corners=False)
        coarse = torch.from_numpy(rng.normal(0.0, 0.06, (n, 2, 4, 4)).astype(np.float32))
        grid = grid + F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ink = F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return np.clip(ink[:, 0].numpy(), 0.0, 1.0)


def render(ink: np.ndarray, domains: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, S, S) ink maps -> (N, S, S, 3) uint8 in each scan's domain style."""
    ink = ink[..., None]  # (N, S, S, 1): how much ink each pixel holds
    noise = rng.standard_normal((len(ink), SIZE, SIZE, 1)).astype(np.float32)
    out = np.empty((len(ink), SIZE, SIZE, 3), dtype=np.float32)
    for d, (bg, fg, noise_std) in enumerate(STYLES.values()):  # three styles, vectorised within each
        sel = domains == d
        paper = np.asarray(bg, dtype=np.float32) + noise_std * noise[sel]
        out[sel] = paper * (1.0 - ink[sel]) + np.asarray(fg, dtype=np.float32) * ink[sel]
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def build_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, domain index into STYLES, (VARIANTS, N, 32, 32, 3) uint8 pixels), from the fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    rng = np.random.Generator(np.random.PCG64(SEED))
    domains = assign_domains(labels, len(STYLES), rng)
    pixels = np.stack([render(ink_maps(digits.images, v), domains, rng) for v in range(VARIANTS)])
    return labels, domains, pixels


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
        for v in range(VARIANTS):  # one-off materialisation, 4 x 1,797 small files
            for i in range(len(labels)):
                path = tmp / DOMAIN_NAMES[domains[i]] / CLASS_NAMES[labels[i]] / file_name(i, v)
                Image.fromarray(pixels[v, i]).save(path, optimize=False, compress_level=1)
        info = {"version": VERSION, "seed": SEED, "source": "sklearn.datasets.load_digits",
                "n_scans": int(len(labels)), "variants": VARIANTS, "n_images": int(len(labels) * VARIANTS),
                "size": SIZE, "domains": DOMAIN_NAMES,
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
    """The embedded data as one MultiDomainDataset (every variant of every scan)."""
    from tally.data.folder import read_folder

    return read_folder(materialise(target))


def scan_ids(ds) -> np.ndarray:
    """The scan each image was drawn from (its file name's number): variants of a scan share it."""
    names = ds.samples["path"].astype(str).str.rsplit("/", n=1).str[-1]
    return names.str.slice(0, 4).astype(np.int64).to_numpy()


def embedded_splits(root: str | Path | None, **generator):
    """The splits of the embedded data, made on scans (see the module docstring).

    The seeded generator (tally.data.splits.make_splits) splits the scans (variant 0 of each); then a
    training scan brings all its variants and an evaluation scan only variant 0.
    """
    import pandas as pd

    from tally.data.splits import make_splits

    everything = load_embedded(root)
    scans = everything.subset(everything.samples["path"].str.endswith(_V0).to_numpy())
    splits = make_splits(scans, **generator)
    train = splits["train"]
    rows = train.samples.loc[train.samples.index.repeat(VARIANTS)].reset_index(drop=True)
    variant = pd.Series(np.tile(np.arange(VARIANTS), len(train)).astype(str))
    rows["path"] = rows["path"].str.slice(0, -len(_V0)) + "-v" + variant + ".png"
    expanded = type(train)(rows, train.class_names, train.domain_names, list(train.notes))
    expanded.notes.append(f"{VARIANTS} images (the scan and {VARIANTS - 1} distortions) per training scan; "
                          "validation and test: the scans themselves")
    return {**splits, "train": expanded}
