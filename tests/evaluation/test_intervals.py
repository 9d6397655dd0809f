"""The bootstrap against exact binomial cases and hand-computed ones, the exact F1 resampling against
a plain per-image resampler, the paired comparison's coverage, refusals, seeds and `tally compare`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from tally import cli, evaluation
from tally.errors import TallyError
from tally.evaluation import intervals, metric_arrays, pair_table
from tally.evaluation.intervals import (
    bootstrap,
    paired_difference,
    prediction_frame,
    read_predictions,
    replicate_counts,
    seed_summary,
    write_predictions,
)


def binomial_pmf(n: int, p: float) -> np.ndarray:
    return np.array([math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)])


def one_pair_table(n: int, correct: int, split: str = "test") -> pd.DataFrame:
    preds = np.r_[np.zeros(correct, dtype=np.int64), np.ones(n - correct, dtype=np.int64)]
    return pair_table(split, preds, np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), ["a", "b"],
                      ["d"], np.array([[50, 50]]))


def test_one_pair_accuracy_is_binomial():
    """One pair, n = 20, 7 right: a replicate's accuracy is Binomial(20, 0.35) / 20 exactly."""
    n, k, R = 20, 7, 40_000
    counts = evaluation.count_arrays(one_pair_table(n, k))
    [(correct_r, _)] = replicate_counts(counts["n"], counts["correct"], counts["predicted"], R,
                                        np.random.default_rng(0))
    acc = correct_r[:, 0, 0] / n
    p = k / n
    assert abs(acc.mean() - p) < 4 * math.sqrt(p * (1 - p) / n / R)
    assert acc.var() == pytest.approx(p * (1 - p) / n, rel=0.05)
    freq = np.bincount(correct_r[:, 0, 0], minlength=n + 1) / R
    pmf = binomial_pmf(n, p)
    assert np.all(np.abs(freq - pmf) < 5 * np.sqrt(pmf * (1 - pmf) / R) + 1e-12)

    # the reported interval is the distribution's 2.5 / 97.5 percentiles: within one step of the exact ones
    rows = bootstrap(one_pair_table(n, k), replicates=R).set_index("metric")
    cdf = np.cumsum(pmf)
    exact_low, exact_high = np.searchsorted(cdf, 0.025) / n, np.searchsorted(cdf, 0.975) / n
    assert rows.at["acc", "value"] == p
    assert abs(rows.at["acc", "low"] - exact_low) <= 1 / n and abs(rows.at["acc", "high"] - exact_high) <= 1 / n
    assert rows.at["acc", "low"] < p < rows.at["acc", "high"]


def test_worst_pair_is_the_minimum_of_independent_binomials():
    """Two pairs (8 of 10 right, 12 of 20 right): P(worst >= x) = P(A >= x) P(B >= x) exactly."""
    lab = np.r_[np.zeros(10, np.int64), np.ones(20, np.int64)]
    pred = np.r_[np.zeros(8), np.ones(2), np.ones(12), np.zeros(8)].astype(np.int64)
    table = pair_table("t", pred, lab, np.zeros(30, np.int64), ["a", "b"], ["d"], np.array([[5, 5]]))
    c = evaluation.count_arrays(table)
    R = 40_000
    [(correct_r, predicted_r)] = replicate_counts(c["n"], c["correct"], c["predicted"], R, np.random.default_rng(1))
    worst = metric_arrays(c["n"], correct_r, predicted_r, c["n_train"])["pair_acc_worst"]
    grid = np.linspace(0, 1, 41)
    surv_a = np.array([binomial_pmf(10, 0.8)[np.arange(11) / 10 >= x - 1e-12].sum() for x in grid])
    surv_b = np.array([binomial_pmf(20, 0.6)[np.arange(21) / 20 >= x - 1e-12].sum() for x in grid])
    exact = surv_a * surv_b
    got = np.array([(worst >= x - 1e-12).mean() for x in grid])
    assert np.max(np.abs(got - exact)) < 0.01


