"""The search sections of the dashboard: learning curves, how the search went (progress, importance,
parallel coordinates, Optuna's slice and contour plots) and the timeline of trials.

What optuna-dashboard users look for, drawn from the results store (so they work without study.db and
for trials Optuna never saw, e.g. failed ones); numbers from ``search_data`` and ``progress``.
"""

from __future__ import annotations

import streamlit as st

from tally.dashboard import cache, progress, views
from tally.dashboard import data as dd
from tally.dashboard import search_data as dsearch
from tally.dashboard import uncertainty as dun

MAX_CURVE_TRIALS = 12


def curves_view(trials: dd.TrialSet, trial_id: str) -> None:
    """Per-epoch curves of chosen trials, then one metric per epoch for every trial (stopped ones too)."""
    from tally.dashboard import charts  # plotly: imported when a chart is drawn
    ids = trials.frame["trial_id"].tolist()
    chosen = st.multiselect("Trials", ids, default=[trial_id] if trial_id in ids else ids[:1],
                            key=f"curve_trials:{trials.name}", max_selections=MAX_CURVE_TRIALS)
    epochs = {t: cache.run(dd.trial_dir(trials, t)).epochs for t in chosen}
    frame = dsearch.curves(epochs)
    empty = [t for t, df in epochs.items() if df.empty]
    if empty:
        st.caption(f"No epochs.jsonl lines yet for: {dd.plain(', '.join(empty))}")
    if frame.empty:
        st.info("No per-epoch records for the chosen trials.")
    else:
        metrics = dsearch.curve_metrics(frame)
        vals = [m for m in metrics if m != "train_loss"]
        default = trials.selection.metric if trials.selection.metric in vals else (vals[0] if vals else None)
        warm = dsearch.warmup_end(next(df for df in epochs.values() if not df.empty))
        left, right = st.columns(2)
        if "train_loss" in metrics:
            left.plotly_chart(charts.curves_figure(frame, "train_loss", warm), key="curve_loss")
        if vals:
            metric = right.selectbox("Validation metric", vals, index=vals.index(default), key="curve_metric")
            right.plotly_chart(charts.curves_figure(frame, metric, warm), key="curve_metric_chart")

    st.markdown("**Every trial** (intermediate values: trials stopped early by the scheduler end where it "
                "stopped them)")
    started = trials.frame.loc[trials.frame["status"] != "pending", "trial_id"].tolist()
    values = dsearch.intermediate_values(trials, cache.epochs(trials, started))
    if values.empty:
        st.info(f"No trial has per-epoch {trials.selection.metric} yet.")
        return
    st.plotly_chart(charts.intermediate_figure(values, trials.selection.metric), key="intermediate")
    views.data_table(values, "intermediate", f"{trials.name}-intermediate-values.csv")


def search_view(trials: dd.TrialSet) -> None:
    """How the search went: metric by trial order, parameter importance, parallel coordinates, and
    Optuna's slice and contour plots of the metric against the parameters."""
    from tally.dashboard import charts  # plotly: imported when a chart is drawn
    metric = trials.selection.metric
    prog = dsearch.search_progress(trials)
    if prog.empty:
        st.info(f"No trial has {dd.plain(metric)} yet.")
        return
    st.plotly_chart(charts.progress_figure(prog, metric), key="progress")
    if trials.selection.objectives:
        pareto_section(trials)
    left, right = st.columns([2, 3])
    with left:
        imp = cache.importance(trials)
        if imp.values.empty:
            st.info(f"Parameter importance {dd.plain(imp.method)}.")
        else:
            st.plotly_chart(charts.importance_bars(imp.values, "Parameter importance"), key="importance")
            st.caption(dd.plain(imp.method))
    with right:
        dims, color = dsearch.parallel_dimensions(trials)
        if len(dims) < 2:
            st.info("Parallel coordinates need searched parameters and finished trials.")
        else:
            st.plotly_chart(charts.parallel_figure(dims, color, metric), key="parallel")
            st.caption("One line per finished trial; drag along an axis to filter.")

    study, params = cache.param_study(trials)
    done = len(study.trials)
    if not params or done < 2:
        st.info("Slice and contour plots need two finished trials and a parameter that varies.")
        return
    shown = st.multiselect("Parameters (slice plot)", params, default=params[:4], key=f"slice_params:{trials.name}")
    if shown:
        st.plotly_chart(charts.slice_figure(study, shown, metric), key="slice")
    if len(params) >= 2:
        c1, c2 = st.columns(2)
        x = c1.selectbox("Contour x", params, index=0, key=f"contour_x:{trials.name}")
        y = c2.selectbox("Contour y", params, index=1, key=f"contour_y:{trials.name}")
        if x == y:
            st.info("Pick two different parameters for the contour plot.")
        else:
            st.plotly_chart(charts.contour_figure(study, x, y, metric), key="contour")
    st.caption(f"Slice and contour: Optuna's plots over the {done} trials that ran to the end ('done'), "
               f"{metric} as the target.")


def pareto_section(trials: dd.TrialSet) -> None:
    """A multi-objective search: its two objectives, the Pareto front and the trial the rule picks."""
    from tally.dashboard import charts  # plotly: imported when a chart is drawn
    x, y = trials.selection.objectives
    points = dun.pareto_points(trials)
    if points.empty:
        st.info(f"The Pareto front appears when a trial finishes with both {dd.plain(x)} and {dd.plain(y)}.")
        return
    st.plotly_chart(charts.pareto_figure(points, x, y, trials.selection.tolerance, trials.selection.modes),
                    key="pareto")
    st.caption(f"Pick: {dd.plain(trials.selection.source)}. Shaded: within the tolerance of the best {dd.plain(x)}. "
               f"{int(points['front'].sum())} of {len(points)} finished trials are on the front.")
    views.data_table(points, "pareto", f"{trials.name}-pareto.csv")


def timeline_view(trials: dd.TrialSet) -> None:
    """Start to end of every trial, coloured by status, one lane per trial or per node."""
    from tally.dashboard import charts  # plotly: imported when a chart is drawn
    frame = progress.timeline(trials)
    if frame.empty:
        st.info("No trial has started yet.")
        return
    lane = st.radio("One lane per", ["trial_id", "node"], horizontal=True, key=f"timeline_lane:{trials.name}",
                    format_func={"trial_id": "trial", "node": "node"}.get)
    st.plotly_chart(charts.timeline_figure(frame, lane), key="timeline")
    st.caption("A running trial's bar ends now; times are those its status.json recorded.")
    views.data_table(frame, "timeline", f"{trials.name}-timeline.csv",
                     column_config={"duration_s": st.column_config.NumberColumn("duration (s)", format="%.0f")})
