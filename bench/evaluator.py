"""Benchmark: the bincount evaluator against a loop-over-pairs formulation of the same metrics.

345 classes x 6 domains, 200,000 predictions, seeded synthetic data with long-tailed training counts
and some absent pairs. All run in this process; each is timed the same number of times (--repeats,
best of N for every path: a minimum over more tries would flatter the path that gets them).
Exit code 1 if any metric differs by more than 1e-9 (NaN must match NaN).

Run: .venv/bin/python bench/evaluator.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from tally.evaluation import METRIC_NAMES, metrics_from_counts, pair_counts, pair_table, split_metrics

D, C, N = 6, 345, 200_000
MANY_ABOVE, FEW_AT_MOST = 100, 20
TOL = 1e-9


def synthetic(seed: int = 0):
    """Long-tailed training counts per (domain, class), ~5% absent test pairs, accuracy rising with shots."""
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((D, C)), axis=1)
    n_train = np.floor(1000 * 0.985**ranks).astype(np.int64)
    n_train[rng.random((D, C)) < 0.08] = 0  # pairs never seen in training
    weight = rng.gamma(2.0, size=D * C)
    weight[rng.random(D * C) < 0.05] = 0.0  # pairs absent from the evaluated split
    pair = rng.choice(D * C, size=N, p=weight / weight.sum())
    domains, labels = pair // C, pair % C
    p_correct = 0.2 + 0.7 * np.log1p(n_train.ravel()[pair]) / np.log1p(1000)
    wrong = rng.integers(0, C, size=N)
    preds = np.where(rng.random(N) < p_correct, labels, wrong)
    return preds, labels, domains, n_train


def loop_metrics(preds, labels, domains, n_train, num_domains, num_classes, many_above, few_at_most):
    """The straightforward formulation: boolean masks per (domain, class) pair and per class."""
    pair_acc = {}
    for d in range(num_domains):
        for c in range(num_classes):
            mask = (domains == d) & (labels == c)
            n = int(mask.sum())
            if n > 0:
                pair_acc[(d, c)] = float((preds[mask] == c).sum()) / n
    out = {"acc": float((preds == labels).sum()) / len(labels)}

    recalls, f1s = [], []
    for c in range(num_classes):
        is_true, is_pred = labels == c, preds == c
        tp = int((is_true & is_pred).sum())
        support, pred_total = int(is_true.sum()), int(is_pred.sum())
        if support > 0:
            recalls.append(tp / support)
        if support > 0:  # WILDS' macro F1: classes present in the true labels
            f1s.append(2 * tp / (support + pred_total))
    out["macro_recall"] = sum(recalls) / len(recalls)
    out["macro_f1"] = sum(f1s) / len(f1s)

    accs = list(pair_acc.values())
    out["pair_acc_mean"], out["pair_acc_worst"] = sum(accs) / len(accs), min(accs)
    per_class = []
    for c in range(num_classes):
        v = [pair_acc[(d, c)] for d in range(num_domains) if (d, c) in pair_acc]
        if v:
            per_class.append(sum(v) / len(v))
    out["class_acc_mean"], out["class_acc_worst"] = sum(per_class) / len(per_class), min(per_class)
    per_domain = []
    for d in range(num_domains):
        v = [pair_acc[(d, c)] for c in range(num_classes) if (d, c) in pair_acc]
        if v:
            per_domain.append(sum(v) / len(v))
    out["domain_acc_mean"], out["domain_acc_worst"] = sum(per_domain) / len(per_domain), min(per_domain)

    buckets = {"shot_many": [], "shot_medium": [], "shot_few": [], "shot_zero": []}
    for (d, c), a in pair_acc.items():
        t = n_train[d, c]
        if t > many_above:
            buckets["shot_many"].append(a)
        elif t == 0:
            buckets["shot_zero"].append(a)
        elif t <= few_at_most:
            buckets["shot_few"].append(a)
        else:
            buckets["shot_medium"].append(a)
    for name, v in buckets.items():
        out[name] = sum(v) / len(v) if v else float("nan")
    return out


def best_time(fn, repeats: int) -> tuple[float, dict]:
    best, result = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="best of N, the same N for every path")
    repeats = parser.parse_args().repeats
    preds, labels, domains, n_train = synthetic(0)
    class_names = [f"class_{c}" for c in range(C)]
    domain_names = [f"domain_{d}" for d in range(D)]

    def core():
        n, correct, predicted = pair_counts(preds, labels, domains, D, C)
        return metrics_from_counts(n, correct, predicted, n_train, MANY_ABOVE, FEW_AT_MOST)

    def end_to_end():
        table = pair_table("test", preds, labels, domains, class_names, domain_names, n_train)
        return split_metrics(table, MANY_ABOVE, FEW_AT_MOST)

    def loop():
        return loop_metrics(preds, labels, domains, n_train, D, C, MANY_ABOVE, FEW_AT_MOST)

    t_loop, ref = best_time(loop, repeats)
    t_core, got_core = best_time(core, repeats)
    t_e2e, got_e2e = best_time(end_to_end, repeats)

    print(
        f"data: {C} classes x {D} domains, {N:,} predictions, "
        f"{int((n_train == 0).sum())} zero-shot pairs, "
        f"{D * C - len(np.unique(domains * C + labels))} absent test pairs"
    )
    print(f"loop over pairs (boolean masks)             : {t_loop * 1e3:9.2f} ms  (best of {repeats})")
    print(
        f"core: pair_counts + metrics_from_counts     : {t_core * 1e3:9.3f} ms  (best of {repeats})  "
        f"ratio {t_loop / t_core:7.1f}x"
    )
    print(
        f"end to end: pair_table (DataFrame) + split_metrics: {t_e2e * 1e3:6.3f} ms  (best of {repeats})  "
        f"ratio {t_loop / t_e2e:7.1f}x"
    )

    bad = []
    for label, got in (("core", got_core), ("end to end", got_e2e)):
        for name in METRIC_NAMES:
            a, b = got[name], ref[name]
            same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOL
            if not same:
                bad.append(f"{label}: {name} = {a!r}, loop gives {b!r}")
    print("metric check (|diff| <= 1e-9, all 13 metrics, both paths):", "FAIL" if bad else "ok")
    for line in bad:
        print("  " + line)
    for name in METRIC_NAMES:
        print(f"  {name:18s} {got_e2e[name]:.6f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
