"""TALLY vs ERM vs class-balanced re-weighting on the embedded data: same budget, several seeds.

Every method gets the same epochs, warm-up epochs, steps and batch size; the best epoch of each
run is kept on validation. Prints validation (and test_sub) metrics, mean +- standard error.

    .venv/bin/python bench/compare_methods.py [--seeds 3] [--epochs 8] [--steps 40]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--methods", default="tally,erm,reweight")
    parser.add_argument("--metric", default="pair_acc_worst", help="the selection metric")
    args = parser.parse_args()

    from tally.search import mean_and_stderr
    from tally.training import RunContext, train_run

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            by_seed = {}
            for seed in range(args.seeds):
                cfg = {"data": {"source": "embedded", "setting": "sub", "image_size": 32},
                       "model": {"arch": "resnet10", "cut": "layer2"}, "method": {"name": method},
                       "train": {"epochs": args.epochs, "warmup_epochs": args.warmup, "steps_per_epoch": args.steps,
                                 "batch_size": 32, "lr": 2e-3, "weight_decay": 0.0, "seed": seed, "device": "cpu",
                                 "selection_metric": args.metric}}
                by_seed[seed] = train_run(cfg, Path(tmp) / f"{method}-{seed}", ctx=RunContext(progress=False))
                print(f"{method} seed {seed}: val {args.metric} {by_seed[seed]['val'][args.metric]:.3f}", flush=True)
            table = mean_and_stderr(by_seed)
            table.insert(0, "method", method)
            rows.append(table)
    table = pd.concat(rows)
    shown = table[table["metric"].isin(["pair_acc_worst", "pair_acc_mean", "class_acc_worst", "shot_few"])]
    wide = shown.assign(value=[f"{m:.3f} +- {s:.3f}" for m, s in zip(shown["mean"], shown["stderr"], strict=True)])
    print(wide.pivot_table(index=["split", "metric"], columns="method", values="value", aggfunc="first")
          .to_string())


if __name__ == "__main__":
    main()
