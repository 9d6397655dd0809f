"""Intervals per kind of metric against hand-computed cases, the point estimate inside its interval,
never a zero width, paired differences, refusals (other images, other thresholds), image keys, one
random stream per split, seeds and `tally compare`. Coverage itself: test_coverage.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from tally import cli, evaluation
from tally.errors import TallyError
from tally.evaluation import intervals, pair_table
from tally.evaluation.intervals import (
    paired_difference,
    prediction_frame,
    read_predictions,
    seed_summary,
    table_intervals,
    write_predictions,
)


def one_pair_table(n: int, correct: int, split: str = "test") -> pd.DataFrame:
    preds = np.r_[np.zeros(correct, dtype=np.int64), np.ones(n - correct, dtype=np.int64)]
    return pair_table(split, preds, np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), ["a", "b"],
                      ["d"], np.array([[50, 50]]))


def test_smooth_metric_is_the_normal_interval_with_the_laplace_variance():
    """One pair, 7 of 20 right: 0.35 +- 1.96 sqrt(p~(1 - p~) / 20) with p~ = 8 / 22."""
    rows = table_intervals(one_pair_table(20, 7)).set_index("metric")
    half = stats.norm.isf(0.025) * math.sqrt((8 / 22) * (14 / 22) / 20)
    assert rows.at["acc", "value"] == 0.35
    assert (rows.at["acc", "low"], rows.at["acc", "high"]) == pytest.approx((0.35 - half, 0.35 + half))
    assert rows.at["acc", "method"] == "normal" and rows.at["pair_acc_mean", "method"] == "normal"


def test_worst_pair_is_the_min_of_lows_and_the_min_of_bonferroni_highs():
    """Two pairs (8 of 10, 12 of 20): low = min of the Clopper-Pearson 2.5% lows, high = min of the
    Clopper-Pearson highs at 2.5% / 2 (two candidates)."""
    lab = np.r_[np.zeros(10, np.int64), np.ones(20, np.int64)]
    pred = np.r_[np.zeros(8), np.ones(2), np.ones(12), np.zeros(8)].astype(np.int64)
    table = pair_table("t", pred, lab, np.zeros(30, np.int64), ["a", "b"], ["d"], np.array([[5, 5]]))
    row = table_intervals(table).set_index("metric").loc["pair_acc_worst"]
    lows = [stats.beta.ppf(0.025, 8, 3), stats.beta.ppf(0.025, 12, 9)]
    highs = [stats.beta.isf(0.0125, 9, 2), stats.beta.isf(0.0125, 13, 8)]
    assert row["value"] == 0.6 and row["method"] == "simultaneous"
    assert (row["low"], row["high"]) == pytest.approx((min(lows), min(highs)))
    assert row["small_cells"] == 0


def test_the_point_estimate_lies_inside_and_small_cells_are_counted():
    """The issue's case: 28 pairs of 5 images, 12 of them 3 of 5 right (the rest 5 of 5): worst pair
    0.6 lay outside the old interval [0.0, 0.4]. Now inside. 5-image cells are not flagged; with one
    image fewer per pair the flag counts the candidates' 4-image cells."""
    D, C = 4, 7
    lab = np.tile(np.repeat(np.arange(C), 5), D)
    dom = np.repeat(np.arange(D), C * 5)
    right = np.ones(lab.size, bool)
    cells = np.arange(lab.size) // 5
    right[(cells < 12) & (np.arange(lab.size) % 5 >= 3)] = False
    pred = np.where(right, lab, (lab + 1) % C)
    rows = table_intervals(pair_table("t", pred, lab, dom, list("abcdefg"), list("wxyz"),
                                      np.full((D, C), 50))).set_index("metric")
    for metric in ("pair_acc_worst", "class_acc_worst", "domain_acc_worst"):
        assert rows.at[metric, "low"] <= rows.at[metric, "value"] <= rows.at[metric, "high"], metric
        assert rows.at[metric, "low"] < rows.at[metric, "high"]
    assert rows.at["pair_acc_worst", "value"] == 0.6 and rows.at["pair_acc_worst", "small_cells"] == 0
    keep = np.arange(lab.size) % 5 != 4  # drop one image of each pair: 4-image cells are flagged
    rows = table_intervals(pair_table("t", pred[keep], lab[keep], dom[keep], list("abcdefg"), list("wxyz"),
                                      np.full((D, C), 50))).set_index("metric")
    assert rows.at["pair_acc_worst", "small_cells"] > 0 and rows.at["class_acc_worst", "small_cells"] > 0
    assert rows.at["acc", "small_cells"] == 0  # only worst-case values are flagged


