"""Seeded multi-domain long-tailed split generator, and writer of reference-format split lists.

Fixes reference defect 3 (unseeded generators): everything derives from one numpy PCG64 seed, and
samples are put in a canonical order (domain, class, path) before any shuffle, so the same seed
gives byte-identical lists whatever order the filesystem lists files in.

Per (domain, class) pair, in the pair's seeded shuffled order: the first n_test images are test,
the next n_val validation (both capped by what the pair has), and only the rest may go to train.
So the balanced evaluation sets are fixed first and train can never overlap them. Train is long
tailed in every domain, each domain with its own class order (distinct head classes while there are
at least as many classes as domains).

``imbalance: natural`` is the MDLT benchmark's protocol (Yang et al. 2022, BoDA): per pair the first
min(n, n_val + n_test) images are the balanced evaluation sets (one third of them validation, the
rest test) and train keeps everything else, so train has the dataset's own imbalance.

A held-out domain is tested on every one of its images (as the reference and DomainBed do), not on
a balanced n_test per pair: nothing of it is trained or validated on, so nothing needs to be kept.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
from pathlib import Path

import numpy as np

from tally.data.atomic import SPLITS_FORMAT, write_folder_atomically
from tally.data.dataset import MultiDomainDataset
from tally.errors import TallyError

IMBALANCE_TYPES = ("exp", "step", "natural")


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def draw_class_orders(rng: np.random.Generator, n_domains: int, n_classes: int) -> np.ndarray:
    """(D, C): orders[d, r] = class of rank r (0 = head) in domain d; heads distinct while D <= C."""
    if n_classes == 0:
        return np.zeros((n_domains, 0), dtype=np.int64)
    rounds = -(-n_domains // n_classes)
    heads = np.concatenate([rng.permutation(n_classes) for _ in range(rounds)])[:n_domains]
    orders = np.empty((n_domains, n_classes), dtype=np.int64)
    for d in range(n_domains):  # D rows, not samples
        rest = np.delete(np.arange(n_classes), heads[d])
        orders[d, 0] = heads[d]
        orders[d, 1:] = rng.permutation(rest)
    return orders


def class_orders(seed: int, n_domains: int, n_classes: int) -> np.ndarray:
    """The per-domain class orders ``make_splits`` uses for this seed (they are its first draws)."""
    return draw_class_orders(_rng(seed), n_domains, n_classes)


def imbalance_profile(n_classes: int, max_per_class: int, imbalance: str, factor: float) -> np.ndarray:
    """Target train count per class rank: exp decays from max to max/factor; step halves to max/factor.

    ``natural`` has no profile (train keeps every image left): callers do not ask for one.
    """
    ranks = np.arange(n_classes, dtype=np.float64)
    if imbalance == "exp":
        frac = ranks / (n_classes - 1) if n_classes > 1 else ranks
        target = max_per_class * np.power(1.0 / factor, frac)
    elif imbalance == "step":
        target = np.where(ranks < n_classes // 2, float(max_per_class), max_per_class / factor)
    else:
        raise TallyError(f"data.imbalance: expected one of {', '.join(IMBALANCE_TYPES)}, got {imbalance!r}")
    return np.floor(target + 1e-9).astype(np.int64)


def canonical_order(ds: MultiDomainDataset) -> np.ndarray:
    """Row positions sorted by (domain, label, path): independent of how the rows were listed."""
    table = ds.samples.reset_index(drop=True)
    return table.sort_values(["domain", "label", "path"], kind="mergesort").index.to_numpy(dtype=np.int64)


def rank_within_pairs(ds: MultiDomainDataset, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per row: its position in a seeded shuffle of its (domain, class) pair, and the pair's size."""
    n_c = len(ds.class_names)
    canon = canonical_order(ds)
    shuffled = canon[rng.permutation(len(canon))]
    pair = ds.domains * n_c + ds.labels
    ordered = shuffled[np.argsort(pair[shuffled], kind="stable")]
    counts = np.bincount(pair, minlength=len(ds.domain_names) * n_c)
    start = np.cumsum(counts) - counts
    rank = np.empty(len(ds), dtype=np.int64)
    rank[ordered] = np.arange(len(ds)) - start[pair[ordered]]
    return rank, counts[pair]


