"""Uncertainty of every metric: a stratified bootstrap within (domain, class) pairs, paired comparisons
of two runs on one test set, and the spread over seeds.

Why a bootstrap within pairs: every metric is a function of the per-(domain, class) table, and each
pair's test images are a sample of that pair; the pair sizes themselves are fixed by the split (a
balanced test set has n_test images per pair by design). So a replicate redraws each pair's images
with replacement and keeps its size n. For pair accuracy this is exact and cheap: the number of
correct images in a redrawn pair is Binomial(n, correct / n), so one ``rng.binomial`` of shape
(R, D, C) draws all R replicates at once, with no loop over images or replicates. Every metric, worst
pair, worst class, worst domain and the shot buckets included, is then computed for all replicates at
once by ``evaluation.metric_arrays`` (the same code as the point estimate), and the interval is the
2.5 and 97.5 percentiles of the R values (a percentile interval).

Why macro F1 needs more than the table: F1 needs, per class, the images of OTHER classes predicted as
it (false positives). The table's ``predicted`` column holds, per (domain, class), how many images of
the domain were predicted as that class, but not which pairs those false positives came from. When a
pair is redrawn, how many of its wrong images land on each other class depends on that pair's own
confusions, which the table does not keep. So:
- with per-example predictions (``predictions.parquet``, written for test splits by training): exact.
  The number of wrong images in a redrawn pair comes from the same draw as its accuracy; each wrong
  draw is then a uniform pick among the pair's wrong images (this is exactly what resampling the
  pair's images does, conditioned on its wrong count), and its prediction is counted as a false
  positive of that class. The picks are one vectorised draw per block of replicates.
- table only: an approximation. A domain's false positives are redrawn as one multinomial of the
  domain's redrawn wrong count over the domain's observed false-positive profile (predicted - correct
  per class), as if a wrong image's predicted class did not depend on its true class within a domain.
  It keeps every count consistent (a domain's false positives sum to its wrong images) and is exact
  whenever each domain's errors go to one class; otherwise its F1 intervals are approximate (on
  simulated 3 x 20 data with uniform errors, one confuser per class, or two sink classes, its
  endpoints matched the exact ones within 0.001). Results say which was used (column ``f1``:
  ``exact`` or ``pooled``).

Caveat: the bootstrap of a minimum (worst pair / class / domain) is a known weak spot (non-smooth
statistic; the replicate minima sit below the observed one when several pairs are near the worst),
so those intervals are conservative on the low side. They still show how far a worst-pair number can
move with a few images per pair, which is what a decision needs.

Paired comparison: two runs on the same test images are redrawn with the SAME images: each pair's
images fall into four cells (both right, only A right, only B right, both wrong) and a replicate draws
the four counts as one multinomial, so the difference's interval removes the variation both runs
share. Across seeds: mean, standard error (ddof 1 / sqrt k) and the seed-level values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tally import results
from tally.errors import TallyError
from tally.evaluation import metrics as evaluation

REPLICATES = 1000
LEVEL = 0.95
SEED = 0
PREDICTIONS_FILE = "predictions.parquet"
PREDICTION_COLUMNS = ("split", "index", "label", "domain", "prediction", "confidence")
DOMAIN_PREFIX = "domain_acc:"  # rows "domain_acc:<domain>": one domain's accuracy (a report column)
# Data fields that do not change which images a test split holds; every other field must match for
# two runs to be compared (a field added later is compared, which errs on the side of refusing).
NOT_TEST_SET_FIELDS = frozenset({"root", "image_size", "flip", "crop_padding", "decode_workers",
                                 "oracle_selection", "shot_many_above", "shot_few_at_most"})
# Wrong-image picks drawn at once (int64 index arrays of this length): bounds memory for large R * N.
_PICKS_PER_BLOCK = 2_000_000


# --------------------------------------------------------------------------------------------------
# Per-example predictions of the kept checkpoint
# --------------------------------------------------------------------------------------------------


def prediction_frame(split: str, preds, labels, domains, confidence) -> pd.DataFrame:
    """One split's per-example predictions: ``split, index, label, domain, prediction, confidence``.

    ``index`` is the example's position in the split (the order of its dataset), which is what lets
    two runs on the same split be paired image by image.
    """
    arrays = [np.asarray(x.detach().cpu() if hasattr(x, "detach") else x) for x in (preds, labels, domains)]
    conf = np.asarray(confidence.detach().cpu() if hasattr(confidence, "detach") else confidence)
    n = len(arrays[0])
    return pd.DataFrame({
        "split": np.full(n, split, dtype=object),
        "index": np.arange(n, dtype=np.int64),
        "label": arrays[1].astype(np.int64),
        "domain": arrays[2].astype(np.int64),
        "prediction": arrays[0].astype(np.int64),
        "confidence": conf.astype(np.float32),
    })


def write_predictions(run_dir: str | Path, frames: Iterable[pd.DataFrame]) -> Path | None:
    """Write ``predictions.parquet`` (atomically) in the run folder; nothing when there are no frames."""
    frames = list(frames)
    if not frames:
        return None
    path = Path(run_dir) / PREDICTIONS_FILE
    results.write_parquet(path, pd.concat(frames, ignore_index=True))
    return path


def read_predictions(run_dir: str | Path) -> pd.DataFrame | None:
    """The run's per-example predictions, or None for a run without them (older runs)."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    frame = pd.read_parquet(path)
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise TallyError(f"{path}: lacks columns {missing}")
    return frame


