"""Decode once per cluster: before any trial starts, every split and image size of a search has a bank.

Without this, every trial decodes its whole dataset before its first step (DomainNet at 224 px: about
586,000 images, 88 GB of uint8, again in every trial). The pre-flight lists the banks the trials can
ask for, finds those already built, and decodes the missing ones once, as parallel Ray tasks over
shards of the sample list: every CPU of the cluster decodes. Each task writes its rows straight into
one memory-mapped images.npy in a folder every node sees (the search's storage, or --cache), and the
bank is renamed in whole when all tasks are done (tally.data.bank.write_bank), so a reader never
sees half a bank. Keys and folder names are those of `tally data cache`; trials memory-map the banks.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tally.data import DATA_KEYS
from tally.errors import TallyError

# what a bank depends on: the split's sample list (every key load_splits reads) and the image size
BANK_FIELDS = (*DATA_KEYS, "image_size")
SHARD_BYTES = 64 * 2**20   # decoded output per task: a lost task costs little, every CPU gets work
# below this a task's start-up (a process importing torch: 3-5 s here) outweighs its decoding
# (2,000-5,000 small images/s per CPU); a bank of one shard is decoded by the driver itself
MIN_SHARD_ROWS = 4096
MAX_VARIANTS = 32          # data sections to enumerate; a larger space's banks are left to the trials


def bank_dir_for(storage: str | Path) -> Path:
    """The search's bank folder: $TALLY_BANK_DIR (`tally search --cache`) or <storage>/banks."""
    from tally.data.bank import BANK_DIR_ENV

    return Path(os.environ.get(BANK_DIR_ENV) or Path(storage) / "banks").expanduser().resolve()


def data_variants(spec) -> list[dict] | None:
    """Every data section a trial of this spec can get (a superset: `when` conditions are ignored), or
    None when the space searches a bank field over a continuous range or too many combinations."""
    searched = {path: p for path, p in spec.space.items()
                if path.startswith("data.") and path.split(".", 1)[1] in BANK_FIELDS}
    choices = {}
    for path, p in searched.items():
        if p["type"] == "categorical":
            choices[path] = p["choices"]
        elif p["type"] == "int":
            choices[path] = list(range(p["low"], p["high"] + 1, p.get("step", 1)))
        else:
            return None
    if math.prod(len(c) for c in choices.values()) > MAX_VARIANTS:
        return None
    variants = []
    for values in itertools.product(*choices.values()):
        try:
            data = spec.trial_config(dict(zip(choices, values, strict=True)))["data"]
        except TallyError:
            continue  # a combination no trial can get (e.g. a held-out domain without the domain setting)
        if data not in variants:
            variants.append(data)
    return variants


@dataclass
class NeededBank:
    split: str
    size: int
    path: Path
    key: str
    ds: object  # MultiDomainDataset


def needed_banks(sources: list[dict], bank_dir: Path) -> list[NeededBank]:
    """One entry per distinct (sample list, image size), in first-seen order, over data sections or
    complete run configs (whose splits may differ from their data section's: a final retrain's)."""
    from tally.data import load_splits, run_splits
    from tally.data.bank import bank_path

    out: dict[Path, NeededBank] = {}
    for source in sources:
        data = source["data"] if "train" in source else source
        size = int(data["image_size"])
        for split, ds in (run_splits(source) if "train" in source else load_splits(data)).items():
            path, key = bank_path(ds, size, bank_dir)
            out.setdefault(path, NeededBank(split, size, path, key, ds))
    return list(out.values())


