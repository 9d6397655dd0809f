"""The dashboard's sections: each function lays out one view with Streamlit.

Numbers come from ``tally.dashboard.data`` (hence from the evaluator's long table) and figures from
``charts``; this module only arranges them and explains what is missing, never raises on partial data.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pandas as pd
import streamlit as st
import yaml

from tally import results
from tally.dashboard import cache
from tally.dashboard import data as dd
from tally.dashboard import search_data as dsearch

MAX_CURVE_TRIALS = 12


def _fmt(value) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(value) else f"{value:.4f}"


def _metric_table(frame: pd.DataFrame) -> None:
    """Metrics (rows) by split or trial (columns), every row visible, 4 decimals."""
    config = {c: st.column_config.NumberColumn(str(c), format="%.4f") for c in frame.columns}
    st.dataframe(frame, column_config=config, height=35 * (len(frame) + 1) + 3)


# ---------------------------------------------------------------- experiment level
def experiment_list(overviews: list[dict]) -> None:
    """All experiments under the root with their status counts and best values."""
    frame = pd.DataFrame(overviews)
    statuses = [c for c in frame.columns if c in results.STATUSES]
    frame[statuses] = frame[statuses].fillna(0).astype(int)  # a status one experiment lacks counts 0
    st.dataframe(frame, hide_index=True,
                 column_config={"best_value": st.column_config.NumberColumn("best value", format="%.4f")})


def header(trials: dd.TrialSet) -> None:
    """Status counts, the best trial by the validation selection metric, the spec and store notes."""
    counts = dd.status_counts(trials.frame)
    shown = [s for s in counts if s in dd.SHOWN_STATUSES or counts[s]]
    cols = st.columns(len(shown) + 1)
    cols[0].metric("trials", len(trials.frame))
    for col, status in zip(cols[1:], shown, strict=True):
        col.metric(status, counts[status])
    sel = trials.selection
    best = results.best_trial(trials.frame, trials.selection.metric, trials.selection.mode)
    if best is None:
        st.info(f"No finished trial has {sel.metric} yet: the best trial appears when one finishes.")
    else:
        st.success(f"Best trial: **{best['trial_id']}**, {sel.metric} = {_fmt(best[sel.metric])} "
                   f"({sel.mode}, {sel.source})")
    with st.expander("Search spec (spec.yaml)"):
        if trials.spec is None:
            st.caption("This experiment has no spec.yaml.")
        else:
            st.code(yaml.safe_dump(trials.spec, sort_keys=False), language="yaml")
    for note in trials.notes:
        st.caption(f"Note: {note}")


def trial_picker(trials: dd.TrialSet, label: str, key: str, default: str | None,
                 only_with_results: bool = False) -> str | None:
    """A selectbox of trials labelled with status and selection value."""
    frame = trials.frame
    if only_with_results:
        has = frame["status"].isin(dd.FINISHED)
        frame = frame[has] if has.any() else frame
    ids = frame["trial_id"].tolist()
    if not ids:
        return None
    metric = trials.selection.metric
    values = frame[metric] if metric in frame.columns else pd.Series(float("nan"), index=frame.index)
    labels = {t: f"{t} ({s}, {_fmt(v)})" for t, s, v in zip(ids, frame["status"], values, strict=True)}
    index = ids.index(default) if default in ids else 0
    return st.selectbox(label, ids, index=index, key=key, format_func=lambda t: labels.get(t, t))


# ---------------------------------------------------------------- trials table
def trials_view(trials: dd.TrialSet) -> None:
    """Sortable, filterable trials table; failed trials' errors below it."""
    frame = trials.frame
    if frame.empty:
        st.info("No trials yet: they appear here as the search starts them.")
        return
    seen = set(frame["status"])
    present = [s for s in dict.fromkeys([*dd.SHOWN_STATUSES, *frame["status"]]) if s in seen]
    c1, c2, c3 = st.columns([2, 2, 3])
    statuses = c1.multiselect("Status", present, default=present, key=f"status_filter:{trials.name}")
    text = c2.text_input("Filter (any shown column contains)", key=f"text_filter:{trials.name}")
    names = dd.metric_names(frame)
    metrics = c3.multiselect("Metrics", names, key=f"metrics:{trials.name}",
                             default=[m for m in dd.DEFAULT_TABLE_METRICS if m in names])
    cols = dd.table_columns(trials, metrics)
    shown = dd.filter_trials(frame, statuses, text, columns=cols)
    config = {"duration_s": st.column_config.NumberColumn("duration (s)", format="%.0f"),
              "error": st.column_config.TextColumn("error", width="large")}
    for col in cols:
        if "/" in col and not col.startswith(("param.", "config.")):
            config[col] = st.column_config.NumberColumn(col, format="%.4f")
    st.caption(f"{len(shown)} of {len(frame)} trials; click a column header to sort.")
    with st.container(key="trials_table"):  # a stable CSS hook (st-key-trials_table) for browser tests
        st.dataframe(shown[cols], hide_index=True, column_config=config)
    failed = dd.failed_errors(shown)
    if failed:
        st.markdown(f"**Failed trials ({len(failed)})**")
        for trial_id, error in failed:
            last = error.strip().splitlines()[-1] if error.strip() else error
            st.error(f"{trial_id}: {last}")
            with st.expander(f"{trial_id}: full error"):
                st.code(error, language="text")


