"""The evaluator against hand-computed cases, sklearn, and a per-pair loop on random data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score, recall_score

from tally.evaluation import (
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    TABLE_COLUMNS,
    accuracy_grid,
    all_metrics,
    difference_grid,
    metric_arrays,
    metrics_from_counts,
    pair_counts,
    pair_table,
    shot_thresholds,
    shot_thresholds_of,
    split_metrics,
    worst_pairs,
)

# Hand-computed case: 2 domains x 3 classes.
#   domain 0: class 0 -> preds [0, 1] (1/2), class 1 -> [1] (one example, 1/1), class 2 absent (n = 0)
#   domain 1: class 0 -> [2] (0/1), class 1 -> [1, 1] (2/2), class 2 -> [0] (0/1)
DOMAINS = ["d0", "d1"]
CLASSES = ["c0", "c1", "c2"]
DOM = np.array([0, 0, 0, 1, 1, 1, 1])
LAB = np.array([0, 0, 1, 0, 1, 1, 2])
PRED = np.array([0, 1, 1, 2, 1, 1, 0])
# training counts: (0,0) many, (0,1) medium, (0,2) zero (but n = 0), (1,0) few, (1,1) zero, (1,2) few
TRAIN = np.array([[150, 50, 0], [10, 0, 5]])


def hand_table(split: str = "test") -> pd.DataFrame:
    return pair_table(split, PRED, LAB, DOM, CLASSES, DOMAINS, TRAIN)


def test_hand_computed_metrics():
    m = split_metrics(hand_table())
    assert list(m) == list(METRIC_NAMES)
    expected = {
        "acc": 4 / 7,
        "macro_recall": (1 / 3 + 3 / 3 + 0 / 1) / 3,
        # F1 = 2TP / (support + predicted): c0 2*1/(3+2), c1 2*3/(3+4), c2 0/(1+1)
        "macro_f1": (2 / 5 + 6 / 7 + 0) / 3,
        "pair_acc_mean": (0.5 + 1 + 0 + 1 + 0) / 5,  # the absent pair (d0, c2) is not a 0
        "pair_acc_worst": 0.0,
        "class_acc_mean": ((0.5 + 0) / 2 + 1 + 0) / 3,  # c2 is averaged over d1 only
        "class_acc_worst": 0.0,
        "domain_acc_mean": ((0.5 + 1) / 2 + (0 + 1 + 0) / 3) / 2,
        "domain_acc_worst": 1 / 3,
        "shot_many": 0.5,
        "shot_medium": 1.0,
        "shot_few": 0.0,
        "shot_zero": 1.0,  # (d1, c1) only: (d0, c2) has n_train 0 but n 0
    }
    assert m == pytest.approx(expected, abs=1e-12)


def test_macro_f1_ignores_a_class_predicted_but_never_true():
    """WILDS' definition: c2 below is predicted twice but never true; it must not enter the average.

    c0: TP 1, support 2, predicted 1 -> 2/3; c1: TP 2, support 3, predicted 2 -> 4/5. sklearn's
    default (every class in labels or predictions) would add c2's F1 of 0 and report (2/3 + 4/5) / 3.
    """
    lab = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 2, 1, 1, 2])
    t = pair_table("t", pred, lab, np.zeros(5, dtype=np.int64), CLASSES, ["d"], np.ones((1, 3)))
    assert split_metrics(t)["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2, abs=1e-12)
    # the false predictions still count: predicting the absent class less raises the score
    better = pair_table("t", np.array([0, 0, 1, 1, 2]), lab, np.zeros(5, dtype=np.int64), CLASSES, ["d"],
                        np.ones((1, 3)))
    assert split_metrics(better)["macro_f1"] > split_metrics(t)["macro_f1"]
    assert split_metrics(t)["macro_recall"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_shot_thresholds_per_dataset():
    assert shot_thresholds() == (100, 20) == shot_thresholds("PACS")
    assert shot_thresholds("OfficeHome") == (60, 20) == shot_thresholds("office_home")
    assert shot_thresholds("TerraIncognita") == (100, 25) == shot_thresholds("terra_incognita")
    assert shot_thresholds("OfficeHome", few_at_most=5) == (60, 5)
    assert shot_thresholds_of({"dataset": "OfficeHome", "shot_many_above": None}) == (60, 20)
    assert shot_thresholds_of({"dataset": "OfficeHome", "shot_many_above": 80}) == (80, 20)
    assert shot_thresholds_of(None) == (100, 20)
    with pytest.raises(ValueError):
        shot_thresholds(many_above=20, few_at_most=20)
    # the thresholds move pairs between buckets: training counts 70 (many only for OfficeHome), 22, 3
    n = np.ones((1, 3), dtype=np.int64)
    correct = np.array([[1, 0, 1]])
    train = np.array([[70, 22, 3]])
    default = metrics_from_counts(n, correct, n, train, *shot_thresholds("PACS"))
    office = metrics_from_counts(n, correct, n, train, *shot_thresholds("OfficeHome"))
    terra = metrics_from_counts(n, correct, n, train, *shot_thresholds("TerraIncognita"))
    assert math.isnan(default["shot_many"]) and default["shot_medium"] == 0.5 and default["shot_few"] == 1.0
    assert office["shot_many"] == 1.0 and office["shot_medium"] == 0.0
    assert terra["shot_few"] == 0.5 and terra["shot_medium"] == 1.0 and math.isnan(terra["shot_many"])


def test_metric_arrays_batch_over_leading_axes():
    """The bootstrap's path: a stack of count arrays gives each slice's metrics."""
    a = hand_table()
    counts = {k: accuracy_grid(a, "test", k).to_numpy() for k in ("n", "correct", "predicted", "n_train")}
    other = pair_table("test", LAB, LAB, DOM, CLASSES, DOMAINS, TRAIN)  # same n, perfect predictions
    c2 = accuracy_grid(other, "test", "correct").to_numpy()
    p2 = accuracy_grid(other, "test", "predicted").to_numpy()
    stacked = metric_arrays(counts["n"], np.stack([counts["correct"], c2]),
                            np.stack([counts["predicted"], p2]), counts["n_train"])
    for i, table in enumerate((a, other)):
        expected = split_metrics(table)
        for name in METRIC_NAMES:
            assert stacked[name].shape == (2,)
            assert stacked[name][i] == pytest.approx(expected[name], abs=1e-12, nan_ok=True), name


def test_empty_bucket_is_nan_and_thresholds_are_parameters():
    m = split_metrics(hand_table(), many_above=1000, few_at_most=5)
    assert math.isnan(m["shot_many"])
    assert m["shot_medium"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # 150, 50, 10
    assert m["shot_few"] == 0.0  # 5
    # zero-shot bucket whose only pair has n = 0 -> NaN, not 0 or 1
    train = TRAIN.copy()
    train[1, 1] = 7
    m = split_metrics(pair_table("t", PRED, LAB, DOM, CLASSES, DOMAINS, train))
    assert math.isnan(m["shot_zero"])


def test_bucket_boundaries():
    n = np.ones((1, 4), dtype=np.int64)
    correct = np.array([[1, 0, 1, 0]])
    train = np.array([[101, 100, 20, 21]])  # many, medium, few, medium
    m = metrics_from_counts(n, correct, n, train)
    assert (m["shot_many"], m["shot_medium"], m["shot_few"]) == (1.0, 0.0, 1.0)
    assert math.isnan(m["shot_zero"])


def test_single_domain_and_single_example_pair():
    dom = np.zeros(4, dtype=np.int64)
    lab = np.array([0, 1, 1, 1])
    pred = np.array([0, 1, 0, 0])  # class 0: one example, right; class 1: 1/3
    m = split_metrics(pair_table("v", pred, lab, dom, ["a", "b"], ["only"], np.array([[3, 3]])))
    assert m["pair_acc_mean"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["class_acc_mean"] == m["pair_acc_mean"]  # one domain: class acc = pair acc
    assert m["domain_acc_mean"] == m["domain_acc_worst"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["pair_acc_worst"] == m["class_acc_worst"] == pytest.approx(1 / 3)
    assert m["acc"] == 0.5


def test_table_rows_columns_and_counts():
    t = hand_table()
    assert list(t.columns) == list(TABLE_COLUMNS)
    assert len(t) == len(DOMAINS) * len(CLASSES)
    assert t["n"].sum() == t["predicted"].sum() == len(LAB)
    assert t["correct"].sum() == int((PRED == LAB).sum())
    absent = t[(t["domain"] == "d0") & (t["class"] == "c2")].iloc[0]
    assert (absent["n"], absent["correct"], absent["predicted"], absent["n_train"]) == (0, 0, 0, 0)
    row = t[(t["domain"] == "d1") & (t["class"] == "c0")].iloc[0]
    assert (row["domain_idx"], row["class_idx"], row["n"], row["correct"], row["predicted"]) == (
        1,
        0,
        1,
        0,
        1,
    )
    assert (t["split"] == "test").all()


def test_grid_shape_nan_and_counts():
    t = hand_table()
    g = accuracy_grid(t, "test")
    assert g.shape == (2, 3)
    assert list(g.index) == DOMAINS and list(g.columns) == CLASSES
    assert math.isnan(g.loc["d0", "c2"])
    assert g.loc["d0", "c0"] == 0.5 and g.loc["d1", "c1"] == 1.0
    assert accuracy_grid(t, "test", "n").to_numpy().tolist() == [[2, 1, 0], [1, 2, 1]]
    np.testing.assert_array_equal(accuracy_grid(t, "test", "n_train").to_numpy(), TRAIN)
    with pytest.raises(ValueError):
        accuracy_grid(t, "test", "bogus")
    with pytest.raises(KeyError):
        accuracy_grid(t, "val")


def test_all_metrics_worst_pairs_and_difference_grid():
    both = pd.concat([hand_table("val"), hand_table("test_sub")], ignore_index=True)
    out = all_metrics(both)
    assert list(out) == ["val", "test_sub"]
    assert out["val"] == out["test_sub"] == split_metrics(hand_table())
    with pytest.raises(ValueError):
        split_metrics(both)  # one split only

    w = worst_pairs(both, "val", k=3)
    assert len(w) == 3 and (w["n"] > 0).all()
    assert w["acc"].tolist() == [0.0, 0.0, 0.5]
    assert w[["domain", "class"]].values.tolist()[:2] == [["d1", "c0"], ["d1", "c2"]]

    better = pair_table("val", LAB, LAB, DOM, CLASSES, DOMAINS, TRAIN)  # perfect predictions
    diff = difference_grid(better, both, "val")
    assert diff.shape == (2, 3)
    assert math.isnan(diff.loc["d0", "c2"])
    assert diff.loc["d0", "c0"] == 0.5 and diff.loc["d1", "c0"] == 1.0


def test_input_checks():
    with pytest.raises(ValueError):
        pair_counts([0, 3], [0, 1], [0, 0], 1, 3)  # pred out of range
    with pytest.raises(ValueError):
        pair_counts([0, -1], [0, 1], [0, 0], 1, 3)
    with pytest.raises(ValueError):
        pair_counts([0, 1], [0, 1], [0], 1, 3)
    with pytest.raises(ValueError):
        pair_table("x", PRED, LAB, DOM, CLASSES, DOMAINS, TRAIN.T)
    with pytest.raises(TypeError):
        pair_counts([0.0, 1.0], [0, 1], [0, 0], 1, 3)


def test_torch_tensors_give_the_same_table():
    import torch  # a dependency of the platform: a missing torch fails here, it does not skip
    t = pair_table(
        "test",
        torch.tensor(PRED),
        torch.tensor(LAB),
        torch.tensor(DOM),
        CLASSES,
        DOMAINS,
        torch.tensor(TRAIN),
    )
    pd.testing.assert_frame_equal(t, hand_table())


def test_empty_split_gives_nan():
    empty = np.array([], dtype=np.int64)
    m = split_metrics(pair_table("x", empty, empty, empty, CLASSES, DOMAINS, TRAIN))
    assert all(math.isnan(v) for v in m.values())


def test_higher_is_better_covers_every_metric():
    assert set(HIGHER_IS_BETTER) == set(METRIC_NAMES) and all(HIGHER_IS_BETTER.values())


def loop_pair_metrics(pred, lab, dom, train, D, C):
    """Reference: per-pair boolean masks (the formulation the bincount path replaces)."""
    acc = {}
    for d in range(D):
        for c in range(C):
            mask = (dom == d) & (lab == c)
            if mask.any():
                acc[d, c] = float((pred[mask] == c).mean())
    per_class = [
        np.mean([acc[d, c] for d in range(D) if (d, c) in acc])
        for c in range(C)
        if any((d, c) in acc for d in range(D))
    ]
    per_domain = [
        np.mean([acc[d, c] for c in range(C) if (d, c) in acc])
        for d in range(D)
        if any((d, c) in acc for c in range(C))
    ]
    few = [a for (d, c), a in acc.items() if 1 <= train[d, c] <= 20]
    return {
        "pair_acc_mean": np.mean(list(acc.values())),
        "pair_acc_worst": min(acc.values()),
        "class_acc_mean": np.mean(per_class),
        "class_acc_worst": min(per_class),
        "domain_acc_mean": np.mean(per_domain),
        "domain_acc_worst": min(per_domain),
        "shot_few": np.mean(few) if few else float("nan"),
    }


@st.composite
def predictions(draw):
    D = draw(st.integers(1, 3))
    C = draw(st.integers(1, 6))
    N = draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # labels from a random subset of classes, so some classes are absent or only predicted
    present = rng.choice(C, size=rng.integers(1, C + 1), replace=False)
    lab = rng.choice(present, size=N)
    pred = np.where(rng.random(N) < 0.5, lab, rng.integers(0, C, size=N))
    dom = rng.integers(0, D, size=N)
    train = rng.integers(0, 150, size=(D, C))
    return pred, lab, dom, train, D, C


@settings(max_examples=60, deadline=None)
@given(predictions())
def test_matches_sklearn_and_pair_loop(case):
    pred, lab, dom, train, D, C = case
    t = pair_table("t", pred, lab, dom, [str(c) for c in range(C)], [str(d) for d in range(D)], train)
    assert len(t) == D * C
    assert t["n"].sum() == t["predicted"].sum() == len(lab)
    m = split_metrics(t)
    assert m["acc"] == pytest.approx(accuracy_score(lab, pred), abs=1e-12)
    rec = recall_score(lab, pred, labels=np.unique(lab), average="macro", zero_division=0)
    assert m["macro_recall"] == pytest.approx(rec, abs=1e-12)
    # WILDS' macro F1: averaged over the classes present in the true labels
    f1 = f1_score(lab, pred, labels=np.unique(lab), average="macro", zero_division=0)
    assert m["macro_f1"] == pytest.approx(f1, abs=1e-12)
    ref = loop_pair_metrics(pred, lab, dom, train, D, C)
    for name, value in ref.items():
        assert m[name] == pytest.approx(value, abs=1e-12, nan_ok=True), name


def test_parquet_round_trip_keeps_metrics(tmp_path):
    """eval.parquet is the stored form of the table: metrics and grids must survive it."""
    table = pd.concat([hand_table("val"), hand_table("test_sub")], ignore_index=True)
    table.to_parquet(tmp_path / "eval.parquet")
    back = pd.read_parquet(tmp_path / "eval.parquet")
    assert all_metrics(back) == all_metrics(table)
    pd.testing.assert_frame_equal(accuracy_grid(back, "val"), accuracy_grid(table, "val"))


def test_config_shot_threshold_fields_are_checked_before_a_run():
    from tally.config import validate
    from tally.errors import TallyError

    cfg = validate({"data": {"source": "embedded"}})
    assert cfg["data"]["shot_many_above"] is None and cfg["data"]["shot_few_at_most"] is None
    assert shot_thresholds_of(validate({"data": {"dataset": "OfficeHome", "shot_few_at_most": 10}})["data"]) == (60, 10)
    with pytest.raises(TallyError, match="data.shot_few_at_most"):
        validate({"data": {"dataset": "OfficeHome", "shot_few_at_most": 60}})  # not below OfficeHome's 60
    with pytest.raises(TallyError, match="data.shot_many_above"):
        validate({"data": {"shot_many_above": 0}})
