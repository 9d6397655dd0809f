"""Calibration and selective prediction of the kept checkpoint: does the model know when it is wrong?

Accuracy metrics come from the per-(domain, class) table of counts (metrics.py). Calibration cannot:
it needs each example's probabilities, so training keeps the kept checkpoint's logits of every
evaluated split in ``logits.npz`` (float32, one (N, C) array per split, rows in the split's order, the
same ``index`` as predictions.parquet) and every number here is computed from them. A run without
that file (older runs) has no calibration section.

Definitions (top-label, as SubpopBench reports ECE beside worst-group accuracy):
- confidence = the largest softmax probability, correct = (its class == label).
- ECE: sort a group's examples by confidence, cut them into ``bins`` bins of equal mass (sizes differ
  by at most one; ties straddling a cut are split by example order), and take
  sum_b (n_b / n) |accuracy_b - mean confidence_b| = (1/n) sum_b |correct_b - confidence sum_b|.
  SubpopBench (through netcal) bins by equal width; equal mass is the issue's choice, because with a
  confident model most equal-width bins are empty. A group with fewer examples than bins puts each
  example in its own bin (ECE becomes the mean |correct - confidence|, as equal mass implies).
- Brier: mean over examples of sum_k (p_k - [y = k])^2 (multi-class, in [0, 2]).
- NLL: mean of -log p_y.
- selective prediction: keep the most confident examples first (ties by example order). Risk at
  coverage k/n is the error rate of the first k; AURC is its mean over k = 1..n (Geifman et al.);
  ``acc_at_cov90`` is the accuracy of the most confident ceil(0.9 n) examples.
- per domain, per class (true label) and per shot bucket (the pair's training count, the thresholds
  of metrics.py): ECE of that group's examples, binned within the group; ``ece_worst_domain`` and
  ``ece_worst_class`` are the largest.
Lower is better for every ECE, Brier, NLL and AURC; higher for the accuracies at a coverage
(``higher_is_better``: tally.schema.mode_of, the one definition selection reads too).
A search or benchmark may select on any of ``METRIC_NAMES`` (tally.schema.CALIBRATION_METRICS): training
records them on validation every epoch (``validation_metrics``), BEFORE temperature scaling, since T is
fitted on those same images and a ``ts_`` value there would be in-sample; selecting on ``ts_*`` is refused.

Temperature scaling (Guo et al. 2017): one T > 0 divides every logit. It is fitted on the
validation split only (minimum NLL over log T, bounded), never on a test split, and the test metrics
are given before (``ece``) and after (``ts_ece``) it. A final retrain (``train.final``) trains on
validation, so it has no held-out data to fit on: T = 1 and the reason is recorded. The fitted T is
written to ``calibration.json`` at the end of training, and an exported bundle divides its logits by
it inside the graph (deploy/export.py).

Intervals (coverage measured by ``bench/coverage.py --calibration``; table in docs/CONTRACTS.md): a
basic (reverse-percentile) bootstrap over the split's images, every replicate of every metric at once
(vectorised; no loop over replicates or examples). Each interval claims to cover the metric of the
model on the test distribution: the split's mix of (domain, class) cells fixed, ``bins`` equal-mass
bins cut at the population's quantiles, T held fixed (it is fitted on validation, which a test
replicate does not redraw, so ``ts_`` intervals leave out T's own uncertainty).
- Redrawn over the whole split, not within cells: a one-image cell has no variance within itself.
- basic, not percentile: [2 v - q_high, 2 v - q_low] subtracts the bias the replicates show instead
  of doubling it, and every interval is widened to hold its own value v.
- ECE rows (overall, per domain / class / shot bucket, worst, ``ts_``) are one-sided: low = 0, high =
  the basic upper end. Binned ECE is biased upward by about each bin's sampling noise, so for a
  calibrated model (true ECE 0) every two-sided construction tried put its lower end above 0 in most
  test sets (percentile within cells: coverage 0.00; basic: 0.00-0.45). The lower end is not shown.
- worst-domain / worst-class ECE: simultaneous over the groups: each group's upper end at level
  1 - alpha / G (Bonferroni), the largest taken (it covers the largest population ECE whenever every
  group's covers its own), and at least the point value.
- a metric resting on fewer than ``MIN_IMAGES`` images (the split's; a domain's, class's or shot
  bucket's own for its ECE row) has no interval, only its value and that note: on ~85-image splits
  AURC, NLL, Brier and ECE covered 0.85-0.90. Worst-domain / worst-class ECE keep theirs (1.00).
``ts_`` rows are not given for the validation split itself: T was fitted there, so they would be
in-sample. Paired differences (``calibration_differences``) still use a percentile bootstrap within
cells whose coverage has not been measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from tally import results
from tally.errors import TallyError
from tally.evaluation import metrics as evaluation
from tally.schema import mode_of

LOGITS_FILE = "logits.npz"
CALIBRATION_FILE = results.CALIBRATION_FILE  # "calibration.json": the store reads its metrics too
BINS = 15
COVERAGES = (0.9, 0.8)
REPLICATES = 1000
LEVEL = 0.95
SEED = 0
TS_PREFIX = "ts_"  # a metric after temperature scaling: "ts_ece"
BASIC_METHOD = "basic bootstrap over the split's images"
ECE_METHOD = "upper bound only (basic bootstrap; no lower bound: coverage not reached, see docs)"
# A metric resting on fewer images than this (the split's, or a domain's / class's / shot bucket's own
# for its ECE row) gets no interval, except worst-domain / worst-class ECE. Measured (bench/coverage.py
# --calibration, 150 test sets per cell): on ~85-image splits (tiny layout) AURC covered 0.85-0.91,
# NLL 0.86, Brier 0.89-0.90, ECE 0.89-0.90; on ~300-image (long-tailed) and 1120-image (balanced)
# splits every metric >= 0.91 (most >= 0.93); worst-domain / worst-class ECE 1.00 on every layout.
MIN_IMAGES = 200
SMALL_METHOD = f"no interval: coverage not reached below {MIN_IMAGES} images, see docs"
# log T is searched in [log 0.05, log 20]: wider than any temperature a trained network needs
LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))
# Example picks drawn at once in the bootstrap (each pick is a few arrays of that length)
_PICKS_PER_BLOCK = 2_000_000

HEADLINE: tuple[str, ...] = ("ece", "ece_worst_domain", "ece_worst_class", "brier", "nll", "aurc",
                             "acc_at_cov90", "acc_at_cov80")
SHOT_NAMES: tuple[str, ...] = ("ece_shot_many", "ece_shot_medium", "ece_shot_few", "ece_shot_zero")
DOMAIN_PREFIX, CLASS_PREFIX = "ece_domain:", "ece_class:"
METRIC_NAMES: tuple[str, ...] = HEADLINE + SHOT_NAMES
METRIC_LABELS: dict[str, str] = {
    "ece": "ECE", "ece_worst_domain": "worst-domain ECE", "ece_worst_class": "worst-class ECE",
    "brier": "Brier score", "nll": "NLL", "aurc": "AURC (risk-coverage area)",
    "acc_at_cov90": "accuracy at 90% coverage", "acc_at_cov80": "accuracy at 80% coverage",
    "ece_shot_many": "many-shot ECE", "ece_shot_medium": "medium-shot ECE", "ece_shot_few": "few-shot ECE",
    "ece_shot_zero": "zero-shot ECE",
}


def metric_label(name: str) -> str:
    """How a calibration metric reads in a sentence ("ts_ece" reads "ECE after temperature scaling")."""
    base = name.removeprefix(TS_PREFIX)
    if base.startswith(DOMAIN_PREFIX):
        text = f"ECE on domain {base.split(':', 1)[1]}"
    elif base.startswith(CLASS_PREFIX):
        text = f"ECE on class {base.split(':', 1)[1]}"
    else:
        text = METRIC_LABELS.get(base, base)
    return text + (" after temperature scaling" if name.startswith(TS_PREFIX) else "")


def higher_is_better(name: str) -> bool:
    """Direction of any calibration metric name (per-domain and per-class ECE rows included)."""
    return mode_of(name) == "max"


# --------------------------------------------------------------------------------------------------
# Per-example quantities
# --------------------------------------------------------------------------------------------------


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise log-softmax of logits / T, in float64 (stable: the row maximum is subtracted first)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def example_stats(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Per example: ``confidence`` (top probability), ``correct`` (0/1), ``nll`` and ``brier``."""
    labels = np.asarray(labels, dtype=np.int64)
    logp = log_softmax(logits, temperature)
    p = np.exp(logp)
    rows = np.arange(len(labels))
    pred = logp.argmax(axis=1)
    p_y = p[rows, labels]
    return {"confidence": p[rows, pred], "correct": (pred == labels).astype(np.float64),
            "nll": -logp[rows, labels], "brier": (p * p).sum(axis=1) - 2.0 * p_y + 1.0}


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the mean NLL of softmax(logits / T): a bounded 1-D search over log T.

    NLL is convex in 1/T, so the bounded search finds its one minimum (or the bound it lies beyond).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise TallyError("temperature scaling: no validation examples to fit on")
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits, math.exp(log_t))[rows, labels].mean())

    found = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(math.exp(found.x))