def shards(n: int, row_bytes: int, cpus: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges: at most SHARD_BYTES each, at least two per CPU when there are enough
    rows (a straggler then costs half a shard), never under MIN_SHARD_ROWS."""
    rows = min(math.ceil(n / max(1, 2 * cpus)), max(1, SHARD_BYTES // row_bytes))
    rows = max(rows, MIN_SHARD_ROWS)
    return [(start, min(n, start + rows)) for start in range(0, n, rows)]


def decode_shard(images_npy: str, start: int, paths: list[str], size: int) -> tuple[int, int]:
    """A Ray task: decode ``paths`` into rows start.. of the shared images.npy; (rows, process id)."""
    import numpy as np
    import torch

    from tally.data.bank import decode_rows

    torch.set_num_threads(1)  # one task per CPU: resizing must not spread over the others' cores
    images = np.load(images_npy, mmap_mode="r+")
    decode_rows(images[start:start + len(paths)], paths, size)
    images.flush()
    del images
    return len(paths), os.getpid()


def build_with_tasks(bank: NeededBank, cpus: int) -> dict:
    """Decode one missing bank with parallel Ray tasks; what was done (tasks, processes, seconds)."""
    import ray

    from tally.data.bank import write_bank

    started = time.perf_counter()
    paths = bank.ds.paths
    ranges = shards(len(paths), 3 * bank.size * bank.size, cpus)
    task = ray.remote(num_cpus=1, max_retries=2)(decode_shard)
    done: list[tuple[int, int]] = []

    def decode(images_npy: Path) -> None:
        if len(ranges) == 1:  # a small bank: starting a task (and its imports) costs more than decoding
            done.append(decode_shard(str(images_npy), 0, paths, bank.size))
            return
        refs = [task.remote(str(images_npy), a, paths[a:b], bank.size) for a, b in ranges]
        try:
            done.extend(ray.get(refs))
        except ray.exceptions.RayTaskError as e:
            for ref in refs:  # the bank is abandoned: stop the other tasks writing into it
                ray.cancel(ref, force=True)
            if isinstance(e.cause, TallyError):  # a bad image: one line naming it, as everywhere else
                raise TallyError(str(e.cause)) from None
            raise

    write_bank(bank.path, bank.key, bank.ds, bank.size, decode)
    seconds = time.perf_counter() - started
    return {"split": bank.split, "size": bank.size, "images": len(paths), "path": str(bank.path),
            "tasks": len(ranges), "processes": len({pid for _, pid in done}), "seconds": round(seconds, 3)}


def prepare_banks(sources: list[dict], bank_dir: str | Path, log=print) -> list[dict]:
    """The pre-flight: every bank the data sections or run configs need exists in bank_dir afterwards.

    Returns one record per bank: found, or built (with its tasks, processes and seconds).
    Ray must be connected (tally.search.run.connect).
    """
    import ray

    bank_dir = Path(bank_dir)
    existed = bank_dir.exists()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    records = []
    try:
        for bank in needed_banks(sources, bank_dir):
            if (bank.path / "key.txt").is_file():
                records.append({"split": bank.split, "size": bank.size, "images": len(bank.ds),
                                "path": str(bank.path), "built": False})
                continue
            record = {**build_with_tasks(bank, cpus), "built": True}
            records.append(record)
            if log:
                log(f"bank {bank.split} ({record['images']} images at {bank.size}px) decoded by "
                    f"{record['tasks']} task(s) on {record['processes']} process(es) in {record['seconds']:.1f}s: "
                    f"{bank.path}")
    except BaseException:
        if not existed and bank_dir.is_dir() and not any(bank_dir.iterdir()):
            bank_dir.rmdir()  # a refused pre-flight leaves no empty folder behind
        raise
    return records


def prepare_for_configs(configs: list[dict], storage: str | Path, log=print) -> Path:
    """prepare_banks over run configs; returns the bank folder for the trials."""
    bank_dir = bank_dir_for(storage)
    prepare_banks(configs, bank_dir, log=log)
    return bank_dir


def prepare_for_spec(spec, storage: str | Path, log=print) -> Path | None:
    """The search's pre-flight; None when its space makes the banks impossible to list (each trial
    then finds or decodes its own, as without a pre-flight)."""
    variants = data_variants(spec)
    if variants is None:
        if log:
            log("banks: the space searches a data field over a range; trials decode their own images")
        return None
    bank_dir = bank_dir_for(storage)
    prepare_banks(variants, bank_dir, log=log)
    return bank_dir
