"""Store reads memoised with st.cache_data, keyed on the files' mtimes and sizes.

Why keys of mtimes rather than a TTL: a finished search never changes, so it is read once; a running
one is re-read as soon as a trial writes a file, and only then. The signature is a few stats per
trial, cheap enough for every rerun of the auto-refresh.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from tally import results
from tally.dashboard import data as dd
from tally.dashboard import search_data as dsearch


@st.cache_data(show_spinner=False, max_entries=64)
def _trials(exp_dir: str, signature: str) -> dd.TrialSet:
    return dd.load_trials(Path(exp_dir))


def trials(exp_dir: Path) -> dd.TrialSet:
    return _trials(str(exp_dir), dd.experiment_signature(exp_dir))


@st.cache_data(show_spinner=False, max_entries=256)
def _run(run_dir: str, signature: tuple) -> results.RunRecord:
    return dd.load_run(Path(run_dir))


def run(run_dir: Path) -> results.RunRecord:
    return _run(str(run_dir), dd.run_signature(run_dir))


@st.cache_data(show_spinner="Computing parameter importance ...", max_entries=16)
def _importance(exp_dir: str, signature: str, study: tuple | None) -> dsearch.Importance:
    return dsearch.param_importance(dd.load_trials(Path(exp_dir)))


def importance(exp_dir: Path) -> dsearch.Importance:
    study = dd.file_stamp(Path(exp_dir) / "study.db")
    return _importance(str(exp_dir), dd.experiment_signature(exp_dir), study)