# --------------------------------------------------------------------------------------------------
# Grouped metrics: one sort per call, every group (and every bootstrap replicate) at once
# --------------------------------------------------------------------------------------------------


def _group_layout(groups: np.ndarray, n_groups: int, key: np.ndarray) -> tuple[np.ndarray, ...]:
    """Order sorting by (group, key), each sorted example's group, its rank in the group, group sizes."""
    order = np.lexsort((key, groups))  # stable: ties in key keep example order
    g = groups[order]
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(g)) - starts[g]
    return order, g, rank, counts, starts


def grouped_ece(confidence: np.ndarray, correct: np.ndarray, groups: np.ndarray, n_groups: int,
                bins: int = BINS) -> np.ndarray:
    """ECE (equal-mass bins) of each group; NaN for an empty group. See the module docstring."""
    if bins < 1:
        raise TallyError(f"bins: expected >= 1, got {bins}")
    order, g, rank, counts, _ = _group_layout(groups, n_groups, confidence)
    b = rank * bins // counts[g]  # equal mass: bin b holds ranks [b n / bins, (b + 1) n / bins)
    flat = g * bins + b
    size = n_groups * bins
    gap = np.abs(np.bincount(flat, correct[order], minlength=size) - np.bincount(flat, confidence[order], minlength=size))
    with np.errstate(invalid="ignore", divide="ignore"):
        return gap.reshape(n_groups, bins).sum(axis=1) / counts


