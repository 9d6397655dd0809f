"""Every interval the platform shows: per-metric-kind intervals of one run, paired differences of two
runs on the same test images, and the spread over seeds. Coverage measured by bench/coverage.py.

Why not a percentile bootstrap within cells (what this module did before, kept in git history): a
cell of one image, or one that is all right or all wrong, resamples with zero variance, and the
bootstrap of a minimum is biased low on top of the estimate's own bias. Simulated from known
accuracies it covered the worst pair in 0-22% of test sets and called equal models different in up
to 31%. The population value an interval covers here is the metric evaluated at the TRUE per-cell
(per-(domain, class)) accuracies, the cells and their sizes n fixed by the split.

Per kind of metric (level 1 - a, a = 0.05 by default):
- smooth metrics, i.e. every metric that is a fixed weighted mean of cell accuracies (accuracy, macro
  recall, mean pair / class / domain accuracy, shot buckets, each domain's accuracy): estimate +- z *
  SE, SE^2 = sum_cells w^2 p~(1 - p~) / n with the Laplace rate p~ = (correct + 1) / (n + 2), which
  never vanishes on a one-image or all-right / all-wrong cell; clipped to [0, 1]. Method "normal".
- macro F1 (a ratio, not a weighted mean): R draws of every cell's accuracy from its Jeffreys
  posterior Beta(correct + 1/2, n - correct + 1/2), false positives spread over each domain's
  observed false-positive profile; the draws' 2.5-97.5% spread placed around the point estimate
  (``value - (median - q_low)``, ``value + (q_high - median)``). Method "beta draws".
- worst class / pair / domain (a minimum over K candidates): simultaneous one-sided bounds combined
  as [min of lows, min of highs]. The low end needs only the TRUE worst candidate's bound to hold, so
  lows are at a/2 unadjusted; the high end needs every candidate's high to hold, so highs are at
  a/(2K) (Bonferroni). Candidates: pairs use Clopper-Pearson bounds (exact for one binomial); classes
  and domains (means of cell accuracies with unequal n) the normal bound with the SE above. The point
  estimate (min of estimates) always lies inside. Method "simultaneous".
  ``small_cells`` counts the cells with fewer than 5 test images among the candidates that could be
  the worst (their low end lies below the interval's high end): a value resting on them is flagged.
- paired differences A - B (same images; per cell the four counts both right / only A / only B /
  both wrong): smooth metrics by the normal interval of sum w (n10 - n01) / n with per-cell variance
  (pi10 + pi01 - (pi10 - pi01)^2) / n, pi smoothed towards the split's pooled disagreement rates by one
  pseudo-image (never zero). Worst-case metrics: theta = min a - min b lies in
  [delta(c_a), delta(c_b)] at the true argmins c_a, c_b (delta = a - b per candidate); the argmins lie
  in each run's plausible set P = {candidates whose simultaneous low <= the minimum of the highs}, so
  the interval is [min over P_a of delta's low, max over P_b of delta's high], error budget 0.015 per
  delta side and 0.01 per plausible set. Macro F1: normal draws of each cell's two accuracies (the
  runs' Laplace variances, correlated as the paired variance implies), spread placed around the
  observed difference and widened by the smooth metrics' t / z.

Measured (bench/coverage.py; docs/CONTRACTS.md has the tables; 1000 simulated test sets per cell of
the balanced, long-tailed, tiny and DomainNet-like layouts): every coverage >= 0.93 (macro F1 >= 0.943);
equal models called different in <= 0.054 of test sets except balanced cells' means (0.064-0.067, the
suite's random stream: 8000 fresh sets from the same accuracies give 0.046). Worst-case intervals are conservative by construction
(coverage near 1), as are paired means on long-tailed and tiny cells (0.966-1.00). The fixed-seed suite
in tests/evaluation/test_coverage.py passes; the percentile bootstrap this module replaced failed it.

Across seeds (``seed_summary``): mean, standard error and the seed values; with the runs' test-set
half-widths (``test_halfwidth``) the SE also carries the test-set noise that every seed shares.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from tally import results
from tally.errors import TallyError
from tally.evaluation import metrics as evaluation

REPLICATES = 1000
LEVEL = 0.95
SEED = 0
SMALL_CELL = 5  # a worst-case value resting on cells with fewer test images is flagged
PREDICTIONS_FILE = "predictions.parquet"
PREDICTION_COLUMNS = ("split", "index", "label", "domain", "prediction", "confidence")
KEY_COLUMN = "key"  # a stable image key (relative path or content hash); older runs lack it
DOMAIN_PREFIX = "domain_acc:"  # rows "domain_acc:<domain>": one domain's accuracy (a report column)
WORST = {"pair_acc_worst": "pair", "class_acc_worst": "class", "domain_acc_worst": "domain"}
RUN_COLUMNS = ["split", "metric", "value", "low", "high", "method", "small_cells"]
DIFF_COLUMNS = ["split", "metric", "a", "b", "diff", "low", "high", "method", "small_cells"]
# What the numbers mean, in one line each (every table and view prints one of these)
LEGEND_RUN = ("[ ] = 95% interval over the test images (method per metric kind, coverage measured by "
              "bench/coverage.py); '!k' = a worst-case value resting on k cells with < 5 test images")
LEGEND_DIFF = ("[ ] = 95% paired interval of A - B on the same test images; '!k' = k cells with < 5 test "
               "images among the worst-case candidates")
# Data fields that do not change which images a test split holds; every other field must match for
# two runs to be compared (a field added later is compared, which errs on the side of refusing).
NOT_TEST_SET_FIELDS = frozenset({"root", "image_root", "image_size", "flip", "crop_padding", "decode_workers",
                                 "oracle_selection", "carve_validation", "wilds_validation", "shot_many_above", "shot_few_at_most"})


# --------------------------------------------------------------------------------------------------
# Per-example predictions of the kept checkpoint
# --------------------------------------------------------------------------------------------------


def _numpy(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)


def prediction_frame(split: str, preds, labels, domains, confidence, keys=None) -> pd.DataFrame:
    """One split's per-example predictions: ``split, index, label, domain, prediction, confidence``
    and, when given, ``key`` (a stable image key: relative path or content hash).

    ``index`` is the example's position in the split; ``key`` is what lets two runs be paired image by
    image (a run without keys is paired by index, and `compare` says so).
    """
    preds, labels, domains = (_numpy(x) for x in (preds, labels, domains))
    n = len(preds)
    frame = pd.DataFrame({
        "split": np.full(n, split, dtype=object),
        "index": np.arange(n, dtype=np.int64),
        "label": labels.astype(np.int64),
        "domain": domains.astype(np.int64),
        "prediction": preds.astype(np.int64),
        "confidence": _numpy(confidence).astype(np.float32),
    })
    if keys is not None:
        keys = np.asarray(keys, dtype=object)
        if len(keys) != n:
            raise ValueError(f"keys: expected {n}, got {len(keys)}")
        frame[KEY_COLUMN] = keys.astype(str)
    return frame


def image_keys(paths: Sequence[str] | None, root=None, images=None) -> np.ndarray | None:
    """Stable image keys: each path relative to ``root`` (its last three parts, domain/class/file as
    in the folder layout, when there is no root or it lies outside), or, where the source has no
    files, a content hash of each decoded image (uint8 rows of ``images``); None without either."""
    if paths is not None and len(paths) and all(paths):
        base = Path(root).expanduser().resolve() if root else None
        out = []
        for p in paths:  # once per evaluated image at the end of training: not a hot path
            path = Path(p)
            rel = None
            if base is not None:
                with contextlib.suppress(ValueError):  # outside the root: the last parts below
                    rel = path.resolve().relative_to(base).as_posix()
            out.append(rel or "/".join(path.parts[-3:]))
        return np.asarray(out, dtype=object)
    if images is None:
        return None
    flat = _numpy(images).reshape(len(images), -1)
    weights = np.random.default_rng(20).integers(1, 2**63, size=(2, flat.shape[1]), dtype=np.uint64)
    out = np.empty((len(flat), 2), dtype=np.uint64)
    with np.errstate(over="ignore"):  # a wrapping polynomial hash: overflow is the point
        for i in range(0, len(flat), 4096):  # blocks bound the uint64 copy
            out[i:i + 4096] = flat[i:i + 4096].astype(np.uint64) @ weights.T
    return np.asarray([f"hash:{a:016x}{b:016x}" for a, b in out], dtype=object)


def write_predictions(run_dir: str | Path, frames: Iterable[pd.DataFrame]) -> Path | None:
    """Write ``predictions.parquet`` (atomically) in the run folder; nothing when there are no frames."""
    frames = list(frames)
    if not frames:
        return None
    path = Path(run_dir) / PREDICTIONS_FILE
    results.write_parquet(path, pd.concat(frames, ignore_index=True))
    return path


def read_predictions(run_dir: str | Path) -> pd.DataFrame | None:
    """The run's per-example predictions, or None for a run without them (older runs). A file without
    image keys (older runs) reads with ``attrs['keyed'] = False``: such runs pair by index."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    frame = pd.read_parquet(path)
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise TallyError(f"{path}: lacks columns {missing}")
    frame.attrs["keyed"] = KEY_COLUMN in frame.columns
    return frame


