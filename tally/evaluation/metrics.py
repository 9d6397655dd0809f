"""The evaluator: one per-(domain, class) table per split, and every metric derived from it.

Why one table: every number the platform reports (average accuracy, macro recall/F1, pair, class and
domain accuracies, shot buckets, the grids of the dashboard) is a function of four counts per
(domain, class) pair, so the table is the only thing a run has to store (``eval.parquet``) and every
view recomputes the same numbers from it. Counts are built with one ``np.bincount`` over the flat
pair index ``domain * C + class``: O(N + D*C), no Python loop over samples or pairs.

Why pairs with n = 0 are kept as rows but excluded from metrics: the grids must show which pairs the
split does not contain (empty cells), while an accuracy of 0/0 is undefined, so such a pair is never
counted as 0 or as 1 in any mean or minimum.

All metrics are accuracies or recall/F1 scores in [0, 1]: higher is better for every one of them.
A metric whose set of contributing pairs or classes is empty is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

TABLE_COLUMNS: tuple[str, ...] = (
    "split",
    "domain",
    "class",
    "domain_idx",
    "class_idx",
    "n_train",
    "n",
    "correct",
    "predicted",
)
COUNT_COLUMNS: tuple[str, ...] = ("n_train", "n", "correct", "predicted")

METRIC_NAMES: tuple[str, ...] = (
    "acc",
    "macro_recall",
    "macro_f1",
    "pair_acc_mean",
    "pair_acc_worst",
    "class_acc_mean",
    "class_acc_worst",
    "domain_acc_mean",
    "domain_acc_worst",
    "shot_many",
    "shot_medium",
    "shot_few",
    "shot_zero",
)
# Every metric is higher-is-better; kept as a mapping so model selection and the dashboard never
# hard-code a direction (a future loss-like metric would be added here as False).
HIGHER_IS_BETTER: dict[str, bool] = dict.fromkeys(METRIC_NAMES, True)

GRID_VALUES: tuple[str, ...] = ("acc", *COUNT_COLUMNS)

# How a metric reads in a sentence ("TALLY - ERM on worst-class accuracy: +0.12 [0.05, 0.19]").
METRIC_LABELS: dict[str, str] = {
    "acc": "accuracy",
    "macro_recall": "macro recall",
    "macro_f1": "macro F1",
    "pair_acc_mean": "mean pair accuracy",
    "pair_acc_worst": "worst-pair accuracy",
    "class_acc_mean": "mean class accuracy",
    "class_acc_worst": "worst-class accuracy",
    "domain_acc_mean": "mean domain accuracy",
    "domain_acc_worst": "worst-domain accuracy",
    "shot_many": "many-shot accuracy",
    "shot_medium": "medium-shot accuracy",
    "shot_few": "few-shot accuracy",
    "shot_zero": "zero-shot accuracy",
}


def metric_label(name: str) -> str:
    """The readable name of a metric (``domain_acc:<d>`` reads "accuracy on domain <d>")."""
    if name.startswith("domain_acc:"):
        return f"accuracy on domain {name.split(':', 1)[1]}"
    return METRIC_LABELS.get(name, name)


# --------------------------------------------------------------------------------------------------
# Counting (the only O(N) step)
# --------------------------------------------------------------------------------------------------


def _index_array(x: Any, name: str, bound: int) -> np.ndarray:
    """A 1-D int64 NumPy array of ``x`` (array, list or torch tensor, moved to the CPU).

    Values are checked to lie in [0, bound): an out-of-range class would silently land in the next
    domain's pairs. One pass: viewed as unsigned, a negative value is huge, so ``max < bound`` suffices.
    """
    if hasattr(x, "detach"):  # a torch tensor; no torch import needed here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.view(np.uint64).max() >= bound:
        raise ValueError(f"{name} values must lie in [0, {bound}), got range [{arr.min()}, {arr.max()}]")
    return arr


def pair_counts(
    preds: Any, labels: Any, domains: Any, num_domains: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n, correct, predicted)``, each a (D, C) int64 array, from 1-D predictions/labels/domains.

    ``n[d, c]`` examples of class c in domain d, ``correct[d, c]`` of them predicted as c, and
    ``predicted[d, c]`` examples of domain d (any label) predicted as c. Two bincounts: one over
    ``2 * (d*C + label) + is_correct`` gives n and correct together (cheaper than a boolean-mask
    gather), one over ``d*C + pred`` gives predicted. The training loop can call this every epoch
    without building a DataFrame.
    """
    D, C = int(num_domains), int(num_classes)
    p = _index_array(preds, "preds", C)
    y = _index_array(labels, "labels", C)
    d = _index_array(domains, "domains", D)
    if not (len(p) == len(y) == len(d)):
        raise ValueError(f"preds, labels, domains differ in length: {len(p)}, {len(y)}, {len(d)}")
    base = d * C
    key = base + y
    key <<= 1
    key += p == y
    wrong_right = np.bincount(key, minlength=2 * D * C).reshape(D, C, 2)
    correct = wrong_right[..., 1]
    n = wrong_right[..., 0] + correct
    base += p
    predicted = np.bincount(base, minlength=D * C).reshape(D, C)
    as64 = np.int64
    return n.astype(as64, copy=False), np.ascontiguousarray(correct, as64), predicted.astype(as64, copy=False)


