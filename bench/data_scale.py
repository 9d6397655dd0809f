"""Decode once per cluster, at scale: a generated folder dataset of small PNGs (200,000 by default).

Prints, measured side by side in one run:
  decode img/s    one Ray task against N tasks (every CPU of the local Ray) on the same images;
  the pre-flight  building every bank of a 2-trial search (N tasks, into the search's bank folder);
  trial start-up  load the splits and get their banks, with the bank (memory-mapped) and without it
                  (decoded in memory, with --decode-workers DataLoader workers, as before the pre-flight);
  the search      2 trials (ResNet-10, a few steps, no warm-up): each trial's peak RSS, from its status.json.

    PYTHONPATH=. .venv/bin/python bench/data_scale.py [--images 200000] [--size 32] [--sample 20000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def spec_for(root: Path, size: int) -> dict:
    return {
        "name": "scale",
        "base": {"data": {"source": "folder", "root": str(root), "imbalance": "natural", "n_val": 5, "n_test": 5,
                          "image_size": size},
                 "model": {"arch": "resnet10"}, "method": {"name": "tally"},
                 "train": {"epochs": 1, "warmup_epochs": 0, "steps_per_epoch": 4, "batch_size": 16,
                           "eval_batch_size": 32, "lr": 1e-3, "device": "cpu"}},
        "space": {"method.alpha": {"type": "uniform", "low": 0.1, "high": 1.0}},
        "selection": {"metric": "pair_acc_mean"},
        "budget": {"trials": 2, "concurrency": 1}, "resources": {"workers": 1, "cpus_per_worker": 1},
    }


def decode_rate(paths: list[str], size: int, tasks: int, tmp: Path) -> float:
    """Images/s of ``tasks`` Ray tasks decoding ``paths`` into one memory-mapped file (workers warm)."""
    import numpy as np
    import ray

    from tally.search.banks import decode_shard

    target = tmp / f"rate-{tasks}.npy"
    np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
    task = ray.remote(num_cpus=1)(decode_shard)
    bounds = np.linspace(0, len(paths), tasks + 1).astype(int)
    started = time.perf_counter()
    ray.get([task.remote(str(target), int(a), paths[a:b], size) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    rate = len(paths) / (time.perf_counter() - started)
    target.unlink()
    return rate


def start_up(data: dict, bank_dir: Path | None, workers: int) -> float:
    """Seconds a trial spends before its first step on data: the splits, then a bank for each."""
    from tally.data import load_splits
    from tally.data.bank import BANK_DIR_ENV, bank_for_training

    os.environ.pop(BANK_DIR_ENV, None)
    if bank_dir is not None:
        os.environ[BANK_DIR_ENV] = str(bank_dir)
    started = time.perf_counter()
    banks = [bank_for_training(ds, data["image_size"], workers=workers) for ds in load_splits(data).values()]
    seconds = time.perf_counter() - started
    del banks
    os.environ.pop(BANK_DIR_ENV, None)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=32, help="training image size (the PNGs are 32 px)")
    parser.add_argument("--sample", type=int, default=20_000, help="images for the 1-task / N-task decode rates")
    parser.add_argument("--decode-workers", type=int, default=2, help="DataLoader workers without the bank")
    parser.add_argument("--no-search", action="store_true", help="skip the 2-trial search")
    args = parser.parse_args()
    os.environ["TALLY_CACHE"] = tempfile.mkdtemp(prefix="tally-bench-cache-")  # no stale default cache

    from tally import results
    from tally.config import validate
    from tally.data import load_splits
    from tally.data.synthetic import make_many_images
    from tally.search import connect, run_search, spec_from_raw
    from tally.search.banks import bank_dir_for, data_variants, prepare_banks

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        root = make_many_images(tmp / "data", args.images, processes=os.cpu_count() or 2)
        generated = time.perf_counter() - started
        spec = spec_from_raw(spec_for(root, args.size))
        data = validate({"data": spec.base["data"]})["data"]
        connect(None, concurrency=1)
        import ray

        cpus = int(ray.cluster_resources()["CPU"])
        train_paths = load_splits(data)["train"].paths
        sample = train_paths[: args.sample]
        decode_rate(sample[:200], args.size, cpus, tmp)  # start the task workers (imports) first
        one = decode_rate(sample, args.size, 1, tmp)
        many = decode_rate(sample, args.size, cpus, tmp)

        storage = tmp / "results"
        started = time.perf_counter()
        records = prepare_banks(data_variants(spec), bank_dir_for(storage), log=None)
        preflight = time.perf_counter() - started
        with_bank = start_up(data, bank_dir_for(storage), args.decode_workers)
        without_bank = start_up(data, None, args.decode_workers)

        peaks = []
        if not args.no_search:
            started = time.perf_counter()
            summary = run_search(spec, storage)
            searched = time.perf_counter() - started
            exp_dir = results.experiment_dir(storage, spec.name)
            peaks = [(results.read_json(d / "status.json") or {}).get("peak_rss_mib")
                     for d in results.iter_trial_dirs(exp_dir)]
        ray.shutdown()

    images = sum(r["images"] for r in records)
    train = next(r for r in records if r["split"] == "train")
    print(f"{args.images} PNGs of 32 px -> {args.size} px, {cpus} CPUs; generated in {generated:.0f}s; "
          f"load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(f"decode, 1 Ray task           : {one:8.0f} img/s ({len(sample)} images)")
    print(f"decode, {cpus} Ray tasks          : {many:8.0f} img/s ({many / one:.2f}x)")
    print(f"pre-flight, every bank       : {images / preflight:8.0f} img/s ({images} images in {preflight:.1f}s; "
          f"train bank by {train['tasks']} tasks on {train['processes']} processes)")
    print(f"trial start-up with the bank : {with_bank:8.1f} s (splits + memory-mapped banks)")
    print(f"trial start-up without      : {without_bank:8.1f} s (splits + decode, {args.decode_workers} "
          f"DataLoader workers) -> {without_bank / with_bank:.0f}x")
    if peaks:
        print(f"search, 2 trials             : {searched:8.1f} s, {', '.join(summary['status'])}; "
              f"peak RSS per trial {', '.join(f'{p:.0f}' for p in peaks)} MiB "
              f"(train bank {train['images'] * 3 * args.size ** 2 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
