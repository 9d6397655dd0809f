"""The dashboard's sections: each function lays out one view with Streamlit (the grid and the search
views have modules of their own: grid_views, search_views).

Numbers come from the data layer (hence from the evaluator's long table) and figures from ``charts``;
this module only arranges them and explains what is missing, never raises on partial data. Every table
shown has a CSV download of what it shows (all rows, also when the table is paged).
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pandas as pd
import streamlit as st
import yaml

from tally import results
from tally.dashboard import cache, grids, progress
from tally.dashboard import data as dd
from tally.dashboard import robustness as drob
from tally.dashboard import uncertainty as dun

MAX_ERRORS_SHOWN = 20  # failed trials listed with their error below the table (the table has them all)


def _fmt(value) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(value) else f"{value:.4f}"


def data_table(frame: pd.DataFrame, key: str, file_name: str, *, full: pd.DataFrame | None = None,
               hide_index: bool = True, page_rows: int = 200, **kwargs) -> None:
    """st.dataframe of ``frame`` under a stable CSS hook (``st-key-table_<key>``) and a button that
    downloads ``full`` (default: all of ``frame``) as CSV, built only when the button is clicked.

    A frame longer than ``page_rows`` is shown a page at a time (a page number input), so a long table
    never goes to the browser whole; callers that page themselves pass the page and ``full``.
    """
    data = frame if full is None else full
    if full is None and len(frame) > page_rows:
        pages = dd.page_count(len(frame), page_rows)
        number = st.number_input(f"Page (of {pages}, {page_rows} rows each)", min_value=1, step=1,
                                 key=f"page_{key}")
        frame = dd.page(frame, number, page_rows)
    with st.container(key=f"table_{key}"):
        st.dataframe(frame, hide_index=hide_index, **kwargs)
    st.download_button("Download CSV", lambda: dd.csv_bytes(data, index=not hide_index), file_name=file_name,
                       mime="text/csv", key=f"csv_{key}", on_click="ignore", type="tertiary",
                       icon=":material/download:")


def metric_table(frame: pd.DataFrame, key: str, file_name: str) -> None:
    """Metrics (rows) by split or trial (columns), every row visible, 4 decimals."""
    config = {c: st.column_config.NumberColumn(str(c), format="%d" if str(c).endswith(dun.SMALL) else "%.4f")
              for c in frame.columns}
    data_table(frame, key, file_name, hide_index=False, column_config=config, height=35 * (len(frame) + 1) + 3)


def run_metrics_section(run, trial_id: str, splits: list[str], key: str, file_name: str) -> None:
    """A run's metrics by split, each with its 95% interval (``uncertainty.run_intervals``); the plain
    metrics when the intervals cannot be computed on this table (said so, never an error)."""
    try:
        long = cache.run_intervals(run.path)
    except Exception as exc:  # noqa: BLE001 - e.g. an old table the intervals refuse: show the values
        st.markdown(f"**Metrics of {dd.plain(trial_id)}** (from its eval table)")
        st.caption(f"No intervals: {dd.plain(exc)}")
        metric_table(dd.run_metrics_frame(run.eval_table, splits), key, file_name)
        return
    st.markdown(f"**Metrics of {dd.plain(trial_id)}** with 95% intervals over the test images")
    st.caption(dun.LEGEND_RUN + "; the column 'cells < 5 images' gives k.")
    metric_table(dun.interval_frame(long, splits), key, file_name)


# ---------------------------------------------------------------- experiment level
def experiment_list(overviews: list[dict]) -> None:
    """All experiments under the root: searches with their status counts and best values; benchmarks
    (kind 'benchmark', dd.benchmark_overview) in a table of their own, with their own summary."""
    searches = [o for o in overviews if o.get("kind") != "benchmark"]
    benchmarks = [o for o in overviews if o.get("kind") == "benchmark"]
    if searches:
        frame = pd.DataFrame(searches)
        statuses = [c for c in frame.columns if c in results.STATUSES]
        frame[statuses] = frame[statuses].fillna(0).astype(int)  # a status one experiment lacks counts 0
        data_table(frame, "experiments", "experiments.csv",
                   column_config={"best_value": st.column_config.NumberColumn("best value", format="%.4f")})
    if benchmarks:
        data_table(pd.DataFrame(benchmarks), "benchmarks", "benchmarks.csv")


def header(trials: dd.TrialSet) -> None:
    """Status counts, the best trial by the validation selection metric, the spec and store notes."""
    counts = dd.status_counts(trials.frame)
    shown = [s for s in counts if s in dd.SHOWN_STATUSES or counts[s]]
    cols = st.columns(len(shown) + 1)
    cols[0].metric("trials", len(trials.frame))
    for col, status in zip(cols[1:], shown, strict=True):
        col.metric(status, counts[status])
    sel = trials.selection
    best = results.select_trial(trials.frame, trials.selection)
    if best is None:
        st.info(f"No finished trial has {dd.plain(sel.metric)} yet: the best trial appears when one finishes.")
    oracle = dd.oracle_trials(trials.frame)
    if best is not None:
        st.success(f"Best trial: **{dd.plain(best['trial_id'])}**, {dd.plain(sel.metric)} = {_fmt(best[sel.metric])} "
                   f"({sel.mode}, {dd.plain(sel.source)})"
                   + (" — ORACLE: its epoch was selected on test images" if best["trial_id"] in oracle else ""))
    if oracle:
        st.warning(f"ORACLE selection: {len(oracle)} of {len(trials.frame)} trials selected their epoch on test "
                   "images (data.oracle_selection, as the reference protocol does for a held-out domain); "
                   "their test numbers are optimistic (docs/PROTOCOL.md).")
    spec = st.expander("Search spec (spec.yaml)", key=f"spec_open:{trials.name}", on_change="rerun")
    if spec.open:  # drawn only when opened: highlighted code costs the first page load ~0.15 s
        with spec:
            if trials.spec is None:
                st.caption("This experiment has no spec.yaml.")
            else:
                st.code(yaml.safe_dump(trials.spec, sort_keys=False), language="yaml")
    for note in trials.notes:
        st.caption(f"Note: {dd.plain(note)}")


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
def _duration(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def running_view(trials: dd.TrialSet) -> None:
    """Running trials: epochs done of the total, the last validation value, seconds per epoch, ETA."""
    ids = trials.frame.loc[trials.frame["status"] == "running", "trial_id"].tolist()
    if not ids:
        return
    table = progress.running_progress(trials, cache.epochs(trials, ids))
    table["done"] = (table["epochs_done"] / table["epochs_total"]).clip(0, 1)
    table["eta"] = table["eta_s"].map(_duration)
    metric = trials.selection.metric
    st.markdown(f"**Running trials ({len(table)})**: last {dd.plain(metric)}, and the time left at the median "
                "duration of each trial's own epochs")
    cols = ["trial_id", "node", "epochs_done", "epochs_total", "done", "last_value", "seconds_per_epoch", "eta"]
    data_table(table[cols], "running", f"{trials.name}-running.csv", column_config={
        "epochs_done": st.column_config.NumberColumn("epochs done", format="%d"),
        "epochs_total": st.column_config.NumberColumn("of", format="%d"),
        "done": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
        "last_value": st.column_config.NumberColumn(f"last {metric}", format="%.4f"),
        "seconds_per_epoch": st.column_config.NumberColumn("s / epoch", format="%.1f"),
        "eta": st.column_config.TextColumn("ETA")})


def trials_view(trials: dd.TrialSet) -> None:
    """Running trials first, then the trials table: filtered, sorted over all rows, paged (only one
    page goes to the browser: 5,000 rows would cost seconds), downloadable whole; errors below it."""
    frame = trials.frame
    if frame.empty:
        st.info("No trials yet: they appear here as the search starts them.")
        return
    running_view(trials)
    name = trials.name
    seen = set(frame["status"])
    present = [s for s in dict.fromkeys([*dd.SHOWN_STATUSES, *frame["status"]]) if s in seen]
    c1, c2, c3 = st.columns([2, 2, 3])
    statuses = c1.multiselect("Status", present, default=present, key=f"status_filter:{name}")
    text = c2.text_input("Filter (any shown column contains)", key=f"text_filter:{name}")
    names = dd.metric_names(frame)
    metrics = c3.multiselect("Metrics", names, key=f"metrics:{name}",
                             default=[m for m in dd.DEFAULT_TABLE_METRICS if m in names])
    cols = dd.table_columns(trials, metrics)
    shown = dd.filter_trials(frame, statuses, text, columns=cols)
    s1, s2, s3, s4 = st.columns([3, 2, 2, 2])
    sort_by = s1.selectbox("Sort by", cols, index=0, key=f"sort_by:{name}")
    descending = s2.toggle("Descending", key=f"sort_desc:{name}")
    size = s3.selectbox("Rows per page", dd.PAGE_SIZES, index=1, key=f"page_size:{name}")
    pages = dd.page_count(len(shown), size)
    number = min(int(s4.number_input(f"Page (of {pages})", min_value=1, step=1, key=f"page:{name}")), pages)
    ordered = dd.sort_trials(shown, sort_by, descending)
    rows = dd.page(ordered, number, size)
    config = {"duration_s": st.column_config.NumberColumn("duration (s)", format="%.0f"),
              "error": st.column_config.TextColumn("error", width="large")}
    for col in cols:
        if "/" in col and not col.startswith(("param.", "config.")):
            config[col] = st.column_config.NumberColumn(col, format="%.4f")
    first = (number - 1) * size + 1 if len(rows) else 0
    st.caption(f"Trials {first}–{first + len(rows) - 1 if len(rows) else 0} of {len(shown)} shown "
               f"({len(frame)} in the experiment), sorted by {dd.plain(sort_by)}; the CSV holds all {len(shown)}.")
    data_table(rows[cols], "trials", f"{name}-trials.csv", full=ordered[cols], column_config=config)
    failed = dd.failed_errors(shown)
    if failed:
        st.markdown(f"**Failed trials ({len(failed)})**"
                    + (f", the first {MAX_ERRORS_SHOWN} (all are in the table)" if len(failed) > MAX_ERRORS_SHOWN
                       else ""))
        for trial_id, error in failed[:MAX_ERRORS_SHOWN]:
            last = error.strip().splitlines()[-1] if error.strip() else error
            st.error(f"{dd.plain(trial_id)}: {dd.plain(last)}")
            full = st.expander(f"{dd.plain(trial_id)}: full error", key=f"error_open:{trial_id}", on_change="rerun")
            if full.open:
                with full:
                    st.code(error, language="text")


# ---------------------------------------------------------------- one trial
def missing(run, trial_id: str, what: str) -> None:
    state = run.state
    hint = " (it is still running: results come when it finishes)" if state in ("running", "pending") else ""
    lacks = ", ".join(run.missing) or "nothing"
    st.info(f"Trial {dd.plain(trial_id)} ({dd.plain(state)}) has no {what} yet{hint}. Missing in its folder: "
            f"{dd.plain(lacks)}.")


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
            missing(run, tid, "evaluation table (eval.parquet)")
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
        diff = grids.difference(run_a.eval_table, run_b.eval_table, split).dropna(how="all")
        left.plotly_chart(charts.difference_heatmap(diff, f"{split}: accuracy of {a} minus {b}"), key="diff",
                          config={"scrollZoom": True})
    except ValueError as exc:
        left.warning(f"No difference grid: {exc}")
    shots = dd.shot_frame({a: run_a.eval_table, b: run_b.eval_table}, split)
    right.plotly_chart(charts.shot_bars(shots, f"{split}: accuracy by shot bucket"), key="shots")
    table = _compare_table(run_a, run_b, a, b, split)
    diff, why = cache.paired(run_a.path, run_b.path, split)
    if diff is not None:
        table = table.join(diff.rename(columns={"diff": "A - B", "low": f"A - B {dun.LOW}", "high": f"A - B {dun.HIGH}",
                                                "small_cells": f"A - B {dun.SMALL}"})[
            [f"A - B {dun.LOW}", f"A - B {dun.HIGH}", f"A - B {dun.SMALL}"]])
        st.markdown(f"**{dd.plain(a)} - {dd.plain(b)} on {dd.plain(split)}**: per-run 95% intervals, and the paired interval of the "
                    "difference (on the same test images, as `tally compare`)")
        st.caption(dun.LEGEND_DIFF + (f". Note: {dd.plain(why)}" if why else ""))
    else:
        st.markdown(f"**{dd.plain(a)} and {dd.plain(b)} on {dd.plain(split)}** with per-run 95% intervals")
        st.caption(dd.plain(why))
    metric_table(table, "compare_metrics", f"{trials.name}-{a}-vs-{b}-{split}.csv")


def _compare_table(run_a, run_b, a: str, b: str, split: str) -> pd.DataFrame:
    """Both runs' metrics on ``split`` with their intervals (plain values when they fail) and A - B."""
    if a == b:  # the same trial twice: distinct column names
        a, b = f"A: {a}", f"B: {b}"
    parts = []
    for run, label in ((run_a, a), (run_b, b)):
        try:
            long = cache.run_intervals(run.path)
            part = dun.interval_frame(long[long["split"] == split], [split])
            parts.append(part.set_axis([label, f"{label} {dun.LOW}", f"{label} {dun.HIGH}", f"{label} {dun.SMALL}"],
                                       axis=1))
        except Exception:  # noqa: BLE001 - the plain metric still shows
            parts.append(pd.DataFrame({label: dd.run_metrics(run.eval_table)[split]}))
    table = pd.concat(parts, axis=1)
    table["A - B"] = table[a] - table[b]
    return table