# ---------------------------------------------------------------- one trial
def _missing(run, trial_id: str, what: str) -> None:
    state = run.state
    hint = " (it is still running: results come when it finishes)" if state in ("running", "pending") else ""
    lacks = ", ".join(run.missing) or "nothing"
    st.info(f"Trial {trial_id} ({state}) has no {what} yet{hint}. Missing in its folder: {lacks}.")


def grid_view(trials: dd.TrialSet, trial_id: str) -> None:
    """Accuracy grids (test_sub and held-out domains side by side), metrics and worst pairs."""
    from tally.dashboard import charts  # plotly: imported when a chart is drawn
    run = cache.run(dd.trial_dir(trials, trial_id))
    table = run.eval_table
    if table is None or table.empty:
        _missing(run, trial_id, "evaluation table (eval.parquet)")
        return
    notes = [m for m in run.missing if m.startswith("eval.parquet")]
    for note in notes:
        st.caption(f"Note: {note}")
    splits = dd.table_splits(table)
    tests = dd.test_splits(splits) or splits
    for start in range(0, len(tests), 2):
        cols = st.columns(2)
        for col, split in zip(cols, tests[start:start + 2], strict=False):
            g, dropped = dd.grid(table, split).without_empty_domains()
            col.plotly_chart(charts.accuracy_heatmap(g, f"{split}: pair accuracy ({trial_id})"),
                             key=f"grid:{split}")
            if dropped:
                col.caption(f"Not in {split} (no test examples): {', '.join(dropped)}")
    st.caption("Cells: pair accuracy and the pair's training count (n_train); blank = no test examples.")
    split = st.selectbox("Split for the details below", splits, key=f"detail_split:{trials.name}",
                         index=splits.index(tests[0]) if tests else 0)
    metrics = pd.DataFrame(dd.run_metrics(table)).reindex(columns=splits)
    c1, c2 = st.columns([3, 2])
    with c1:
        st.markdown("**Metrics of this trial** (from its eval table)")
        _metric_table(metrics)
    with c2:
        st.markdown(f"**Worst pairs on {split}**")
        st.dataframe(dd.worst_pairs(table, split, 10), hide_index=True,
                     column_config={"acc": st.column_config.NumberColumn(format="%.3f")})
    with st.expander(f"{split} grid as a table"):
        g = dd.grid(table, split)
        st.dataframe(g.acc.round(3))
        st.dataframe(g.n_train)


def compare_view(trials: dd.TrialSet, default_a: str | None) -> None:
    """Difference grid of two trials and their shot-bucket accuracies."""
    from tally.dashboard import charts  # plotly: imported when a chart is drawn
    c1, c2, c3 = st.columns(3)
    with c1:
        a = trial_picker(trials, "Trial A", f"cmp_a:{trials.name}", default_a, only_with_results=True)
    with c2:
        b = trial_picker(trials, "Trial B (e.g. an ERM baseline)", f"cmp_b:{trials.name}",
                         dd.default_comparison(trials, a), only_with_results=True)
    if a is None or b is None:
        st.info("Comparison needs two trials.")
        return
    run_a, run_b = cache.run(dd.trial_dir(trials, a)), cache.run(dd.trial_dir(trials, b))
    for run, tid in ((run_a, a), (run_b, b)):
        if run.eval_table is None:
            _missing(run, tid, "evaluation table (eval.parquet)")
            return
    common = [s for s in dd.table_splits(run_a.eval_table) if s in set(dd.table_splits(run_b.eval_table))]
    if not common:
        st.warning("The two trials share no split.")
        return
    tests = dd.test_splits(common)
    with c3:
        split = st.selectbox("Split", common, index=common.index(tests[0]) if tests else 0,
                             key=f"cmp_split:{trials.name}")
    left, right = st.columns(2)
    try:
        diff = dd.difference(run_a.eval_table, run_b.eval_table, split).dropna(how="all")
        left.plotly_chart(charts.difference_heatmap(diff, f"{split}: accuracy of {a} minus {b}"), key="diff")
    except ValueError as exc:
        left.warning(f"No difference grid: {exc}")
    shots = dd.shot_frame({a: run_a.eval_table, b: run_b.eval_table}, split)
    right.plotly_chart(charts.shot_bars(shots, f"{split}: accuracy by shot bucket"), key="shots")
    ma, mb = dd.run_metrics(run_a.eval_table)[split], dd.run_metrics(run_b.eval_table)[split]
    table = pd.DataFrame({a: ma, b: mb})
    table["A - B"] = table[a] - table[b]
    _metric_table(table)