# --------------------------------------------------------------------------------------------------
# One split's cells
# --------------------------------------------------------------------------------------------------


def _stream(seed: int, split: str) -> np.random.Generator:
    """One random stream per split, so a split's interval does not depend on the other splits asked for."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode())])


def _example_arrays(examples: pd.DataFrame, D: int, C: int, what: str) -> tuple[np.ndarray, ...]:
    """label, domain and prediction arrays of one split's examples, checked against the index spaces."""
    labels = examples["label"].to_numpy(np.int64)
    domains = examples["domain"].to_numpy(np.int64)
    preds = examples["prediction"].to_numpy(np.int64)
    for arr, bound, name in ((labels, C, "label"), (domains, D, "domain"), (preds, C, "prediction")):
        if arr.size and (arr.min() < 0 or arr.max() >= bound):
            raise TallyError(f"{what}: {name} out of range [0, {bound})")
    return labels, domains, preds


class _Split:
    """One split of one run: its (D, C) counts, names and (optionally) per-example arrays and keys."""

    def __init__(self, table: pd.DataFrame, split: str, predictions: pd.DataFrame | None, what: str):
        rows = table[table["split"] == split]
        if rows.empty:
            raise TallyError(f"{what}: no split {split!r} in its evaluation table "
                             f"(has {', '.join(map(str, pd.unique(table['split'])))})")
        self.counts = evaluation.count_arrays(rows)
        grid = evaluation.accuracy_grid(rows, split, "n")
        self.domain_names = [str(d) for d in grid.index]
        self.class_names = [str(c) for c in grid.columns]
        self.examples, self.keys = None, None
        if predictions is not None:
            mine = predictions[predictions["split"] == split].sort_values("index")
            if len(mine):
                D, C = self.counts["n"].shape
                self.examples = _example_arrays(mine, D, C, what)
                if KEY_COLUMN in mine.columns:
                    self.keys = mine[KEY_COLUMN].astype(str).to_numpy()
                got = evaluation.pair_counts(self.examples[2], self.examples[0], self.examples[1], D, C)
                want = (self.counts["n"], self.counts["correct"], self.counts["predicted"])
                if not all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)):
                    raise TallyError(f"{what}: {PREDICTIONS_FILE} disagrees with eval.parquet on split {split!r}")

    def point(self, thresholds) -> dict[str, np.ndarray]:
        c = self.counts
        out = evaluation.metric_arrays(c["n"], c["correct"], c["predicted"], c["n_train"], *thresholds)
        for i, name in enumerate(self.domain_names):
            out[DOMAIN_PREFIX + name] = evaluation.domain_accuracies(c["n"], c["correct"])[i]
        return out


