"""Coverage of every interval the platform shows, measured by simulation from KNOWN accuracies.

Each simulated test set is drawn from known per-(domain, class) accuracies, scored through the PUBLIC API only:
with --files written as run folders in the store's format (config.yaml, eval.parquet,
predictions.parquet, as training writes them) and scored by tally.evaluation.intervals.run_intervals /
compare_runs; by default the same tables are scored in memory by table_intervals / paired_difference
(what those two call once the files are read), which is many times faster. The
population value an interval must cover is the metric evaluated at the true accuracies with the
cells (and their n) fixed; for macro F1 at the expected counts (errors spread uniformly over the
other classes of the image's domain, as simulated here).

Layouts (images per (domain, class) cell of the test split): balanced 4 x 7 with 40 each,
long-tailed 4 x 7 with 1..40, tiny 4 x 7 with 1..5, and a DomainNet-like 6 x 345 with many 1..3
image cells. Profiles: one clearly worst class, three near-tied worst classes, all cells equal.
Pairs of runs: "equal" (the same accuracies, correlated correctness as real paired models have)
and "differ" (A better by +0.04 on the worst class's cells). Printed: coverage and mean width per
metric x layout x profile for single runs and differences, and the equal-model false-verdict rate
(share of test sets whose difference interval excludes 0).

With --calibration: the calibration metrics' intervals (calibration.py) instead, on logits of a model
of known calibration (calibrated, over-confident, under-confident; simulate_calibration).

Run: .venv/bin/python bench/coverage.py [--sets 1000] [--domainnet-sets N] [--layouts ...] [--files]
     .venv/bin/python bench/coverage.py --calibration --sets 150 --replicates 200
tests/evaluation/test_coverage.py and test_calibration_coverage.py run small fixed-seed versions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tally import evaluation  # noqa: E402
from tally.evaluation import intervals  # noqa: E402

SPLIT = "test_sub"
LAYOUTS = ("balanced", "long_tailed", "tiny", "domainnet")
PROFILES = ("clear", "tied", "equal")
RHO = 0.7  # share of images on which model B's correctness copies A's draw (paired models agree a lot)
METRICS = (*evaluation.METRIC_NAMES, "domain_acc:d0")
WORST = ("pair_acc_worst", "class_acc_worst", "domain_acc_worst")


def layout(name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, n_train): test images and training count per (domain, class) cell."""
    D, C = (6, 345) if name == "domainnet" else (4, 7)
    if name == "balanced":
        n = np.full((D, C), 40)
    elif name == "long_tailed":
        n = np.round(40 ** rng.random((D, C))).astype(int)  # 1..40, log-uniform
    elif name == "tiny":
        n = rng.integers(1, 6, (D, C))
    elif name == "domainnet":
        n = np.where(rng.random((D, C)) < 0.6, rng.integers(1, 4, (D, C)),
                     np.round(4 * 12 ** rng.random((D, C))).astype(int))  # 60% 1..3, the rest 4..48
    else:
        raise ValueError(name)
    n_train = rng.choice([0, 8, 50, 300], size=(D, C))  # every shot bucket present
    return n.astype(np.int64), n_train.astype(np.int64)


