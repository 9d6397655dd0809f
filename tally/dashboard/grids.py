"""Dashboard data of the accuracy grids: a split's domain x class grid, class orders, the training-count
profile, the shot-bucket summary and the worst pairs, all from the run's long table.

Why a module of its own: at DomainNet scale (345 classes x 6 domains) a grid is read through its class
order (the long tail left to right), its training-count profile and its aggregates, not cell by cell.
Plain pandas on ``tally.evaluation``; nothing here imports streamlit.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tally import evaluation as ev

LARGE_GRID_CLASSES = 40  # above this a cell is too narrow for text: the grid switches to the large-grid views
ORDERS = ("training count", "name", "accuracy")
SHOT_BUCKETS = ("many", "medium", "few", "zero")
# The evaluator's bucket thresholds, read from its signature so the dashboard can never disagree with it.
_EVAL_DEFAULTS = inspect.signature(ev.split_metrics).parameters
MANY_ABOVE = _EVAL_DEFAULTS["many_above"].default
FEW_AT_MOST = _EVAL_DEFAULTS["few_at_most"].default


@dataclass
class Grid:
    """One split's grid: accuracy (NaN where n = 0), test counts and training counts."""

    split: str
    acc: pd.DataFrame
    n: pd.DataFrame
    n_train: pd.DataFrame

    @property
    def shape(self) -> tuple[int, int]:
        return self.acc.shape

    @property
    def large(self) -> bool:
        return self.shape[1] > LARGE_GRID_CLASSES

    def without_empty_domains(self) -> tuple[Grid, list[str]]:
        """The grid minus domains with no test example at all (e.g. training domains in a held-out
        domain's split): whole blank rows carry no information; blank cells inside a row still do."""
        keep = self.n.sum(axis=1) > 0
        dropped = [str(d) for d in self.n.index[~keep]]
        if not dropped or not keep.any():
            return self, []
        return Grid(self.split, self.acc[keep], self.n[keep], self.n_train[keep]), dropped

    def ordered(self, classes: list[str]) -> Grid:
        """The grid with its columns in ``classes`` order (classes it lacks are skipped)."""
        cols = [c for c in classes if c in self.acc.columns]
        return Grid(self.split, self.acc[cols], self.n[cols], self.n_train[cols])

    def labels(self) -> list[list[str]]:
        """Cell text: the accuracy alone (training and test counts are on hover); empty for empty pairs."""
        return [["" if math.isnan(a) else f"{a:.2f}" for a in row] for row in self.acc.to_numpy(dtype=float)]


def grid(table: pd.DataFrame, split: str) -> Grid:
    return Grid(split, ev.accuracy_grid(table, split, "acc"), ev.accuracy_grid(table, split, "n"),
                ev.accuracy_grid(table, split, "n_train"))


def training_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Domains x classes training counts of the run (``n_train`` is the same in every split's rows)."""
    return ev.accuracy_grid(table, str(table["split"].iloc[0]), "n_train")


def class_order(table: pd.DataFrame, by: str, domain: str | None = None, split: str | None = None) -> list[str]:
    """Classes left to right: by training count (most first, so the long tail runs to the right), by
    name, or by accuracy on ``split`` (best first). ``domain`` ranks by that domain's row instead of
    all domains (the sum of training counts, the class accuracy as the evaluator defines it: the mean
    over domains of pair accuracies). Ties and unknown values (NaN) go last, then by name."""
    if by not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {by!r}")
    counts = training_counts(table)
    names = [str(c) for c in counts.columns]
    if by == "name":
        return sorted(names)
    if by == "training count":
        key = counts.loc[domain] if domain is not None else counts.sum(axis=0)
    else:
        acc = ev.accuracy_grid(table, split or str(table["split"].iloc[0]), "acc")
        key = acc.loc[domain] if domain is not None else acc.mean(axis=0, skipna=True)
        key = key.reindex(counts.columns)
    frame = pd.DataFrame({"name": names, "key": pd.to_numeric(key, errors="coerce").to_numpy(dtype=float)})
    frame = frame.sort_values(["key", "name"], ascending=[False, True], na_position="last", kind="stable")
    return frame["name"].tolist()


def profile(table: pd.DataFrame, classes: list[str], domain: str | None = None) -> pd.Series:
    """Training count per class in ``classes`` order: of ``domain``, or summed over domains."""
    counts = training_counts(table)
    row = counts.loc[domain] if domain is not None else counts.sum(axis=0)
    return row.reindex(classes).fillna(0).astype(np.int64)


def shot_bucket(n_train) -> np.ndarray:
    """The evaluator's shot bucket of a pair from its training count (see evaluation.metrics_from_counts)."""
    n_train = np.asarray(n_train)
    return np.select([n_train > MANY_ABOVE, (n_train >= 1) & (n_train <= FEW_AT_MOST), n_train <= 0],
                     ["many", "few", "zero"], default="medium")


def shot_table(g: Grid) -> pd.DataFrame:
    """Per domain (and over all domains): mean pair accuracy in each shot bucket and its number of pairs.

    Rows are the grid's domains plus ``all domains``; columns ``<bucket>`` (mean accuracy of the pairs
    with test examples, NaN where none) and ``<bucket> pairs``. The ``all domains`` row equals the
    evaluator's shot_* metrics of the split.
    """
    acc, n = g.acc.to_numpy(dtype=float), g.n.to_numpy()
    buckets = shot_bucket(g.n_train.to_numpy())
    valid = n > 0
    rows = {}
    for label, mask in [*((str(d), np.arange(len(g.acc)) == i) for i, d in enumerate(g.acc.index)),
                        ("all domains", np.ones(len(g.acc), dtype=bool))]:
        row = {}
        for b in SHOT_BUCKETS:
            sel = (buckets == b) & valid & mask[:, None]
            row[b] = float(acc[sel].mean()) if sel.any() else float("nan")
            row[f"{b} pairs"] = int(sel.sum())
        rows[label] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "domain"
    return out[[*SHOT_BUCKETS, *(f"{b} pairs" for b in SHOT_BUCKETS)]]


def worst_pairs(table: pd.DataFrame, split: str, k: int = 10) -> pd.DataFrame:
    """The evaluator's k worst pairs (n > 0) of a split, with their training count and shot bucket."""
    cols = ["domain", "class", "acc", "correct", "n", "n_train"]
    rows = ev.worst_pairs(table, split, k)
    rows = rows[[c for c in cols if c in rows.columns]].copy()
    rows["shot"] = shot_bucket(rows["n_train"].to_numpy()) if "n_train" in rows else None
    rows.insert(0, "rank", np.arange(1, len(rows) + 1))
    return rows


def difference(table_a: pd.DataFrame, table_b: pd.DataFrame, split: str) -> pd.DataFrame:
    return ev.difference_grid(table_a, table_b, split)