def test_perfect_predictions_and_one_image_cells_never_give_zero_width():
    lab = np.array([0, 1, 1, 0])
    table = pair_table("test", lab, lab, np.array([0, 0, 1, 1]), ["a", "b"], ["x", "y"], np.ones((2, 2)))
    rows = table_intervals(table, prediction_frame("test", lab, lab, np.array([0, 0, 1, 1]), np.ones(4)),
                           replicates=200)
    defined = rows.dropna(subset=["value"])
    assert (defined["value"] == 1.0).all() and (defined["high"] == 1.0).all() and (defined["low"] < 0.95).all()
    # undefined metrics (no many-shot pair) stay NaN, never 0 or 1
    assert rows.set_index("metric").loc["shot_many", ["value", "low", "high"]].isna().all()
    same = paired_difference(table, table, *[prediction_frame("test", lab, lab, np.array([0, 0, 1, 1]),
                                                              np.ones(4))] * 2, replicates=200)
    same = same.dropna(subset=["diff"])
    assert (same["diff"] == 0).all() and (same["low"] < 0).all() and (same["high"] > 0).all()


def test_a_splits_interval_does_not_depend_on_the_other_splits():
    rng = np.random.default_rng(0)
    lab, dom, pred = random_split(rng, N=200)
    table = pd.concat([pair_table(s, pred, lab, dom, list("abcd"), ["x", "y"], np.full((2, 4), 9))
                       for s in ("val", "test")], ignore_index=True)
    alone = table_intervals(table, splits=["test"], replicates=100)
    both = table_intervals(table, splits=["val", "test"], replicates=100)
    pd.testing.assert_frame_equal(alone.reset_index(drop=True), both[both["split"] == "test"].reset_index(drop=True))


def random_split(rng, D=2, C=4, N=300, p=0.6, confusion=None):
    lab = rng.integers(0, C, N)
    dom = rng.integers(0, D, N)
    wrong = (lab + 1) % C if confusion == "next" else rng.integers(0, C, N)
    pred = np.where(rng.random(N) < p, lab, wrong)
    return lab, dom, pred


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
        table_intervals(t, other)
    keys = np.array([f"img{i}" for i in range(100)])
    ka = prediction_frame("test", pred, lab, dom, np.ones(100), keys)
    kb = prediction_frame("test", pred, lab, dom, np.ones(100), np.r_[keys[:7], ["other"], keys[8:]])
    with pytest.raises(TallyError, match="image 7: 'img7' vs 'other'"):  # same labels, other images
        paired_difference(t, t, ka, kb)


def test_prediction_files_round_trip(tmp_path):
    frame = prediction_frame("test_sub", np.array([1, 0]), np.array([1, 1]), np.array([0, 0]), np.array([0.9, 0.6]))
    assert list(frame.columns) == list(intervals.PREDICTION_COLUMNS)
    assert write_predictions(tmp_path, []) is None and read_predictions(tmp_path) is None
    write_predictions(tmp_path, [frame])
    back = read_predictions(tmp_path)
    assert back["prediction"].tolist() == [1, 0] and back["index"].tolist() == [0, 1]
    assert back["confidence"].to_numpy() == pytest.approx([0.9, 0.6])
    assert back.attrs["keyed"] is False  # an older run's file: paired by index
    keyed = prediction_frame("test_sub", np.array([1, 0]), np.array([1, 1]), np.array([0, 0]), np.ones(2),
                             intervals.image_keys(["/data/VLCS/x/a/1.jpg", "/data/VLCS/x/b/2.jpg"], "/data/VLCS"))
    write_predictions(tmp_path, [keyed])
    back = read_predictions(tmp_path)
    assert back.attrs["keyed"] is True and back["key"].tolist() == ["x/a/1.jpg", "x/b/2.jpg"]


def test_image_keys_without_files_hash_the_decoded_image():
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 4, 4), dtype=np.uint8)
    images[2] = images[0]
    keys = intervals.image_keys(None, None, images)
    assert keys[0] == keys[2] != keys[1] and keys[0].startswith("hash:")
    assert intervals.image_keys(["/elsewhere/d/c/f.png"], "/data").tolist() == ["d/c/f.png"]


