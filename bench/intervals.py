"""Benchmark: the cost of the bootstrap intervals at DomainNet scale.

345 classes x 6 domains, 200,000 test predictions (bench/evaluator.py's seeded synthetic data),
R = 1000 replicates. Timed side by side in this process:
- point: every metric once (pair_counts + metrics_from_counts), the unit of cost;
- table: tally.evaluation.intervals.bootstrap from the long table alone (binomials; macro F1 pooled per domain);
- exact: the same with per-example predictions (macro F1 resampled exactly);
- paired: tally.evaluation.intervals.paired_difference of two runs on the same images;
- per-replicate: the textbook formulation, one vectorised redraw of all 200,000 images per replicate
  (a Python loop over replicates), then the same metrics; it is also the check: its intervals must
  agree with the fast paths' within Monte Carlo error (exit code 1 if any endpoint differs by more
  than 0.01 on a metric other than macro F1 of the table path, which is an approximation).

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

TOL = 0.01


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def per_replicate(preds, labels, domains, n_train, replicates, seed):
    """Loop over replicates; each redraws every pair's images with replacement in one vectorised step."""
    rng = np.random.default_rng(seed)
    pair = domains * C + labels
    order = np.argsort(pair, kind="stable")
    sizes = np.bincount(pair, minlength=D * C)
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sorted_pair = pair[order]
    values = {m: np.empty(replicates) for m in evaluation.METRIC_NAMES}
    for r in range(replicates):
        idx = order[start[sorted_pair] + (rng.random(N) * sizes[sorted_pair]).astype(np.int64)]
        n, correct, predicted = evaluation.pair_counts(preds[idx], labels[idx], domains[idx], D, C)
        for m, v in evaluation.metrics_from_counts(n, correct, predicted, n_train).items():
            values[m][r] = v
    return {m: np.quantile(v, [0.025, 0.975]) for m, v in values.items()}


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
    t_table, fast_table = timed(lambda: intervals.bootstrap(table, replicates=R))
    t_exact, fast_exact = timed(lambda: intervals.bootstrap(table, examples, replicates=R))
    t_paired, _ = timed(lambda: intervals.paired_difference(table, table_b, examples, examples_b, replicates=R))
    t_loop, slow = timed(lambda: per_replicate(preds, labels, domains, n_train, R, 2))

    print(f"data: {C} classes x {D} domains, {N:,} predictions, R = {R} replicates, 95% percentile intervals")
    print(f"point estimate (every metric once)             : {t_point * 1e3:9.1f} ms")
    for label, t in (("bootstrap, table only (F1 pooled)", t_table),
                     ("bootstrap, per-example predictions (F1 exact)", t_exact),
                     ("paired bootstrap of two runs (F1 exact)", t_paired),
                     ("per-replicate redraw of 200k images (loop)", t_loop)):
        print(f"{label:47s}: {t * 1e3:9.1f} ms  = {t / t_point:7.0f} x point, "
              f"loop / this {t_loop / t:6.1f}x")

    bad = []
    print("interval endpoints vs the per-replicate loop (|diff|, percent points):")
    for name in evaluation.METRIC_NAMES:
        ref = slow[name]
        diffs = []
        for label, frame in (("table", fast_table), ("exact", fast_exact)):
            row = frame.set_index("metric").loc[name]
            d = max(abs(row["low"] - ref[0]), abs(row["high"] - ref[1]))
            diffs.append(d)
            if d > TOL and not (label == "table" and name == "macro_f1") and not np.isnan(d):
                bad.append(f"{label}: {name} differs by {d:.4f}")
        print(f"  {name:16s} table {100 * diffs[0]:6.2f}  exact {100 * diffs[1]:6.2f}   "
              f"[{100 * ref[0]:.2f}, {100 * ref[1]:.2f}]")
    print("check (|diff| <= 0.01):", "FAIL" if bad else "ok")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
