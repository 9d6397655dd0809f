"""DomainBed-style tables of an experiment: rows runs (or configs over seeds), columns domains and summaries.

Every number comes from the stored per-(domain, class) tables through tally.evaluation, and every
number is shown with its uncertainty: a run's metric with its 95% interval over the test images
(tally.evaluation.intervals: the method per kind of metric, coverage measured), or, over seeds, the
mean ± a standard error that combines the seed-to-seed spread and the test-set noise, with the
seed-level values. A metric column ``m`` of a table frame has companions ``m:low`` / ``m:high``
(interval), ``m:small`` (cells of < 5 images under a worst-case value) or ``m:se`` / ``m:values``
(seeds), which ``format_table`` folds into one cell; ``legend`` says what they mean in one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from tally import results
from tally.errors import TallyError
from tally.evaluation import calibration, intervals
from tally.evaluation import metrics as evaluation

SUMMARY_COLUMNS = {"pair_acc_mean": "avg pair", "domain_acc_worst": "worst domain",
                   "class_acc_worst": "worst class", "pair_acc_worst": "worst pair", "shot_many": "many",
                   "shot_medium": "medium", "shot_few": "few", "shot_zero": "zero", "macro_f1": "macro F1"}
# calibration (evaluation/calibration.py; lower is better), for runs that kept their logits
CALIBRATION_COLUMNS = {"ece": "ECE", "ts_ece": "ECE after T", "ece_worst_domain": "worst-domain ECE",
                       "aurc": "AURC"}
ID_COLUMNS = ("run", "method", "split", "seeds")
LOW, HIGH, SE, VALUES, SMALL = ":low", ":high", ":se", ":values", ":small"
# seeds of one config: runs whose configs differ only in these fields are the same config
SEED_FIELDS = (("train", "seed"), ("method", "seed"))


def _columns(estimates: pd.DataFrame, interval: bool) -> dict:
    """Report columns of one run and split from ``intervals.table_intervals`` rows (domains, then summaries)."""
    by_metric = estimates.set_index("metric")
    row = {}
    names = [m for m in by_metric.index if m.startswith(intervals.DOMAIN_PREFIX)]
    labels = {m: m[len(intervals.DOMAIN_PREFIX):] for m in names}
    labels.update(SUMMARY_COLUMNS)
    for metric, label in labels.items():
        row[label] = by_metric.at[metric, "value"]
        if interval:
            row[label + LOW], row[label + HIGH] = by_metric.at[metric, "low"], by_metric.at[metric, "high"]
            row[label + SMALL] = int(by_metric.at[metric, "small_cells"])
    return row


def run_row(table: pd.DataFrame, split: str, thresholds=evaluation.DEFAULT_SHOT_THRESHOLDS,
            predictions: pd.DataFrame | None = None, replicates: int = intervals.REPLICATES,
            seed: int = intervals.SEED) -> dict:
    """Per-domain accuracy (mean pair accuracy within the domain) plus summary metrics of a split,
    each with its 95% interval (``replicates`` 0: point values only; else macro F1's draws)."""
    estimates = intervals.table_intervals(table, predictions, splits=[split], replicates=max(replicates, 1),
                                          seed=seed, thresholds=thresholds)
    return _columns(estimates, interval=replicates > 0)


def _calibration_columns(estimates: pd.DataFrame, interval: bool) -> dict:
    """The calibration columns of one run and split (none for a run without logits)."""
    by_metric = estimates.set_index("metric")
    row = {}
    for metric, label in CALIBRATION_COLUMNS.items():
        if metric in by_metric.index:
            row[label] = by_metric.at[metric, "value"]
            if interval:
                row[label + LOW], row[label + HIGH] = by_metric.at[metric, "low"], by_metric.at[metric, "high"]
    return row


def _config_key(cfg: dict) -> str:
    """The config without its seeds: runs sharing it are seeds of one config."""
    cfg = json.loads(json.dumps(cfg, default=str))
    for section, field in SEED_FIELDS:
        (cfg.get(section) or {}).pop(field, None)
    return json.dumps(cfg, sort_keys=True)


def experiment_table(exp_dir: Path, split: str | None = None, group: str = results.TRIALS_DIR, *,
                     replicates: int = intervals.REPLICATES, seed: int = intervals.SEED,
                     many_above: int | None = None, few_at_most: int | None = None) -> pd.DataFrame:
    """One row per finished run of ``group`` (trials, confirm, robustness) on each test split.

    Shot thresholds: each run's config (its dataset's, ``evaluation.shot_thresholds``) unless
    ``many_above`` / ``few_at_most`` are given. Intervals: ``intervals.table_intervals`` (``replicates``
    0 = none; else macro F1's draws).
    """
    rows = []
    for path in sorted((Path(exp_dir) / group).glob("*/eval.parquet")):
        run_dir = path.parent
        table = results.read_parquet(path)
        if table is None:  # listed by left_out(), not raised on: one bad file hides only its run
            continue
        cfg = results.read_yaml(run_dir / "config.yaml") or {}
        data = {**(cfg.get("data") or {}), **{k: v for k, v in (("shot_many_above", many_above),
                                                                 ("shot_few_at_most", few_at_most)) if v is not None}}
        try:
            thresholds = evaluation.shot_thresholds_of(data)
        except ValueError as e:
            raise TallyError(f"{run_dir}: shot thresholds: {e}") from None
        predictions = intervals.read_predictions(run_dir)
        splits = [split] if split else sorted(s for s in table["split"].unique() if s != "val")
        cal = calibration.calibration_intervals(run_dir, splits, replicates=max(replicates, 1), seed=seed,
                                                thresholds=thresholds)
        for s in splits:
            if s not in set(table["split"]):
                continue
            rows.append({"run": run_dir.name, "method": method_label(cfg), "split": s,
                         "_config": _config_key(cfg), "_seed": (cfg.get("train") or {}).get("seed"),
                         **run_row(table, s, thresholds, predictions, replicates, seed),
                         **_calibration_columns(cal[cal["split"] == s], replicates > 0)})
    if not rows:
        raise TallyError(f"{exp_dir}: no finished runs with evaluation tables under {group}/")
    return pd.DataFrame(rows)


def method_label(cfg: dict) -> str:
    """A run's method name, marked when its kept epoch was selected on test images (data.oracle_selection)."""
    name = str((cfg.get("method") or {}).get("name", "?"))
    return f"{name} (ORACLE selection)" if (cfg.get("data") or {}).get("oracle_selection") else name


def left_out(exp_dir: Path, group: str = results.TRIALS_DIR) -> list[str]:
    """One line per run of ``group`` that the table cannot show, and why: failed (with its error),
    stopped, lost, still running, or finished with unreadable files."""
    lines = []
    for run_dir in sorted(p for p in (Path(exp_dir) / group).glob("*") if p.is_dir()):
        record = results.read_run(run_dir)
        state = record.state
        if record.eval_table is not None and state not in ("failed", "stopped", "lost", "running"):
            continue  # in the table (an older store may lack status.json)
        why = {"failed": f"failed: {record.status.get('error') or 'no error recorded'}",
               "stopped": f"stopped: {record.status.get('reason') or record.status.get('error') or 'early'}",
               "lost": "lost: its owner stopped without a final status (killed?)"}.get(state, state)
        if record.unreadable:
            why += "; " + "; ".join(f"{name} {reason}" for name, reason in record.unreadable.items())
        lines.append(f"{run_dir.name}: {why}")
    return lines


def seed_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Runs of one config (differing only in seeds) folded into one row per split: each metric's mean,
    standard error and seed-level values (``intervals.seed_summary``: the SE carries the seed-to-seed
    spread and, where the runs have intervals, the test-set noise every seed shares); ``seeds`` counts
    the runs."""
    metrics = [c for c in frame.columns if c not in ID_COLUMNS and not c.startswith("_") and ":" not in c]
    rows = []
    for (_, split), runs in frame.groupby(["_config", "split"], sort=False):
        by_seed = {str(r["run"]): {m: r[m] for m in metrics} for _, r in runs.iterrows()}
        half = ({str(r["run"]): {m: (r[m + HIGH] - r[m + LOW]) / 2 for m in metrics if m + LOW in r}
                 for _, r in runs.iterrows()} if any(m + LOW in frame for m in metrics) else None)
        summary = intervals.seed_summary(by_seed, half).set_index("metric")
        row = {"run": ", ".join(by_seed), "method": runs["method"].iloc[0], "split": split, "seeds": len(runs)}
        for m in metrics:
            row[m], row[m + SE], row[m + VALUES] = summary.at[m, "mean"], summary.at[m, "stderr"], \
                summary.at[m, "values"]
            if m + SMALL in runs:
                row[m + SMALL] = runs[m + SMALL].max()
        rows.append(row)
    return pd.DataFrame(rows)


def _percent(value, digits: int = 1) -> str:
    return "--" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def legend(df: pd.DataFrame) -> str:
    """One line saying what the table's ± and [ ] mean (printed under every table)."""
    if any(c.endswith(SE) for c in df.columns):
        seeds = pd.to_numeric(df.get("seeds", pd.Series([0])), errors="coerce").min()
        text = ("mean over seeds ± SE (seed-to-seed spread and the test-set noise all seeds share), then each "
                "seed's value")
        if seeds == seeds and seeds <= 3:
            text += f"; with {int(seeds)} seed(s) the spread is itself uncertain (an SE from 2-3 values can be far off)"
        return text + "; '!k': a worst-case value resting on k cells with < 5 test images."
    return intervals.LEGEND_RUN + "."


def format_table(df: pd.DataFrame, fmt: str = "markdown") -> str:
    """Markdown or LaTeX, in percent as DomainBed prints: ``85.3 [82.1, 88.0]`` (a run's 95% interval;
    ``!3``: a worst-case value resting on 3 cells of < 5 images) or ``85.3 ± 1.2 (84.1, 86.5)`` (mean ±
    SE over seeds, then each seed's value); ``legend`` says so in one line."""
    pm = r"$\pm$" if fmt == "latex" else "±"
    shown = {}
    for col in df.columns:
        if col.startswith("_") or ":" in col:
            continue
        values = df[col]
        if col in ID_COLUMNS or not pd.api.types.is_numeric_dtype(values):
            shown[col] = values.astype(str)
            continue
        cells = []
        for i, v in enumerate(values):
            cell = _percent(v)
            if col + LOW in df and not math.isnan(df[col + LOW].iat[i]):
                cell += f" [{_percent(df[col + LOW].iat[i])}, {_percent(df[col + HIGH].iat[i])}]"
            if col + SMALL in df and df[col + SMALL].iat[i] == df[col + SMALL].iat[i] and df[col + SMALL].iat[i] > 0:
                cell += f" !{int(df[col + SMALL].iat[i])}"
            if col + SE in df and cell != "--":
                se = df[col + SE].iat[i]
                cell += f" {pm} {_percent(se)}" if not math.isnan(se) else ""
                cell += " (" + ", ".join(_percent(x) for x in df[col + VALUES].iat[i]) + ")"
            cells.append(cell)
        shown[col] = cells
    shown = pd.DataFrame(shown)
    if fmt == "latex":
        return shown.to_latex(index=False, na_rep="--")
    header = "| " + " | ".join(map(str, shown.columns)) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *body])
