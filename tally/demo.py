"""`make demo`: a brief multi-objective search of TALLY on the embedded data, then a benchmark of its pick
against ERM and class-balanced re-weighting over 2 seeds, with paired differences and their intervals.

The demo says what the numbers say: a method "beats" a baseline on a metric only when the paired 95%
interval lies above zero on every seed (tally.search.benchmark.VERDICT_RULE); otherwise it says there
is no clear difference, or that TALLY is worse.
"""

from __future__ import annotations

import time
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "searches" / "quickstart.yaml"
SEEDS = 2
BASELINES = ("erm", "reweight")
HEADLINE = ("pair_acc_mean", "class_acc_worst", "pair_acc_worst", "shot_few", "shot_zero", "macro_f1")


def benchmark_raw(spec, exp_dir: Path, name: str) -> dict:
    """The demo's benchmark: the search's pick and the baselines at the quickstart's base config (same
    model, epochs, steps and learning rate), subpopulation split, SEEDS seeds."""
    base = spec.resolved["base"]
    data = {k: v for k, v in base["data"].items() if k not in ("setting", "held_out")}
    return {"name": name, "data": data,
            "base": {"model": base["model"], "train": {**base["train"], "seed": 0}},
            "methods": {"tally": {"from_search": str(exp_dir)}, **{m: {"method": {"name": m}} for m in BASELINES}},
            "baseline": list(BASELINES), "settings": ["sub"], "seeds": SEEDS,
            "selection_metric": spec.resolved["selection"]["metric"],
            "concurrency": spec.resolved["budget"]["concurrency"], "resources": spec.resolved["resources"]}


def conclusion(summary, metrics=HEADLINE) -> list[str]:
    """One honest line per baseline: where TALLY is better / worse by the verdict rule, and the rest."""
    from tally.evaluation import metric_label

    lines = []
    for baseline, rows in summary[summary["metric"].isin(metrics)].groupby("baseline", sort=False):
        by = {v: [metric_label(m) for m in rows.loc[rows["verdict"] == v, "metric"]] for v in set(rows["verdict"])}
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
    from tally.search import benchmark

    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    spec = search.load_spec(QUICKSTART, name_override=f"quickstart-{stamp}")
    splits = load_splits(spec.resolved["base"]["data"])
    print(describe({"train": splits["train"]}).rstrip())
    print(f"validation and test: {splits['val'].counts().min()} images per (domain, class) pair each\n", flush=True)

    print(f"1. searching: {spec.resolved['budget']['trials']} trials of TALLY (Ray Tune + Optuna, "
          f"multi-objective on validation {' and '.join(spec.resolved['selection']['objectives'])}) ...", flush=True)
    summary = search.run_search(spec, storage)
    exp_dir = results.experiment_dir(storage, spec.name)
    best, selection = results.best_of_experiment(exp_dir, summary)
    columns = ["trial_id", "status", *[c for c in summary.columns if c.startswith("param.")], *selection.objectives]
    front = results.pareto_front(summary, selection.objectives)
    shown = summary[[c for c in columns if c in summary]].assign(pareto=front.map({True: "*", False: ""}))
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if best is None:
        print("no trial finished; see the trial folders for errors")
        return 1
    print(f"picked {best['trial_id']} by the rule: {selection.source}  [{time.time() - started:.0f}s]")
    bundle = export_bundle(exp_dir / results.TRIALS_DIR / best["trial_id"], exp_dir / "bundle")

    print(f"\n2. benchmarking the picked config against {' and '.join(BASELINES)} at the quickstart's base config, "
          f"{SEEDS} seeds (TALLY had the search, the baselines none) ...", flush=True)
    bench = benchmark.benchmark_spec_from_raw(benchmark_raw(spec, exp_dir, f"benchmark-{stamp}"), "demo benchmark")
    out = benchmark.run_benchmark(bench, storage)
    print("\n" + benchmark.markdown(out, metrics=HEADLINE))
    for line in conclusion(out["difference_summary"]):
        print(line)
    bench_dir = results.experiment_dir(storage, bench.name)
    print("\n" + calibration.benchmark_calibration_table(bench_dir))
    print(f"\nsearch:    {exp_dir}\nbenchmark: {bench_dir} (table.md, table.tex, table.csv, differences.csv)"
          f"\nbundle:    {bundle}\ndashboard: .venv/bin/tally dashboard {storage}"
          f"\ndemo took {time.time() - started:.0f}s")
    return 0