def test_hand_computed_case():
    """Pair (d, a): 2 images, one right; pair (d, b): 1 image, right. A replicate redraws (d, a) as
    0, 1 or 2 right with probabilities 1/4, 1/2, 1/4, so worst pair is 0, 0.5 or 1 and the 95%
    interval is [0, 1]; micro accuracy is (k + 1) / 3. Macro F1 (exact, per example): the wrong image
    of (d, a) is predicted b; with k right: F1_a = 2k / (2 + k), F1_b = 2 / (2 + 1 + (2 - k)), i.e.
    macro F1 = 0.25, 2/3, 1 for k = 0, 1, 2."""
    lab, pred, dom = np.array([0, 0, 1]), np.array([0, 1, 1]), np.zeros(3, np.int64)
    table = pair_table("test", pred, lab, dom, ["a", "b"], ["d"], np.array([[10, 10]]))
    examples = prediction_frame("test", pred, lab, dom, np.ones(3))
    R = 20_000
    rows = bootstrap(table, examples, replicates=R).set_index("metric")
    assert rows.at["pair_acc_worst", "value"] == 0.5
    assert (rows.at["pair_acc_worst", "low"], rows.at["pair_acc_worst", "high"]) == (0.0, 1.0)
    assert (rows.at["acc", "low"], rows.at["acc", "high"]) == pytest.approx((1 / 3, 1.0))
    assert rows.at["macro_f1", "value"] == pytest.approx(2 / 3)
    assert (rows.at["macro_f1", "low"], rows.at["macro_f1", "high"]) == pytest.approx((0.25, 1.0))
    assert set(rows["f1"]) == {"exact"}

    c = evaluation.count_arrays(table)
    [(correct_r, predicted_r)] = replicate_counts(c["n"], c["correct"], c["predicted"], R, np.random.default_rng(2),
                                                  [(lab, dom, pred)])
    f1 = metric_arrays(c["n"], correct_r, predicted_r, c["n_train"])["macro_f1"]
    for value, prob in ((0.25, 0.25), (2 / 3, 0.5), (1.0, 0.25)):
        assert np.isclose(f1, value).mean() == pytest.approx(prob, abs=0.015)
    # every count stays consistent: a domain's predictions sum to its images in every replicate
    assert (predicted_r.sum(axis=-1) == 3).all() and (correct_r <= predicted_r).all()


def test_perfect_predictions_give_degenerate_intervals():
    lab = np.array([0, 1, 1, 0])
    table = pair_table("test", lab, lab, np.array([0, 0, 1, 1]), ["a", "b"], ["x", "y"], np.ones((2, 2)))
    rows = bootstrap(table, replicates=50)
    defined = rows.dropna(subset=["value"])
    assert (defined["low"] == 1.0).all() and (defined["high"] == 1.0).all() and (defined["value"] == 1.0).all()
    # undefined metrics (no many-shot pair) stay NaN, never 0 or 1
    assert rows.set_index("metric").loc["shot_many", ["value", "low", "high"]].isna().all()


def random_split(rng, D=2, C=4, N=300, p=0.6, confusion=None):
    lab = rng.integers(0, C, N)
    dom = rng.integers(0, D, N)
    wrong = (lab + 1) % C if confusion == "next" else rng.integers(0, C, N)
    pred = np.where(rng.random(N) < p, lab, wrong)
    return lab, dom, pred


def test_exact_f1_matches_resampling_images_one_by_one():
    """The fast exact path against the definition: redraw each pair's images with replacement."""
    rng = np.random.default_rng(3)
    D, C = 2, 4
    lab, dom, pred = random_split(rng, D, C, N=120, p=0.5)
    table = pair_table("t", pred, lab, dom, list("abcd"), ["x", "y"], np.full((D, C), 30))
    c = evaluation.count_arrays(table)
    R = 4000
    [(cr, pr)] = replicate_counts(c["n"], c["correct"], c["predicted"], R, np.random.default_rng(4),
                                  [(lab, dom, pred)])
    fast = metric_arrays(c["n"], cr, pr, c["n_train"])["macro_f1"]

    naive = np.empty(R)
    plain = np.random.default_rng(5)
    members = [np.flatnonzero(dom * C + lab == g) for g in range(D * C)]
    for r in range(R):  # a plain loop, the reference only
        idx = np.concatenate([m[plain.integers(0, len(m), len(m))] for m in members if len(m)])
        n, correct, predicted = evaluation.pair_counts(pred[idx], lab[idx], dom[idx], D, C)
        naive[r] = evaluation.metrics_from_counts(n, correct, predicted, c["n_train"])["macro_f1"]
    se = naive.std() / math.sqrt(R)
    assert abs(fast.mean() - naive.mean()) < 5 * math.sqrt(2) * se
    assert fast.std() == pytest.approx(naive.std(), rel=0.08)
    assert np.quantile(fast, [0.025, 0.975]) == pytest.approx(np.quantile(naive, [0.025, 0.975]), abs=0.01)