def curves_view(trials: dd.TrialSet, trial_id: str) -> None:
    """Per-epoch learning curves (train loss, validation metrics) of chosen trials."""
    from tally.dashboard import charts  # plotly: imported when a chart is drawn
    ids = trials.frame["trial_id"].tolist()
    chosen = st.multiselect("Trials", ids, default=[trial_id] if trial_id in ids else ids[:1],
                            key=f"curve_trials:{trials.name}", max_selections=MAX_CURVE_TRIALS)
    epochs = {t: cache.run(dd.trial_dir(trials, t)).epochs for t in chosen}
    frame = dsearch.curves(epochs)
    empty = [t for t, df in epochs.items() if df.empty]
    if empty:
        st.caption(f"No epochs.jsonl lines yet for: {', '.join(empty)}")
    if frame.empty:
        st.info("No per-epoch records for the chosen trials.")
        return
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


def search_view(trials: dd.TrialSet) -> None:
    """How the search went: metric by trial order, parameter importance, parallel coordinates."""
    from tally.dashboard import charts  # plotly: imported when a chart is drawn
    metric = trials.selection.metric
    progress = dsearch.search_progress(trials)
    if progress.empty:
        st.info(f"No trial has {metric} yet.")
        return
    st.plotly_chart(charts.progress_figure(progress, metric), key="progress")
    left, right = st.columns([2, 3])
    with left:
        imp = cache.importance(trials.exp_dir)
        if imp.values.empty:
            st.info(f"Parameter importance {imp.method}.")
        else:
            st.plotly_chart(charts.importance_bars(imp.values, "Parameter importance"), key="importance")
            st.caption(imp.method)
    with right:
        dims, color = dsearch.parallel_dimensions(trials)
        if len(dims) < 2:
            st.info("Parallel coordinates need searched parameters and finished trials.")
        else:
            st.plotly_chart(charts.parallel_figure(dims, color, metric), key="parallel")
            st.caption("One line per finished trial; drag along an axis to filter.")


def export_view(trials: dd.TrialSet, default: str | None) -> None:
    """Download a trial's deployable bundle (as ``tally export`` writes it) or its config.yaml."""
    trial_id = trial_picker(trials, "Trial to export", f"export:{trials.name}", default,
                            only_with_results=True)
    if trial_id is None:
        st.info("No trials to export.")
        return
    run_dir = dd.trial_dir(trials, trial_id)
    config = run_dir / "config.yaml"
    if config.is_file():
        st.download_button("Download config.yaml", config.read_bytes(), file_name=f"{trial_id}-config.yaml",
                           mime="application/x-yaml", key="dl_config")
    else:
        st.warning(f"{trial_id} has no config.yaml.")
    if not _export_available():
        st.warning("Bundle export is unavailable: the tally.export module is not installed.")
        return
    st.caption(f"The bundle is what `tally export {trials.exp_dir} --trial {trial_id} --out BUNDLE` writes: "
               "config, weights, class and domain names, preprocessing, metrics, eval tables, a model card.")
    key = f"bundle:{run_dir}"
    if st.button("Build bundle", key="build_bundle"):
        st.session_state.pop(key, None)
        try:
            from tally.export import bundle_zip_bytes  # imports torch: only when asked for
        except ImportError as exc:
            st.warning(f"Bundle export is unavailable: tally.export could not be imported ({exc}).")
            return
        try:
            with st.spinner(f"Building the bundle of {trial_id} ..."):
                st.session_state[key] = bundle_zip_bytes(run_dir)
        except Exception as exc:  # noqa: BLE001 - shown to the user, e.g. a trial without checkpoints
            st.error(f"Could not build the bundle of {trial_id}: {exc}")
    if key in st.session_state:
        st.download_button("Download bundle (zip)", st.session_state[key], file_name=f"{trial_id}-bundle.zip",
                           mime="application/zip", key="dl_bundle")


def _export_available() -> bool:
    """Whether tally.export can be found, without importing it (it imports torch, seconds)."""
    try:
        return importlib.util.find_spec("tally.export") is not None
    except ValueError:  # already imported without a spec (e.g. replaced in tests): present
        return sys.modules.get("tally.export") is not None
