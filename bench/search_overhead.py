"""What Ray costs: the same configs run back-to-back in-process, then as Tune trials on Ray Train.

Prints both wall times and their ratio (goal <= 1.15 for trials of >= 60 s each). The Ray side
includes starting the local Ray, each trial's TorchTrainer start and teardown, and the store writes.

    .venv/bin/python bench/search_overhead.py [--trials 3] [--steps 120]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120, help="TALLY steps per epoch (sets trial length)")
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

        from tally.search import connect, run_fixed

        t0 = time.perf_counter()
        connect(None, concurrency=1)
        metrics = run_fixed(Path(tmp) / "ray", "trials", cfgs, {"workers": 1, "cpus_per_worker": 1}, 1)
        ray_time = time.perf_counter() - t0
        assert all(m for m in metrics.values()), "a Ray trial did not finish"

    per_trial = plain / args.trials
    print(f"{args.trials} trials, {per_trial:.1f} s each in-process")
    print(f"in-process back-to-back : {plain:8.1f} s")
    print(f"Ray Tune + Ray Train    : {ray_time:8.1f} s (includes ray.init)")
    print(f"ratio Ray / in-process  : {ray_time / plain:8.3f}  (goal <= 1.15 for trials >= 60 s)")


if __name__ == "__main__":
    main()
