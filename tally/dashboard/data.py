"""Data layer of the dashboard: what the views show, computed from the results store.

Why a module apart from the Streamlit app: everything here is plain pandas on top of ``tally.results``
(file reading) and ``tally.evaluation`` (every metric and grid comes from the long table through it),
so it is unit-testable and benchmarkable without a browser; the app only lays it out and caches it.
Nothing here imports streamlit. Every reader tolerates partial stores: a running trial without
results, a failed trial, a store from an older version; what is missing is reported, not raised.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tally import evaluation as ev
from tally import files, results
from tally.errors import TallyError

SHOWN_STATUSES = ("running", "done", "failed", "stopped")
FINISHED = ("done", "stopped")  # trials with final metrics (ASHA-stopped ones have early metrics)
DEFAULT_TABLE_METRICS = ("acc", "pair_acc_mean", "pair_acc_worst", "macro_f1")
SHOT_METRICS = ("shot_many", "shot_medium", "shot_few", "shot_zero")
CURVE_BASE_COLUMNS = ("epoch", "phase", "train_loss", "seconds")
RUN_FILES = ("config.yaml", "status.json", "epochs.jsonl", "eval.parquet", "metrics.json")


# ---------------------------------------------------------------- cache keys
def file_stamp(path: Path | str) -> tuple[int, int] | None:
    """(mtime_ns, size) of a file, None when absent: the unit of every cache key."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def trial_stamps(exp_dir: Path) -> dict[str, int]:
    """mtime_ns of each trial folder, by trial id: one stat per trial tells whether anything in it changed.

    Why the folder's mtime: every store write is a temporary file renamed into the trial folder
    (``tally.results``), which moves the folder's mtime; the one append (epochs.jsonl) is always
    followed by a status.json rewrite. One stat instead of one per file: at 5,000 trials the
    difference is a quarter of a second on every rerun of the page.
    """
    try:
        with os.scandir(Path(exp_dir) / results.TRIALS_DIR) as entries:
            return {e.name: e.stat().st_mtime_ns for e in entries if e.is_dir()}
    except OSError:
        return {}


def experiment_signature(exp_dir: Path, stamps: dict[str, int] | None = None) -> str:
    """Fingerprint (a digest of mtimes) of what the experiment views read: a cache key.

    Stats only (one per trial, see ``trial_stamps``), so it can run on every rerun while a search
    writes the store; a short digest rather than the stamps themselves because Streamlit hashes cache
    arguments slowly (0.25 s for a tuple of a 500-trial experiment's stamps).
    """
    exp_dir = Path(exp_dir)
    stamps = trial_stamps(exp_dir) if stamps is None else stamps
    digest = hashlib.blake2b(digest_size=16)
    for name in ("spec.yaml", "summary.parquet", "study.db"):
        digest.update(repr(file_stamp(exp_dir / name)).encode())
    digest.update(repr(sorted(stamps.items())).encode())
    return digest.hexdigest()


def run_signature(run_dir: Path) -> tuple:
    """Fingerprint of one trial folder's files (epochs.jsonl included: it grows while training)."""
    return tuple(file_stamp(Path(run_dir) / name) for name in RUN_FILES)


# ---------------------------------------------------------------- experiments
def experiments_under(root: Path) -> list[Path]:
    """Experiment folders under ``root``; ``root`` itself when it is one (``--root results/exp``)."""
    root = Path(root)
    own = (root / results.TRIALS_DIR).is_dir() or (root / "spec.yaml").is_file()
    return [root, *results.list_experiments(root)] if own else results.list_experiments(root)


@dataclass
class TrialSet:
    """An experiment's trials as one table plus notes on what the store lacked."""

    exp_dir: Path
    frame: pd.DataFrame
    spec: dict | None
    selection: results.Selection
    notes: list[str] = field(default_factory=list)
    signature: str = ""  # the experiment_signature it was read under (set by the cache): key of derived reads
    error: str | None = None  # why the experiment could not be read at all (load_trials)

    @property
    def name(self) -> str:
        return self.exp_dir.name


def load_trials(exp_dir: Path, stamps: dict[str, int] | None = None) -> TrialSet:
    """The trials table of an experiment (``_load_trials``); an experiment that cannot be read at all is
    an empty TrialSet whose ``error`` says why: one bad experiment is an error row, never the page."""
    try:
        return _load_trials(exp_dir, stamps)
    except Exception as e:  # noqa: BLE001 - a foreign or damaged store must not take down the others
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}".rstrip(": ")
        return TrialSet(Path(exp_dir), _normalise(pd.DataFrame()), None, results.selection_of(None),
                        [f"could not be read ({why})"], error=why)