def grouped_mean(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    counts = np.bincount(groups, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(groups, values, minlength=n_groups) / counts


def grouped_selective(confidence: np.ndarray, correct: np.ndarray, groups: np.ndarray, n_groups: int,
                      coverages: Sequence[float] = COVERAGES) -> tuple[np.ndarray, np.ndarray]:
    """(AURC per group (G,), accuracy at each coverage per group (G, len(coverages)))."""
    order, g, rank, counts, starts = _group_layout(groups, n_groups, -confidence)
    errors = np.cumsum(1.0 - correct[order])
    before = np.concatenate([[0.0], errors])[starts]  # errors of earlier groups
    in_group = errors - before[g]  # errors among this group's first rank + 1 examples
    risk = in_group / (rank + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        aurc = np.bincount(g, risk, minlength=n_groups) / counts
    accs = np.full((n_groups, len(coverages)), np.nan)
    has = counts > 0
    for j, cov in enumerate(coverages):
        kept = np.maximum(np.ceil(cov * counts - 1e-9).astype(np.int64), 1)  # 1e-9: 0.9 * 10 is 9.000000000000002
        last = starts[has] + kept[has] - 1
        accs[has, j] = 1.0 - in_group[last] / kept[has]
    return aurc, accs


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> pd.DataFrame:
    """One group's reliability diagram: per equal-mass bin, its ``confidence`` (mean), ``accuracy``
    and ``n`` (the dashboard plots accuracy against confidence beside the diagonal)."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    if len(confidence) == 0:
        return pd.DataFrame(columns=["bin", "confidence", "accuracy", "n"])
    order = np.argsort(confidence, kind="stable")
    b = np.arange(len(order)) * bins // len(order)
    n = np.bincount(b, minlength=bins)
    keep = n > 0
    conf = np.bincount(b, confidence[order], minlength=bins)[keep] / n[keep]
    acc = np.bincount(b, correct[order], minlength=bins)[keep] / n[keep]
    return pd.DataFrame({"bin": np.flatnonzero(keep), "confidence": conf, "accuracy": acc, "n": n[keep]})


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> pd.DataFrame:
    """The risk-coverage curve: ``coverage`` k/n and ``risk`` (error rate of the k most confident)."""
    order = np.argsort(-np.asarray(confidence, np.float64), kind="stable")
    k = np.arange(1, len(order) + 1)
    return pd.DataFrame({"coverage": k / max(len(order), 1),
                         "risk": np.cumsum(1.0 - np.asarray(correct, np.float64)[order]) / k})


# --------------------------------------------------------------------------------------------------
# Every metric of one split, for R replicates at once
# --------------------------------------------------------------------------------------------------


class SplitExamples:
    """One split's examples: logits, labels, domains, the (D, C) shape, names and each pair's bucket."""

    def __init__(self, logits: np.ndarray, labels: np.ndarray, domains: np.ndarray, n_train: np.ndarray,
                 domain_names: Sequence[str], class_names: Sequence[str],
                 thresholds: tuple[int, int] = evaluation.DEFAULT_SHOT_THRESHOLDS):
        self.logits = np.asarray(logits, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.domains = np.asarray(domains, dtype=np.int64)
        self.n_train = np.asarray(n_train)
        self.D, self.C = self.n_train.shape
        if self.logits.ndim != 2 or self.logits.shape[1] != self.C or len(self.labels) != len(self.logits) \
                or len(self.domains) != len(self.logits):
            raise TallyError(f"logits {self.logits.shape}, labels {self.labels.shape}, domains "
                             f"{self.domains.shape}: expected (N, {self.C}), (N,), (N,)")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.C
                                 or self.domains.min() < 0 or self.domains.max() >= self.D):
            raise TallyError("labels or domains outside the split's classes / domains")
        self.domain_names, self.class_names = list(domain_names), list(class_names)
        many_above, few_at_most = thresholds
        nt = self.n_train[self.domains, self.labels]
        # bucket of each example's pair: 0 many, 1 medium, 2 few, 3 zero (SHOT_NAMES order)
        self.bucket = np.select([nt > many_above, nt <= 0, nt <= few_at_most], [0, 3, 2], default=1)

    def metrics(self, temperature: float = 1.0, bins: int = BINS, coverages: Sequence[float] = COVERAGES,
                picks: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every calibration metric; with ``picks`` (R, N) example indices, one value per replicate."""
        stats = example_stats(self.logits, self.labels, temperature)
        if picks is None:
            picks = np.arange(len(self.labels))[None, :]
        R, N = picks.shape
        flat = picks.ravel()
        conf, corr = stats["confidence"][flat], stats["correct"][flat]
        rep = np.repeat(np.arange(R), N)
        out: dict[str, np.ndarray] = {"ece": grouped_ece(conf, corr, rep, R, bins)}
        dom = grouped_ece(conf, corr, rep * self.D + self.domains[flat], R * self.D, bins).reshape(R, self.D)
        cls = grouped_ece(conf, corr, rep * self.C + self.labels[flat], R * self.C, bins).reshape(R, self.C)
        shot = grouped_ece(conf, corr, rep * 4 + self.bucket[flat], R * 4, bins).reshape(R, 4)
        out["ece_worst_domain"] = _nanmax(dom)
        out["ece_worst_class"] = _nanmax(cls)
        out["brier"] = grouped_mean(stats["brier"][flat], rep, R)
        out["nll"] = grouped_mean(stats["nll"][flat], rep, R)
        aurc, accs = grouped_selective(conf, corr, rep, R, coverages)
        out["aurc"] = aurc
        for j, cov in enumerate(coverages):
            out[f"acc_at_cov{round(cov * 100)}"] = accs[:, j]
        for i, name in enumerate(SHOT_NAMES):
            out[name] = shot[:, i]
        for i, name in enumerate(self.domain_names):
            out[DOMAIN_PREFIX + name] = dom[:, i]
        for i, name in enumerate(self.class_names):
            out[CLASS_PREFIX + name] = cls[:, i]
        return out

    def group_sizes(self) -> dict[str, int]:
        """Images behind each per-domain, per-class and per-shot-bucket ECE row."""
        sizes = dict(zip(SHOT_NAMES, np.bincount(self.bucket, minlength=4).tolist(), strict=True))
        sizes.update({DOMAIN_PREFIX + n: int(k) for n, k in zip(self.domain_names, np.bincount(
            self.domains, minlength=self.D), strict=True)})
        sizes.update({CLASS_PREFIX + n: int(k) for n, k in zip(self.class_names, np.bincount(
            self.labels, minlength=self.C), strict=True)})
        return sizes

    def split_picks(self, replicates: int, rng: np.random.Generator) -> np.ndarray:
        """(R, N) indices drawn uniformly from the whole split. Not within cells: a one-image cell has
        no variance there, and the measured coverage of Brier / NLL fell short on tiny cells with it;
        over the split the variance also holds the cells' mix (conservative, measured)."""
        return rng.integers(0, max(len(self.labels), 1), (replicates, len(self.labels)))

    def cell_picks(self, replicates: int, rng: np.random.Generator) -> np.ndarray:
        """(R, N) indices: each example's slot redrawn uniformly from its own (domain, class) cell."""
        cell = self.domains * self.C + self.labels
        order = np.argsort(cell, kind="stable")
        counts = np.bincount(cell, minlength=self.D * self.C)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        c = cell[order]
        u = rng.random((replicates, len(order)))
        return order[starts[c] + np.minimum((u * counts[c]).astype(np.int64), counts[c] - 1)]


def _nanmax(values: np.ndarray) -> np.ndarray:
    """Row maxima ignoring NaN (absent groups); NaN for an all-NaN row, without a warning."""
    filled = np.where(np.isnan(values), -np.inf, values)
    top = filled.max(axis=1)
    return np.where(np.isinf(top), np.nan, top)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _basic(point: np.ndarray, reps: np.ndarray, level: float, floor: float | None) -> tuple[np.ndarray, ...]:
    """Basic (reverse-percentile) bootstrap intervals of G values at once: point (G,), reps (R, G).

    [2 v - q_high, 2 v - q_low] subtracts the bootstrap's estimate of the bias (the replicates' shift
    from v) instead of adding it as the percentile interval does; widened to hold v itself (so the
    shown value never lies outside its interval) and cut at ``floor`` (0 for an ECE)."""
    with np.errstate(invalid="ignore"):
        q = np.nanquantile(reps, [(1 - level) / 2, (1 + level) / 2], axis=0) if len(reps) else \
            np.full((2, point.size), np.nan)
    low, high = np.fmin(2 * point - q[1], point), np.fmax(2 * point - q[0], point)
    if floor is not None:
        low = np.maximum(low, floor)
    return low, high


def _bounds(point: dict[str, np.ndarray], reps: dict[str, np.ndarray], level: float) -> dict[str, tuple]:
    """``{metric: (low, high)}``: a basic bootstrap interval per metric, and for the worst domain's and
    worst class's ECE a simultaneous one: each group's interval at level 1 - alpha / G (Bonferroni),
    combined as [max of lows, max of highs] (covers the largest population ECE whenever every group's
    interval covers its own), like intervals.py does for minima."""
    out = {}
    for name, value in point.items():
        floor = 0.0 if name.startswith("ece") else None
        low, high = _basic(value, reps[name][:, None] if reps[name].ndim == 1 else reps[name], level, floor)
        out[name] = (float(low[0]), float(high[0]))
    for worst, prefix in (("ece_worst_domain", DOMAIN_PREFIX), ("ece_worst_class", CLASS_PREFIX)):
        names = [n for n in point if n.startswith(prefix) and not np.isnan(point[n][0])]
        if not names:
            continue
        values = np.array([point[n][0] for n in names])
        low, high = _basic(values, np.stack([reps[n] for n in names], axis=1), 1 - (1 - level) / len(names), 0.0)
        v = float(point[worst][0])
        out[worst] = (min(float(low.max()), v), max(float(high.max()), v))
    # ECE's lower bound: binned ECE is biased upward by about the noise of each bin's accuracy, so for a
    # (nearly) calibrated model every bootstrap lower bound measured lay above the true 0 (coverage
    # 0.00-0.45). Until a debiased estimator is measured, an ECE row is a one-sided claim: low = 0,
    # high = the upper end above (one-sided at (1 + level) / 2, which covers whenever it holds).
    return {name: ((0.0, bounds[1]) if name.startswith("ece") else bounds) for name, bounds in out.items()}


def split_intervals(ex: SplitExamples, split: str, temperatures: dict[str, float], *, replicates: int = REPLICATES,
                    level: float = LEVEL, rng: np.random.Generator, bins: int = BINS) -> list[dict]:
    """Rows ``split, metric, value, low, high`` of every metric, before and (unless ``temperatures`` is
    empty) after temperature scaling; replicates drawn in blocks to bound memory."""
    rows = []
    block = max(1, _PICKS_PER_BLOCK // max(len(ex.labels), 1))
    draws = [ex.split_picks(min(block, replicates - start), rng) for start in range(0, replicates, block)]
    for prefix, temperature in (("", 1.0), *((TS_PREFIX, t) for t in temperatures.values())):
        point = ex.metrics(temperature, bins)
        parts: dict[str, list] = {}
        for picks in draws:
            for name, values in ex.metrics(temperature, bins, picks=picks).items():
                parts.setdefault(name, []).append(values)
        reps = {name: np.concatenate(values) for name, values in parts.items()}
        sizes = ex.group_sizes()
        for name, (low, high) in _bounds(point, reps, level).items():
            if name not in ("ece_worst_domain", "ece_worst_class") and sizes.get(name, len(ex.labels)) < MIN_IMAGES:
                low = high = math.nan
            rows.append({"split": split, "metric": prefix + name, "value": float(point[name][0]), "low": low,
                         "high": high})
    return rows


# --------------------------------------------------------------------------------------------------
# Logits of a run: written by training, read here
# --------------------------------------------------------------------------------------------------


def write_logits(run_dir: str | Path, logits_by_split: dict[str, tuple]) -> Path | None:
    """Write ``logits.npz`` (atomically): per split its float32 logits (N, C), labels and domains,
    rows in the split's order. Nothing when there are no splits."""
    if not logits_by_split:
        return None
    arrays: dict[str, np.ndarray] = {"splits": np.array(list(logits_by_split), dtype=str)}
    for i, (logits, labels, domains) in enumerate(logits_by_split.values()):
        arrays[f"logits_{i}"] = np.asarray(logits, dtype=np.float32)
        arrays[f"labels_{i}"] = np.asarray(labels, dtype=np.int64)
        arrays[f"domains_{i}"] = np.asarray(domains, dtype=np.int64)
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path = Path(run_dir) / LOGITS_FILE
    results.write_bytes(path, buffer.getvalue())
    return path


def read_logits(run_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """``{split: (logits, labels, domains)}`` of a run, or None for a run without ``logits.npz``."""
    path = Path(run_dir) / LOGITS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            splits = [str(s) for s in data["splits"]]
            out = {s: (data[f"logits_{i}"], data[f"labels_{i}"], data[f"domains_{i}"]) for i, s in enumerate(splits)}
    except (KeyError, ValueError, OSError) as e:
        raise TallyError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    for split, (logits, labels, domains) in out.items():
        if logits.ndim != 2 or labels.shape != (len(logits),) or domains.shape != (len(logits),):
            raise TallyError(f"{path}: split {split!r}: logits {logits.shape}, labels {labels.shape}, "
                             f"domains {domains.shape} do not match")
    return out


def temperature_of(logits: dict | None, final: bool) -> dict:
    """What calibration.json holds: the temperature fitted on ``val`` (or 1 and why not)."""
    if final:
        return {"temperature": 1.0, "fitted_on": None,
                "reason": "final retrain: validation is training data, nothing held out to fit on"}
    if not logits or "val" not in logits:
        return {"temperature": 1.0, "fitted_on": None, "reason": "no validation logits"}
    val_logits, val_labels, _ = logits["val"]
    if len(val_labels) == 0:
        return {"temperature": 1.0, "fitted_on": None, "reason": "empty validation split"}
    return {"temperature": fit_temperature(val_logits, val_labels), "fitted_on": "val", "n": int(len(val_labels))}


def read_temperature(run_dir: str | Path) -> dict | None:
    """The run's ``calibration.json`` (checked), or None when it has none."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    info = results.read_json(path)
    t = (info or {}).get("temperature")
    if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        raise TallyError(f"{path}: temperature: expected a finite number > 0, got {t!r}")
    return info


def _split_examples(table: pd.DataFrame, split: str, arrays: tuple, thresholds, what: str) -> SplitExamples:
    rows = table[table["split"] == split]
    if rows.empty:
        raise TallyError(f"{what}: {LOGITS_FILE} has split {split!r}, eval.parquet does not")
    counts = evaluation.count_arrays(rows)
    grid = evaluation.accuracy_grid(rows, split, "n")
    ex = SplitExamples(*arrays, counts["n_train"], [str(d) for d in grid.index], [str(c) for c in grid.columns],
                       thresholds)
    got = np.bincount(ex.domains * ex.C + ex.labels, minlength=ex.D * ex.C).reshape(ex.D, ex.C)
    if not np.array_equal(got, counts["n"]):
        raise TallyError(f"{what}: {LOGITS_FILE} disagrees with eval.parquet on split {split!r} (images per pair)")
    return ex


def calibration_intervals(run_dir: str | Path, splits: Sequence[str] | None = None, *,
                          replicates: int = REPLICATES, level: float = LEVEL, seed: int = SEED,
                          bins: int = BINS, thresholds: tuple[int, int] | None = None) -> pd.DataFrame:
    """Rows ``split, metric, value, low, high, method, small_cells`` (run_intervals' format) of every
    calibration metric of a run, before and after temperature scaling; empty for a run without
    logits. The temperature: the run's calibration.json, else fitted now on its validation logits.
    """
    run_dir = Path(run_dir)
    columns = ["split", "metric", "value", "low", "high", "method", "small_cells"]
    loaded = _run_examples(run_dir, thresholds)
    if loaded is None:
        return pd.DataFrame(columns=columns)
    if replicates < 1:
        raise TallyError(f"replicates: expected >= 1, got {replicates}")
    examples, info, _ = loaded
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for split in splits or list(examples):
        if split not in examples:
            continue  # a split without kept logits has no calibration rows (its accuracy rows remain)
        ex = examples[split]
        scaled = {} if split == "val" or info.get("fitted_on") is None else {"T": float(info["temperature"])}
        rows += split_intervals(ex, split, scaled, replicates=replicates, level=level, rng=rng, bins=bins)
        rows.append({"split": split, "metric": "temperature", "value": float(info["temperature"]),
                     "low": math.nan, "high": math.nan})
    frame = pd.DataFrame(rows, columns=columns[:-2])
    base = frame["metric"].str.removeprefix(TS_PREFIX)
    frame["method"] = np.select([frame["metric"] == "temperature", frame["low"].isna(), base.str.startswith("ece")],
                                ["fitted on validation", SMALL_METHOD, ECE_METHOD], BASIC_METHOD)
    frame["small_cells"] = 0
    return frame


def _run_examples(run_dir: Path, thresholds) -> tuple[dict, dict, dict] | None:
    """(SplitExamples by split, temperature info, config) of a run; None without logits."""
    logits = read_logits(run_dir)
    if logits is None:
        return None
    table = results.read_parquet(run_dir / "eval.parquet")
    if table is None:
        raise TallyError(f"{run_dir}: no eval.parquet (not a finished run folder)")
    cfg = results.read_yaml(run_dir / "config.yaml") or {}
    if thresholds is None:
        thresholds = evaluation.shot_thresholds_of(cfg.get("data"))
    info = read_temperature(run_dir) or temperature_of(logits, bool((cfg.get("train") or {}).get("final")))
    return ({s: _split_examples(table, s, arrays, thresholds, str(run_dir)) for s, arrays in logits.items()},
            info, cfg)


def calibration_differences(run_a: str | Path, run_b: str | Path, splits: Sequence[str] | None = None, *,
                            metrics: Sequence[str] = METRIC_NAMES, replicates: int = REPLICATES,
                            level: float = LEVEL, seed: int = SEED, bins: int = BINS) -> pd.DataFrame:
    """Run A minus run B on the same test images, each metric before and (where both runs have a
    temperature) after temperature scaling: rows ``split, metric, a, b, diff, low, high``, the format
    of ``intervals.paired_difference``. Both runs are redrawn with the SAME images in each replicate
    (one set of cell picks for both), so the interval removes what they share. For these metrics a
    NEGATIVE difference means A is better except for ``acc_at_cov*`` (``higher_is_better``); for that
    reason they are not rows of ``compare_runs``, whose readers (the benchmark's verdicts) take every
    row as higher-is-better. Empty when either run has no logits; other test sets are refused."""
    columns = ["split", "metric", "a", "b", "diff", "low", "high"]
    got_a, got_b = _run_examples(Path(run_a), None), _run_examples(Path(run_b), None)
    if got_a is None or got_b is None:
        return pd.DataFrame(columns=columns)
    (ex_a, info_a, _), (ex_b, info_b, _) = got_a, got_b
    rng = np.random.default_rng(seed)
    rows = []
    for split in splits or [s for s in ex_a if s != "val"]:
        if split not in ex_a or split not in ex_b:
            raise TallyError(f"{run_a} and {run_b}: split {split!r} has no logits in both runs")
        a, b = ex_a[split], ex_b[split]
        if not (np.array_equal(a.labels, b.labels) and np.array_equal(a.domains, b.domains)):
            raise TallyError(f"{run_a} and {run_b}: test sets differ on split {split!r} (labels or domains)")
        picks = a.cell_picks(replicates, rng) if replicates else None
        temps = [("", 1.0, 1.0)]
        if split != "val" and info_a.get("fitted_on") and info_b.get("fitted_on"):
            temps.append((TS_PREFIX, float(info_a["temperature"]), float(info_b["temperature"])))
        for prefix, t_a, t_b in temps:
            point_a, point_b = a.metrics(t_a, bins), b.metrics(t_b, bins)
            rep_a = a.metrics(t_a, bins, picks=picks) if picks is not None else None
            rep_b = b.metrics(t_b, bins, picks=picks) if picks is not None else None
            for name in metrics:
                va, vb = float(point_a[name][0]), float(point_b[name][0])
                low, high = _interval(rep_a[name] - rep_b[name], level) if rep_a else (math.nan, math.nan)
                rows.append({"split": split, "metric": prefix + name, "a": va, "b": vb, "diff": va - vb,
                             "low": low, "high": high})
    return pd.DataFrame(rows, columns=columns)


def headline_metrics(logits: dict, table: pd.DataFrame, info: dict, thresholds=evaluation.DEFAULT_SHOT_THRESHOLDS,
                     bins: int = BINS, what: str = "run") -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` of ``METRIC_NAMES`` (and their ``ts_`` values on test splits, with
    ``info``'s temperature): what training adds to metrics.json, so that searches, benchmarks and
    summaries can report or select on them like any accuracy metric."""
    out = {}
    for split, arrays in logits.items():
        ex = _split_examples(table, split, arrays, thresholds, what)
        values = {m: float(v[0]) for m, v in ex.metrics(1.0, bins).items() if m in METRIC_NAMES}
        if split != "val" and info.get("fitted_on") is not None:
            values.update({TS_PREFIX + m: float(v[0]) for m, v in ex.metrics(float(info["temperature"]), bins).items()
                           if m in METRIC_NAMES})
        out[split] = values
    return out


def validation_metrics(arrays: tuple, table: pd.DataFrame, split: str = "val",
                       thresholds=evaluation.DEFAULT_SHOT_THRESHOLDS, bins: int = BINS) -> dict[str, float]:
    """``METRIC_NAMES`` of one split from its (logits, labels, domains) and long table, before any
    temperature: what training records each epoch as ``val/<metric>`` for selection (a ``ts_`` value is
    never computed here: T is fitted on validation, so it would be in-sample)."""
    return headline_metrics({split: arrays}, table, {}, thresholds, bins, what=split)[split]


def run_calibration(run_dir: str | Path, *, bins: int = BINS, thresholds: tuple[int, int] | None = None
                    ) -> dict[str, dict[str, float]] | None:
    """``{split: {metric: value}}`` (no intervals; ``ts_`` after temperature scaling), or None for a
    run without logits. Cheap: what `tally report` columns and the selection of a search read."""
    frame = calibration_intervals(run_dir, replicates=1, bins=bins, thresholds=thresholds)
    if frame.empty:
        return None
    return {split: dict(zip(rows["metric"], rows["value"].astype(float), strict=True))
            for split, rows in frame.groupby("split", sort=False)}


# --------------------------------------------------------------------------------------------------
# The demo's table
# --------------------------------------------------------------------------------------------------


def calibration_table(run_dirs: dict[str, str | Path], *, split: str | None = None,
                      metrics: Sequence[str] = ("ece", "ece_worst_domain", "nll", "aurc"),
                      replicates: int = 200, seed: int = SEED) -> str:
    """One short text table: per run, each metric before -> after temperature scaling, with 95%
    intervals, on one test split (the first test split of the first run when not given)."""
    table: list[list[str]] = []
    missing = []
    for name, run_dir in run_dirs.items():
        frame = calibration_intervals(run_dir, replicates=replicates, seed=seed)
        if split is None:
            tests = [s for s in pd.unique(frame["split"]) if s != "val"]
            split = str(tests[0]) if tests else None
        rows = frame[frame["split"] == split].set_index("metric")
        if rows.empty:
            missing.append(name)
            continue
        t = rows.loc["temperature", "value"] if "temperature" in rows.index else math.nan
        cells = [name, f"{t:.2f}"]
        for m in metrics:
            cells.append(_cell(rows, m) + (" -> " + _cell(rows, TS_PREFIX + m) if TS_PREFIX + m in rows.index else ""))
        table.append(cells)
    lines = []
    if table:
        header = ["method", "T", *metrics]
        widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
        lines.append(f"calibration on {split}: before -> after temperature scaling (T fitted on val); "
                     "[0, u]: ECE's 95% upper bound (no lower bound: coverage not reached); [l, u]: 95% "
                     "basic bootstrap; a value alone: no interval (coverage not reached, see docs)")
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *table]]
    if missing:
        lines.append(f"(no calibration: {', '.join(missing)}: no logits.npz, a run from before it)")
    return "\n".join(lines)


def _cell(rows: pd.DataFrame, metric: str) -> str:
    if metric not in rows.index:
        return "-"
    r = rows.loc[metric]
    if math.isnan(r["low"]):
        return f"{r['value']:.3f}"
    return f"{r['value']:.3f} [{r['low']:.3f},{r['high']:.3f}]"


def benchmark_calibration_table(bench_dir: str | Path, seed: int | None = None, replicates: int = 200) -> str:
    """``calibration_table`` of a benchmark folder: one run per method (the first seed of the plan, or
    ``seed``) on its setting's test split; the demo prints it."""
    plan = results.read_parquet(Path(bench_dir) / "plan.parquet")
    if plan is None or plan.empty:
        return f"(no calibration: {bench_dir} has no plan.parquet)"
    if "rule" in plan.columns:  # a tuned benchmark: the first rule's re-runs (training-domain validation)
        plan = plan[plan["rule"] == plan["rule"].iloc[0]]
    seed = int(plan["seed"].min()) if seed is None else seed
    rows = plan[plan["seed"] == seed].drop_duplicates("method")
    # "runs" is tally.search.benchmark.RUNS_DIR (not imported: evaluation never imports search)
    runs = {str(r.method): Path(bench_dir) / "runs" / str(r.run) for r in rows.itertuples(index=False)}
    split = str(rows["split"].iloc[0])
    return calibration_table(runs, split=split, replicates=replicates) + f"\n(seed {seed})"


# --------------------------------------------------------------------------------------------------
# What the dashboard draws
# --------------------------------------------------------------------------------------------------

TAIL = "tail (few- and zero-shot pairs)"
_CURVE_POINTS = 400  # a risk-coverage curve is drawn from at most this many points


def split_views(run_dir: str | Path, split: str, bins: int = BINS) -> dict | None:
    """One split of a run, for the dashboard: ``reliability`` (rows group, when, bin, confidence,
    accuracy, n: per domain and for the tail pairs together, before and after temperature scaling),
    ``risk`` (rows when, coverage, risk), ``gap`` (domains x classes: mean confidence minus accuracy of
    each pair, > 0 overconfident; NaN where the pair has no examples) and ``temperature``. None for a
    run without logits or a split without them."""
    got = _run_examples(Path(run_dir), None)
    if got is None or split not in got[0]:
        return None
    ex, info = got[0][split], got[1]
    whens = [("before", 1.0)]
    if split != "val" and info.get("fitted_on"):
        whens.append((f"after T = {float(info['temperature']):.2f}", float(info["temperature"])))
    rel, risk = [], []
    for when, t in whens:
        stats = example_stats(ex.logits, ex.labels, t)
        groups = [(str(name), ex.domains == i) for i, name in enumerate(ex.domain_names)]
        groups.append((TAIL, ex.bucket >= 2))
        for name, mask in groups:
            if mask.any():
                rel.append(reliability(stats["confidence"][mask], stats["correct"][mask], bins)
                           .assign(group=name, when=when))
        curve = risk_coverage(stats["confidence"], stats["correct"])
        step = max(1, len(curve) // _CURVE_POINTS)
        risk.append(pd.concat([curve.iloc[::step], curve.iloc[-1:]]).drop_duplicates().assign(when=when))
    stats = example_stats(ex.logits, ex.labels)
    cell = ex.domains * ex.C + ex.labels
    size = ex.D * ex.C
    n = np.bincount(cell, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = (np.bincount(cell, stats["confidence"] - stats["correct"], minlength=size) / n).reshape(ex.D, ex.C)
    return {"reliability": pd.concat(rel, ignore_index=True), "risk": pd.concat(risk, ignore_index=True),
            "gap": pd.DataFrame(gap, index=ex.domain_names, columns=ex.class_names).dropna(how="all"),
            "temperature": float(info["temperature"]) if len(whens) > 1 else None}
