"""The benchmark section of the dashboard: a `tally benchmark` folder's over-seeds table (mean ± SE per
setting) and its paired differences against the baseline, with intervals and verdicts; of a tuned
benchmark (`tune:`), one rule's tables at a time, and the tuning curves, picks and cost per method.

Numbers are ``tally.evaluation.benchmark_tables.load_benchmark``'s (the tables `tally benchmark` writes), read
through the cache; ``uncertainty`` only reshapes them. Every table has a CSV download.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from tally import results
from tally.dashboard import cache, charts, views
from tally.dashboard import data as dd
from tally.dashboard import uncertainty as dun


def benchmark_view(exp_dir: Path) -> None:
    from tally.evaluation import benchmark_tables as benchmark

    name = exp_dir.name
    st.subheader(f"Benchmark {dd.plain(name)}")
    rules = _rules(exp_dir)
    rule = None
    if rules:  # a tuned benchmark: one table per selection rule; the oracle is labelled as such
        rule = st.radio("Selection rule (picks both the trial and the epoch)", rules, horizontal=True,
                        key=f"bench_rule:{name}", format_func=lambda r: benchmark.RULES.get(r, r))
        st.caption(f"{benchmark.RULES.get(rule, rule)}: {benchmark.RULE_NOTES.get(rule, 'an unknown rule')}.")
    out = cache.benchmark(exp_dir, rule)
    settings = dun.benchmark_settings(out)
    if not settings:
        st.info(f"No finished benchmark run in {dd.plain(exp_dir / benchmark.RUNS_DIR)} yet: the table appears as runs finish "
                "(`tally benchmark SPEC` resumes an unfinished one).")
        return
    setting = st.selectbox("Setting", settings, key=f"bench_setting:{name}",
                           format_func=lambda s: f"{s} (test split {benchmark.test_split(s)})")
    table = dun.seed_frame(out, setting)
    st.markdown(f"**{dd.plain(setting)}: mean over seeds and its standard error (SE)**, on the setting's test split; "
                "each seed's value is in the full CSV")
    st.caption(dun.SEED_LEGEND + (" With 2-3 seeds the spread is itself uncertain (an SE from 2-3 values can be "
                                  "far off)." if table["seeds"].astype(int).min() <= 3 else ""))
    number = {c: st.column_config.NumberColumn(c, format="%.4f") for c in table.columns if c not in ("method", "seeds")}
    views.data_table(table, "bench_table", f"{name}-{setting}-table.csv", column_config=number)
    full = out["table"][out["table"]["setting"] == setting]
    st.download_button("Download CSV (every metric, each seed's value)", lambda: dd.csv_bytes(full),
                       file_name=f"{name}-{setting}-seeds.csv", mime="text/csv", key="csv_bench_seeds",
                       on_click="ignore", type="tertiary", icon=":material/download:")

    diff = dun.difference_frame(out, setting)
    st.markdown(f"**{dd.plain(setting)}: paired differences against the baseline** (method - baseline; mean ± SE over "
                "seeds, and each seed's 95% paired interval on the same test images)")
    st.caption(dun.LEGEND_DIFF + ".")
    if diff.empty:
        st.info("No paired differences: the baseline's and the methods' runs of a seed are not both finished.")
    else:
        views.data_table(diff, "bench_diff", f"{name}-{setting}-differences.csv", column_config={
            "mean_diff": st.column_config.NumberColumn("mean diff", format="%+.4f"),
            "stderr": st.column_config.NumberColumn("SE", format="%.4f")})
    st.caption(benchmark.verdict_line(out["difference_summary"]))
    if rules:
        tuning_view(exp_dir, setting)


def _rules(exp_dir: Path) -> list[str]:
    spec = results.read_yaml(exp_dir / "spec.yaml") or {}
    return list((spec.get("tune") or {}).get("rules") or [])


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def tuning_view(exp_dir: Path, setting: str) -> None:
    """The tuning report of a tuned benchmark: the equal budget, each rule's pick, the tuning curves
    and each method's cost (the CSVs `tally benchmark` writes beside table.md)."""
    from tally.evaluation.benchmark_tables import RULES, budget_text

    name = exp_dir.name
    spec = results.read_yaml(exp_dir / "spec.yaml") or {}
    st.markdown(f"**Tuning**: {budget_text(spec['tune'])}")
    curves, picks, cost = (_csv(exp_dir / f"{k}.csv") for k in ("curves", "picks", "cost"))
    if curves is None or picks is None:
        st.info("The tuning report appears once every method's trials are done.")
        return
    part = curves[curves["setting"] == setting]
    if not part.empty:
        st.plotly_chart(charts.tuning_curves_figure(part, f"{setting}: best training-domain validation value "
                                                          "vs trials (95% interval over trial orders)"),
                        key=f"bench_curves:{name}:{setting}")
    picked = picks[picks["setting"] == setting].assign(rule=lambda f: f["rule"].map(lambda r: RULES.get(r, r)))
    st.markdown("**What each rule picked** (its trial, the rule's value of it, the kept epoch)")
    views.data_table(picked, "bench_picks", f"{name}-{setting}-picks.csv")
    folds = _csv(exp_dir / "lodo_folds.csv")
    if folds is not None:
        st.markdown("**Leave-one-domain-out runs** (each trial's config trained with one training domain held out "
                    "as well; value: the selection metric on that domain at the last epoch; a trial's lodo score is "
                    "the mean of its rows)")
        views.data_table(folds[folds["setting"] == setting], "bench_lodo", f"{name}-{setting}-lodo.csv")
    if cost is not None:
        st.markdown("**Cost per method** (trials, lodo runs and re-runs; wall time is the training epochs' own)")
        views.data_table(cost, "bench_cost", f"{name}-cost.csv")