# ---------------------------------------------------------------- robustness
def robustness_view(trials: dd.TrialSet, best_id: str | None) -> None:
    """The chosen config on the subpopulation split and on each held-out domain, one row per setting."""
    runs = drob.robustness_runs(trials.exp_dir)
    if runs.empty:
        st.info("No robustness runs in this experiment. With `robustness: {settings: [sub, each_domain]}` in "
                "the spec, `tally search` re-runs the chosen config on the subpopulation split and with "
                f"each domain held out; they appear here (from {trials.exp_dir / drob.GROUP}).")
        return
    table = drob.robustness_table(runs)
    params = trials.frame.set_index("trial_id").filter(like="param.").loc[[best_id]] if best_id in set(
        trials.frame["trial_id"]) else None
    chosen = "" if params is None else ", ".join(f"{c.removeprefix('param.')}={v}"
                                                 for c, v in params.iloc[0].dropna().items())
    st.markdown(f"**The chosen config{f' (trial {dd.plain(best_id)})' if best_id else ''}** on each setting"
                f"{f': {dd.plain(chosen)}' if chosen else ''}. Each held-out run selects its epoch on "
                "training-domain validation; the numbers are test numbers of that selection.")
    config = {m: st.column_config.NumberColumn(m, format="%.4f") for m in (*drob.SHOWN_METRICS,
                                                                          "pair_acc_worst_stderr")}
    data_table(table, "robustness", f"{trials.name}-robustness.csv", column_config=config)
    unfinished = table[table["runs_done"] < table["runs"]]
    if not unfinished.empty:
        st.caption("Settings with runs not finished (their metrics are blank until one finishes): "
                   + dd.plain(", ".join(unfinished["setting"])))
    with st.expander("Every run on every test split"):
        data_table(runs, "robustness_runs", f"{trials.name}-robustness-runs.csv")


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
        st.warning(f"{dd.plain(trial_id)} has no config.yaml.")
    if not _export_available():
        st.warning("Bundle export is unavailable: the tally.deploy.export module is not installed.")
        return
    st.caption(f"The bundle is what tally export {dd.plain(trials.exp_dir)} \\-\\-trial {dd.plain(trial_id)} "
               "\\-\\-out BUNDLE writes: "
               "config, weights, class and domain names, preprocessing, metrics, eval tables, a model card.")
    key = f"bundle:{run_dir}"
    if st.button("Build bundle", key="build_bundle"):
        st.session_state.pop(key, None)
        try:
            from tally.deploy.export import bundle_zip_bytes  # imports torch: only when asked for
        except ImportError as exc:
            st.warning(f"Bundle export is unavailable: tally.deploy.export could not be imported ({dd.plain(exc)}).")
            return
        try:
            with st.spinner(f"Building the bundle of {trial_id} ..."):
                st.session_state[key] = bundle_zip_bytes(run_dir)
        except Exception as exc:  # noqa: BLE001 - shown to the user, e.g. a trial without checkpoints
            st.error(f"Could not build the bundle of {dd.plain(trial_id)}: {dd.plain(exc)}")
    if key in st.session_state:
        st.download_button("Download bundle (zip)", st.session_state[key], file_name=f"{trial_id}-bundle.zip",
                           mime="application/zip", key="dl_bundle")


def _export_available() -> bool:
    """Whether tally.deploy.export can be found, without importing it (it imports torch, seconds)."""
    try:
        return importlib.util.find_spec("tally.deploy.export") is not None
    except ValueError:  # already imported without a spec (e.g. replaced in tests): present
        return sys.modules.get("tally.deploy.export") is not None
