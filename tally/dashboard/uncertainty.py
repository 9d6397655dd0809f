"""Intervals for the dashboard: a run's metrics with their 95% intervals, the paired difference of two
runs, a benchmark folder's tables and a multi-objective search's Pareto front.

Why a module apart from the views: every number comes from tally.evaluation.intervals, tally.evaluation.benchmark_tables
and tally.results (the same code as `tally compare`, `tally benchmark` and `tally export`), so the
dashboard cannot drift from the CLI; this module only reshapes them for tables and charts. Nothing here
imports streamlit. Macro F1's draw count is lower than the CLI's (1000) so a page stays fast; the seed
is the same fixed one, so a rerun shows the same interval.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from tally import evaluation as ev
from tally import results
from tally.dashboard import data as dd
from tally.errors import TallyError
from tally.evaluation import intervals

REPLICATES = 500
LOW, HIGH, SMALL = "95% low", "95% high", "cells < 5 images"
LEGEND_RUN, LEGEND_DIFF = intervals.LEGEND_RUN, intervals.LEGEND_DIFF
SEED_LEGEND = ("mean over seeds; SE combines the seed-to-seed spread and the test-set noise all seeds share "
               "(the same test images); 'small' columns: the most cells of < 5 test images under a seed's worst-case value.")
BENCHMARK_FILES = ("plan.parquet", "spec.yaml")


# ---------------------------------------------------------------- one run
def run_intervals(run: results.RunRecord, replicates: int = REPLICATES) -> pd.DataFrame:
    """``intervals.table_intervals`` of a run (its eval table, its predictions when it kept them, its
    config's shot thresholds): rows split, metric, value, low, high, method, small_cells. Metrics an
    older table cannot support (``dd.run_metrics`` blanks them) are blanked here too."""
    table = run.eval_table
    try:
        predictions = intervals.read_predictions(run.path)
    except (TallyError, OSError, ValueError):  # an unreadable predictions file: the table alone still works
        predictions = None
    thresholds = ev.shot_thresholds_of((run.config or {}).get("data"))
    out = intervals.table_intervals(table, predictions, replicates=replicates, thresholds=thresholds,
                                    what=str(run.path))
    lacks = table.attrs.get("lacks", [])
    blank = (["macro_f1"] if "predicted" in lacks else []) + (list(dd.SHOT_METRICS) if "n_train" in lacks else [])
    hidden = out["metric"].isin(blank)
    if hidden.any():  # (an all-False mask would still turn the integer small_cells column into floats)
        out.loc[hidden, ["value", "low", "high", "small_cells"]] = math.nan
    return out


def interval_frame(long: pd.DataFrame, splits: list[str]) -> pd.DataFrame:
    """Metrics (rows) by split, each split as four columns: ``<split>``, ``<split> 95% low``, ``... high``
    and ``... cells < 5 images`` (under a worst-case value; 0 elsewhere)."""
    parts = []
    for split in splits:
        rows = long[long["split"] == split].set_index("metric")
        parts.append(rows[["value", "low", "high", "small_cells"]].set_axis(
            [split, f"{split} {LOW}", f"{split} {HIGH}", f"{split} {SMALL}"], axis=1))
    order = list(dict.fromkeys(long["metric"]))
    return pd.concat(parts, axis=1).reindex(order) if parts else pd.DataFrame(index=order)


def has_predictions(run_dir: Path) -> bool:
    return (Path(run_dir) / intervals.PREDICTIONS_FILE).is_file()


def paired(run_a: Path, run_b: Path, split: str, replicates: int = REPLICATES) -> tuple[pd.DataFrame | None, str]:
    """(rows metric, diff, low, high, small_cells of A - B on ``split``, notes) from
    ``intervals.compare_runs``, or (None, why not): a run without per-example predictions, or test
    sets that differ."""
    lacking = [Path(r).name for r in (run_a, run_b) if not has_predictions(r)]
    if lacking:
        return None, (f"no paired difference: {', '.join(lacking)} kept no per-example predictions "
                      f"({intervals.PREDICTIONS_FILE}; runs trained before they were kept lack it)")
    try:
        frame, _ = intervals.compare_runs(run_a, run_b, splits=[split], replicates=replicates)
    except TallyError as exc:
        return None, f"no paired difference: {exc}"
    return frame.set_index("metric")[["diff", "low", "high", "small_cells"]], "; ".join(frame.attrs.get("notes", []))


# ---------------------------------------------------------------- benchmark folders
def is_benchmark(exp_dir: Path) -> bool:
    """A `tally benchmark` folder: its plan and spec, and no trials of a search."""
    exp_dir = Path(exp_dir)
    return all((exp_dir / f).is_file() for f in BENCHMARK_FILES) and not (exp_dir / results.TRIALS_DIR).is_dir()


def benchmark_signature(exp_dir: Path) -> tuple:
    """Stamps of the plan, the spec and every run folder (a run's files are renamed into it)."""
    exp_dir = Path(exp_dir)
    try:
        with os.scandir(exp_dir / "runs") as entries:
            runs = {e.name: e.stat().st_mtime_ns for e in entries if e.is_dir()}
    except OSError:
        runs = {}
    return (*(dd.file_stamp(exp_dir / f) for f in BENCHMARK_FILES), tuple(sorted(runs.items())))


def benchmark_settings(out: dict[str, pd.DataFrame]) -> list[str]:
    return list(dict.fromkeys(out["table"]["setting"]))


def seed_frame(out: dict[str, pd.DataFrame], setting: str) -> pd.DataFrame:
    """One setting's over-seeds table (``benchmark_tables.wide_table``): a row per method, per column the mean,
    and its standard error as ``<column> SE``; the seed-level values stay in the CSV."""
    from tally.evaluation import benchmark_tables

    wide = benchmark_tables.wide_table(out["table"], setting)
    if wide.empty:
        return wide
    columns = ["method", "seeds"]
    for col in wide.columns:
        if col not in columns and not col.endswith((":se", ":values", ":small")):
            wide = wide.rename(columns={f"{col}:se": f"{col} SE"})
            columns += [col, f"{col} SE"]
    return wide[columns]


def difference_frame(out: dict[str, pd.DataFrame], setting: str) -> pd.DataFrame:
    """One setting's paired differences against the baseline: mean ± SE over seeds, each seed's
    interval as text, and the verdict (``benchmark_tables.VERDICT_RULE``; ``comparisons`` and ``adjust``
    say how many verdicts were made and how they were adjusted)."""
    summary = out["difference_summary"]
    part = summary[summary["setting"] == setting].copy()
    part["per seed (diff [95% low, 95% high])"] = part["per_seed"].map(
        lambda t: "; ".join(f"seed {s}: {d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for s, d, lo, hi in t))
    return part.drop(columns=["per_seed", "setting"]).reset_index(drop=True)


# ---------------------------------------------------------------- Pareto front
def pareto_points(trials: dd.TrialSet) -> pd.DataFrame:
    """Finished trials with both objectives: trial_id, the two objective columns, ``front`` (on the
    Pareto front, ``results.pareto_front``) and ``picked`` (``results.select_trial``'s trial)."""
    objectives = list(trials.selection.objectives)
    frame = trials.frame
    columns = ["trial_id", *objectives, "front", "picked"]
    if len(objectives) != 2 or frame.empty or not set(objectives) <= set(frame.columns):
        return pd.DataFrame(columns=columns)
    front = results.pareto_front(frame, tuple(objectives))
    pick = results.select_trial(frame, trials.selection)
    points = frame[["trial_id", "status", *objectives]].copy()
    for col in objectives:
        points[col] = pd.to_numeric(points[col], errors="coerce")
    points["front"] = front
    points["picked"] = points["trial_id"] == (None if pick is None else pick["trial_id"])
    keep = points["status"].eq("done") & points[objectives].notna().all(axis=1)
    return points[keep][columns].reset_index(drop=True)