def _weights(n: np.ndarray, n_train: np.ndarray, thresholds, domain_names) -> dict[str, np.ndarray | None]:
    """Every smooth metric as the (D, C) weights w of ``sum w * cell accuracy`` (None: undefined)."""
    n = np.asarray(n, dtype=np.float64)
    valid = n > 0

    def mean_of(mask):  # equal weight on each cell of the mask
        return mask / mask.sum() if mask.any() else None

    def mean_of_groups(axis):  # mean over groups (classes: axis 0 summed) of the group's cell mean
        count = valid.sum(axis=axis, keepdims=True)
        groups = (count > 0).sum()
        return np.divide(valid, count * groups, out=np.zeros_like(n), where=count > 0) if groups else None

    support = n.sum(axis=0, keepdims=True)
    present = (support > 0).sum()
    many_above, few_at_most = thresholds
    many, zero = n_train > many_above, n_train <= 0
    few = (n_train >= 1) & (n_train <= few_at_most)
    out = {
        "acc": n / n.sum() if n.sum() > 0 else None,
        "macro_recall": np.divide(n, support * present, out=np.zeros_like(n), where=support > 0) if present else None,
        "pair_acc_mean": mean_of(valid),
        "class_acc_mean": mean_of_groups(0),
        "domain_acc_mean": mean_of_groups(1),
        "shot_many": mean_of(valid & many),
        "shot_medium": mean_of(valid & ~(many | few | zero)),
        "shot_few": mean_of(valid & few),
        "shot_zero": mean_of(valid & zero),
    }
    for i, name in enumerate(domain_names):
        row = np.zeros_like(valid)
        row[i] = valid[i]
        out[DOMAIN_PREFIX + name] = mean_of(row)
    return out


