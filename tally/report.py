"""DomainBed-style tables of an experiment: rows trials (or settings), columns domains and summaries.

Every number comes from the stored per-(domain, class) tables through tally.evaluation.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tally import evaluation, results
from tally.errors import TallyError

SUMMARY_COLUMNS = {"pair_acc_mean": "avg pair", "pair_acc_worst": "worst pair", "shot_many": "many",
                   "shot_medium": "medium", "shot_few": "few", "shot_zero": "zero"}


def run_row(table: pd.DataFrame, split: str) -> dict:
    """Per-domain accuracy (mean pair accuracy within the domain) plus summary metrics of a split."""
    grid = evaluation.accuracy_grid(table, split)
    row = {f"{domain}": value for domain, value in grid.mean(axis=1, skipna=True).items()}
    metrics = evaluation.split_metrics(table[table["split"] == split])
    row.update({label: metrics[key] for key, label in SUMMARY_COLUMNS.items()})
    return row


def experiment_table(exp_dir: Path, split: str | None = None, group: str = results.TRIALS_DIR) -> pd.DataFrame:
    """One row per finished run of ``group`` (trials, confirm, robustness) on each test split."""
    rows = []
    for run_dir in sorted((Path(exp_dir) / group).glob("*/eval.parquet")):
        table = pd.read_parquet(run_dir)
        name = run_dir.parent.name
        method = (results.read_yaml(run_dir.parent / "config.yaml") or {}).get("method", {}).get("name", "?")
        splits = [split] if split else sorted(s for s in table["split"].unique() if s != "val")
        for s in splits:
            if s not in set(table["split"]):
                continue
            rows.append({"run": name, "method": method, "split": s, **run_row(table, s)})
    if not rows:
        raise TallyError(f"{exp_dir}: no finished runs with evaluation tables under {group}/")
    return pd.DataFrame(rows)


def format_table(df: pd.DataFrame, fmt: str = "markdown") -> str:
    shown = df.copy()
    numeric = shown.select_dtypes("number").columns
    shown[numeric] = (shown[numeric] * 100).round(1)  # percent, as DomainBed tables print them
    if fmt == "latex":
        return shown.to_latex(index=False, float_format="%.1f", na_rep="--")
    header = "| " + " | ".join(map(str, shown.columns)) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    body = ["| " + " | ".join("--" if pd.isna(v) else (f"{v:.1f}" if isinstance(v, float) else str(v))
                              for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *body])