def test_paired_interval_covers_the_truth_at_its_rate():
    """200 simulated test sets from a known population: runs A and B share most of their successes
    (paired); the 95% interval of A - B on mean pair accuracy must cover the true difference about
    95% of the time, and be narrower than an unpaired interval."""
    rng = np.random.default_rng(6)
    D, C, n = 2, 3, 40
    p_a = rng.uniform(0.4, 0.9, (D, C))
    p_b = np.clip(p_a - rng.uniform(-0.05, 0.15, (D, C)), 0.05, 0.95)
    truth = (p_a - p_b).mean()
    lab = np.tile(np.repeat(np.arange(C), n), D)
    dom = np.repeat(np.arange(D), C * n)
    names, train = list("abc"), np.full((D, C), 50)
    covered, paired_width, unpaired_width = 0, [], []
    for _ in range(200):
        u = rng.random(lab.size)
        v = np.where(rng.random(lab.size) < 0.7, u, rng.random(lab.size))  # strongly correlated
        wrong = (lab + rng.integers(1, C, lab.size)) % C
        pred_a = np.where(u < p_a[dom, lab], lab, wrong)
        pred_b = np.where(v < p_b[dom, lab], lab, wrong)
        ta = pair_table("test", pred_a, lab, dom, names, ["x", "y"], train)
        tb = pair_table("test", pred_b, lab, dom, names, ["x", "y"], train)
        ea = prediction_frame("test", pred_a, lab, dom, np.ones(lab.size))
        eb = prediction_frame("test", pred_b, lab, dom, np.ones(lab.size))
        row = paired_difference(ta, tb, ea, eb, replicates=300).set_index("metric").loc["pair_acc_mean"]
        covered += row["low"] <= truth <= row["high"]
        paired_width.append(row["high"] - row["low"])
        if len(unpaired_width) < 40:
            wa = bootstrap(ta, replicates=300).set_index("metric").loc["pair_acc_mean"]
            wb = bootstrap(tb, replicates=300).set_index("metric").loc["pair_acc_mean"]
            unpaired_width.append(math.hypot(wa["high"] - wa["low"], wb["high"] - wb["low"]))
    print(f"coverage {covered / 200:.3f}")
    assert 0.90 <= covered / 200 <= 0.99, covered
    assert np.mean(paired_width) < 0.8 * np.mean(unpaired_width)


def test_paired_difference_point_and_sign():
    rng = np.random.default_rng(7)
    lab, dom, pred = random_split(rng, p=0.8)
    worse = np.where(rng.random(lab.size) < 0.3, (lab + 1) % 4, pred)
    tables = [pair_table("test", p, lab, dom, list("abcd"), ["x", "y"], np.full((2, 4), 9)) for p in (pred, worse)]
    frames = [prediction_frame("test", p, lab, dom, np.ones(lab.size)) for p in (pred, worse)]
    out = paired_difference(*tables, *frames, replicates=300).set_index("metric")
    for metric in evaluation.METRIC_NAMES[:4]:
        a = evaluation.split_metrics(tables[0])[metric]
        b = evaluation.split_metrics(tables[1])[metric]
        assert out.at[metric, "diff"] == pytest.approx(a - b)
    assert out.at["acc", "low"] > 0  # 30% of the images made wrong: clearly worse
    line = intervals.format_difference(out.reset_index().iloc[0], "TALLY", "ERM")
    assert line.startswith("TALLY - ERM on accuracy: +0.") and line.count("[") == 1


def test_refuses_runs_on_different_test_sets():
    rng = np.random.default_rng(8)
    lab, dom, pred = random_split(rng, N=100)
    t = pair_table("test", pred, lab, dom, list("abcd"), ["x", "y"], np.ones((2, 4)))
    e = prediction_frame("test", pred, lab, dom, np.ones(100))
    order = rng.permutation(100)  # the same images in another order: same pair sizes, not pairable
    t2 = pair_table("test", pred[order], lab[order], dom[order], list("abcd"), ["x", "y"], np.ones((2, 4)))
    e2 = prediction_frame("test", pred[order], lab[order], dom[order], np.ones(100))
    with pytest.raises(TallyError, match="labels or domains"):
        paired_difference(t, t2, e, e2)
    t3 = pair_table("test", pred[:90], lab[:90], dom[:90], list("abcd"), ["x", "y"], np.ones((2, 4)))
    e3 = prediction_frame("test", pred[:90], lab[:90], dom[:90], np.ones(90))
    with pytest.raises(TallyError, match="images per"):
        paired_difference(t, t3, e, e3)
    with pytest.raises(TallyError, match="predictions"):
        paired_difference(t, t, e, None)
    val_only = prediction_frame("val", pred, lab, dom, np.ones(100))
    with pytest.raises(TallyError, match="no per-example predictions for split 'test'"):
        paired_difference(t, t, e, val_only, splits=["test"])
    other = prediction_frame("test", (pred + 1) % 4, lab, dom, np.ones(100))
    with pytest.raises(TallyError, match="disagrees"):  # predictions that do not match the table
        bootstrap(t, other)


