"""A finished benchmark's tables, read from the store alone: per-run values, the over-seeds table, the
paired differences against the baseline(s) and their verdicts, and their markdown / LaTeX / CSV.

Why here and not in tally.search: the dashboard reads finished benchmarks and must never import the
part that runs them (tally.search needs Ray); `tally benchmark` (tally.search.benchmark) writes these
tables through the same functions.

What the numbers mean:
- over seeds, ``mean ± SE``: the SE combines the seed-to-seed spread (ddof 1 / sqrt k) and the test-set
  noise every seed shares (all seeds are scored on the same images; the runs' own 95% intervals,
  tally.evaluation.intervals), ``intervals.seed_summary``. With 2-3 seeds the spread is itself uncertain.
- per seed, A - B with its 95% paired interval (tally.evaluation.intervals.compare_runs).
- the verdict (VERDICT_RULE): "better" / "worse" only when the paired interval lies above / below 0
  for EVERY seed (an intersection-union test: no adjustment across seeds is needed). Over the
  comparisons (method x baseline x setting x metric) the default (``report.adjust: none``) adjusts
  nothing and says how many comparisons were made; ``report.adjust: holm`` gives Holm's step-down:
  intervals at level 1 - 0.05 / (m - j) after j verdicts, repeated until no new verdict.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from tally import results
from tally.errors import TallyError
from tally.evaluation import intervals
from tally.evaluation import metrics as evaluation

RUNS_DIR = "runs"
ALPHA = 1 - intervals.LEVEL


# the table's summary columns (report.py's, so `tally report` and `tally benchmark` read alike)
SUMMARY = {"pair_acc_mean": "avg pair", "domain_acc_worst": "worst domain", "class_acc_worst": "worst class",
           "pair_acc_worst": "worst pair", "shot_many": "many", "shot_medium": "medium", "shot_few": "few",
           "shot_zero": "zero", "macro_f1": "macro F1"}
DIFFERENCE_METRICS = ("pair_acc_mean", "pair_acc_worst", "class_acc_worst", "domain_acc_worst", "shot_few",
                      "shot_zero", "macro_f1")
VERDICT_RULE = ("better / worse: the paired 95% interval of (method - baseline) on the same test images lies above "
                "/ below 0 for every seed; otherwise no clear difference")


def test_split(setting: str) -> str:
    """The test split a setting is scored on: test_sub, or the held-out domain's own test split."""
    return "test_sub" if setting == "sub" else f"test_domain:{setting.removeprefix('heldout-')}"

# ---------------------------------------------------------------- tables
def run_values(exp_dir: Path, plan: pd.DataFrame, replicates: int = intervals.REPLICATES,
               bootstrap_seed: int = intervals.SEED) -> pd.DataFrame:
    """Long table of every finished run's numbers on its setting's test split: run, method, setting,
    seed, metric, value, half (its 95% interval's half-width over the test images) and small (cells
    of < 5 images under a worst-case value). Metrics are the run's metrics.json; ``domain_acc:<d>``
    its eval.parquet's."""
    rows = []
    for p in plan.itertuples(index=False):
        run_dir = Path(exp_dir) / RUNS_DIR / p.run
        metrics = results.clean_metrics(results.read_json(run_dir / "metrics.json")) or {}
        table = results.read_parquet(run_dir / "eval.parquet")
        if p.split not in metrics or table is None:
            continue
        values = dict(metrics[p.split])
        # calibration (issue 24): extra metrics from calibration.json, when the run kept its logits
        values.update((results.clean_metrics((results.read_json(run_dir / "calibration.json") or {})
                                             .get("metrics")) or {}).get(p.split, {}))
        counts = evaluation.count_arrays(table, p.split)
        names = evaluation.accuracy_grid(table, p.split, "n").index
        for name, acc in zip(names, evaluation.domain_accuracies(counts["n"], counts["correct"]), strict=True):
            if not math.isnan(acc):
                values[intervals.DOMAIN_PREFIX + str(name)] = float(acc)
        try:
            iv = intervals.run_intervals(run_dir, splits=[p.split], replicates=replicates,
                                         seed=bootstrap_seed).set_index("metric")
        except TallyError:  # e.g. predictions that disagree with the table: the values still show
            iv = pd.DataFrame(columns=["low", "high", "small_cells"])
        rows += [{"run": p.run, "method": p.method, "setting": p.setting, "seed": p.seed, "metric": m,
                  "value": v,
                  "half": (iv.at[m, "high"] - iv.at[m, "low"]) / 2 if m in iv.index else math.nan,
                  "small": int(iv.at[m, "small_cells"]) if m in iv.index else 0} for m, v in values.items()]
    return pd.DataFrame(rows, columns=["run", "method", "setting", "seed", "metric", "value", "half", "small"])