def _laplace_var(n: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Per-cell variance of the accuracy estimate, p~(1 - p~) / n with p~ = (correct + 1) / (n + 2):
    never zero for a one-image or all-right / all-wrong cell (0 where n = 0)."""
    n = np.asarray(n, dtype=np.float64)
    rate = (np.asarray(correct) + 1.0) / (n + 2.0)
    return np.divide(rate * (1 - rate), n, out=np.zeros_like(n), where=n > 0)


def _paired_var(n: np.ndarray, n10: np.ndarray, n01: np.ndarray) -> np.ndarray:
    """Per-cell variance bound of (n10 - n01) / n: (pi10 + pi01) / n (the true variance less
    (pi10 - pi01)^2 / n), the shares smoothed by one pseudo-image at the split's pooled disagreement
    rates: unbiased for pi10 + pi01 on average, and never zero, even where the runs agree on every image."""
    n = np.asarray(n, dtype=np.float64)
    total = n.sum()
    pooled = (n10.sum() + n01.sum() + 1.0) / (total + 1.0)
    return np.divide(n10 + n01 + pooled, n * (n + 1.0), out=np.zeros_like(n), where=n > 0)


def _paired_halfwidth(w: np.ndarray, var: np.ndarray, cells, alpha: float) -> float:
    """Half-width of the paired interval of the smooth metric ``sum w * (n10 - n01) / n`` at level
    1 - alpha: a t quantile times sqrt(sum w^2 var), var = ``_paired_var`` of the split's cells."""
    return _t(alpha / 2, cells, w > 0) * math.sqrt(float((w ** 2 * var).sum()))


def _t(tail: float, cells, used: np.ndarray) -> float:
    """A t quantile for a paired SE, degrees of freedom the discordant images plus the cells used: the
    variance is estimated from those few images and the pooled pseudo-image of each cell (a z quantile
    covered 87% of tiny-cell test sets)."""
    df = float((cells["n10"] + cells["n01"])[used].sum() + used.sum())
    return float(stats.t.isf(tail, max(df, 1.0)))


def _z(tail: float) -> float:
    """The standard normal quantile leaving ``tail`` above it."""
    return float(stats.norm.isf(tail))


def _groups(acc0: np.ndarray, var: np.ndarray, valid: np.ndarray, kind: str):
    """Candidates of a worst-case metric: (estimates, variances, cell membership (K, D, C))."""
    if kind == "pair":
        idx = np.flatnonzero(valid.ravel())
        member = np.zeros((len(idx), valid.size), dtype=bool)
        member[np.arange(len(idx)), idx] = True
        return acc0.ravel()[idx], var.ravel()[idx], member.reshape(len(idx), *valid.shape)
    axis = 0 if kind == "class" else 1
    count = valid.sum(axis=axis)
    keep = count > 0
    est = acc0.sum(axis=axis)[keep] / count[keep]
    v = var.sum(axis=axis)[keep] / count[keep] ** 2
    K = int(keep.sum())
    member = np.zeros((K, *valid.shape), dtype=bool)
    if axis == 0:  # class c: the valid cells of column c
        cols = np.flatnonzero(keep)
        member[np.arange(K), :, cols] = valid[:, cols].T
    else:
        rows = np.flatnonzero(keep)
        member[np.arange(K), rows, :] = valid[rows, :]
    return est, v, member


def _bounds(n, correct, kind: str, low_tail: float, high_tail_total: float):
    """Per-candidate (estimate, low, high, membership) of a worst-case metric: one-sided lows at
    ``low_tail``, highs at ``high_tail_total / K`` (Bonferroni over the K candidates)."""
    n = np.asarray(n, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    valid = n > 0
    acc0 = np.divide(correct, n, out=np.zeros_like(n), where=valid)
    est, var, member = _groups(acc0, _laplace_var(n, correct), valid, kind)
    K = len(est)
    if K == 0:
        return est, est, est, member
    if kind == "pair":  # Clopper-Pearson: exact for one binomial, and holds its level at any n
        k, m = correct[valid], n[valid]
        with np.errstate(invalid="ignore"):
            low = np.where(k > 0, stats.beta.ppf(low_tail, k, m - k + 1), 0.0)
            high = np.where(k < m, stats.beta.isf(high_tail_total / K, k + 1, m - k), 1.0)
    else:
        se = np.sqrt(var)
        low, high = est - _z(low_tail) * se, est + _z(high_tail_total / K) * se
    return est, np.clip(low, 0, 1), np.clip(high, 0, 1), member


def _plausible(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Candidates that could be the worst: their low end is not above every candidate's high end."""
    return low <= high.min()


def _small(n: np.ndarray, member: np.ndarray, chosen: np.ndarray) -> int:
    """Cells with 1..SMALL_CELL-1 test images among the chosen candidates' cells."""
    cells = member[chosen].any(axis=0)
    return int((cells & (n > 0) & (n < SMALL_CELL)).sum())


def _centred(value: float, draws: np.ndarray, level: float) -> tuple[float, float]:
    """The draws' central ``level`` spread placed around ``value`` (the posterior centre is shrunk
    towards 1/2 on tiny cells; the point estimate is not)."""
    if draws.size == 0 or np.isnan(draws).any() or math.isnan(value):
        return math.nan, math.nan
    q_low, q_mid, q_high = np.quantile(draws, [(1 - level) / 2, 0.5, (1 + level) / 2])
    return value - (q_mid - q_low), value + (q_high - q_mid)


def _f1_draws(n, p, predicted_obs, correct_obs, n_train, thresholds, rng) -> np.ndarray:
    """Macro F1 of (R, D, C) cell accuracies ``p``: each domain's wrong images spread over the classes
    by a Dirichlet draw around its observed false-positive profile (one pseudo-image spread evenly),
    so the false positives vary as a multinomial split of the wrong images would. The F1 itself is
    metrics.metric_arrays' definition (WILDS': classes present in the split), written out for the
    draws alone (the full metric set over R replicates would be computed and thrown away)."""
    # >= 0: an older table without a `predicted` column reads it as 0 (the dashboard blanks its F1)
    fp_obs = np.maximum(np.asarray(predicted_obs) - np.asarray(correct_obs), 0).astype(np.float64)
    C = fp_obs.shape[1]
    g = rng.gamma(np.broadcast_to(fp_obs + 1.0 / C, p.shape))
    g /= g.sum(axis=-1, keepdims=True)
    correct = n * p
    g *= (n - correct).sum(axis=-1, keepdims=True)  # each domain's wrong images, spread over classes
    tp = correct.sum(axis=-2)
    support = np.asarray(n, dtype=np.float64).sum(axis=0)
    present = support > 0
    f1 = 2 * tp[..., present] / (support[present] + tp[..., present] + g.sum(axis=-2)[..., present])
    return f1.mean(axis=-1) if present.any() else np.full(p.shape[:-2], np.nan)


# --------------------------------------------------------------------------------------------------
# Intervals of one run
# --------------------------------------------------------------------------------------------------


def split_intervals(part: _Split, split: str, thresholds, level: float, replicates: int,
                    rng: np.random.Generator) -> list[dict]:
    """Rows ``split, metric, value, low, high, method, small_cells`` of one split (module docstring)."""
    c = part.counts
    n, correct = c["n"], c["correct"]
    alpha = 1 - level
    point = part.point(thresholds)
    var = _laplace_var(n, correct)
    acc0 = np.divide(correct, n, out=np.zeros(n.shape), where=n > 0)
    weights = _weights(n, c["n_train"], thresholds, part.domain_names)
    z = _z(alpha / 2)
    rows = []
    for name, value in point.items():
        value = float(value)
        row = {"split": split, "metric": name, "value": value, "low": math.nan, "high": math.nan,
               "method": "", "small_cells": 0}
        if math.isnan(value):
            rows.append(row)
            continue
        if name in WORST:
            est, low, high, member = _bounds(n, correct, WORST[name], alpha / 2, alpha / 2)
            row.update(low=float(low.min()), high=float(high.min()), method="simultaneous",
                       small_cells=_small(n, member, _plausible(low, high)))
        elif name == "macro_f1":
            p = acc0 + np.sqrt(var) * rng.standard_normal((replicates, *n.shape))
            draws = _f1_draws(n, p, c["predicted"], correct, c["n_train"], thresholds, rng)
            low, high = _centred(value, draws, level)
            row.update(low=max(0.0, low), high=min(1.0, high), method="normal draws")
        else:
            w = weights[name]
            se = math.sqrt(float((w ** 2 * var).sum()))
            row.update(low=max(0.0, value - z * se), high=min(1.0, value + z * se), method="normal")
        rows.append(row)
    return rows


def table_intervals(
    table: pd.DataFrame,
    predictions: pd.DataFrame | None = None,
    *,
    splits: Sequence[str] | None = None,
    replicates: int = REPLICATES,
    level: float = LEVEL,
    seed: int = SEED,
    thresholds: tuple[int, int] = evaluation.DEFAULT_SHOT_THRESHOLDS,
    what: str = "run",
) -> pd.DataFrame:
    """Intervals of every metric of every split of one run's long table (``run_intervals`` reads a run
    folder and calls this). Rows ``RUN_COLUMNS``; metrics are ``evaluation.METRIC_NAMES`` plus
    ``domain_acc:<domain>``; ``replicates`` sets macro F1's draws; a fixed ``seed`` repeats exactly."""
    if replicates < 1:
        raise TallyError(f"replicates: expected >= 1, got {replicates}")
    rows = []
    for split in splits or [str(s) for s in pd.unique(table["split"])]:
        part = _Split(table, split, predictions, what)
        rows += split_intervals(part, split, thresholds, level, replicates, _stream(seed, split))
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


# --------------------------------------------------------------------------------------------------
# Paired differences of two runs
# --------------------------------------------------------------------------------------------------


def _four_cells(a: _Split, b: _Split) -> dict[str, np.ndarray]:
    """Per (domain, class) cell: n11 (both right), n10 (only A), n01 (only B), n00; (D, C) each."""
    (labels, domains, pred_a), pred_b = a.examples, b.examples[2]
    D, C = a.counts["n"].shape
    cell = domains * C + labels
    code = 2 * (pred_a == labels) + (pred_b == labels)  # 3: both, 2: only A, 1: only B, 0: neither
    m = np.bincount(cell * 4 + code, minlength=D * C * 4).reshape(D, C, 4)
    return {"n11": m[..., 3], "n10": m[..., 2], "n01": m[..., 1], "n00": m[..., 0]}


def _worst_difference(n, cells, kind: str, level: float):
    """(low, high, small cells) of min a - min b over the candidates of ``kind`` (module docstring)."""
    alpha = 1 - level
    side, select = 0.3 * alpha, 0.2 * alpha  # 0.015 per delta side, 0.01 per run's plausible set
    ka, kb = cells["n11"] + cells["n10"], cells["n11"] + cells["n01"]
    _, low_a, high_a, member = _bounds(n, ka, kind, select / 2, select / 2)
    _, low_b, high_b, _ = _bounds(n, kb, kind, select / 2, select / 2)
    plaus_a, plaus_b = _plausible(low_a, high_a), _plausible(low_b, high_b)
    nf = np.asarray(n, dtype=np.float64)
    valid = nf > 0
    d0 = np.divide(cells["n10"] - cells["n01"], nf, out=np.zeros_like(nf), where=valid)
    est, var, _ = _groups(d0, _paired_var(n, cells["n10"], cells["n01"]), valid, kind)
    se = np.sqrt(var)
    z = _z(side)
    low = float(np.max([-1.0, (est - z * se)[plaus_a].min()]))
    high = float(np.min([1.0, (est + z * se)[plaus_b].max()]))
    return low, high, _small(n, member, plaus_a | plaus_b)


def _paired_f1(a: _Split, b: _Split, cells, value: float, thresholds, level, replicates, rng):
    """Macro F1 of A - B from normal draws of each cell's two accuracies, with the runs' per-cell
    variances (``_laplace_var``) and the covariance their paired difference implies (``_paired_var``)."""
    c = a.counts
    n = c["n"].astype(np.float64)
    ka, kb = cells["n11"] + cells["n10"], cells["n11"] + cells["n01"]
    va, vb = _laplace_var(n, ka), _laplace_var(n, kb)
    cov = (va + vb - _paired_var(n, cells["n10"], cells["n01"])) / 2
    sa, sb = np.sqrt(va), np.sqrt(vb)
    rho = np.clip(np.divide(cov, sa * sb, out=np.zeros_like(n), where=sa * sb > 0), -1, 1)
    z1, z2 = rng.standard_normal((2, replicates, *n.shape))
    acc_a = np.divide(ka, n, out=np.zeros_like(n), where=n > 0)
    acc_b = np.divide(kb, n, out=np.zeros_like(n), where=n > 0)
    pa = acc_a + sa * z1
    pb = acc_b + sb * (rho * z1 + np.sqrt(1 - rho ** 2) * z2)
    fa = _f1_draws(n, pa, c["predicted"], c["correct"], c["n_train"], thresholds, rng)
    fb = _f1_draws(n, pb, b.counts["predicted"], b.counts["correct"], c["n_train"], thresholds, rng)
    low, high = _centred(value, fa - fb, level)
    widen = _t((1 - level) / 2, cells, n > 0) / _z((1 - level) / 2)  # as the smooth metrics' t
    return max(-1.0, value - widen * (value - low)), min(1.0, value + widen * (high - value))


def paired_difference(
    table_a: pd.DataFrame,
    table_b: pd.DataFrame,
    predictions_a: pd.DataFrame,
    predictions_b: pd.DataFrame,
    *,
    splits: Sequence[str] | None = None,
    replicates: int = REPLICATES,
    level: float = LEVEL,
    seed: int = SEED,
    thresholds: tuple[int, int] = evaluation.DEFAULT_SHOT_THRESHOLDS,
    thresholds_b: tuple[int, int] | None = None,
    names: tuple[str, str] = ("A", "B"),
) -> pd.DataFrame:
    """Metric of run A minus that of run B on the same test images, with its paired interval.

    Rows ``DIFF_COLUMNS``. Needs both runs' per-example predictions; runs whose test sets differ
    (other splits, index spaces, pair sizes, image keys, or images' labels and domains in split order)
    are refused with a one-line TallyError. Run B is scored with ``thresholds_b`` (default: A's).
    """
    for preds, name in ((predictions_a, names[0]), (predictions_b, names[1])):
        if preds is None:
            raise TallyError(f"{name}: no {PREDICTIONS_FILE} (per-example predictions); a paired comparison "
                             "needs them (runs trained before they were kept must be re-trained)")
    if splits is None:
        splits = sorted(set(predictions_a["split"]))
        if splits != sorted(set(predictions_b["split"])):
            raise TallyError(f"{names[0]} and {names[1]} have different test splits: {splits} vs "
                             f"{sorted(set(predictions_b['split']))}")
    thresholds_b = thresholds if thresholds_b is None else thresholds_b
    alpha = 1 - level
    rows = []
    for split in splits:
        a = _Split(table_a, split, predictions_a, names[0])
        b = _Split(table_b, split, predictions_b, names[1])
        for part, name in ((a, names[0]), (b, names[1])):
            if part.examples is None:
                raise TallyError(f"{name}: no per-example predictions for split {split!r}")
        _check_same_test_set(a, b, split, names)
        rng = _stream(seed, split)
        n = a.counts["n"]
        cells = _four_cells(a, b)
        var = _paired_var(n, cells["n10"], cells["n01"])
        weights = _weights(n, a.counts["n_train"], thresholds, a.domain_names)
        point_a, point_b = a.point(thresholds), b.point(thresholds_b)
        for name in point_a:
            va, vb = float(point_a[name]), float(point_b.get(name, math.nan))
            row = {"split": split, "metric": name, "a": va, "b": vb, "diff": va - vb, "low": math.nan,
                   "high": math.nan, "method": "", "small_cells": 0}
            if not math.isnan(va - vb):
                if name in WORST:
                    low, high, small = _worst_difference(n, cells, WORST[name], level)
                    row.update(low=low, high=high, method="simultaneous", small_cells=small)
                elif name == "macro_f1":
                    low, high = _paired_f1(a, b, cells, va - vb, thresholds, level, replicates, rng)
                    row.update(low=low, high=high, method="normal draws")
                elif thresholds_b != thresholds and name.startswith("shot_"):
                    row["method"] = "n/a (shot thresholds differ)"
                else:
                    half = _paired_halfwidth(weights[name], var, cells, alpha)
                    row.update(low=max(-1.0, va - vb - half), high=min(1.0, va - vb + half), method="normal")
            rows.append(row)
    return pd.DataFrame(rows, columns=DIFF_COLUMNS)


def _check_same_test_set(a: _Split, b: _Split, split: str, names: tuple[str, str]) -> None:
    label = f"{names[0]} and {names[1]}: test sets differ on split {split!r}"
    if a.domain_names != b.domain_names or a.class_names != b.class_names:
        raise TallyError(f"{label} (domain or class names)")
    if not np.array_equal(a.counts["n"], b.counts["n"]):
        raise TallyError(f"{label} (images per (domain, class) pair)")
    if a.keys is not None and b.keys is not None and not np.array_equal(a.keys, b.keys):
        first = int(np.flatnonzero(a.keys != b.keys)[0])
        raise TallyError(f"{label} (image {first}: {a.keys[first]!r} vs {b.keys[first]!r})")
    if not (np.array_equal(a.examples[0], b.examples[0]) and np.array_equal(a.examples[1], b.examples[1])):
        raise TallyError(f"{label} (labels or domains of the images, in split order)")


def format_interval(value: float, low: float, high: float, small: int = 0, digits: int = 3,
                    scale: float = 1.0, signed: bool = False) -> str:
    """``0.512 [0.430, 0.590]`` (``!3`` appended when the value rests on 3 cells of < 5 images)."""
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(scale * value)
    if not (math.isnan(low) or math.isnan(high)):
        text += f" [{fmt.format(scale * low)}, {fmt.format(scale * high)}]"
    if small:
        text += f" !{int(small)}"
    return text


def format_difference(row, name_a: str, name_b: str, digits: int = 3) -> str:
    """``"tally - erm on worst-class accuracy: +0.120 [+0.050, +0.190]"`` (``!k``: k small cells)."""
    label = evaluation.metric_label(row["metric"])
    return (f"{name_a} - {name_b} on {label}: "
            + format_interval(row["diff"], row["low"], row["high"], int(row.get("small_cells", 0) or 0),
                              digits, signed=True))


# --------------------------------------------------------------------------------------------------
# Runs on disk: the public API
# --------------------------------------------------------------------------------------------------


def _read_run(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, dict]:
    table = results.read_parquet(run_dir / "eval.parquet")
    if table is None:
        raise TallyError(f"{run_dir}: no eval.parquet (not a finished run folder)")
    return table, read_predictions(run_dir), results.read_yaml(run_dir / "config.yaml") or {}


def run_intervals(run_dir: str | Path, *, splits: Sequence[str] | None = None, replicates: int = REPLICATES,
                  level: float = LEVEL, seed: int = SEED,
                  thresholds: tuple[int, int] | None = None) -> pd.DataFrame:
    """Every metric of a run folder with its interval: rows ``split, metric, value, low, high, method,
    small_cells`` (``RUN_COLUMNS``; the method per metric kind in the module docstring). Reads
    eval.parquet, predictions.parquet when present, and the shot thresholds its config asks for."""
    run_dir = Path(run_dir)
    table, predictions, cfg = _read_run(run_dir)
    if thresholds is None:
        thresholds = evaluation.shot_thresholds_of(cfg.get("data"))
    frame = table_intervals(table, predictions, splits=splits, replicates=replicates, level=level, seed=seed,
                           thresholds=thresholds, what=str(run_dir))
    # --- calibration hook (issue 24): ECE/Brier/NLL/selective rows, same row format, from logits.npz;
    # none for a run without it. Kept to these lines so the interval rewrite can re-home them.
    from tally.evaluation import calibration
    extra = calibration.calibration_intervals(run_dir, splits, replicates=replicates, level=level, seed=seed,
                                              thresholds=thresholds)
    return pd.concat([frame, extra], ignore_index=True) if len(extra) else frame
    # --- end of the calibration hook


def run_label(run_dir: Path, cfg: dict) -> str:
    """A run's name in comparisons: its method's name (the folder name when there is none)."""
    return str((cfg.get("method") or {}).get("name") or run_dir.name)


def compare_runs(run_a: str | Path, run_b: str | Path, *, splits: Sequence[str] | None = None,
                 replicates: int = REPLICATES, level: float = LEVEL, seed: int = SEED,
                 thresholds: tuple[int, int] | None = None) -> tuple[pd.DataFrame, tuple[str, str]]:
    """A - B for every metric of two run folders on the same test images, and the two runs' labels.

    Rows ``split, metric, a, b, diff, low, high, method, small_cells`` (``DIFF_COLUMNS``). Refused
    unless both runs' data configs select the same test images (every data field except those in
    ``NOT_TEST_SET_FIELDS``) and their predictions agree image by image (by image key; runs without
    keys, older ones, by index: ``frame.attrs['notes']`` says so). Each run is scored with its own
    shot thresholds; refused when they differ (the shot buckets would hold other cells).
    """
    run_a, run_b = Path(run_a), Path(run_b)
    table_a, preds_a, cfg_a = _read_run(run_a)
    table_b, preds_b, cfg_b = _read_run(run_b)
    names = (run_label(run_a, cfg_a), run_label(run_b, cfg_b))
    if names[0] == names[1]:
        names = (run_a.name, run_b.name) if run_a.name != run_b.name else (str(run_a), str(run_b))
    data_a, data_b = cfg_a.get("data") or {}, cfg_b.get("data") or {}
    for key in sorted((set(data_a) | set(data_b)) - NOT_TEST_SET_FIELDS):
        if data_a.get(key) != data_b.get(key):
            raise TallyError(f"{run_a} and {run_b}: test sets differ (data.{key}: "
                             f"{data_a.get(key)!r} vs {data_b.get(key)!r})")
    if thresholds is None:
        thresholds = evaluation.shot_thresholds_of(data_a)
        other = evaluation.shot_thresholds_of(data_b)
        if tuple(other) != tuple(thresholds):
            raise TallyError(f"{run_a} and {run_b}: shot thresholds differ ({tuple(thresholds)} vs "
                             f"{tuple(other)}); pass the same thresholds to compare them")
    frame = paired_difference(table_a, table_b, preds_a, preds_b, splits=splits, replicates=replicates,
                              level=level, seed=seed, thresholds=thresholds, names=names)
    unkeyed = [name for preds, name in ((preds_a, names[0]), (preds_b, names[1]))
               if preds is not None and not preds.attrs.get("keyed", True)]
    frame.attrs["notes"] = ([f"{', '.join(unkeyed)}: predictions without image keys (an older run): paired "
                             "by position in the split, checked by label and domain only"] if unkeyed else [])
    return frame, names


# --------------------------------------------------------------------------------------------------
# Across seeds
# --------------------------------------------------------------------------------------------------


def seed_summary(values_by_seed: dict[str, dict[str, float]],
                 test_halfwidth: dict[str, dict[str, float]] | None = None, level: float = LEVEL) -> pd.DataFrame:
    """Rows per metric: ``mean``, ``stderr``, ``n`` and ``values`` (the seed-level values, in the order
    of ``values_by_seed``). A seed whose metric is NaN is left out of that metric.

    ``stderr`` is the seed-to-seed standard error (ddof 1 / sqrt k; NaN for one seed) and, when the
    runs' interval half-widths are given (``test_halfwidth``, same keys), also the test-set noise every
    seed shares (all seeds are scored on the same images): sqrt(s^2 / k + (mean half-width / z)^2),
    the mean of the runs' test-set SEs being the SE of their mean when the runs move together."""
    metrics: list[str] = []
    for values in values_by_seed.values():
        metrics += [m for m in values if m not in metrics]
    z = _z((1 - level) / 2)
    rows = []
    for metric in metrics:
        values = tuple(float(v.get(metric, math.nan)) for v in values_by_seed.values())
        finite = np.array([v for v in values if not math.isnan(v)])
        k = len(finite)
        se = float(finite.std(ddof=1) / math.sqrt(k)) if k > 1 else math.nan
        if test_halfwidth is not None and k:
            half = np.array([float((test_halfwidth.get(s) or {}).get(metric, math.nan)) for s in values_by_seed])
            half = half[~np.isnan(half)]
            if half.size:
                test_se = float(half.mean()) / z
                se = math.sqrt((0.0 if math.isnan(se) else se) ** 2 + test_se ** 2)
        rows.append({"metric": metric, "mean": float(finite.mean()) if k else math.nan,
                     "stderr": se, "n": k, "values": values})
    return pd.DataFrame(rows, columns=["metric", "mean", "stderr", "n", "values"])