def check_params(imbalance: str, imbalance_factor: float, max_per_class: int | None, n_val: int,
                 n_test: int) -> None:
    if imbalance not in IMBALANCE_TYPES:
        raise TallyError(f"data.imbalance: expected one of {', '.join(IMBALANCE_TYPES)}, got {imbalance!r}")
    if not isinstance(imbalance_factor, numbers.Real) or imbalance_factor < 1:
        raise TallyError(f"data.imbalance_factor: expected a number >= 1 (head/tail ratio), "
                         f"got {imbalance_factor!r}")
    if max_per_class is not None and (not isinstance(max_per_class, numbers.Integral) or max_per_class < 1):
        raise TallyError(f"data.max_per_class: expected an integer >= 1 or null, got {max_per_class!r}")
    for name, value in (("n_val", n_val), ("n_test", n_test)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise TallyError(f"data.{name}: expected an integer >= 1, got {value!r}")


def make_splits(ds: MultiDomainDataset, setting: str = "sub", held_out: list[str] | tuple = (),
                seed: int = 0, imbalance: str = "exp", imbalance_factor: float = 20.0,
                max_per_class: int | None = None, n_val: int = 5,
                n_test: int = 5) -> dict[str, MultiDomainDataset]:
    """Splits train / val / test_sub (+ test_domain:<X> per held-out X for setting 'domain').

    ``max_per_class`` None means the largest pair count left after the evaluation sets.
    """
    check_params(imbalance, imbalance_factor, max_per_class, n_val, n_test)
    held_out = list(held_out or [])
    if setting == "sub":
        if held_out:
            raise TallyError("data.held_out: only used with setting 'domain'")
    elif setting == "domain":
        if not held_out:
            raise TallyError("data.held_out: expected at least one held-out domain for setting 'domain'")
        unknown = [d for d in held_out if d not in ds.domain_names]
        if unknown:
            raise TallyError(f"data.held_out: unknown domain {unknown[0]!r}; known domains: "
                             f"{', '.join(ds.domain_names)}")
        if len(set(held_out)) == len(ds.domain_names):
            raise TallyError("data.held_out: every domain is held out; nothing is left to train on")
    else:
        raise TallyError(f"data.setting: expected 'sub' or 'domain', got {setting!r}")

    n_d, n_c = len(ds.domain_names), len(ds.class_names)
    rng = _rng(seed)
    orders = draw_class_orders(rng, n_d, n_c)  # first draws: class_orders(seed, D, C) reproduces them
    rank, count = rank_within_pairs(ds, rng)

    held_idx = np.array([ds.domain_names.index(d) for d in held_out], dtype=np.int64)
    held = np.isin(ds.domains, held_idx)
    n_te, n_va = evaluation_sizes(count, imbalance, n_val, n_test)
    is_test = rank < n_te
    is_val = ~held & ~is_test & (rank < n_te + n_va)
    first_train = n_te + n_va
    train_domains = np.setdiff1d(np.arange(n_d), held_idx)
    if imbalance == "natural":
        is_train = ~held & (rank >= first_train)
    else:
        pair_counts = ds.counts()
        pair_test, pair_val = evaluation_sizes(pair_counts, imbalance, n_val, n_test)
        left = pair_counts - pair_test - pair_val
        top = max_per_class if max_per_class is not None else int(left[train_domains].max(initial=0))
        profile = imbalance_profile(n_c, max(top, 1), imbalance, float(imbalance_factor))
        target = np.zeros((n_d, n_c), dtype=np.int64)
        np.put_along_axis(target, orders, np.broadcast_to(profile, (n_d, n_c)), axis=1)
        is_train = ~held & (rank >= first_train) & (rank < first_train + target[ds.domains, ds.labels])

    if not is_train.any():
        raise TallyError(f"the training split would be empty: no (domain, class) pair has more than "
                         f"n_test + n_val = {n_test + n_val} images; lower data.n_test / data.n_val")
    canon = canonical_order(ds)

    def pick(mask: np.ndarray) -> MultiDomainDataset:
        return ds.subset(canon[mask[canon]])

    out = {"train": pick(is_train), "val": pick(is_val), "test_sub": pick(is_test & ~held)}
    if imbalance == "natural":
        out["train"].notes.append(f"seed {seed}: natural imbalance (every image not in val/test), MDLT protocol")
        out["val"].notes.append(f"balanced: a third of min(n, {n_val + n_test}) per (domain, class) pair"
                                + (", training domains only" if held_out else ""))
    else:
        out["train"].notes.append(f"seed {seed}: {imbalance} long tail, head/tail {imbalance_factor:g}, head "
                                  f"{top} per class, each domain its own class order")
        out["val"].notes.append(f"balanced: up to {n_val} per (domain, class) pair"
                                + (", training domains only" if held_out else ""))
    for d, d_idx in zip(held_out, held_idx, strict=True):
        test = pick(ds.domains == d_idx)  # every image of the held-out domain
        test.notes.append(f"held-out domain {d}: all {len(test)} of its images")
        out[f"test_domain:{d}"] = test
    return out


def evaluation_sizes(count: np.ndarray, imbalance: str, n_val: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """(test, val) sizes for pairs of ``count`` images: capped by what each pair has.

    exp/step: n_test first, then n_val of what is left. natural (MDLT): take = min(n, n_val + n_test),
    a third of it (rounded down) validation, the rest test.
    """
    if imbalance == "natural":
        take = np.minimum(count, n_val + n_test)
        return take - take // 3, take // 3
    n_te = np.minimum(n_test, count)
    return n_te, np.minimum(n_val, count - n_te)


# ---------------------------------------------------------------- writing lists
def _safe_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise TallyError(f"domain or suffix {name!r} cannot be used in a file name")
    return name


def _compact_json(obj) -> str:
    """Indented JSON with number lists kept on one line (count tables stay readable)."""
    rows: list[str] = []

    def swap(x):
        if isinstance(x, dict):
            return {k: swap(v) for k, v in x.items()}
        if isinstance(x, list) and x and all(isinstance(v, int | float) for v in x):
            rows.append(json.dumps(x))
            return f"\0{len(rows) - 1}"  # placeholder: no real string holds a NUL
        if isinstance(x, list):
            return [swap(v) for v in x]
        return x

    text = json.dumps(swap(obj), indent=2, sort_keys=True)
    return re.sub(r'"\\u0000(\d+)"', lambda m: rows[int(m.group(1))], text) + "\n"


def list_files(splits: dict[str, MultiDomainDataset], image_root: str | Path, suffix: str) -> dict[str, str]:
    """File name -> text of every <domain>_<train|val|test>_<suffix>.txt (empty ones included)."""
    any_ds = next(iter(splits.values()))
    root = Path(image_root).expanduser().resolve()
    prefix = str(root).rstrip(os.sep) + os.sep
    kinds = {"train": ["train"], "val": ["val"],
             "test": ["test_sub", *sorted(k for k in splits if k.startswith("test_domain:"))]}
    unknown = set(splits) - {n for names in kinds.values() for n in names}
    if unknown:
        raise TallyError(f"cannot write split {sorted(unknown)[0]!r} in the reference format")
    texts = {}
    for d_idx, domain in enumerate(any_ds.domain_names):
        for kind, names in kinds.items():
            lines = []
            for name in names:
                ds = splits.get(name)
                if ds is None or not len(ds):
                    continue
                part = ds.samples[ds.samples["domain"] == d_idx]
                paths = part["path"].astype(str)
                outside = ~paths.str.startswith(prefix)
                if outside.any():
                    raise TallyError(f"image {paths[outside].iloc[0]} is not under the image root {root}")
                rel = paths.str.slice(len(prefix))
                if os.sep != "/":
                    rel = rel.str.replace(os.sep, "/", regex=False)
                lines.extend((rel + " " + part["label"].astype(str) + "\n").tolist())
            texts[f"{_safe_name(domain)}_{kind}_{_safe_name(suffix)}.txt"] = "".join(lines)
    return texts


def write_splits(splits: dict[str, MultiDomainDataset], out_dir: str | Path, image_root: str | Path,
                 params: dict) -> Path:
    """Write reference-format lists (paths relative to image_root) and manifest.json, atomically.

    ``params`` must hold ``setting`` and ``held_out`` (they name the suffix) and may hold anything
    else that produced the splits (seed, generator parameters); it is recorded as given. The lists
    are built in a hidden temporary sibling folder that is renamed onto ``out_dir``: an existing
    ``out_dir`` is replaced only if it is empty or holds a previous manifest.json.
    """
    setting, held_out = params.get("setting", "sub"), list(params.get("held_out") or [])
    suffix = "sub" if setting == "sub" else "+".join(held_out)
    texts = list_files(splits, image_root, suffix)
    shas = {name: hashlib.sha256(t.encode()).hexdigest() for name, t in texts.items()}
    any_ds = next(iter(splits.values()))
    manifest = {
        "format": SPLITS_FORMAT,
        "image_root": str(Path(image_root).expanduser().resolve()),
        "setting": setting,
        "held_out": held_out,
        "suffix": suffix,
        "params": params,
        "seed": params.get("seed"),
        "class_names": any_ds.class_names,
        "domain_names": any_ds.domain_names,
        "counts": {name: ds.counts().tolist() for name, ds in splits.items()},
        "files": shas,
        "lists_sha256": hashlib.sha256("".join(f"{n} {shas[n]}\n" for n in sorted(shas)).encode()).hexdigest(),
    }
    return write_folder_atomically(Path(out_dir), {**texts, "manifest.json": _compact_json(manifest)})


def generate(root: str | Path, out_dir: str | Path, setting: str = "sub", held_out: list[str] | tuple = (),
             seed: int = 0, imbalance: str = "exp", imbalance_factor: float = 20.0,
             max_per_class: int | None = None, n_val: int = 5, n_test: int = 5,
             domains: list[str] | None = None) -> tuple[Path, dict[str, MultiDomainDataset]]:
    """Folder-layout dataset at root -> seeded splits -> lists + manifest in out_dir."""
    from tally.data.folder import read_folder

    ds = read_folder(root, domains)
    gen = {"setting": setting, "held_out": list(held_out or []), "seed": seed, "imbalance": imbalance,
           "imbalance_factor": float(imbalance_factor), "max_per_class": max_per_class,
           "n_val": n_val, "n_test": n_test}
    splits = make_splits(ds, **gen)
    params = dict(gen)
    if imbalance != "natural":  # natural imbalance has no class order
        orders = class_orders(seed, len(ds.domain_names), len(ds.class_names))
        params["class_order"] = {d: [ds.class_names[c] for c in orders[i]] for i, d in enumerate(ds.domain_names)}
    return write_splits(splits, out_dir, Path(root).expanduser(), params), splits
