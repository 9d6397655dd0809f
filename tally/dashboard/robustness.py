"""Dashboard data of robustness: the chosen config re-run on the subpopulation split and with each domain
held out (``tally search`` with ``robustness:`` in the spec), one row per setting.

Read from the runs' folders (``<experiment>/robustness/<run>/``: status and metrics while they run) and,
for stores whose folders are gone, from ``robustness.parquet`` (what the search writes when they end).
Plain pandas; nothing here imports streamlit.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from tally import results

GROUP = "robustness"
TABLE = "robustness.parquet"
SHOWN_METRICS = ("acc", "pair_acc_mean", "pair_acc_worst", "class_acc_worst", "macro_f1", "shot_few",
                 "shot_zero")
_SEED = re.compile(r"-seed\d+$")


def setting_of(run_id: str) -> str:
    """``heldout-photo-seed3`` -> ``heldout-photo``: the runs of one setting differ only in their seed."""
    return _SEED.sub("", run_id)


def headline_split(setting: str) -> str:
    """The split a setting is scored on: test_sub for sub-shift, the held-out domain's test split else."""
    return f"test_domain:{setting.removeprefix('heldout-')}" if setting.startswith("heldout-") else "test_sub"


def robustness_runs(exp_dir: Path) -> pd.DataFrame:
    """One row per (run, test split): run, setting, status, split and the split's metrics.

    A run without metrics yet (running, failed) keeps one row with its status and no split.
    """
    exp_dir = Path(exp_dir)
    rows = []
    folders = sorted(p for p in (exp_dir / GROUP).glob("*") if p.is_dir())
    for folder in folders:
        status = (results.read_json(folder / "status.json") or {}).get("status", "pending")
        metrics = results.read_json(folder / "metrics.json") or {}
        tests = {s: v for s, v in metrics.items() if s != "val"}
        base = {"run": folder.name, "setting": setting_of(folder.name), "status": status}
        rows += [{**base, "split": s, **v} for s, v in tests.items()] or [{**base, "split": None}]
    if not folders:
        stored = results.read_parquet(exp_dir / TABLE)
        if stored is None or stored.empty or "run" not in stored:
            return pd.DataFrame(columns=["run", "setting", "status", "split"])
        stored = stored.assign(setting=stored["run"].astype(str).map(setting_of), status="done")
        return stored[["run", "setting", "status", *[c for c in stored.columns
                                                     if c not in ("run", "setting", "status")]]]
    return pd.DataFrame(rows)


def robustness_table(runs: pd.DataFrame, metrics: tuple[str, ...] = SHOWN_METRICS) -> pd.DataFrame:
    """One row per setting, scored on its headline split: the mean of each metric over the setting's
    finished runs (seeds), their number, the standard error of pair_acc_worst, and the runs' statuses.

    Settings come sub-shift first, then held-out domains by name.
    """
    cols = ["setting", "split", "runs_done", "runs", "statuses", *metrics, "pair_acc_worst_stderr"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for setting, group in runs.groupby("setting", sort=False):
        split = headline_split(str(setting))
        scored = group[group["split"] == split]
        statuses = group.drop_duplicates("run")["status"].value_counts()
        row = {"setting": setting, "split": split, "runs_done": int(scored["run"].nunique()),
               "runs": int(group["run"].nunique()),
               "statuses": ", ".join(f"{n} {s}" for s, n in statuses.items())}
        for m in metrics:
            values = pd.to_numeric(scored[m], errors="coerce").dropna() if m in scored else pd.Series()
            row[m] = float(values.mean()) if len(values) else float("nan")
        worst = pd.to_numeric(scored.get("pair_acc_worst", pd.Series(dtype=float)), errors="coerce").dropna()
        row["pair_acc_worst_stderr"] = (float(worst.std(ddof=1) / np.sqrt(len(worst))) if len(worst) > 1
                                        else float("nan"))
        rows.append(row)
    out = pd.DataFrame(rows, columns=cols)
    order = out["setting"].map(lambda s: (s != "sub", s))
    return out.loc[order.sort_values().index].reset_index(drop=True)