def seed_table(values: pd.DataFrame) -> pd.DataFrame:
    """method, setting, metric -> mean, stderr (seed spread and shared test-set noise), n (seeds), values
    (each seed's) and small (the most cells of < 5 images under a seed's worst-case value), via
    intervals.seed_summary."""
    parts = []
    if "half" not in values:
        values = values.assign(half=math.nan, small=0)
    for (method, setting), rows in values.groupby(["method", "setting"], sort=False):
        by_seed = {str(s): dict(zip(r["metric"], r["value"], strict=True)) for s, r in rows.groupby("seed")}
        half = {str(s): dict(zip(r["metric"], r["half"], strict=True)) for s, r in rows.groupby("seed")}
        summary = intervals.seed_summary(by_seed, half)
        small = rows.groupby("metric")["small"].max()
        parts.append(summary.assign(method=method, setting=setting,
                                    small=summary["metric"].map(small).fillna(0).astype(int)))
    columns = ["method", "setting", "metric", "mean", "stderr", "n", "values", "small"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def paired_differences(exp_dir: Path, plan: pd.DataFrame, baselines: list[str], replicates: int = 1000,
                       bootstrap_seed: int = 0, level: float = intervals.LEVEL) -> pd.DataFrame:
    """Per seed and setting: every other method minus each baseline's run with the same seed, on the
    setting's test split (``intervals.compare_runs`` at ``level``; rows metric, diff, low, high)."""
    baselines = [baselines] if isinstance(baselines, str) else list(baselines)
    done = plan[[(Path(exp_dir) / RUNS_DIR / r / "metrics.json").is_file() for r in plan["run"]]]
    rows = []
    for baseline in baselines:
        base = done[done["method"] == baseline].set_index(["setting", "seed"])["run"]
        for p in done[~done["method"].isin(baselines)].itertuples(index=False):
            other = base.get((p.setting, p.seed))
            if other is None:
                continue
            frame, _ = intervals.compare_runs(Path(exp_dir) / RUNS_DIR / p.run, Path(exp_dir) / RUNS_DIR / other,
                                              splits=[p.split], replicates=replicates, seed=bootstrap_seed,
                                              level=level)
            rows.append(frame.drop(columns=["split"]).assign(method=p.method, baseline=baseline,
                                                              setting=p.setting, seed=p.seed))
    columns = ["method", "baseline", "setting", "seed", "metric", "a", "b", "diff", "low", "high", "small_cells"]
    return pd.concat(rows, ignore_index=True)[columns] if rows else pd.DataFrame(columns=columns)


def _verdict(r: pd.DataFrame) -> str:
    if r["diff"].isna().all():
        return "n/a"
    return "better" if (r["low"] > 0).all() else "worse" if (r["high"] < 0).all() else "no clear difference"


def difference_summary(per_seed: pd.DataFrame, adjust: str = "none") -> pd.DataFrame:
    """Across seeds: mean difference ± standard error, the per-seed intervals, and the verdict
    (VERDICT_RULE); ``comparisons`` is how many verdicts were made (the same on every row) and
    ``adjust`` how they were adjusted for that (``tables`` computes Holm's)."""
    rows = []
    for (method, baseline, setting, metric), r in per_seed.groupby(["method", "baseline", "setting", "metric"],
                                                                   sort=False):
        diffs = r["diff"].to_numpy(float)
        k = len(diffs)
        rows.append({"method": method, "baseline": baseline, "setting": setting, "metric": metric,
                     "mean_diff": float(diffs.mean()),
                     "stderr": float(diffs.std(ddof=1) / math.sqrt(k)) if k > 1 else math.nan, "seeds": k,
                     "per_seed": tuple(zip(r["seed"].tolist(), diffs.tolist(), r["low"].tolist(),
                                           r["high"].tolist(), strict=True)),
                     "small": int(r["small_cells"].max()) if "small_cells" in r else 0,
                     "verdict": _verdict(r)})
    out = pd.DataFrame(rows, columns=["method", "baseline", "setting", "metric", "mean_diff", "stderr",
                                      "seeds", "per_seed", "small", "verdict"])
    return out.assign(comparisons=int((out["verdict"] != "n/a").sum()), adjust=adjust)


def _holm(exp_dir, plan, baselines, per_seed: pd.DataFrame, replicates: int, bootstrap_seed: int) -> pd.DataFrame:
    """Holm's step-down over the comparisons: with j verdicts made, the rest are judged on intervals at
    level 1 - ALPHA / (m - j); repeated until a round adds none. Returns per_seed with the intervals
    each comparison was judged on."""
    keys = ["method", "baseline", "setting", "metric"]
    judged = per_seed.copy()
    comparisons = [k for k, r in per_seed.groupby(keys, sort=False) if not r["diff"].isna().all()]
    m, decided = len(comparisons), set()
    while len(decided) < m:
        level = 1 - ALPHA / (m - len(decided))
        now = paired_differences(exp_dir, plan, baselines, replicates, bootstrap_seed, level)
        new = {k for k, r in now.groupby(keys, sort=False)
               if k in comparisons and k not in decided and _verdict(r) in ("better", "worse")}
        open_rows = ~judged.set_index(keys).index.isin(list(decided))
        judged.loc[open_rows, ["low", "high"]] = now.loc[open_rows, ["low", "high"]].to_numpy()
        if not new:
            break
        decided |= new
    return judged


def tables(exp_dir: Path, plan: pd.DataFrame, baselines: list[str], replicates: int = 1000,
           bootstrap_seed: int = 0, adjust: str = "none") -> dict[str, pd.DataFrame]:
    """Everything a benchmark shows, from the store alone: ``values`` (per run), ``table`` (over seeds),
    ``differences`` (per seed) and ``difference_summary``. The dashboard's benchmark view reads these.
    ``adjust``: "none" (the default; the summary says how many comparisons were made) or "holm"."""
    values = run_values(exp_dir, plan, replicates, bootstrap_seed)
    per_seed = paired_differences(exp_dir, plan, baselines, replicates, bootstrap_seed)
    if adjust == "holm" and len(per_seed):
        per_seed = _holm(exp_dir, plan, baselines, per_seed, replicates, bootstrap_seed)
    return {"values": values, "table": seed_table(values), "differences": per_seed,
            "difference_summary": difference_summary(per_seed, adjust)}


# A tuned benchmark's selection rules (tally.search.tuning runs them; readers such as the dashboard name them)
RULES = {"train_val": "training-domain validation", "lodo": "leave-one-domain-out cross-validation",
         "oracle": "oracle (test domain)"}
# how each rule reads the trials, in one line (the report and the dashboard show it beside the rule)
RULE_NOTES = {
    "train_val": "the best epoch of each trial by the training domains' validation split",
    "lodo": "each trial's config trained again once per training domain Di with Di held out as well; its score "
            "is the mean over Di of the selection metric on Di at the last epoch (no early stopping); the pick "
            "is re-run holding out the test domain only, keeping its last epoch",
    "oracle": "the best epoch of each trial by the held-out test domain itself (an upper bound, not a protocol)",
}
EARLY_STOPPING = "none: every trial trains the full budget"


def budget_text(tune: dict) -> str:
    """The equal tuning budget of a tuned benchmark's ``tune`` section, in one sentence."""
    return (f"every method {tune['trials']} trials ({tune['sampler']} sampler, sampler seed {tune['sampler_seed']}, "
            f"trial 0 its default point), each trained with seed {tune['trial_seed']} and the same model and "
            f"training budget, early stopping {EARLY_STOPPING}; each rule's pick re-run with "
            f"{tune['seeds']} seed(s)")


def load_benchmark(exp_dir: str | Path, rule: str | None = None) -> dict[str, pd.DataFrame]:
    """``tables`` of a benchmark folder (its stored plan and spec), for readers such as the dashboard;
    of a tuned one, the tables of one selection rule (default: the first, training-domain validation)."""
    exp_dir = Path(exp_dir)
    plan, spec = results.read_parquet(exp_dir / "plan.parquet"), results.read_yaml(exp_dir / "spec.yaml")
    if plan is None or spec is None:
        raise TallyError(f"{exp_dir}: not a benchmark folder (no plan.parquet / spec.yaml)")
    if "rule" in plan.columns:  # a tuned benchmark: never mix two rules' re-runs in one table
        plan = plan[plan["rule"] == (rule or spec["tune"]["rules"][0])]
    return tables(exp_dir, plan, spec["baseline"], **spec.get("report", {}))


# ---------------------------------------------------------------- formatting
def wide_table(table: pd.DataFrame, setting: str) -> pd.DataFrame:
    """One setting as report.format_table's frame: a row per method, a column per domain and summary
    metric, with ``:se``, ``:values`` and ``:small`` companions."""
    rows = []
    part = table[table["setting"] == setting]
    domains = [m for m in dict.fromkeys(part["metric"]) if m.startswith(intervals.DOMAIN_PREFIX)]
    labels = {**{m: m[len(intervals.DOMAIN_PREFIX):] for m in domains}, **SUMMARY}
    for method, r in part.groupby("method", sort=False):
        by_metric = r.set_index("metric")
        row = {"method": method, "seeds": str(int(by_metric["n"].max()))}
        for metric, label in labels.items():
            if metric in by_metric.index:
                row[label], row[label + ":se"] = by_metric.at[metric, "mean"], by_metric.at[metric, "stderr"]
                row[label + ":values"] = by_metric.at[metric, "values"]
                if "small" in by_metric:
                    row[label + ":small"] = by_metric.at[metric, "small"]
            else:
                row[label], row[label + ":se"], row[label + ":values"] = math.nan, math.nan, ()
        rows.append(row)
    return pd.DataFrame(rows)


def format_difference_rows(summary: pd.DataFrame, setting: str) -> list[str]:
    """Markdown rows: metric | mean ± SE | per seed: diff [low, high] (!k) | verdict (percentage points)."""
    lines = []
    for r in summary[summary["setting"] == setting].itertuples(index=False):
        if math.isnan(r.mean_diff):  # undefined on this split (e.g. few-shot pairs of a held-out domain)
            continue
        se = "" if math.isnan(r.stderr) else f" ± {100 * r.stderr:.1f}"
        seeds = "; ".join(f"s{s}: {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" for s, d, lo, hi in r.per_seed)
        small = f" !{r.small}" if getattr(r, "small", 0) else ""
        lines.append(f"| {r.method} - {r.baseline} | {evaluation.metric_label(r.metric)} | "
                     f"{100 * r.mean_diff:+.1f}{se} | {seeds}{small} | {r.verdict} |")
    return lines


def markdown(out: dict[str, pd.DataFrame], metrics=DIFFERENCE_METRICS) -> str:
    """The benchmark's tables (percent; mean ± SE over seeds, then each seed), each with its legend line,
    and the paired differences with the verdict line (rule, number of comparisons, adjustment)."""
    from tally.evaluation.report import format_table, legend

    blocks = []
    for setting in dict.fromkeys(out["table"]["setting"]):
        wide = wide_table(out["table"], setting)
        blocks.append(f"### {setting} ({test_split(setting)})\n\n" + format_table(wide) + "\n\n" + legend(wide))
        diff = out["difference_summary"]
        diff = diff[diff["metric"].isin(metrics)]
        if len(diff[diff["setting"] == setting]):
            blocks.append("paired differences (percentage points; " + intervals.LEGEND_DIFF.replace("[ ]", "per seed, [ ]")
                          + ")\n\n| comparison | metric | mean ± SE over seeds | per seed | verdict |\n|---|---|---|---|---|\n"
                          + "\n".join(format_difference_rows(diff, setting)))
    blocks.append(verdict_line(out["difference_summary"]))
    return "\n\n".join(blocks) + "\n"


def verdict_line(summary: pd.DataFrame) -> str:
    """The verdict rule, how many comparisons were made and how they were adjusted, in one line."""
    m = int(summary["comparisons"].iat[0]) if len(summary) and "comparisons" in summary else 0
    adjust = str(summary["adjust"].iat[0]) if len(summary) and "adjust" in summary else "none"
    how = ("Holm-adjusted over them (report.adjust: holm)" if adjust == "holm" else
           "not adjusted for multiplicity (report.adjust: none, the default; holm adjusts)")
    return f"verdict rule: {VERDICT_RULE}; {m} comparisons, {how}."


def latex(out: dict[str, pd.DataFrame]) -> str:
    from tally.evaluation.report import format_table

    return "\n".join(f"% {setting} ({test_split(setting)})\n" + format_table(wide_table(out["table"], setting), "latex")
                     for setting in dict.fromkeys(out["table"]["setting"]))


def write_tables(exp_dir: Path, out: dict[str, pd.DataFrame]) -> None:
    """table.md, table.tex, table.csv (over seeds), runs.csv (per run), differences.csv (per seed) and
    difference_summary.csv in the benchmark folder."""
    exp_dir = Path(exp_dir)
    results.write_text(exp_dir / "table.md", markdown(out))
    results.write_text(exp_dir / "table.tex", latex(out))
    csv = out["table"].assign(values=out["table"]["values"].map(lambda v: " ".join(f"{x:.6g}" for x in v)))
    results.write_text(exp_dir / "table.csv", csv.to_csv(index=False))
    results.write_text(exp_dir / "runs.csv", out["values"].to_csv(index=False))
    results.write_text(exp_dir / "differences.csv", out["differences"].to_csv(index=False))
    summary = out["difference_summary"]
    summary = summary.assign(per_seed=summary["per_seed"].map(
        lambda t: " ".join(f"{s}:{d:.6g}[{lo:.6g},{hi:.6g}]" for s, d, lo, hi in t)))
    results.write_text(exp_dir / "difference_summary.csv", summary.to_csv(index=False))


