"""TALLY vs ERM vs class-balanced re-weighting on the embedded data: same budget, several seeds, no Ray.

The runs of a `tally benchmark` (tally.search.benchmark), trained one after the other in this process
instead of as Tune trials, then the same table (mean ± standard error over seeds, percent) and the same
paired differences against each baseline (per seed: paired 95% bootstrap interval; verdict "better"
only when the interval is above zero on every seed).

    .venv/bin/python bench/compare_methods.py [--seeds 3] [--epochs 6] [--steps 25] [--settings sub]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--methods", default="tally,erm,reweight")
    parser.add_argument("--baselines", default="erm,reweight")
    parser.add_argument("--settings", default="sub", help="comma-separated: sub, each_domain, domain:<name>")
    parser.add_argument("--metric", default="class_acc_worst", help="the epoch-selection metric of every method")
    parser.add_argument("--out", help="keep the runs and tables here (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    from tally.search import benchmark
    from tally.training import RunContext, train_run

    torch.set_num_threads(1)  # as one Tune trial gets one CPU
    raw = {"name": "compare", "data": {"source": "embedded", "image_size": 32, "shot_many_above": 40},
           "base": {"model": {"arch": "resnet10", "cut": "layer2"},
                    "train": {"epochs": args.epochs, "warmup_epochs": args.warmup, "steps_per_epoch": args.steps,
                              "batch_size": 32, "lr": args.lr, "weight_decay": 0.0, "device": "cpu"}},
           "methods": {m: {"method": {"name": m}} for m in args.methods.split(",")},
           "baseline": args.baselines.split(","), "settings": args.settings.split(","), "seeds": args.seeds,
           "selection_metric": args.metric}
    spec = benchmark.benchmark_spec_from_raw(raw, "bench/compare_methods.py")
    with tempfile.TemporaryDirectory() as tmp:
        exp = Path(args.out or tmp) / spec.name
        for run_id, cfg in benchmark.pending_runs(spec, exp).items():
            started = time.time()
            metrics = train_run(cfg, exp / benchmark.RUNS_DIR / run_id, resume=True, ctx=RunContext(progress=False))
            print(f"{run_id}: val {args.metric} {metrics['val'][args.metric]:.3f} "
                  f"({time.time() - started:.0f}s)", flush=True)
        out = benchmark.tables(exp, spec.plan, spec.resolved["baseline"])
        if args.out:
            benchmark.write_tables(exp, out)
        print("\n" + benchmark.markdown(out))


if __name__ == "__main__":
    main()