def _load_trials(exp_dir: Path, stamps: dict[str, int] | None = None) -> TrialSet:
    """The trials table of an experiment, fresh even while a search is writing it.

    The stored summary.parquet is used for speed, but rows of trials whose folders changed after it
    was written (or absent from it) are rebuilt with ``results.trial_row``; without a summary every
    row is built from the trial folders. Trials without metrics.json but with eval.parquet (older
    stores) get their metrics recomputed from the long table. ``stamps``: ``trial_stamps`` when the
    caller has them already.
    """
    exp_dir = Path(exp_dir)
    stamps = trial_stamps(exp_dir) if stamps is None else stamps
    notes: list[str] = []
    spec = results.read_yaml(exp_dir / "spec.yaml")
    if spec is None:
        why = f"spec.yaml {results.problem(exp_dir / 'spec.yaml')}" if (exp_dir / "spec.yaml").exists() else "no spec.yaml"
        notes.append(f"{why}: the spec is not shown and the best trial uses the default metric")
    frame = _fresh_summary(exp_dir, stamps, notes)
    frame = _backfill_metrics(exp_dir, frame, notes)
    if "unreadable" in frame:  # one bad file hides what it holds, never the page: name it
        for trial, why in frame.loc[frame["unreadable"].notna(), ["trial_id", "unreadable"]].itertuples(index=False):
            notes.append(f"trial {trial}: {why}")
    frame = _normalise(frame)
    return TrialSet(exp_dir, frame, spec if isinstance(spec, dict) else None, results.selection_of(spec), notes)


def _fresh_summary(exp_dir: Path, stamps: dict[str, int], notes: list[str]) -> pd.DataFrame:
    stored_path = exp_dir / "summary.parquet"
    written = file_stamp(stored_path)
    stored = results.read_parquet(stored_path) if written else None
    if stored is None or "trial_id" not in stored.columns:
        if stamps:
            notes.append("no summary.parquet: the trials table was built from the trial folders")
        return results.summarise(exp_dir)
    ids = stored["trial_id"].astype(str)
    unsafe = ~ids.map(_safe_id)
    if unsafe.any():  # a trial id names a folder: one read from a file must not point outside trials/
        notes.append(f"summary.parquet: {int(unsafe.sum())} row(s) with a trial id that is not a folder name "
                     f"(first: {ids[unsafe].iloc[0][:80]!r}) ignored")
        stored = stored[~unsafe].reset_index(drop=True)
    known = set(stored["trial_id"].astype(str))
    stale = sorted(name for name, mtime in stamps.items() if name not in known or mtime >= written[0])
    if not stale:
        return stored
    fresh = pd.DataFrame([results.trial_row(exp_dir / results.TRIALS_DIR / name) for name in stale])
    kept = stored[~stored["trial_id"].astype(str).isin(set(fresh["trial_id"]))]
    parts = [df for df in (kept, fresh) if not df.empty]
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)


def _safe_id(trial_id: str) -> bool:
    try:
        files.safe_component(trial_id, "trial id")
    except TallyError:
        return False
    return True


def _metric_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if "/" in c and not c.startswith(("param.", "config."))]


