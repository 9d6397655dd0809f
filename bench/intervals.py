"""Benchmark: the cost of the intervals at DomainNet scale.

345 classes x 6 domains, 200,000 test predictions (bench/evaluator.py's seeded synthetic data),
macro F1 with R = 1000 draws. Timed side by side in this process:
- point: every metric once (pair_counts + metrics_from_counts), the unit of cost;
- run: tally.evaluation.intervals.table_intervals (what run_intervals calls once the files are read);
- paired: tally.evaluation.intervals.paired_difference of two runs on the same images.
Coverage is bench/coverage.py's question; this one only asks what the intervals cost.

Run: .venv/bin/python bench/intervals.py [--replicates R]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluator import C, D, N, synthetic  # noqa: E402

from tally import evaluation  # noqa: E402
from tally.evaluation import intervals  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicates", type=int, default=1000)
    R = parser.parse_args().replicates
    preds, labels, domains, n_train = synthetic(0)
    rng = np.random.default_rng(1)
    other = np.where(rng.random(N) < 0.1, rng.integers(0, C, N), preds)  # a second run: 10% changed
    classes, doms = [f"c{c}" for c in range(C)], [f"d{d}" for d in range(D)]
    table = evaluation.pair_table("test", preds, labels, domains, classes, doms, n_train)
    table_b = evaluation.pair_table("test", other, labels, domains, classes, doms, n_train)
    conf = np.ones(N, dtype=np.float32)
    examples = intervals.prediction_frame("test", preds, labels, domains, conf)
    examples_b = intervals.prediction_frame("test", other, labels, domains, conf)

    t_point = min(timed(lambda: evaluation.metrics_from_counts(
        *evaluation.pair_counts(preds, labels, domains, D, C), n_train))[0] for _ in range(5))
    t_run, rows = timed(lambda: intervals.table_intervals(table, examples, replicates=R))
    t_paired, diff = timed(lambda: intervals.paired_difference(table, table_b, examples, examples_b, replicates=R))
    print(f"data: {C} classes x {D} domains, {N:,} predictions, macro F1 with R = {R} draws")
    print(f"point estimate (every metric once): {t_point * 1e3:9.1f} ms")
    for label, t in (("intervals of one run", t_run), ("paired intervals of two runs", t_paired)):
        print(f"{label:34s}: {t * 1e3:9.1f} ms  = {t / t_point:7.0f} x point")
    zero = int(((rows["high"] - rows["low"]) <= 0).sum() + ((diff["high"] - diff["low"]) <= 0).sum())
    print(f"zero-width intervals: {zero}")
    return 1 if zero else 0


if __name__ == "__main__":
    sys.exit(main())