def profile(name: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """True accuracy of every cell."""
    D, C = shape
    if name == "equal":
        return np.full(shape, 0.8)
    cls = np.full(C, 0.85)
    if name == "clear":
        cls[0] = 0.45
        jitter = 0.08
    else:  # three near-tied worst classes
        cls[:3] = (0.50, 0.52, 0.54)
        jitter = 0.04
    return np.clip(cls[None, :] + rng.uniform(-jitter, jitter, (D, C)), 0.02, 0.98)


def truth(p: np.ndarray, n: np.ndarray, n_train: np.ndarray, thresholds) -> dict[str, float]:
    """Every metric at the true accuracies, cells fixed (macro F1 at the expected counts)."""
    C = n.shape[1]
    correct = n * p
    wrong = n - correct
    fp = (wrong.sum(axis=1, keepdims=True) - wrong) / (C - 1)  # uniform over the other classes
    values = evaluation.metric_arrays(n, correct, correct + fp, n_train, *thresholds)
    values["domain_acc:d0"] = evaluation.domain_accuracies(n, correct)[0]
    return {k: float(v) for k, v in values.items()}


def examples(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    D, C = n.shape
    cells = np.repeat(np.arange(D * C), n.ravel())
    return cells % C, cells // C  # labels, domains


def draw(p_a, p_b, labels, domains, rng, rho=RHO):
    """Predictions of two models on the same images: B copies A's uniform draw on a share rho."""
    C = int(labels.max()) + 1 if labels.size else 1
    u = rng.random(labels.size)
    v = np.where(rng.random(labels.size) < rho, u, rng.random(labels.size))
    wrong = (labels + rng.integers(1, max(C, 2), labels.size)) % C  # uniform over the other classes
    pred_a = np.where(u < p_a[domains, labels], labels, wrong)
    pred_b = np.where(v < p_b[domains, labels], labels, wrong)
    return pred_a, pred_b


def write_run(run_dir: Path, pred, labels, domains, n_train, method: str) -> None:
    """A finished run folder as training writes it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    D, C = n_train.shape
    names_d, names_c = [f"d{i}" for i in range(D)], [f"c{i}" for i in range(C)]
    table = evaluation.pair_table(SPLIT, pred, labels, domains, names_c, names_d, n_train)
    table.to_parquet(run_dir / "eval.parquet")
    intervals.write_predictions(run_dir, [intervals.prediction_frame(SPLIT, pred, labels, domains,
                                                                     np.ones(labels.size))])
    cfg = {"data": {"source": "synthetic", "dataset": None, "split_seed": 0}, "method": {"name": method},
           "train": {"seed": 0}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


class _Scorer:
    """Scores through the public API: run folders (``run_intervals`` / ``compare_runs``, files=True) or
    the same functions on in-memory tables (``table_intervals`` / ``paired_difference``, what those
    two call after reading the files; the full suite's default, for speed)."""

    def __init__(self, root: Path, files: bool, replicates: int):
        self.root, self.files, self.replicates = root, files, replicates

    def frames(self, pred, labels, domains, n_train):
        D, C = n_train.shape
        table = evaluation.pair_table(SPLIT, pred, labels, domains, [f"c{i}" for i in range(C)],
                                      [f"d{i}" for i in range(D)], n_train)
        return table, intervals.prediction_frame(SPLIT, pred, labels, domains, np.ones(labels.size))

    def run(self, pred, labels, domains, n_train):
        if self.files:
            write_run(self.root / "a", pred, labels, domains, n_train, "a")
            return intervals.run_intervals(self.root / "a", splits=[SPLIT], replicates=self.replicates)
        table, examples = self.frames(pred, labels, domains, n_train)
        return intervals.table_intervals(table, examples, splits=[SPLIT], replicates=self.replicates)

    def pair(self, pred_a, pred_b, labels, domains, n_train):
        if self.files:
            write_run(self.root / "a", pred_a, labels, domains, n_train, "a")
            write_run(self.root / "b", pred_b, labels, domains, n_train, "b")
            return intervals.compare_runs(self.root / "a", self.root / "b", splits=[SPLIT],
                                          replicates=self.replicates)[0]
        (ta, ea), (tb, eb) = self.frames(pred_a, labels, domains, n_train), self.frames(pred_b, labels, domains,
                                                                                         n_train)
        return intervals.paired_difference(ta, tb, ea, eb, splits=[SPLIT], replicates=self.replicates)


def simulate(layouts=LAYOUTS, profiles=PROFILES, sets: int = 200, seed: int = 0, workdir: Path | None = None,
             paired: bool = True, files: bool = False, replicates: int = intervals.REPLICATES,
             sets_by_layout: dict | None = None) -> pd.DataFrame:
    """One row per (kind, layout, profile, metric): coverage, mean width, mean value, sets, and for
    pairs the share of intervals excluding 0 (``excludes0``). kind: run, equal (A - B, equal models),
    differ (A - B, A better by 0.04 on the worst class)."""
    thresholds = evaluation.DEFAULT_SHOT_THRESHOLDS
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    root = Path(tmp.name if tmp else workdir)
    score = _Scorer(root, files, replicates)
    records = []
    try:
        for li, lay in enumerate(layouts):
            for pi, prof in enumerate(profiles):
                rng = np.random.default_rng([seed, li, pi])
                n, n_train = layout(lay, rng)
                p = profile(prof, n.shape, rng)
                labels, domains = examples(n)
                better = p.copy()
                better[:, 0] = np.clip(better[:, 0] + 0.04, 0, 1)  # class 0 is (one of) the worst
                pops = {"run": truth(p, n, n_train, thresholds)}
                pops["equal"] = {m: 0.0 for m in pops["run"]}
                tb = truth(better, n, n_train, thresholds)
                pops["differ"] = {m: tb[m] - pops["run"][m] for m in pops["run"]}
                kinds = ("run", "equal", "differ") if paired else ("run",)
                hits = {(k, m): [] for k in kinds for m in METRICS}
                for _ in range((sets_by_layout or {}).get(lay, sets)):
                    pred_a, pred_b = draw(p, p, labels, domains, rng)
                    got = score.run(pred_a, labels, domains, n_train).set_index("metric")
                    for m in METRICS:
                        hits[("run", m)].append((got.at[m, "low"], got.at[m, "high"]))
                    if not paired:
                        continue
                    diff = score.pair(pred_a, pred_b, labels, domains, n_train).set_index("metric")
                    for m in METRICS:
                        hits[("equal", m)].append((diff.at[m, "low"], diff.at[m, "high"]))
                    pred_c, pred_d = draw(better, p, labels, domains, rng)
                    diff = score.pair(pred_c, pred_d, labels, domains, n_train).set_index("metric")
                    for m in METRICS:
                        hits[("differ", m)].append((diff.at[m, "low"], diff.at[m, "high"]))
                for (kind, m), bounds in hits.items():
                    b = np.asarray(bounds, dtype=float)
                    target = pops[kind][m]
                    if np.isnan(target) or np.isnan(b).all():
                        continue
                    tol = 1e-9  # an endpoint equal to the truth covers it
                    covered = (b[:, 0] <= target + tol) & (target - tol <= b[:, 1])
                    records.append({"kind": kind, "layout": lay, "profile": prof, "metric": m,
                                    "coverage": covered.mean(), "width": np.nanmean(b[:, 1] - b[:, 0]),
                                    "zero_width": float(np.mean(b[:, 1] - b[:, 0] <= 0)),
                                    "excludes0": float(np.mean((b[:, 0] > 0) | (b[:, 1] < 0))),
                                    "truth": target, "sets": len(b)})
    finally:
        if tmp:
            tmp.cleanup()
    return pd.DataFrame(records)


# --------------------------------------------------------------------------------------------------
# Calibration mode: logits from a known model, intervals of calibration.py through the public API
# --------------------------------------------------------------------------------------------------

CAL_PROFILES = ("calibrated", "over", "under")
CAL_SCALE = {"calibrated": 1.0, "over": 2.0, "under": 0.5}  # reported logits = scale * calibrated logits
CAL_METRICS = ("ece", "ece_worst_domain", "ece_worst_class", "brier", "nll", "aurc", "acc_at_cov90",
               "acc_at_cov80", "ts_ece", "ts_brier", "ts_nll")
CAL_POPULATION = 400  # the population: every test cell's images times this


def cal_logits(n: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of a perfectly calibrated model on the images of layout n (labels, domains as examples()):
    each image's confidence c = sigmoid(logit p_cell + N(0, 1)), its prediction right with probability c
    (else a uniform other class), logits log(c (C-1) / (1-c)) on the predicted class and 0 elsewhere,
    so the top softmax probability is c: P(correct | confidence c) = c in every domain, class and cell."""
    labels, domains = examples(n)
    C = n.shape[1]
    c = 1 / (1 + np.exp(-(np.log(p / (1 - p))[domains, labels] + rng.normal(0.0, 1.0, labels.size))))
    c = np.clip(c, 1.0 / C + 1e-3, 1 - 1e-6)
    right = rng.random(labels.size) < c
    pred = np.where(right, labels, (labels + rng.integers(1, C, labels.size)) % C)
    z = np.zeros((labels.size, C))
    z[np.arange(labels.size), pred] = np.log(c * (C - 1) / (1 - c))
    return z, labels, domains


def cal_truth(n, n_train, p, scale, rng) -> dict[str, float]:
    """Every calibration metric of the model on the population (each cell's images CAL_POPULATION
    times, so the layout's mix of cells is kept; 15 equal-mass bins fixed): what each interval claims
    to cover. The calibrated profile's ECEs are 0 by construction (every bin's accuracy equals its
    confidence), the others' are what the large sample measures (Monte Carlo error < 0.003)."""
    from tally.evaluation import calibration

    z, labels, domains = cal_logits(n * CAL_POPULATION, p, rng)
    ex = calibration.SplitExamples(z * scale, labels, domains, n_train,
                                   [f"d{i}" for i in range(n.shape[0])], [f"c{i}" for i in range(n.shape[1])])
    values = {m: float(v[0]) for m, v in ex.metrics(1.0).items()}
    values.update({"ts_" + m: float(v[0]) for m, v in ex.metrics(scale).items()})  # T = scale undoes it
    # T = scale gives back the calibrated model exactly: its ECEs are 0 (the large sample's are noise)
    values.update({k: 0.0 for k in values if k.startswith("ts_ece") or (scale == 1.0 and k.startswith("ece"))})
    return values


def write_cal_run(run_dir: Path, logits, labels, domains, n_train, temperature: float) -> None:
    """A finished run folder with logits.npz and calibration.json, as training writes them."""
    from tally import results
    from tally.evaluation import calibration

    write_run(run_dir, logits.argmax(axis=1), labels, domains, n_train, "a")
    calibration.write_logits(run_dir, {SPLIT: (logits, labels, domains)})
    results.write_json(run_dir / calibration.CALIBRATION_FILE,
                       {"temperature": float(temperature), "fitted_on": "val", "n": 0})


def simulate_calibration(layouts=("balanced", "long_tailed", "tiny"), profiles=CAL_PROFILES, sets: int = 200,
                         seed: int = 0, workdir: Path | None = None, files: bool = False,
                         replicates: int = 200) -> pd.DataFrame:
    """One row per (layout, profile, metric): coverage of the population value, mean width, share of
    test sets whose point estimate lies outside its own interval (``outside``), the truth, sets.

    Each test set: the layout's images, a calibrated model's logits z drawn afresh (cal_logits), reported
    logits scale * z (calibrated: scale 1; over-confident 2; under-confident 0.5); calibration.json holds
    T = scale (what a perfect fit on validation would give), so ``ts_`` rows are near calibrated.
    Scored by calibration.calibration_intervals on the run folder (what run_intervals appends), or
    with ``files`` by run_intervals itself."""
    from tally.evaluation import calibration

    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    root = Path(tmp.name if tmp else workdir)
    records = []
    try:
        for li, lay in enumerate(layouts):
            rng = np.random.default_rng([seed, li, 99])
            n, n_train = layout(lay, rng)
            p = profile("clear", n.shape, rng)
            for prof in profiles:
                scale = CAL_SCALE[prof]
                pop = cal_truth(n, n_train, p, scale, np.random.default_rng([seed, li, 7]))
                bounds = {m: [] for m in CAL_METRICS}
                points = {m: [] for m in CAL_METRICS}
                for _ in range(sets):
                    z, labels, domains = cal_logits(n, p, rng)
                    write_cal_run(root / "a", z * scale, labels, domains, n_train, scale)
                    if files:
                        got = intervals.run_intervals(root / "a", splits=[SPLIT], replicates=replicates)
                    else:
                        got = calibration.calibration_intervals(root / "a", [SPLIT], replicates=replicates)
                    got = got.set_index("metric")
                    for m in CAL_METRICS:
                        bounds[m].append((got.at[m, "low"], got.at[m, "high"]))
                        points[m].append(got.at[m, "value"])
                for m in CAL_METRICS:
                    b, v = np.asarray(bounds[m], dtype=float), np.asarray(points[m], dtype=float)
                    shown = ~np.isnan(b).any(axis=1)
                    tol = 1e-9
                    covered = (b[:, 0] <= pop[m] + tol) & (pop[m] - tol <= b[:, 1])
                    outside = shown & ~((b[:, 0] <= v + tol) & (v - tol <= b[:, 1]))
                    records.append({"kind": "calibration", "layout": lay, "profile": prof, "metric": m,
                                    "coverage": covered[shown].mean() if shown.any() else np.nan,
                                    "width": np.nanmean(b[:, 1] - b[:, 0]) if shown.any() else np.nan,
                                    "outside": outside.mean(), "shown": shown.mean(), "truth": pop[m],
                                    "mean_value": v.mean(), "sets": sets})
    finally:
        if tmp:
            tmp.cleanup()
    return pd.DataFrame(records)


def print_calibration(frame: pd.DataFrame, sets: int) -> None:
    print(f"\ncalibration: coverage (mean width) at nominal 95%, {sets} test sets per cell; "
          "'-' = no interval shown")
    cov = frame.pivot_table(index="metric", columns=["layout", "profile"], values="coverage", sort=False,
                            dropna=False)
    wid = frame.pivot_table(index="metric", columns=["layout", "profile"], values="width", sort=False,
                            dropna=False)
    print(cov.combine(wid, lambda c, w: (c.map("{:.3f}".format) + " (" + w.map("{:.3f}".format) + ")")
                      .where(c.notna(), "-")).to_string())
    print(f"\nlowest coverage {frame['coverage'].min():.3f}; point estimate outside its interval in "
          f"{frame['outside'].max():.3f} of test sets at worst")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, default=1000, help="simulated test sets per layout x profile")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=PROFILES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--domainnet-sets", type=int, help="test sets per profile of the DomainNet-like layout "
                    "(default: --sets)")
    ap.add_argument("--replicates", type=int, default=intervals.REPLICATES, help="macro F1's draws")
    ap.add_argument("--files", action="store_true", help="write every test set as run folders and score "
                    "them with run_intervals / compare_runs (slower; the default scores the same tables in memory)")
    ap.add_argument("--csv", type=Path, help="also write the rows here")
    ap.add_argument("--calibration", action="store_true", help="the calibration metrics instead "
                    "(logits of a known model; layouts balanced, long_tailed, tiny)")
    args = ap.parse_args(argv)
    started = time.time()
    if args.calibration:
        lays = [x for x in args.layouts if x != "domainnet"]
        frame = simulate_calibration(lays, CAL_PROFILES, args.sets, args.seed, files=args.files,
                                     replicates=args.replicates)
        if args.csv:
            frame.to_csv(args.csv, index=False)
        pd.set_option("display.width", 250)
        print_calibration(frame, args.sets)
        print(f"{time.time() - started:.0f}s")
        return 0
    frame = simulate(args.layouts, args.profiles, args.sets, args.seed, files=args.files,
                     replicates=args.replicates, sets_by_layout={"domainnet": args.domainnet_sets or args.sets})
    if args.csv:
        frame.to_csv(args.csv, index=False)
    pd.set_option("display.width", 200)
    for kind, rows in frame.groupby("kind", sort=False):
        print(f"\n{kind}: coverage (mean width) at nominal 95%, {args.sets} test sets per cell")
        cov = rows.pivot_table(index="metric", columns=["layout", "profile"], values="coverage", sort=False)
        wid = rows.pivot_table(index="metric", columns=["layout", "profile"], values="width", sort=False)
        print(cov.combine(wid, lambda c, w: c.map("{:.3f}".format) + " (" + w.map("{:.3f}".format) + ")")
              .to_string())
    equal = frame[frame["kind"] == "equal"]
    if len(equal):
        print("\nequal models: share of test sets whose interval excludes 0 (false verdicts)")
        print(equal.pivot_table(index="metric", columns=["layout", "profile"], values="excludes0", sort=False)
              .map("{:.3f}".format).to_string())
    print(f"\nlowest coverage {frame['coverage'].min():.3f}; highest equal-model false-verdict rate "
          f"{equal['excludes0'].max() if len(equal) else float('nan'):.3f}; "
          f"{(frame['zero_width'] > 0).sum()} cells with zero-width intervals; {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
