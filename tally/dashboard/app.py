"""The TALLY dashboard, a Streamlit script: ``streamlit run app.py -- --root RESULTS``.

Reads only the results store (never a live Ray cluster), so it works on a laptop with a copied store
as well as next to a running search; while trials run it re-reads the store every few seconds.
The root comes from ``--root``, else the TALLY_RESULTS_ROOT environment variable, else ./results.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import streamlit as st

from tally import results
from tally.dashboard import benchmark_views, cache, grid_views, search_views, views
from tally.dashboard import data as dd
from tally.dashboard import uncertainty as dun
from tally.results import storage

ROOT_ENV = "TALLY_RESULTS_ROOT"
MIRROR_MAX_AGE_S = 5.0  # a bucket root is copied again at most this often (reruns, auto-refresh)
TABS = ("Trials", "Accuracy grid", "Robustness", "Compare", "Curves", "Search", "Timeline", "Export")


def results_root(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--root", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    location = args.root or os.environ.get(ROOT_ENV) or "results"
    if storage.is_remote(location):  # s3://bucket/prefix: a read-only local mirror, re-read every few seconds
        return storage.read_mirror(location, max_age_s=MIRROR_MAX_AGE_S)
    return Path(location).expanduser().resolve()


def _experiment_label(root: Path, exp: Path) -> str:
    return exp.name if exp != root else f"{exp.name} (the root)"


def body(trials: dd.TrialSet) -> None:
    """Everything about one experiment."""
    exp_dir = trials.exp_dir
    st.subheader(f"Experiment {dd.plain(trials.name)}")
    views.header(trials)
    if trials.frame.empty:
        st.info(f"{dd.plain(trials.name)} has no trials yet (no folders under {dd.plain(exp_dir / 'trials')}).")
        return
    best = results.select_trial(trials.frame, trials.selection)
    best_id = None if best is None else str(best["trial_id"])
    trial_id = views.trial_picker(trials, "Trial", f"trial:{trials.name}", best_id)
    tabs = st.tabs(list(TABS), key="view", on_change="rerun")
    sections = {
        "Trials": lambda: views.trials_view(trials),
        "Accuracy grid": lambda: grid_views.grid_view(trials, trial_id),
        "Robustness": lambda: views.robustness_view(trials, best_id),
        "Compare": lambda: views.compare_view(trials, best_id or trial_id),
        "Curves": lambda: search_views.curves_view(trials, trial_id),
        "Search": lambda: search_views.search_view(trials),
        "Timeline": lambda: search_views.timeline_view(trials),
        "Export": lambda: views.export_view(trials, best_id or trial_id),
    }
    for name, tab in zip(TABS, tabs, strict=True):
        if tab.open is False:
            continue  # lazy tabs: only the open one computes
        with tab:
            try:
                sections[name]()
            except Exception as exc:  # noqa: BLE001 - one broken view must not take the page down
                st.error(f"The {name} view failed on this store ({type(exc).__name__}: {dd.plain(exc)}); "
                         "the other views still work. Details:")
                st.exception(exc)


def main() -> None:
    st.set_page_config(page_title="TALLY dashboard", layout="wide")
    root = results_root()
    st.title("TALLY results")
    st.caption(f"Results store: `{root}`")
    if not root.is_dir():
        st.warning(f"The results root {root} does not exist yet. Run a search (`tally search SPEC`) or "
                   f"point the dashboard at a store with `--root`.")
        return
    experiments = dd.experiments_under(root)
    if not experiments:
        st.info(f"No experiments under {root} yet. Start one with `tally search searches/quickstart.yaml`; "
                "it appears here as soon as its first trial starts.")
        return
    labels = {_experiment_label(root, e): e for e in experiments}
    with st.sidebar:
        choice = st.selectbox("Experiment", list(labels), key="experiment")
        exp_dir = labels[choice]
        running = bool((cache.trials(exp_dir).frame["status"] == "running").any())
        auto = st.toggle("Auto-refresh", value=running, key=f"auto:{choice}",
                         help="Re-read the store every few seconds (on by default while trials run).")
        every = st.number_input("Refresh every (s)", min_value=2, max_value=600, value=10, key="every")
    st.fragment(page, run_every=every if auto else None)(root, exp_dir)


def page(root: Path, exp_dir: Path) -> None:
    """The main area, rerun alone by the auto-refresh: the experiment list, then the chosen one."""
    results_root()  # a bucket root: the auto-refresh reruns only this fragment, so refresh the mirror here
    experiments = dd.experiments_under(root)
    loaded = {e: cache.trials(e) for e in experiments}  # one signature (stats) per experiment and rerun
    if len(experiments) > 1:  # one experiment: its header below says it all
        with st.expander(f"All experiments under the root ({len(experiments)})", expanded=True):
            views.experiment_list([dd.benchmark_overview(e) if dun.is_benchmark(e) else dd.experiment_overview(t)
                                   for e, t in loaded.items()])
    if dun.is_benchmark(exp_dir):  # a `tally benchmark` folder: its tables, not a search's views
        try:
            benchmark_views.benchmark_view(exp_dir)
        except Exception as exc:  # noqa: BLE001 - a broken folder says why instead of a blank page
            st.error(f"The benchmark view failed on {dd.plain(exp_dir.name)} ({type(exc).__name__}: {dd.plain(exc)}). "
                     "Details:")
            st.exception(exc)
        return
    body(loaded.get(exp_dir) or cache.trials(exp_dir))


if __name__ == "__main__":
    main()