# --------------------------------------------------------------------------------------------------
# Replicate counts: one (R, D, C) array of correct and of predicted per run
# --------------------------------------------------------------------------------------------------


def _multinomial_cells(m: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(R, P, K) counts: each of P pairs' n = m.sum(1) images redrawn over its K cells (counts m).

    Conditional binomials from the last cell down (K - 1 vectorised draws of shape (R, P)): the last
    cell is "right in every run", so for one run the first draw is exactly Binomial(n, correct / n).
    """
    m = m.astype(np.int64)
    P, K = m.shape
    out = np.empty((replicates, P, K), dtype=np.int64)
    left = np.broadcast_to(m.sum(axis=1), (replicates, P)).copy()  # images still to place
    mass = m.sum(axis=1).astype(np.float64)  # their share of the pair
    for k in range(K - 1, 0, -1):
        p = np.divide(m[:, k], mass, out=np.zeros(P), where=mass > 0)
        out[..., k] = rng.binomial(left, np.clip(p, 0.0, 1.0))
        left -= out[..., k]
        mass -= m[:, k]
    out[..., 0] = left
    return out


def _pooled_false_positives(n, correct, predicted, correct_r, rng) -> np.ndarray:
    """(R, D, C) false positives when only the table exists (see the module docstring: approximate)."""
    fp_obs = (np.asarray(predicted) - np.asarray(correct)).astype(np.float64)  # (D, C), >= 0
    wrong_obs = fp_obs.sum(axis=1, keepdims=True)
    C = fp_obs.shape[1]
    profile = np.divide(fp_obs, wrong_obs, out=np.full_like(fp_obs, 1.0 / C), where=wrong_obs > 0)
    wrong_r = (np.asarray(n) - correct_r).sum(axis=-1)  # (R, D)
    return rng.multinomial(wrong_r, profile)  # broadcasts (R, D) trials over (D, C) profiles


def _example_arrays(examples: pd.DataFrame, D: int, C: int, what: str) -> tuple[np.ndarray, ...]:
    """label, domain and prediction arrays of one split's examples, checked against the index spaces."""
    labels = examples["label"].to_numpy(np.int64)
    domains = examples["domain"].to_numpy(np.int64)
    preds = examples["prediction"].to_numpy(np.int64)
    for arr, bound, name in ((labels, C, "label"), (domains, D, "domain"), (preds, C, "prediction")):
        if arr.size and (arr.min() < 0 or arr.max() >= bound):
            raise TallyError(f"{what}: {name} out of range [0, {bound})")
    return labels, domains, preds


def replicate_counts(
    n: np.ndarray,
    correct: np.ndarray,
    predicted: np.ndarray,
    replicates: int,
    rng: np.random.Generator,
    examples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(correct_r, predicted_r)]``, each (R, D, C), one per run: the bootstrap's replicates.

    Table only (``examples`` None): one run, correct from binomials, false positives pooled per domain.
    With ``examples`` (one ``(labels, domains, preds)`` per run, the SAME test images in the same
    order for every run): each pair's images are split into cells by which runs got them right and
    redrawn together, so several runs are paired; false positives are exact.
    """
    n = np.asarray(n, dtype=np.int64)
    D, C = n.shape
    if examples is None:
        correct_r = _multinomial_cells(np.stack([n - correct, correct], axis=-1).reshape(D * C, 2),
                                       replicates, rng)[..., 1].reshape(replicates, D, C)
        return [(correct_r, correct_r + _pooled_false_positives(n, correct, predicted, correct_r, rng))]

    labels, domains = examples[0][0], examples[0][1]
    preds = np.stack([p for _, _, p in examples])  # (k, N)
    runs, P = len(examples), D * C
    K = 1 << runs
    right = preds == labels  # (k, N)
    cell = (right.astype(np.int64) << np.arange(runs)[:, None]).sum(axis=0)  # bit j: run j right
    pair = domains * C + labels
    group = pair * K + cell
    m = np.bincount(group, minlength=P * K).reshape(P, K)
    draws = _multinomial_cells(m, replicates, rng)  # (R, P, K)
    bits = (np.arange(K)[:, None] >> np.arange(runs)) & 1  # (K, k)
    corrects = [(draws * bits[:, j]).sum(axis=-1).reshape(replicates, D, C) for j in range(runs)]

    # Exact false positives: every draw from a cell where some run is wrong picks one of the cell's
    # images uniformly; each run that is wrong on it adds a false positive (domain, its prediction).
    order = np.argsort(group, kind="stable")
    sizes = m.ravel()
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    wrong_groups = np.flatnonzero((sizes > 0) & (np.arange(P * K) % K != K - 1))
    G, bins = len(wrong_groups), P + 1  # bin P of each replicate collects the runs that were right
    g_start, g_size = start[wrong_groups], sizes[wrong_groups].astype(np.float64)
    counts = draws.reshape(replicates, P * K)[:, wrong_groups]  # (R, G)
    key_of = np.where(right, P, domains * C + preds)[:, order]  # (k, N) in group order
    fps = np.zeros((runs, replicates, bins), dtype=np.int64)
    block = max(1, _PICKS_PER_BLOCK // max(1, int(g_size.sum())))
    for r0 in range(0, replicates if G else 0, block):  # blocks of replicates only bound memory
        c = counts[r0:r0 + block]
        rows = c.shape[0]
        # one entry per draw: its cell and its replicate's offset in the flat (rows, bins) counts
        g = np.repeat(np.tile(np.arange(G), rows), c.ravel())
        base = np.repeat(np.repeat(np.arange(rows) * bins, G), c.ravel())
        u = rng.random(g.size)
        u *= g_size[g]  # float64: floor(u * size) is uniform over the cell's images
        pick = u.astype(np.intp)
        pick += g_start[g]
        for j in range(runs):
            key = key_of[j][pick]
            key += base
            fps[j, r0:r0 + rows] = np.bincount(key, minlength=rows * bins).reshape(rows, bins)
    return [(cr, cr + fp[:, :P].reshape(replicates, D, C)) for cr, fp in zip(corrects, fps, strict=True)]


# --------------------------------------------------------------------------------------------------
# Intervals of one run, differences of two runs
# --------------------------------------------------------------------------------------------------


def _metric_values(n, n_train, correct, predicted, thresholds, domain_names) -> dict[str, np.ndarray]:
    """Every metric plus one accuracy per domain, over the leading (replicate) axes of the counts."""
    out = evaluation.metric_arrays(n, correct, predicted, n_train, *thresholds)
    per_domain = evaluation.domain_accuracies(n, correct)
    for i, name in enumerate(domain_names):
        out[DOMAIN_PREFIX + name] = per_domain[..., i]
    return out


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of replicate values; NaN for a metric that is undefined (NaN) on the split."""
    if values.size == 0 or np.isnan(values).any():
        return math.nan, math.nan
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


class _Split:
    """One split of one run: its (D, C) counts, domain names and (optionally) per-example arrays."""

    def __init__(self, table: pd.DataFrame, split: str, predictions: pd.DataFrame | None, what: str):
        rows = table[table["split"] == split]
        if rows.empty:
            raise TallyError(f"{what}: no split {split!r} in its evaluation table "
                             f"(has {', '.join(map(str, pd.unique(table['split'])))})")
        self.counts = evaluation.count_arrays(rows)
        grid = evaluation.accuracy_grid(rows, split, "n")
        self.domain_names = [str(d) for d in grid.index]
        self.class_names = [str(c) for c in grid.columns]
        self.examples = None
        if predictions is not None:
            mine = predictions[predictions["split"] == split].sort_values("index")
            if len(mine):
                D, C = self.counts["n"].shape
                self.examples = _example_arrays(mine, D, C, what)
                got = evaluation.pair_counts(self.examples[2], self.examples[0], self.examples[1], D, C)
                want = (self.counts["n"], self.counts["correct"], self.counts["predicted"])
                if not all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)):
                    raise TallyError(f"{what}: {PREDICTIONS_FILE} disagrees with eval.parquet on split {split!r}")

    def point(self, thresholds) -> dict[str, np.ndarray]:
        c = self.counts
        return _metric_values(c["n"], c["n_train"], c["correct"], c["predicted"], thresholds, self.domain_names)