def pair_table(
    split: str,
    preds: Any,
    labels: Any,
    domains: Any,
    class_names: Sequence[str],
    domain_names: Sequence[str],
    train_counts: Any,
) -> pd.DataFrame:
    """The long table of one split: one row per (domain, class) pair, n = 0 rows included.

    Columns ``split, domain, class, domain_idx, class_idx, n_train, n, correct, predicted``, rows in
    domain-major order. ``predicted`` (examples of that domain predicted as that class) is stored
    because n and correct alone cannot give false positives, which macro F1 (and per-domain
    precision) need. ``n_train`` is the pair's training count (``train_counts[d, c]``, shape (D, C)),
    which decides its shot bucket; names are stored next to indices so the table is readable alone.
    Tables of several splits are combined with ``pd.concat``.
    """
    D, C = len(domain_names), len(class_names)
    n_train = np.asarray(train_counts.detach().cpu() if hasattr(train_counts, "detach") else train_counts)
    if n_train.shape != (D, C):
        raise ValueError(f"train_counts must have shape (D, C) = {(D, C)}, got {n_train.shape}")
    n, correct, predicted = pair_counts(preds, labels, domains, D, C)
    return pd.DataFrame(
        {
            "split": np.full(D * C, split, dtype=object),
            "domain": np.repeat(np.asarray(domain_names, dtype=object), C),
            "class": np.tile(np.asarray(class_names, dtype=object), D),
            "domain_idx": np.repeat(np.arange(D, dtype=np.int64), C),
            "class_idx": np.tile(np.arange(C, dtype=np.int64), D),
            "n_train": n_train.astype(np.int64).ravel(),
            "n": n.ravel(),
            "correct": correct.ravel(),
            "predicted": predicted.ravel(),
        }
    )


# --------------------------------------------------------------------------------------------------
# Arithmetic shared by every metric (and by the bootstrap's replicates)
# --------------------------------------------------------------------------------------------------


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den as float, NaN where den == 0 (no 0/0 warnings, no 0/0 counted as 0 or 1)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def _mean_worst(values: np.ndarray, mask: np.ndarray) -> tuple[Any, Any]:
    """Mean and minimum of ``values[..., mask]`` over the masked trailing axes; NaN when the mask is empty.

    ``values`` may carry leading (replicate) axes in front of the mask's shape: the bootstrap
    (tally.evaluation.intervals) computes every metric for all replicates at once through this same function.
    """
    v = values[..., mask]
    if v.shape[-1] == 0:
        nan = np.full(v.shape[:-1], np.nan)
        return nan, nan
    return v.mean(axis=-1), v.min(axis=-1)


