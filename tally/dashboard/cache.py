"""Store reads memoised with st.cache_data, keyed on the files' mtimes and sizes.

Why keys of mtimes rather than a TTL: a finished search never changes, so it is read once; a running
one is re-read as soon as a trial writes a file, and only then. The signature is one stat per trial
(the trial folder's mtime), cheap enough for every rerun of the auto-refresh.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import streamlit as st

from tally import results
from tally.dashboard import data as dd
from tally.dashboard import search_data as dsearch
from tally.dashboard import uncertainty as dun
from tally.evaluation import intervals


@st.cache_data(show_spinner=False, max_entries=64)
def _trials(exp_dir: str, signature: str, _stamps: dict | None = None) -> dd.TrialSet:
    trials = dd.load_trials(Path(exp_dir), _stamps)
    trials.signature = signature
    return trials


def trials(exp_dir: Path) -> dd.TrialSet:
    stamps = dd.trial_stamps(exp_dir)  # one stat per trial, shared by the key and a cache miss
    return _trials(str(exp_dir), dd.experiment_signature(exp_dir, stamps), stamps)


@st.cache_data(show_spinner=False, max_entries=256)
def _run(run_dir: str, signature: tuple) -> results.RunRecord:
    return dd.load_run(Path(run_dir))


def run(run_dir: Path) -> results.RunRecord:
    return _run(str(run_dir), dd.run_signature(run_dir))


@st.cache_data(show_spinner="Computing parameter importance ...", max_entries=16)
def _importance(exp_dir: str, signature: str, study: tuple | None) -> dsearch.Importance:
    return dsearch.param_importance(_trials(exp_dir, signature))


def importance(trials: dd.TrialSet) -> dsearch.Importance:
    study = dd.file_stamp(trials.exp_dir / "study.db")
    return _importance(str(trials.exp_dir), trials.signature, study)


@st.cache_data(show_spinner="Reading the trials' epochs ...", max_entries=8)
def _epochs(exp_dir: str, signature: str, ids_digest: str, _trial_ids: tuple[str, ...]) -> dict:
    return dd.read_epochs(Path(exp_dir), list(_trial_ids))


def epochs(trials: dd.TrialSet, trial_ids: list[str]) -> dict:
    """epochs.jsonl of several trials, re-read when the experiment's files change (status.json is
    rewritten after every epoch line, so the signature the trials were read under moves with them)."""
    ids = tuple(str(t) for t in trial_ids)  # hashed by us: Streamlit hashes long tuples slowly
    digest = hashlib.blake2b("\n".join(ids).encode(), digest_size=16).hexdigest()
    return _epochs(str(trials.exp_dir), trials.signature, digest, ids)


@st.cache_resource(show_spinner="Building the Optuna study of the finished trials ...", max_entries=8)
def _param_study(exp_dir: str, signature: str):
    return dsearch.param_study(_trials(exp_dir, signature))


def param_study(trials: dd.TrialSet):
    """(study, parameters) for Optuna's slice and contour plots; shared, never modified after creation."""
    return _param_study(str(trials.exp_dir), trials.signature)


def _predictions_stamp(run_dir: Path) -> tuple | None:
    return dd.file_stamp(run_dir / intervals.PREDICTIONS_FILE)


@st.cache_data(show_spinner="Bootstrapping the metrics' intervals ...", max_entries=64)
def _run_intervals(run_dir: str, signature: tuple, predictions: tuple | None):
    return dun.run_intervals(_run(run_dir, signature))


def run_intervals(run_dir: Path):
    """The run's metrics with 95% bootstrap intervals (``uncertainty.run_intervals``), re-computed only
    when its files change."""
    return _run_intervals(str(run_dir), dd.run_signature(run_dir), _predictions_stamp(run_dir))


@st.cache_data(show_spinner="Bootstrapping the paired difference ...", max_entries=32)
def _paired(run_a: str, run_b: str, split: str, stamps: tuple):
    return dun.paired(Path(run_a), Path(run_b), split)


def paired(run_a: Path, run_b: Path, split: str):
    stamps = tuple((dd.run_signature(r), _predictions_stamp(r)) for r in (run_a, run_b))
    return _paired(str(run_a), str(run_b), split, stamps)


@st.cache_data(show_spinner="Reading the benchmark (paired intervals of its runs) ...", max_entries=8)
def _benchmark(exp_dir: str, signature: tuple, rule: str | None = None) -> dict:
    from tally.evaluation import benchmark_tables

    return benchmark_tables.load_benchmark(exp_dir, rule)


def benchmark(exp_dir: Path, rule: str | None = None) -> dict:
    """``benchmark_tables.load_benchmark`` of a benchmark folder (of a tuned one, one selection rule's
    tables), re-read when a run or the plan changes."""
    return _benchmark(str(exp_dir), dun.benchmark_signature(exp_dir), rule)