def test_prediction_files_round_trip(tmp_path):
    frame = prediction_frame("test_sub", np.array([1, 0]), np.array([1, 1]), np.array([0, 0]), np.array([0.9, 0.6]))
    assert list(frame.columns) == list(intervals.PREDICTION_COLUMNS)
    assert write_predictions(tmp_path, []) is None and read_predictions(tmp_path) is None
    write_predictions(tmp_path, [frame])
    back = read_predictions(tmp_path)
    assert back["prediction"].tolist() == [1, 0] and back["index"].tolist() == [0, 1]
    assert back["confidence"].to_numpy() == pytest.approx([0.9, 0.6])


def test_seed_summary():
    out = seed_summary({"s0": {"acc": 0.5, "f1": 0.2}, "s1": {"acc": 0.7, "f1": float("nan")},
                        "s2": {"acc": 0.6, "f1": 0.4}}).set_index("metric")
    assert out.at["acc", "mean"] == pytest.approx(0.6)
    assert out.at["acc", "stderr"] == pytest.approx(0.1 / math.sqrt(3))
    assert out.at["acc", "values"] == (0.5, 0.7, 0.6) and out.at["acc", "n"] == 3
    assert out.at["f1", "n"] == 2 and out.at["f1", "mean"] == pytest.approx(0.3)
    assert math.isnan(seed_summary({"s0": {"acc": 0.5}}).at[0, "stderr"])


def fake_run(path, pred, lab, dom, method="tally", split_seed=0):
    """A finished run folder as training writes it: config, eval.parquet, predictions.parquet."""
    path.mkdir(parents=True)
    table = pd.concat([pair_table(s, pred, lab, dom, list("abcd"), ["x", "y"], np.full((2, 4), 30))
                       for s in ("val", "test_sub")], ignore_index=True)
    table.to_parquet(path / "eval.parquet")
    write_predictions(path, [prediction_frame("test_sub", pred, lab, dom, np.ones(lab.size))])
    cfg = {"data": {"source": "embedded", "dataset": None, "split_seed": split_seed, "image_size": 32},
           "method": {"name": method}, "train": {"seed": 0}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_tally_compare_prints_one_line_per_metric_and_refuses_other_test_sets(tmp_path, capsys):
    rng = np.random.default_rng(9)
    lab, dom, pred = random_split(rng, N=200, p=0.7)
    fake_run(tmp_path / "a", pred, lab, dom, "tally")
    fake_run(tmp_path / "b", np.where(rng.random(200) < 0.5, pred, lab), lab, dom, "erm")
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--metric", "class_acc_worst",
                     "--metric", "acc", "--replicates", "200"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "test_sub:"
    assert out[2].startswith("  tally - erm on worst-class accuracy: ") and out[3].startswith("  tally - erm on accuracy: -")

    fake_run(tmp_path / "c", pred, lab, dom, "erm", split_seed=1)
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.split_seed" in err[0]
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--metric", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


@pytest.mark.slow
def test_training_keeps_the_test_predictions_of_the_kept_checkpoint(tmp_path, one_thread):
    from tally.training import train_run

    cfg = {"data": {"source": "embedded", "setting": "domain", "held_out": ["noisy"]},
           "model": {"arch": "resnet10", "cut": "layer2"}, "method": {"name": "erm"},
           "train": {"epochs": 1, "warmup_epochs": 0, "steps_per_epoch": 2, "batch_size": 16, "device": "cpu"}}
    train_run(cfg, tmp_path / "run")
    preds = read_predictions(tmp_path / "run")
    table = pd.read_parquet(tmp_path / "run" / "eval.parquet")
    assert set(preds["split"]) == set(table["split"]) - {"val"}
    for split, rows in preds.groupby("split"):
        n = evaluation.count_arrays(table, split)["n"]
        assert len(rows) == n.sum() and rows["index"].tolist() == list(range(len(rows)))
    assert ((preds["confidence"] > 0) & (preds["confidence"] <= 1)).all()
    # the predictions reproduce the stored table exactly (else the bootstrap refuses them)
    out = intervals.run_intervals(tmp_path / "run", replicates=20)
    assert set(out["split"]) == set(table["split"])
    assert set(out[out["split"] != "val"]["f1"]) == {"exact"} and set(out[out["split"] == "val"]["f1"]) == {"pooled"}