def _backfill_metrics(exp_dir: Path, frame: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    if frame.empty or "trial_id" not in frame.columns:
        return frame
    cols = _metric_columns(frame)
    lacking = frame[cols].isna().all(axis=1) if cols else pd.Series(True, index=frame.index)
    filled = 0
    rows = {}
    for idx in frame.index[lacking]:
        run_dir = exp_dir / results.TRIALS_DIR / str(frame.at[idx, "trial_id"])
        table = results.read_parquet(run_dir / "eval.parquet")
        if table is None or table.empty:
            continue
        table, _ = compat_table(table)
        rows[idx] = {f"{split}/{name}": value for split, values in run_metrics(table).items()
                     for name, value in values.items()}
        filled += 1
    if not rows:
        return frame
    frame = frame.copy()
    extra = pd.DataFrame.from_dict(rows, orient="index")
    for col in extra.columns:
        if col not in frame.columns:
            frame[col] = np.nan
        frame.loc[extra.index, col] = extra[col]
    notes.append(f"metrics.json missing for {filled} trial(s): metrics recomputed from eval.parquet")
    return frame


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns every view relies on exist (older stores lack some); a stable trial order."""
    frame = frame.copy()
    for col, default in (("trial_id", ""), ("status", "pending"), ("error", None), ("started", np.nan),
                         ("ended", np.nan), ("duration_s", np.nan), ("epoch", np.nan)):
        if col not in frame.columns:
            frame[col] = default
    frame["trial_id"] = frame["trial_id"].astype(str)
    frame["status"] = frame["status"].fillna("pending").astype(str)
    for col in ("started", "ended", "duration_s", "epoch"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame = frame.sort_values(["started", "trial_id"], na_position="last", kind="stable")
    frame.insert(0, "order", np.arange(1, len(frame) + 1))
    return frame.reset_index(drop=True)


def status_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Counts for running/done/failed/stopped (always present) and any other status seen."""
    counts = dict.fromkeys(SHOWN_STATUSES, 0)
    if "status" in frame.columns:
        for status, n in frame["status"].value_counts().items():
            counts[str(status)] = int(n)
    return counts


ORACLE_COLUMN = "config.data.oracle_selection"


def oracle_trials(frame: pd.DataFrame) -> list[str]:
    """Trials whose kept epoch was selected on test images (data.oracle_selection: the reference
    protocol's held-out-domain selection): their test numbers are optimistic and must say so."""
    if ORACLE_COLUMN not in frame.columns:
        return []
    oracle = frame[ORACLE_COLUMN].map(lambda v: v is True or str(v).lower() == "true")
    return frame.loc[oracle, "trial_id"].astype(str).tolist()


def experiment_overview(trials: TrialSet) -> dict:
    """One row of the experiment list: name, counts, best trial and its value."""
    best = results.select_trial(trials.frame, trials.selection)
    row = {"experiment": trials.name, "kind": "search", "trials": len(trials.frame), **status_counts(trials.frame),
           "selection": f"{trials.selection.metric} ({trials.selection.mode})",
           "best_trial": None if best is None else best["trial_id"],
           "best_value": None if best is None else float(best[trials.selection.metric]),
           "error": trials.error}
    return row


def benchmark_overview(exp_dir: Path) -> dict:
    """One row of the experiment list for a `tally benchmark` folder: its own summary (methods,
    settings, seeds, runs done of those planned), from its plan.parquet and each run's status.json.
    A benchmark has no trials, selection rule or best trial: a search's columns would read "0 trials"."""
    exp_dir = Path(exp_dir)
    plan = results.read_parquet(exp_dir / "plan.parquet")
    if plan is None or not {"run", "method", "setting", "seed"} <= set(plan.columns):
        return {"experiment": exp_dir.name, "kind": "benchmark", "runs": "plan.parquet unreadable"}
    runs = plan["run"].drop_duplicates()
    done = sum((results.read_json(exp_dir / "runs" / str(r) / "status.json") or {}).get("status") == "done"
               for r in runs)
    return {"experiment": exp_dir.name, "kind": "benchmark",
            "methods": ", ".join(map(str, dict.fromkeys(plan["method"]))),
            "settings": ", ".join(map(str, dict.fromkeys(plan["setting"]))),
            "seeds": int(plan["seed"].nunique()), "runs": f"{done} of {len(runs)} done"}


# ---------------------------------------------------------------- trials table
def param_columns(frame: pd.DataFrame) -> list[str]:
    """Searched parameters: ``param.*``; for stores without them, the config values that vary."""
    params = [c for c in frame.columns if c.startswith("param.")]
    if params or frame.empty:
        return params
    varying = []
    for c in frame.columns:
        if c.startswith("config.") and frame[c].astype(str).nunique(dropna=False) > 1:
            varying.append(c)
    return varying


def metric_names(frame: pd.DataFrame) -> list[str]:
    """Metric names present in the table (e.g. acc, pair_acc_worst), in the evaluator's order."""
    present = {c.split("/", 1)[1] for c in _metric_columns(frame)}
    return [m for m in ev.METRIC_NAMES if m in present] + sorted(present - set(ev.METRIC_NAMES))


def split_names(columns) -> list[str]:
    """Splits in display order: val, test_sub, then held-out domains, then anything else."""
    splits = {c.split("/", 1)[0] for c in columns if "/" in c and not c.startswith(("param.", "config."))}
    return sorted(splits, key=split_key)


def split_key(split: str) -> tuple:
    rank = {"train": 0, "val": 1, "test_sub": 2}.get(split, 3 if split.startswith("test_domain:") else 4)
    return rank, split


def table_columns(trials: TrialSet, metrics: list[str] | None = None) -> list[str]:
    """Columns of the trials table: identity, status, timing, parameters, chosen metrics, error."""
    frame = trials.frame
    metrics = list(metrics) if metrics is not None else list(DEFAULT_TABLE_METRICS)
    cols = ["order", "trial_id", "status", "duration_s", "epoch"]
    for col in dict.fromkeys((*trials.selection.objectives, trials.selection.metric)):  # what the pick reads
        if col in frame.columns:
            cols.append(col)
    cols += param_columns(frame)
    for split in split_names(frame.columns):
        for name in metrics:
            col = f"{split}/{name}"
            if col in frame.columns and col not in cols:
                cols.append(col)
    cols.append("error")
    return [c for c in cols if c in frame.columns]


def filter_trials(frame: pd.DataFrame, statuses=None, text: str = "", columns=None) -> pd.DataFrame:
    """Rows whose status is in ``statuses`` (None/empty = all) and whose ``columns`` (default: all)
    contain ``text`` (case-insensitive)."""
    out = frame
    if statuses:
        out = out[out["status"].isin(list(statuses))]
    text = (text or "").strip().lower()
    if text and not out.empty:
        haystack = pd.Series("", index=out.index, dtype=object)
        for col in columns if columns is not None else out.columns:  # NaN blanked: pandas 3 keeps it
            haystack = haystack + " " + out[col].astype(object).where(out[col].notna(), "").astype(str)
        out = out[haystack.str.lower().str.contains(text, regex=False)]
    return out


def failed_errors(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(trial_id, error) of failed trials, for the error panel."""
    rows = frame.loc[frame["status"] == "failed", ["trial_id", "error"]]
    return [(str(r.trial_id), str(r.error) if isinstance(r.error, str) and r.error else "(no error recorded)")
            for r in rows.itertuples()]


PAGE_SIZES = (25, 50, 100, 200)


def sort_trials(frame: pd.DataFrame, by: str | None, descending: bool = False) -> pd.DataFrame:
    """Rows sorted by one column over the whole table (the browser's header click would sort a page
    only); blanks last whatever the direction, ties in trial order."""
    if not by or by not in frame.columns or frame.empty:
        return frame
    numeric = pd.to_numeric(frame[by], errors="coerce")
    key = numeric if numeric.notna().sum() >= frame[by].notna().sum() else frame[by].astype(str)
    key = key.where(frame[by].notna())
    order = key.sort_values(ascending=not descending, na_position="last", kind="stable").index
    return frame.loc[order]


def page_count(rows: int, size: int) -> int:
    return max(1, math.ceil(rows / max(1, size)))


def page(frame: pd.DataFrame, number: int, size: int) -> pd.DataFrame:
    """Rows of page ``number`` (from 1; clamped to the last page) of ``size`` rows."""
    number = min(max(1, int(number)), page_count(len(frame), size))
    return frame.iloc[(number - 1) * size: number * size]


# A spreadsheet runs a cell that starts with one of these as a formula (=HYPERLINK(...), =cmd|...):
# such a cell from a store file is written with a leading apostrophe (OWASP's CSV-injection advice).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# What lets markdown from a store file link, load or inject: [text](url), ![image](url), <html>, &entities;,
# autolinks (https://..., www...., a@b.c), Streamlit directives (:red[...], :material/x:), LaTeX ($), code,
# tables and headings. Backslash-escaped, each shows as written (names keep their _ and - and .).
MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]()<>!:$~|{}#&@])|(?<=www)(\.)", re.IGNORECASE)


def _cell(value):
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_bytes(frame: pd.DataFrame, index: bool = False) -> bytes:
    """A table as UTF-8 CSV, what every download button of the dashboard serves. Text cells (and
    labels) that a spreadsheet would run as a formula are escaped; numbers are left as they are."""
    frame = frame.copy()
    frame.columns = [_cell(c) for c in frame.columns]
    if index:
        frame.index = frame.index.map(_cell)
    for col in frame.columns:
        if frame[col].dtype == object or pd.api.types.is_string_dtype(frame[col]):
            frame[col] = frame[col].map(_cell)
    return frame.to_csv(index=index).encode()


def plain(value) -> str:
    """Text from the store (names, errors, notes) for a Streamlit call that renders markdown
    (st.markdown, caption, info, error, expander labels, ...): shown as written, never a link, a
    remote image, HTML, a Streamlit directive, LaTeX or an autolink (MARKDOWN_SPECIAL)."""
    return MARKDOWN_SPECIAL.sub(lambda m: "\\" + m.group(0), str(value))


# ---------------------------------------------------------------- one trial
def trial_dir(trials: TrialSet, trial_id: str) -> Path:
    return trials.exp_dir / results.TRIALS_DIR / files.safe_component(str(trial_id), "trial id")


def load_run(run_dir: Path) -> results.RunRecord:
    """The trial folder (``results.read_run``) with its eval table made readable by the evaluator."""
    run = results.read_run(run_dir)
    if run.eval_table is not None:
        run.eval_table, notes = compat_table(run.eval_table)
        run.missing.extend(notes)
    return run


def read_epochs(exp_dir: Path, trial_ids: list[str]) -> dict[str, pd.DataFrame]:
    """epochs.jsonl of several trials (learning curves of a whole search); empty frames where absent."""
    base = Path(exp_dir) / results.TRIALS_DIR
    return {t: pd.DataFrame(results.read_jsonl(base / t / "epochs.jsonl")) for t in trial_ids if _safe_id(t)}


def compat_table(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """A long table from an older evaluator, completed so ``tally.evaluation`` accepts it.

    Index columns are derived from the names (first-seen order); a missing ``predicted`` column makes
    macro F1 unknowable and a missing ``n_train`` the shot buckets: they are filled with 0 and the
    affected metrics are blanked by ``run_metrics``.
    """
    notes = []
    table = table.copy()
    for idx_col, name_col in (("domain_idx", "domain"), ("class_idx", "class")):
        if idx_col not in table.columns and name_col in table.columns:
            codes = {name: i for i, name in enumerate(pd.unique(table[name_col]))}
            table[idx_col] = table[name_col].map(codes).astype(np.int64)
            notes.append(f"eval.parquet lacks {idx_col} (derived from names)")
    for col, meaning in (("predicted", "macro F1"), ("n_train", "shot buckets and training counts")):
        if col not in table.columns:
            table[col] = 0
            notes.append(f"eval.parquet lacks '{col}': {meaning} unavailable")
    table.attrs["lacks"] = [c for c in ("predicted", "n_train") if any(f"'{c}'" in n for n in notes)]
    return table, notes


def run_metrics(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``evaluation.all_metrics`` of a long table, blanking metrics its columns cannot support."""
    out = ev.all_metrics(table)
    lacks = table.attrs.get("lacks", [])
    blank = ["macro_f1"] if "predicted" in lacks else []
    blank += list(SHOT_METRICS) if "n_train" in lacks else []
    for values in out.values():
        for name in blank:
            values[name] = float("nan")
    return out


def run_metrics_frame(table: pd.DataFrame, splits: list[str]) -> pd.DataFrame:
    """``run_metrics`` as a table: metrics (rows) by split (columns, in ``splits`` order)."""
    return pd.DataFrame(run_metrics(table)).reindex(columns=splits)


def table_splits(table: pd.DataFrame | None) -> list[str]:
    if table is None or table.empty:
        return []
    return sorted((str(s) for s in pd.unique(table["split"])), key=split_key)


def test_splits(splits: list[str]) -> list[str]:
    """The splits shown side by side: subpopulation shift (test_sub) and held-out domains."""
    return [s for s in splits if s.startswith("test")]


def shot_frame(tables: dict[str, pd.DataFrame], split: str) -> pd.DataFrame:
    """Long frame (trial, bucket, accuracy) of the shot-bucket metrics of each table's ``split``."""
    rows = []
    for label, table in tables.items():
        values = run_metrics(table).get(split, {})
        for name in SHOT_METRICS:
            rows.append({"trial": label, "bucket": name.removeprefix("shot_"), "accuracy": values.get(name)})
    return pd.DataFrame(rows, columns=["trial", "bucket", "accuracy"])


def default_comparison(trials: TrialSet, first: str | None) -> str | None:
    """A sensible second trial: an ERM baseline when the search has one, else the runner-up."""
    frame = trials.frame[trials.frame["trial_id"] != first]
    finished = frame["status"].isin(FINISHED)
    frame = frame[finished] if finished.any() else frame
    for col in ("param.method.name", "config.method.name", "param.method"):
        if col in frame.columns:
            erm = frame[frame[col].astype(str).str.lower() == "erm"]
            if not erm.empty:
                return str(erm.iloc[0]["trial_id"])
    sel = trials.selection.metric
    if sel in frame.columns:
        ranked = frame.assign(_v=pd.to_numeric(frame[sel], errors="coerce")).dropna(subset=["_v"])
        if not ranked.empty:
            ranked = ranked.sort_values("_v", ascending=trials.selection.mode == "min")
            return str(ranked.iloc[0]["trial_id"])
    return None if frame.empty else str(frame.iloc[0]["trial_id"])
