"""The accuracy-grid section of the dashboard: one trial's domain x class grids, readable at any size.

The subpopulation (test_sub) and held-out-domain grids stand side by side, in one class order (training
count within a domain, name, or accuracy) under the classes' training-count profile. Cells show the
accuracy only; training count and test n are on hover. Above ``grids.LARGE_GRID_CLASSES`` classes the
cells carry no text (a zoomable overview) and the grid is read through the shot-bucket summary and the
k worst pairs, both shown for every grid size.
"""

from __future__ import annotations

import streamlit as st

from tally.dashboard import cache, calibration_views, grids, views
from tally.dashboard import data as dd

ALL_DOMAINS = "all domains"


def grid_view(trials: dd.TrialSet, trial_id: str) -> None:
    from tally.dashboard import charts  # plotly: imported when a chart is drawn

    run = cache.run(dd.trial_dir(trials, trial_id))
    table = run.eval_table
    if table is None or table.empty:
        views.missing(run, trial_id, "evaluation table (eval.parquet)")
        return
    for note in [m for m in run.missing if m.startswith("eval.parquet")]:
        st.caption(f"Note: {dd.plain(note)}")
    splits = dd.table_splits(table)
    tests = dd.test_splits(splits) or splits
    counts = grids.training_counts(table)
    n_classes = counts.shape[1]
    name = trials.name

    c1, c2, c3 = st.columns(3)
    by = c1.selectbox("Order classes by", grids.ORDERS, key=f"grid_order:{name}",
                      help="Training count: most first, so the long tail runs left to right. "
                           "Accuracy: best first, on the split chosen on the right.")
    domains = [ALL_DOMAINS, *(str(d) for d in counts.index)]
    within = c2.selectbox("Within domain", domains, key=f"grid_domain:{name}",
                          help="Rank by one domain's training counts (or accuracies) instead of all domains'; "
                               "the profile above the grids follows.")
    split = c3.selectbox("Split for accuracy order, shot buckets and worst pairs", splits,
                         index=splits.index(tests[0]) if tests else 0, key=f"detail_split:{name}")
    domain = None if within == ALL_DOMAINS else within
    order = grids.class_order(table, by, domain, split)
    profile = grids.profile(table, order, domain)
    label = f"training count ({within})"

    for start in range(0, len(tests), 2):
        cols = st.columns(2)
        for col, test in zip(cols, tests[start:start + 2], strict=False):
            g, dropped = grids.grid(table, test).without_empty_domains()
            fig = charts.accuracy_heatmap(g.ordered(order), f"{test}: pair accuracy ({trial_id})", profile, label)
            col.plotly_chart(fig, key=f"grid:{test}", config={"scrollZoom": True, "displaylogo": False})
            if dropped:
                col.caption(f"Not in {test} (no test examples): {', '.join(dropped)}")
    if n_classes > grids.LARGE_GRID_CLASSES:
        st.info(f"{n_classes} classes: the cells carry no text. Drag to zoom (the profile follows), "
                "double-click to reset, hover a cell for its accuracy, training count and test n; "
                "the shot buckets and the worst pairs below summarise the grid.")
    else:
        st.caption("Cells: pair accuracy (hover for training count and test n); blank = no test examples. "
                   f"Bars above: {label} of each class.")

    g, _ = grids.grid(table, split).without_empty_domains()
    left, right = st.columns([2, 3])
    with left:
        shots = grids.shot_table(g)
        st.plotly_chart(charts.shot_heatmap(shots, f"{split}: accuracy by shot bucket"), key="grid_shots")
        st.caption(f"Buckets by the pair's training count: many > {grids.MANY_ABOVE}, few 1..{grids.FEW_AT_MOST}, "
                   "zero 0, medium between (the evaluator's shot_* metrics).")
        views.data_table(shots, "shots", f"{name}-{trial_id}-{split}-shots.csv", hide_index=False,
                         column_config={b: st.column_config.NumberColumn(b, format="%.3f") for b in grids.SHOT_BUCKETS})
    with right:
        k = st.number_input("Worst pairs (k)", min_value=1, max_value=1000, step=5, key=f"worst_k:{name}",
                            value=20 if n_classes > grids.LARGE_GRID_CLASSES else 10)
        st.markdown(f"**The {int(k)} worst pairs on {dd.plain(split)}** (lowest accuracy; ties: more test examples first)")
        views.data_table(grids.worst_pairs(table, split, int(k)), "worst_pairs",
                         f"{name}-{trial_id}-{split}-worst-pairs.csv",
                         column_config={"acc": st.column_config.NumberColumn(format="%.3f")},
                         height=min(35 * (int(k) + 1) + 3, 738))  # all k rows visible up to 20

    calibration_views.calibration_section(run.path, trial_id, split)  # issue 24: beside the grids
    views.run_metrics_section(run, trial_id, splits, "trial_metrics", f"{name}-{trial_id}-metrics.csv")
    with st.expander(f"{dd.plain(split)} grid as a table (accuracy, then training counts)"):
        full = grids.grid(table, split).ordered(order)
        views.data_table(full.acc.round(3), "grid_acc", f"{name}-{trial_id}-{split}-accuracy.csv", hide_index=False)
        views.data_table(full.n_train, "grid_ntrain", f"{name}-{trial_id}-{split}-n_train.csv", hide_index=False)