def test_seed_summary():
    out = seed_summary({"s0": {"acc": 0.5, "f1": 0.2}, "s1": {"acc": 0.7, "f1": float("nan")},
                        "s2": {"acc": 0.6, "f1": 0.4}}).set_index("metric")
    assert out.at["acc", "mean"] == pytest.approx(0.6)
    assert out.at["acc", "stderr"] == pytest.approx(0.1 / math.sqrt(3))
    assert out.at["acc", "values"] == (0.5, 0.7, 0.6) and out.at["acc", "n"] == 3
    assert out.at["f1", "n"] == 2 and out.at["f1", "mean"] == pytest.approx(0.3)
    assert math.isnan(seed_summary({"s0": {"acc": 0.5}}).at[0, "stderr"])
    # with the runs' test-set half-widths the SE also carries the noise every seed shares
    half = {"s0": {"acc": 0.0392}, "s1": {"acc": 0.0392}, "s2": {"acc": 0.0392}}
    both = seed_summary({"s0": {"acc": 0.5}, "s1": {"acc": 0.7}, "s2": {"acc": 0.6}}, half).set_index("metric")
    test_se = 0.0392 / stats.norm.isf(0.025)
    assert both.at["acc", "stderr"] == pytest.approx(math.hypot(0.1 / math.sqrt(3), test_se))
    one = seed_summary({"s0": {"acc": 0.5}}, {"s0": {"acc": 0.0392}})
    assert one.at[0, "stderr"] == pytest.approx(test_se)


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
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert "without image keys" in captured.err  # fake_run's predictions are an older run's: no keys
    assert out[1] == "test_sub:"
    assert out[0] == intervals.LEGEND_DIFF
    assert out[2].startswith("  tally - erm on worst-class accuracy: ") and out[3].startswith("  tally - erm on accuracy: -")

    fake_run(tmp_path / "c", pred, lab, dom, "erm", split_seed=1)
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.split_seed" in err[0]
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--metric", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    cfg = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    cfg["data"]["shot_few_at_most"] = 25  # other shot buckets: not comparable metric by metric
    (tmp_path / "b" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "shot thresholds differ" in capsys.readouterr().err


def test_compare_allows_the_validation_protocol_fields_and_refuses_a_test_set_field(tmp_path):
    """data.carve_validation / oracle_selection (docs/PROTOCOL.md row d) change training and validation
    only (tally.data.uncarved_splits keeps every test split): compared; data.held_out changes the test
    split: refused, naming the field."""
    rng = np.random.default_rng(10)
    lab, dom, pred = random_split(rng, N=120, p=0.7)
    fake_run(tmp_path / "a", pred, lab, dom, "tally")
    fake_run(tmp_path / "b", np.where(rng.random(120) < 0.5, pred, lab), lab, dom, "tally")

    def set_data(run, **fields):
        cfg = yaml.safe_load((tmp_path / run / "config.yaml").read_text())
        cfg["data"].update(fields)
        (tmp_path / run / "config.yaml").write_text(yaml.safe_dump(cfg))

    set_data("a", carve_validation=True, oracle_selection=False, held_out=["x"])
    set_data("b", carve_validation=False, oracle_selection=True, held_out=["x"])
    frame, _ = intervals.compare_runs(tmp_path / "a", tmp_path / "b", replicates=20)
    assert set(frame["split"]) == {"test_sub"} and len(frame)
    set_data("b", held_out=["y"])
    with pytest.raises(TallyError, match=r"test sets differ \(data.held_out: \['x'\] vs \['y'\]\)"):
        intervals.compare_runs(tmp_path / "a", tmp_path / "b", replicates=20)


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
    # the predictions reproduce the stored table exactly (else the intervals refuse them), with image keys
    out = intervals.run_intervals(tmp_path / "run", replicates=20)
    assert set(out["split"]) == set(table["split"])
    assert preds.attrs["keyed"] and preds["key"].is_unique


def test_macro_f1_of_the_draws_is_the_evaluators_definition():
    """_f1_draws writes macro F1 out for speed: with the profile draw pinned to its centre it must equal
    metrics.metric_arrays' macro F1 on the same counts (absent classes, false positives included)."""

    class Pinned:  # a gamma "draw" that returns a huge multiple of its shape: the Dirichlet's mean
        def gamma(self, shape):
            return np.asarray(shape) * 1e9

    rng = np.random.default_rng(0)
    D, C = 3, 5
    n = rng.integers(0, 6, (D, C))
    n[:, 4] = 0  # a class absent from the split: not averaged in
    k = rng.binomial(n, 0.7)
    predicted = k + rng.integers(0, 3, (D, C))
    p = np.broadcast_to(np.divide(k, n, out=np.zeros((D, C)), where=n > 0), (4, D, C))
    got = intervals._f1_draws(n, p, predicted, k, n * 0, (100, 20), Pinned())
    fp = predicted - k + 1.0 / C
    correct = n * p
    spread = (n - correct).sum(-1, keepdims=True) * fp / fp.sum(-1, keepdims=True)
    want = evaluation.metric_arrays(n, correct, correct + spread, n * 0)["macro_f1"]
    np.testing.assert_allclose(got, want)
