"""The benchmark section of the dashboard: a `tally benchmark` folder's over-seeds table (mean ± SE per
setting) and its paired differences against the baseline, with intervals and verdicts.

Numbers are ``tally.evaluation.benchmark_tables.load_benchmark``'s (the tables `tally benchmark` writes), read
through the cache; ``uncertainty`` only reshapes them. Every table has a CSV download.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from tally.dashboard import cache, views
from tally.dashboard import data as dd
from tally.dashboard import uncertainty as dun


def benchmark_view(exp_dir: Path) -> None:
    from tally.evaluation import benchmark_tables as benchmark

    name = exp_dir.name
    st.subheader(f"Benchmark {dd.plain(name)}")
    out = cache.benchmark(exp_dir)
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