def bootstrap(
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
    """95% (``level``) percentile intervals of every metric of every split of one run's long table.

    Rows ``split, metric, value, low, high, f1``: ``value`` is the metric of the table itself (the
    point estimate), ``low``/``high`` the interval; metrics are ``evaluation.METRIC_NAMES`` plus
    ``domain_acc:<domain>`` per domain. ``f1`` says how macro F1 was resampled (``exact`` from
    per-example predictions, ``pooled`` from the table alone; see the module docstring). Fixed
    ``seed``: the same table always gives the same intervals.
    """
    if replicates < 1:
        raise TallyError(f"replicates: expected >= 1, got {replicates}")
    rng = np.random.default_rng(seed)
    rows = []
    for split in splits or [str(s) for s in pd.unique(table["split"])]:
        part = _Split(table, split, predictions, what)
        c = part.counts
        examples = [part.examples] if part.examples is not None else None
        [(correct_r, predicted_r)] = replicate_counts(c["n"], c["correct"], c["predicted"], replicates, rng,
                                                      examples)
        reps = _metric_values(c["n"], c["n_train"], correct_r, predicted_r, thresholds, part.domain_names)
        for name, value in part.point(thresholds).items():
            low, high = _interval(reps[name], level)
            rows.append({"split": split, "metric": name, "value": float(value), "low": low, "high": high,
                         "f1": "exact" if examples else "pooled"})
    return pd.DataFrame(rows, columns=["split", "metric", "value", "low", "high", "f1"])


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
    names: tuple[str, str] = ("A", "B"),
) -> pd.DataFrame:
    """Metric of run A minus that of run B on the same test images, with a paired-bootstrap interval.

    Rows ``split, metric, a, b, diff, low, high``. Both runs are redrawn with the same images in every
    replicate (see the module docstring), which needs both runs' per-example predictions; runs whose
    test sets differ (other splits, index spaces, pair sizes, or images' labels and domains) are
    refused with a one-line TallyError.
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
    rng = np.random.default_rng(seed)
    rows = []
    for split in splits:
        a = _Split(table_a, split, predictions_a, names[0])
        b = _Split(table_b, split, predictions_b, names[1])
        _check_same_test_set(a, b, split, names)
        for part, name in ((a, names[0]), (b, names[1])):
            if part.examples is None:
                raise TallyError(f"{name}: no per-example predictions for split {split!r}")
        c = a.counts
        (ca, pa), (cb, pb) = replicate_counts(c["n"], c["correct"], c["predicted"], replicates, rng,
                                              [a.examples, b.examples])
        rep_a = _metric_values(c["n"], c["n_train"], ca, pa, thresholds, a.domain_names)
        rep_b = _metric_values(c["n"], c["n_train"], cb, pb, thresholds, a.domain_names)
        point_a, point_b = a.point(thresholds), b.point(thresholds)
        for name in point_a:
            low, high = _interval(rep_a[name] - rep_b[name], level)
            va, vb = float(point_a[name]), float(point_b[name])
            rows.append({"split": split, "metric": name, "a": va, "b": vb, "diff": va - vb,
                         "low": low, "high": high})
    return pd.DataFrame(rows, columns=["split", "metric", "a", "b", "diff", "low", "high"])


def _check_same_test_set(a: _Split, b: _Split, split: str, names: tuple[str, str]) -> None:
    label = f"{names[0]} and {names[1]}: test sets differ on split {split!r}"
    if a.domain_names != b.domain_names or a.class_names != b.class_names:
        raise TallyError(f"{label} (domain or class names)")
    if not np.array_equal(a.counts["n"], b.counts["n"]):
        raise TallyError(f"{label} (images per (domain, class) pair)")
    if a.examples is not None and b.examples is not None and not (
            np.array_equal(a.examples[0], b.examples[0]) and np.array_equal(a.examples[1], b.examples[1])):
        raise TallyError(f"{label} (labels or domains of the images, in split order)")


def format_difference(row, name_a: str, name_b: str, digits: int = 3) -> str:
    """``"tally - erm on worst-class accuracy: +0.120 [0.050, 0.190]"`` (plus the split when not one)."""
    label = evaluation.metric_label(row["metric"])
    return (f"{name_a} - {name_b} on {label}: {row['diff']:+.{digits}f} "
            f"[{row['low']:.{digits}f}, {row['high']:.{digits}f}]")


# --------------------------------------------------------------------------------------------------
# Runs on disk
# --------------------------------------------------------------------------------------------------


def _read_run(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, dict]:
    table = results.read_parquet(run_dir / "eval.parquet")
    if table is None:
        raise TallyError(f"{run_dir}: no eval.parquet (not a finished run folder)")
    return table, read_predictions(run_dir), results.read_yaml(run_dir / "config.yaml") or {}


def run_intervals(run_dir: str | Path, *, splits: Sequence[str] | None = None, replicates: int = REPLICATES,
                  level: float = LEVEL, seed: int = SEED,
                  thresholds: tuple[int, int] | None = None) -> pd.DataFrame:
    """``bootstrap`` of a run folder: its eval.parquet, predictions.parquet when present, and the shot
    thresholds its config asks for (unless given)."""
    run_dir = Path(run_dir)
    table, predictions, cfg = _read_run(run_dir)
    if thresholds is None:
        thresholds = evaluation.shot_thresholds_of(cfg.get("data"))
    frame = bootstrap(table, predictions, splits=splits, replicates=replicates, level=level, seed=seed,
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
    """``paired_difference`` of two run folders, and the two runs' labels.

    Refused unless both runs' data configs select the same test images (every data field except
    those in ``NOT_TEST_SET_FIELDS``) and their tables and predictions agree image by image. Shot
    thresholds: run A's config (both runs are scored with the same ones).
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
    frame = paired_difference(table_a, table_b, preds_a, preds_b, splits=splits, replicates=replicates,
                              level=level, seed=seed, thresholds=thresholds, names=names)
    return frame, names


# --------------------------------------------------------------------------------------------------
# Across seeds
# --------------------------------------------------------------------------------------------------


def seed_summary(values_by_seed: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Rows per metric: ``mean``, ``stderr`` (ddof 1 / sqrt k; NaN for one seed), ``n`` and ``values``
    (the seed-level values, a tuple in the order of ``values_by_seed``). A seed whose metric is NaN
    (undefined on its split) is left out of that metric's mean and count."""
    metrics: list[str] = []
    for values in values_by_seed.values():
        metrics += [m for m in values if m not in metrics]
    rows = []
    for metric in metrics:
        values = tuple(float(v.get(metric, math.nan)) for v in values_by_seed.values())
        finite = np.array([v for v in values if not math.isnan(v)])
        k = len(finite)
        rows.append({"metric": metric, "mean": float(finite.mean()) if k else math.nan,
                     "stderr": float(finite.std(ddof=1) / math.sqrt(k)) if k > 1 else math.nan,
                     "n": k, "values": values})
    return pd.DataFrame(rows, columns=["metric", "mean", "stderr", "n", "values"])
