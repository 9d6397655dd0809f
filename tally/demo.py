"""`make demo`: TALLY, ERM and class-balanced re-weighting tuned alike on the embedded data (the same
small random-search budget each, tally.search.tuning), each pick re-run over 2 seeds, then compared
with paired differences and their intervals.

The demo says what the numbers say: a method "beats" a baseline on a metric only when the paired 95%
interval lies above zero on every seed (tally.search.benchmark.VERDICT_RULE); otherwise it says there
is no clear difference, or that TALLY is worse. Its first conclusion line states the equal budget.
"""

from __future__ import annotations

import time
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "searches" / "quickstart.yaml"
METHODS = ("tally", "erm", "reweight")
BASELINES = ("erm", "reweight")
HEADLINE = ("pair_acc_mean", "class_acc_worst", "pair_acc_worst", "shot_few", "shot_zero", "macro_f1")
# the equal budget: 3 random trials per method (trial 0 each method's defaults), each pick re-run with
# 2 seeds; lr searched over the quickstart's range for every method, weight decay and batch fixed at
# the quickstart's base, each method's own knobs from its registered space (docs/SPACES.md)
TUNE = {"trials": 3, "sampler": "random", "sampler_seed": 0, "trial_seed": 0, "seeds": 2, "rules": ["train_val"],
        "space": {"train.lr": {"type": "loguniform", "low": 5.0e-4, "high": 5.0e-3},
                  "train.weight_decay": None, "train.batch_size": None}}


def benchmark_raw(spec, name: str) -> dict:
    """The demo's tuned benchmark: the quickstart's data, model and training budget for every method,
    the subpopulation split, the TUNE budget; selection on the quickstart's worst-class accuracy."""
    base = spec.resolved["base"]
    data = {k: v for k, v in base["data"].items() if k not in ("setting", "held_out")}
    train = {k: v for k, v in base["train"].items() if k != "seed"}
    return {"name": name, "data": data, "base": {"model": base["model"], "train": train},
            "methods": {m: {"method": {"name": m}} for m in METHODS},
            "baseline": list(BASELINES), "settings": ["sub"], "tune": TUNE,
            "selection_metric": "class_acc_worst",
            "concurrency": spec.resolved["budget"]["concurrency"], "resources": spec.resolved["resources"]}


def conclusion(summary, tune: dict, metrics=HEADLINE) -> list[str]:
    """The equal budget, then one honest line per baseline: where TALLY is better / worse by the verdict
    rule, and the rest. Every claim is a verdict of ``summary`` (tests/test_demo.py checks it)."""
    from tally.evaluation import metric_label

    lines = [f"Equal budget: TALLY, ERM and re-weighting each had {tune['trials']} {tune['sampler']} trials "
             f"(sampler seed {tune['sampler_seed']}, trial seed {tune['trial_seed']}, the same model and training "
             f"budget, no early stopping); each pick was re-run with {tune['seeds']} seeds."]
    rows = summary[summary["metric"].isin(metrics) & (summary["method"] == "tally")]
    for baseline, r in rows.groupby("baseline", sort=False):
        by = {v: [metric_label(m) for m in r.loc[r["verdict"] == v, "metric"]] for v in set(r["verdict"])}
        better, worse = by.get("better", []), by.get("worse", [])
        if better:
            text = f"TALLY beats {baseline} beyond the intervals on every seed on: {', '.join(better)}"
        else:
            text = f"TALLY does not beat {baseline} beyond the intervals on any headline metric"
        if worse:
            text += f"; it is worse on every seed on: {', '.join(worse)}"
        unclear = by.get("no clear difference", [])
        if unclear:
            text += f"; no clear difference on: {', '.join(unclear)}"
        lines.append(text + ".")
    return lines


def run_demo(storage: Path) -> int:
    from tally import results, search
    from tally.data import describe, load_splits
    from tally.deploy.export import export_bundle
    from tally.evaluation import calibration
    from tally.search import benchmark, tuning

    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    spec = search.load_spec(QUICKSTART)
    splits = load_splits(spec.resolved["base"]["data"])
    print(describe({"train": splits["train"]}).rstrip())
    print(f"validation and test: {splits['val'].counts().min()} images per (domain, class) pair each\n", flush=True)

    # 1. tune every method alike, re-run each pick over the seeds
    bench = benchmark.benchmark_spec_from_raw(benchmark_raw(spec, f"demo-{stamp}"), "demo benchmark")
    print(benchmark.dry_run_text(bench), flush=True)
    print(f"\n1. tuning {', '.join(METHODS)} alike, then re-running each pick ...", flush=True)
    out = benchmark.run_benchmark(bench, storage)
    bench_dir = results.experiment_dir(storage, bench.name)
    if "train_val" not in out:
        print(f"a method's trials did not all finish, so nothing was picked; see {bench_dir / tuning.TUNE_DIR}")
        return 1

    # 2. the comparison (training-domain validation picks), the tuning report, the conclusion
    print("\n2. the picks compared on test_sub\n")
    print(benchmark.markdown(out["train_val"], metrics=HEADLINE))
    t = out["tuning"]
    print(tuning.tuning_markdown(t["curves"], t["picks"], t["cost"], bench.resolved["tune"],
                                 bench.resolved["selection_metric"]))
    for line in conclusion(out["train_val"]["difference_summary"], bench.resolved["tune"]):
        print(line)

    print("\n" + calibration.benchmark_calibration_table(bench_dir))

    bundle = export_bundle(bench_dir / benchmark.RUNS_DIR / "tally-sub-train_val-seed1", bench_dir / "bundle")
    print(f"\nbenchmark: {bench_dir} (table.md, rules/train_val/table.csv, picks.csv, curves.csv, cost.csv)"
          f"\nbundle:    {bundle} (TALLY's pick, seed 1)\ndashboard: .venv/bin/tally dashboard {storage}"
          f"\ndemo took {time.time() - started:.0f}s")
    return 0