def pair_accuracy(n: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """(D, C) pair accuracies correct / n, NaN where n = 0: the one array the pair metrics share."""
    return _ratio(correct, n)


# --------------------------------------------------------------------------------------------------
# Shot-bucket thresholds per dataset (the BoDA benchmark's protocol)
# --------------------------------------------------------------------------------------------------


class ShotThresholds(NamedTuple):
    """many: training count > many_above; few: 1..few_at_most; zero: 0; medium: the rest."""

    many_above: int = 100
    few_at_most: int = 20


DEFAULT_SHOT_THRESHOLDS = ShotThresholds()
# The MDLT benchmark (Yang et al. 2022, github YyzHarry/multi-domain-imbalance) uses other thresholds
# for datasets whose pairs are small (OfficeHome) or whose tails are longer (TerraIncognita). Keys are
# dataset names lower-cased with everything but letters and digits removed (OfficeHome, office_home).
DATASET_SHOT_THRESHOLDS: dict[str, ShotThresholds] = {
    "officehome": ShotThresholds(many_above=60, few_at_most=20),
    "terraincognita": ShotThresholds(many_above=100, few_at_most=25),
}


def shot_thresholds(dataset: str | None = None, many_above: int | None = None,
                    few_at_most: int | None = None) -> ShotThresholds:
    """The thresholds of ``dataset`` (the default for unknown or no dataset), each overridable."""
    key = "".join(ch for ch in str(dataset or "").lower() if ch.isalnum())
    base = DATASET_SHOT_THRESHOLDS.get(key, DEFAULT_SHOT_THRESHOLDS)
    out = ShotThresholds(base.many_above if many_above is None else int(many_above),
                         base.few_at_most if few_at_most is None else int(few_at_most))
    if out.few_at_most >= out.many_above:
        raise ValueError(f"few_at_most ({out.few_at_most}) must be below many_above ({out.many_above})")
    return out


def shot_thresholds_of(data_cfg: dict | None) -> ShotThresholds:
    """The thresholds a run's ``data`` config section asks for: its dataset's, unless set explicitly
    (``data.shot_many_above`` / ``data.shot_few_at_most``; null means the dataset's default)."""
    data_cfg = data_cfg or {}
    return shot_thresholds(data_cfg.get("dataset"), data_cfg.get("shot_many_above"),
                           data_cfg.get("shot_few_at_most"))


# --------------------------------------------------------------------------------------------------
# Metrics from the (D, C) count arrays
# --------------------------------------------------------------------------------------------------


def metric_arrays(
    n: np.ndarray,
    correct: np.ndarray,
    predicted: np.ndarray,
    n_train: np.ndarray,
    many_above: int = 100,
    few_at_most: int = 20,
) -> dict[str, np.ndarray]:
    """Every metric as an array over the leading axes of ``correct`` / ``predicted``.

    ``n`` and ``n_train`` are (D, C); ``correct`` and ``predicted`` are (..., D, C). With no leading
    axes every value is a 0-d array (``metrics_from_counts`` turns them into floats); with a leading
    replicate axis R every value has shape (R,). ``n`` has no replicate axis because a bootstrap
    within pairs keeps each pair's size, so every mask below (which pairs, classes, domains and
    buckets count) is the same for all replicates and the whole computation stays vectorised.
    Definitions in ``metrics_from_counts``.
    """
    n = np.asarray(n)
    correct = np.asarray(correct)
    predicted = np.asarray(predicted)
    n_train = np.asarray(n_train)
    if not (n.shape == n_train.shape == correct.shape[-2:] == predicted.shape[-2:]) or n.ndim != 2 \
            or correct.shape != predicted.shape:
        raise ValueError("n, n_train must be (D, C) arrays and correct, predicted (..., D, C) of that shape")
    if few_at_most >= many_above:
        raise ValueError(f"few_at_most ({few_at_most}) must be below many_above ({many_above})")

    out: dict[str, np.ndarray] = {}
    total = n.sum()
    out["acc"] = correct.sum(axis=(-2, -1)) / total if total > 0 else np.full(correct.shape[:-2], np.nan)

    support = n.sum(axis=0)
    tp = correct.sum(axis=-2)
    pred_total = predicted.sum(axis=-2)
    present = support > 0
    out["macro_recall"], _ = _mean_worst(_ratio(tp, support), present)
    # WILDS' F1: classes present in the true labels only; predictions of an absent class still count
    # as false positives of that class, but the class itself is not averaged in.
    out["macro_f1"], _ = _mean_worst(_ratio(2 * tp, support + pred_total), present)

    valid = n > 0
    acc = pair_accuracy(n, correct)
    acc0 = np.where(valid, acc, 0.0)
    out["pair_acc_mean"], out["pair_acc_worst"] = _mean_worst(acc, valid)
    cls_count = valid.sum(axis=0)
    out["class_acc_mean"], out["class_acc_worst"] = _mean_worst(
        _ratio(acc0.sum(axis=-2), cls_count), cls_count > 0
    )
    dom_count = valid.sum(axis=1)
    out["domain_acc_mean"], out["domain_acc_worst"] = _mean_worst(
        _ratio(acc0.sum(axis=-1), dom_count), dom_count > 0
    )

    many = n_train > many_above
    few = (n_train >= 1) & (n_train <= few_at_most)
    zero = n_train <= 0
    medium = ~(many | few | zero)
    for name, bucket in (
        ("shot_many", many),
        ("shot_medium", medium),
        ("shot_few", few),
        ("shot_zero", zero),
    ):
        out[name], _ = _mean_worst(acc, bucket & valid)
    return out


def domain_accuracies(n: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """(..., D) accuracy of each domain (mean of its n > 0 pair accuracies; NaN for an empty domain).

    The per-domain columns of a report; ``domain_acc_mean`` / ``_worst`` are their mean / minimum.
    """
    valid = np.asarray(n) > 0
    acc0 = np.where(valid, pair_accuracy(n, correct), 0.0)
    return _ratio(acc0.sum(axis=-1), valid.sum(axis=1))


def metrics_from_counts(
    n: np.ndarray,
    correct: np.ndarray,
    predicted: np.ndarray,
    n_train: np.ndarray,
    many_above: int = 100,
    few_at_most: int = 20,
) -> dict[str, float]:
    """Every metric of METHOD.md from (D, C) count arrays; keys in ``METRIC_NAMES`` order.

    - acc: micro accuracy, sum(correct) / sum(n).
    - macro_recall: mean over classes with support > 0 of TP / support (a class absent from the
      split has no defined recall, so it is left out rather than scored 0).
    - macro_f1: WILDS' definition (the paper's TerraIncognita and iWildCam numbers): mean over the
      classes present in the split's true labels of 2 TP / (support + predicted), i.e. sklearn's
      ``f1_score(y, p, labels=unique(y), average='macro')``. A class predicted but never true is not
      averaged in (it does not lower the score); its false predictions still lower the F1 of the
      true classes through their recall.
    - pair_acc_*: mean / minimum of correct / n over pairs with n > 0.
    - class_acc_*: a class's accuracy is the mean over domains of its pair accuracies (n > 0 pairs),
      so every domain weighs equally whatever its size; then mean / minimum over classes.
    - domain_acc_*: the same with the roles of domain and class swapped.
    - shot_*: mean pair accuracy (n > 0 pairs) of the pairs whose TRAINING count is > many_above
      (many), in 1..few_at_most (few), 0 (zero), or in between (medium). Buckets follow the
      training count of the pair, not of the class: the point is long tails inside each domain.
      Thresholds differ per dataset (``shot_thresholds``).
    """
    n = np.asarray(n)
    if np.asarray(correct).shape != n.shape:
        raise ValueError("n, correct, predicted, n_train must be (D, C) arrays of one shape")
    arrays = metric_arrays(n, correct, predicted, n_train, many_above, few_at_most)
    return {name: float(arrays[name]) for name in METRIC_NAMES}


# --------------------------------------------------------------------------------------------------
# Metrics and views from the long table
# --------------------------------------------------------------------------------------------------


def _one_split(table: pd.DataFrame, split: str | None = None) -> pd.DataFrame:
    """The rows of ``split`` (or of the table's only split); errors name what is wrong."""
    if split is None:
        splits = pd.unique(table["split"])
        if len(splits) != 1:
            raise ValueError(f"expected a table of one split, got splits {list(splits)}")
        return table
    rows = table[table["split"] == split]
    if rows.empty:
        raise KeyError(f"split {split!r} not in table (has {list(pd.unique(table['split']))})")
    return rows


def _counts(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """(D, C) arrays of the count columns of one split's rows.

    Scatters by ``domain_idx, class_idx`` so row order does not matter; a pair without a row counts
    as n = 0, the same meaning a zero row has.
    """
    d = rows["domain_idx"].to_numpy(np.int64)
    c = rows["class_idx"].to_numpy(np.int64)
    shape = (int(d.max()) + 1, int(c.max()) + 1)
    arrays = {}
    for col in COUNT_COLUMNS:
        grid = np.zeros(shape, dtype=np.int64)
        grid[d, c] = rows[col].to_numpy(np.int64)
        arrays[col] = grid
    return arrays


def _names(rows: pd.DataFrame, name_col: str, idx_col: str, size: int) -> list[str]:
    """Names in index order (scattered like the counts; an index without rows is named by number)."""
    names = np.array([str(i) for i in range(size)], dtype=object)
    names[rows[idx_col].to_numpy(np.int64)] = rows[name_col].astype(str).to_numpy(dtype=object)
    return names.tolist()


def count_arrays(table: pd.DataFrame, split: str | None = None) -> dict[str, np.ndarray]:
    """(D, C) arrays ``n_train, n, correct, predicted`` of one split (of the table's only split if None)."""
    return _counts(_one_split(table, split))


def split_metrics(table: pd.DataFrame, many_above: int = 100, few_at_most: int = 20) -> dict[str, float]:
    """Every metric of one split's table (see ``metrics_from_counts`` for the definitions)."""
    a = count_arrays(table)
    return metrics_from_counts(a["n"], a["correct"], a["predicted"], a["n_train"], many_above, few_at_most)


def all_metrics(
    table: pd.DataFrame, many_above: int = 100, few_at_most: int = 20
) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` for every split of a (concatenated) table, in table order."""
    return {
        str(split): split_metrics(rows, many_above, few_at_most)
        for split, rows in table.groupby("split", sort=False)
    }


def accuracy_grid(table: pd.DataFrame, split: str, value: str = "acc") -> pd.DataFrame:
    """Domains x classes DataFrame of one split: pair accuracy (NaN where n = 0) or a count column.

    ``value`` is ``acc`` or one of ``n_train, n, correct, predicted``; NaN (not 0) for empty pairs
    so a heat map shows them as blank rather than as failures.
    """
    if value not in GRID_VALUES:
        raise ValueError(f"value must be one of {GRID_VALUES}, got {value!r}")
    rows = _one_split(table, split)
    arrays = _counts(rows)
    grid = pair_accuracy(arrays["n"], arrays["correct"]) if value == "acc" else arrays[value]
    D, C = grid.shape
    return pd.DataFrame(
        grid,
        index=pd.Index(_names(rows, "domain", "domain_idx", D), name="domain"),
        columns=pd.Index(_names(rows, "class", "class_idx", C), name="class"),
    )


def worst_pairs(table: pd.DataFrame, split: str, k: int = 10) -> pd.DataFrame:
    """The k pairs (n > 0) of one split with the lowest accuracy, with an ``acc`` column.

    Ties go to the pair with more test examples (its low accuracy is the better-supported one).
    """
    rows = _one_split(table, split)
    rows = rows[rows["n"] > 0].copy()
    rows["acc"] = rows["correct"].to_numpy(np.float64) / rows["n"].to_numpy(np.float64)
    rows = rows.sort_values(["acc", "n", "domain_idx", "class_idx"], ascending=[True, False, True, True])
    return rows.head(k).reset_index(drop=True)


def difference_grid(table_a: pd.DataFrame, table_b: pd.DataFrame, split: str) -> pd.DataFrame:
    """Pair accuracy of a minus that of b (domains x classes); NaN where either pair has n = 0.

    Both tables must cover the same domains and classes: silently aligning different index spaces
    would compare unrelated pairs.
    """
    a = accuracy_grid(table_a, split)
    b = accuracy_grid(table_b, split)
    if not (a.index.equals(b.index) and a.columns.equals(b.columns)):
        raise ValueError("tables differ in domains or classes; cannot difference them")
    return a - b
