"""What Ray costs: the same configs run back-to-back in-process, then as Tune trials on Ray Train.

Prints both wall times and their ratio (goal <= 1.15 for trials of >= 60 s each). The Ray side
includes starting the local Ray, each trial's TorchTrainer start and teardown, and the store writes.
Each run's own time (its status.json started -> ended) is read back from both halves, so the
fixed cost Ray adds per trial is measured directly, not inferred from the difference of totals
(later in-process runs can be a few percent slower than fresh processes, which flatters Ray).

    .venv/bin/python bench/search_overhead.py [--trials 3] [--steps 45]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def configs(n: int, steps: int) -> dict[str, dict]:
    from tally.config import validate

    out = {}
    for i in range(n):
        out[f"c{i}"] = validate({
            "data": {"source": "embedded", "setting": "sub", "image_size": 32},
            "model": {"arch": "resnet18", "cut": "layer2"},
            "method": {"name": "tally", "alpha": 0.2 + 0.3 * i},
            "train": {"epochs": 3, "warmup_epochs": 1, "steps_per_epoch": steps, "batch_size": 32,
                      "lr": 1e-3, "device": "cpu", "seed": i}})
    return out


def run_seconds(group_dir: Path, run_ids) -> list[float]:
    """Each run's own time, started -> ended, from the store."""
    from tally import results

    statuses = [results.read_json(group_dir / run_id / "status.json") or {} for run_id in run_ids]
    return [s["ended"] - s["started"] for s in statuses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=45, help="TALLY steps per epoch (45: about 60 s a trial here)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)  # a Ray Train worker with 1 CPU runs 1 thread; same here, fair comparison
    cfgs = configs(args.trials, args.steps)

    from tally.training import RunContext, train_run

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for run_id, cfg in cfgs.items():
            train_run(cfg, Path(tmp) / "plain" / run_id, ctx=RunContext(progress=False))
        plain = time.perf_counter() - t0
        plain_runs = run_seconds(Path(tmp) / "plain", cfgs)

        from tally.search import connect, run_fixed

        t0 = time.perf_counter()
        connect(None, concurrency=1)
        connect_time = time.perf_counter() - t0
        metrics = run_fixed(Path(tmp) / "ray", "trials", cfgs, {"workers": 1, "cpus_per_worker": 1}, 1)
        ray_time = time.perf_counter() - t0
        assert all(m for m in metrics.values()), "a Ray trial did not finish"
        ray_runs = run_seconds(Path(tmp) / "ray" / "trials", cfgs)

    # start-up + teardown of one trial: time outside the runs, less what in-process spends outside them
    fixed = ((ray_time - connect_time - sum(ray_runs)) - (plain - sum(plain_runs))) / args.trials
    overhead_only = (plain + connect_time + args.trials * fixed) / plain
    print(f"{args.trials} trials, {plain / args.trials:.1f} s each in-process")
    print("run times in-process    : " + " ".join(f"{s:6.1f}" for s in plain_runs) + " s")
    print("run times in Ray workers: " + " ".join(f"{s:6.1f}" for s in ray_runs) + " s")
    print(f"in-process back-to-back : {plain:8.1f} s")
    print(f"Ray Tune + Ray Train    : {ray_time:8.1f} s (includes ray.init: {connect_time:.1f} s)")
    print(f"ratio Ray / in-process  : {ray_time / plain:8.3f}  (goal <= 1.15 for trials >= 60 s)")
    print(f"Ray's fixed cost        : {fixed:8.1f} s per trial (start-up + teardown, outside the run)")
    print(f"ratio, Ray costs only   : {overhead_only:8.3f}  (same run times on both sides)")


if __name__ == "__main__":
    main()
