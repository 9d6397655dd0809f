"""Calibration metrics against hand-computed values and a plain transcription of their definitions."""

import math

import numpy as np
import pandas as pd
import pytest

from tally import results
from tally.evaluation import calibration as cal
from tally.evaluation import metrics as evaluation


def _logits_with_confidence(conf: np.ndarray, pred: np.ndarray, C: int) -> np.ndarray:
    """Logits whose softmax puts ``conf`` on ``pred`` and spreads the rest evenly (conf > 1 / C)."""
    rest = (1 - conf) / (C - 1)
    logits = np.repeat(np.log(rest)[:, None], C, axis=1)
    logits[np.arange(len(conf)), pred] = np.log(conf)
    return logits


def test_ece_brier_nll_by_hand():
    # 4 examples, 2 classes, 2 equal-mass bins: {0.6 wrong, 0.7 right}, {0.8 right, 0.9 wrong}
    conf = np.array([0.9, 0.6, 0.8, 0.7])
    labels = np.array([1, 1, 0, 0])
    pred = np.array([0, 0, 0, 0])
    stats = cal.example_stats(_logits_with_confidence(conf, pred, 2), labels)
    np.testing.assert_allclose(stats["confidence"], conf)
    ece = cal.grouped_ece(stats["confidence"], stats["correct"], np.zeros(4, np.int64), 1, bins=2)[0]
    # bin 1: acc 0.5, conf 0.65 -> 0.15; bin 2: acc 0.5, conf 0.85 -> 0.35; mean of the two: 0.25
    assert ece == pytest.approx(0.25)
    # Brier: wrong at 0.9 -> 2 * 0.9^2 = 1.62; wrong 0.6 -> 0.72; right 0.8 -> 2 * 0.2^2 = 0.08; right 0.7 -> 0.18
    assert stats["brier"].mean() == pytest.approx((1.62 + 0.72 + 0.08 + 0.18) / 4)
    assert stats["nll"].mean() == pytest.approx(-(math.log(0.1) + math.log(0.4) + math.log(0.8) + math.log(0.7)) / 4)
    # selective: most confident first: wrong, right, right, wrong -> risks 1, 1/2, 1/3, 2/4
    aurc, accs = cal.grouped_selective(stats["confidence"], stats["correct"], np.zeros(4, np.int64), 1, (0.9, 0.5))
    assert aurc[0] == pytest.approx((1 + 1 / 2 + 1 / 3 + 2 / 4) / 4)
    assert accs[0, 0] == pytest.approx(1 - 2 / 4)  # ceil(3.6) = 4 kept
    assert accs[0, 1] == pytest.approx(1 / 2)


def _plain_ece(conf, correct, bins):
    """The definition, transcribed: sort, split into equal-mass bins, weighted |acc - conf|."""
    order = np.argsort(conf, kind="stable")
    total = 0.0
    n = len(conf)
    for b in range(bins):
        members = [order[i] for i in range(n) if i * bins // n == b]
        if members:
            total += len(members) / n * abs(np.mean(correct[members]) - np.mean(conf[members]))
    return total


def _plain_brier(probs, labels):
    out = []
    for p, y in zip(probs, labels, strict=True):
        onehot = np.zeros(len(p))
        onehot[y] = 1
        out.append(((p - onehot) ** 2).sum())
    return np.mean(out)


@pytest.mark.parametrize("bins", [1, 5, 15, 40])
def test_grouped_ece_matches_the_plain_definition(bins):
    rng = np.random.default_rng(3)
    N, C, G = 300, 5, 4
    logits = rng.normal(size=(N, C)) * 2
    labels = rng.integers(0, C, N)
    groups = rng.integers(0, G, N)
    stats = cal.example_stats(logits, labels)
    got = cal.grouped_ece(stats["confidence"], stats["correct"], groups, G + 1, bins)
    for g in range(G):
        m = groups == g
        assert got[g] == pytest.approx(_plain_ece(stats["confidence"][m], stats["correct"][m], bins))
    assert np.isnan(got[G])  # an empty group
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert stats["brier"].mean() == pytest.approx(_plain_brier(probs, labels))
    assert stats["nll"].mean() == pytest.approx(-np.log(probs[np.arange(N), labels]).mean())


def test_selective_matches_the_plain_definition():
    rng = np.random.default_rng(4)
    conf, correct = rng.random(50), (rng.random(50) < 0.7).astype(float)
    groups = np.repeat([0, 1], 25)
    aurc, accs = cal.grouped_selective(conf, correct, groups, 2, (0.8,))
    for g in range(2):
        c, k = conf[groups == g], correct[groups == g]
        order = np.argsort(-c, kind="stable")
        risks = [1 - k[order[:i]].mean() for i in range(1, 26)]
        assert aurc[g] == pytest.approx(np.mean(risks))
        assert accs[g, 0] == pytest.approx(k[order[:20]].mean())
    curve = cal.risk_coverage(conf[:25], correct[:25])
    assert curve["risk"].mean() == pytest.approx(aurc[0])


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(5)
    N, C = 20000, 6
    base = rng.normal(size=(N, C)) * 3
    # labels drawn from softmax(base): base is calibrated, so logits = base * T need T to undo
    p = np.exp(base - base.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (p.cumsum(1) > rng.random((N, 1))).argmax(1)
    fitted = cal.fit_temperature(base * true_t, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)
    before = cal.example_stats(base * true_t, labels)
    after = cal.example_stats(base * true_t, labels, fitted)
    ece = [cal.grouped_ece(s["confidence"], s["correct"], np.zeros(N, np.int64), 1)[0] for s in (before, after)]
    assert ece[1] < ece[0] and ece[1] < 0.02


def _write_run(run_dir, rng, shift=1.0, final=False):
    """A run folder with eval.parquet, config.yaml and logits.npz for val and test_sub (2 x 3 pairs)."""
    D, C, per = 2, 3, 40
    names_d, names_c = ["photo", "sketch"], ["a", "b", "c"]
    arrays, tables = {}, []
    for split in ("val", "test_sub"):
        domains = np.repeat(np.arange(D), C * per)
        labels = np.tile(np.repeat(np.arange(C), per), D)
        logits = rng.normal(size=(len(labels), C)) + 2.5 * np.eye(C)[labels]
        logits *= shift  # overconfident for shift > 1
        arrays[split] = (logits, labels, domains)
        tables.append(evaluation.pair_table(split, logits.argmax(1), labels, domains, names_c, names_d,
                                            np.array([[150, 50, 5], [30, 0, 2]])))
    run_dir.mkdir(parents=True)
    results.write_parquet(run_dir / "eval.parquet", pd.concat(tables, ignore_index=True))
    results.write_yaml(run_dir / "config.yaml", {"data": {}, "train": {"final": final}, "method": {"name": "m"}})
    cal.write_logits(run_dir, arrays)
    return arrays


def test_calibration_intervals_of_a_run(tmp_path):
    rng = np.random.default_rng(6)
    arrays = _write_run(tmp_path / "run", rng, shift=3.0)
    frame = cal.calibration_intervals(tmp_path / "run", replicates=100)
    assert list(frame.columns) == ["split", "metric", "value", "low", "high", "method", "small_cells"]
    test = frame[frame["split"] == "test_sub"].set_index("metric")
    # temperature fitted on val, not test: equal to a fit on val's logits, not on test's
    t_val = cal.fit_temperature(arrays["val"][0], arrays["val"][1])
    t_test = cal.fit_temperature(arrays["test_sub"][0], arrays["test_sub"][1])
    assert abs(t_val - t_test) > 1e-3
    assert test.loc["temperature", "value"] == pytest.approx(t_val)
    assert test.loc["temperature", "value"] > 1  # overconfident logits: T > 1
    # point values equal a direct computation; intervals bracket them
    stats = cal.example_stats(arrays["test_sub"][0], arrays["test_sub"][1])
    assert test.loc["ece", "value"] == pytest.approx(
        _plain_ece(stats["confidence"], stats["correct"], cal.BINS))
    assert test.loc["ts_ece", "value"] < test.loc["ece", "value"]
    for m in ("ece", "brier", "nll", "aurc", "ece_worst_domain", "ts_ece", "acc_at_cov90"):
        assert test.loc[m, "low"] <= test.loc[m, "value"] <= test.loc[m, "high"]
    worst = max(test.loc[f"ece_domain:{d}", "value"] for d in ("photo", "sketch"))
    assert test.loc["ece_worst_domain", "value"] == pytest.approx(worst)
    # shot buckets from n_train [[150, 50, 5], [30, 0, 2]]: many one pair, zero one pair
    many = (arrays["test_sub"][2] == 0) & (arrays["test_sub"][1] == 0)
    assert test.loc["ece_shot_many", "value"] == pytest.approx(
        _plain_ece(stats["confidence"][many], stats["correct"][many], cal.BINS))
    # no ts_ rows on val (T fitted there: in-sample)
    assert not frame[(frame["split"] == "val") & frame["metric"].str.startswith("ts_")].shape[0]


def test_final_retrain_has_no_temperature(tmp_path):
    _write_run(tmp_path / "run", np.random.default_rng(7), final=True)
    frame = cal.calibration_intervals(tmp_path / "run", replicates=5)
    assert not frame["metric"].str.startswith("ts_").any()
    assert (frame[frame["metric"] == "temperature"]["value"] == 1.0).all()


def test_old_run_without_logits(tmp_path):
    (tmp_path / "run").mkdir()
    assert cal.calibration_intervals(tmp_path / "run").empty
    assert cal.run_calibration(tmp_path / "run") is None


def test_logits_that_disagree_with_the_table(tmp_path):
    rng = np.random.default_rng(8)
    arrays = _write_run(tmp_path / "run", rng)
    logits, labels, domains = arrays["test_sub"]
    cal.write_logits(tmp_path / "run", {"val": arrays["val"], "test_sub": (logits, labels, np.ones_like(domains))})
    with pytest.raises(Exception, match="disagrees with eval.parquet"):
        cal.calibration_intervals(tmp_path / "run", replicates=2)


def test_calibration_table(tmp_path):
    rng = np.random.default_rng(9)
    _write_run(tmp_path / "erm", rng, shift=3.0)
    _write_run(tmp_path / "tally", rng, shift=0.5)
    (tmp_path / "old").mkdir()
    text = cal.calibration_table({"ERM": tmp_path / "erm", "TALLY": tmp_path / "tally", "OLD": tmp_path / "old"},
                                 replicates=50)
    lines = text.splitlines()
    assert "test_sub" in lines[0] and "ece" in lines[1]
    erm, tally = lines[2], lines[3]
    assert erm.startswith("ERM") and tally.startswith("TALLY") and "->" in erm and "[" in erm
    t_erm, t_tally = float(erm.split()[1]), float(tally.split()[1])
    assert t_erm > 1 > t_tally  # overconfident ERM cooled (T > 1), underconfident TALLY sharpened
    assert "OLD" in lines[-1]


def test_benchmark_calibration_table(tmp_path):
    rng = np.random.default_rng(10)
    bench = tmp_path / "bench"
    plan = []
    for method, shift in (("tally", 0.5), ("erm", 3.0)):
        for seed in (0, 1):
            run = f"{method}-sub-s{seed}"
            _write_run(bench / "runs" / run, rng, shift=shift)
            plan.append({"run": run, "method": method, "setting": "sub", "split": "test_sub", "seed": seed})
    results.write_parquet(bench / "plan.parquet", pd.DataFrame(plan))
    text = cal.benchmark_calibration_table(bench, replicates=20)
    lines = text.splitlines()
    assert "test_sub" in lines[0]
    assert lines[2].startswith("tally") and lines[3].startswith("erm") and lines[-1] == "(seed 0)"
    direct = cal.calibration_table({"tally": bench / "runs" / "tally-sub-s0", "erm": bench / "runs" / "erm-sub-s0"},
                                   split="test_sub", replicates=20)
    assert text.startswith(direct)


def test_paired_calibration_differences(tmp_path):
    rng = np.random.default_rng(11)
    _write_run(tmp_path / "a", rng, shift=3.0)
    arrays = _write_run(tmp_path / "b", rng, shift=0.5)
    same = cal.calibration_differences(tmp_path / "a", tmp_path / "a", replicates=50)
    # the same images for both runs in every replicate: a run minus itself is exactly 0
    assert (same["diff"] == 0).all() and (same["low"] == 0).all() and (same["high"] == 0).all()
    diff = cal.calibration_differences(tmp_path / "a", tmp_path / "b", replicates=50).set_index("metric")
    one = cal.calibration_intervals(tmp_path / "a", replicates=1)
    one = one[one["split"] == "test_sub"].set_index("metric")
    assert diff.loc["ece", "a"] == pytest.approx(one.loc["ece", "value"])
    assert diff.loc["ts_ece", "a"] == pytest.approx(one.loc["ts_ece", "value"])
    assert diff.loc["ece", "diff"] == pytest.approx(diff.loc["ece", "a"] - diff.loc["ece", "b"])
    assert diff.loc["nll", "low"] <= diff.loc["nll", "diff"] <= diff.loc["nll", "high"]
    # other test images are refused
    logits, labels, domains = arrays["test_sub"]
    cal.write_logits(tmp_path / "b", {"val": arrays["val"], "test_sub": (logits, labels[::-1], domains[::-1])})
    with pytest.raises(Exception, match="differ|disagrees"):
        cal.calibration_differences(tmp_path / "a", tmp_path / "b", replicates=5)


def test_compare_command_prints_paired_calibration_with_its_direction(tmp_path, capsys):
    from tally import cli
    from tests.evaluation.test_report import C, D, write_run

    lab = np.tile(np.repeat(np.arange(C), 20), D)
    dom = np.repeat(np.arange(D), C * 20)
    for name, seed, p, scale in (("a", 0, 0.7, 3.0), ("b", 1, 0.6, 1.0)):
        write_run(tmp_path / name, seed, method=name, p=p)
        pred = np.where(np.random.default_rng(seed).random(lab.size) < p, lab, (lab + 1) % C)  # write_run's
        logits = scale * np.eye(C)[pred] + np.random.default_rng(seed).uniform(-1, 1, (lab.size, C))
        cal.write_logits(tmp_path / name, {"val": (logits, lab, dom), "test": (logits, lab, dom)})
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--replicates", "100",
                     "--metric", "ece", "--metric", "acc_at_cov90"]) == 0
    out = capsys.readouterr().out.splitlines()
    want = cal.calibration_differences(tmp_path / "a", tmp_path / "b", replicates=1).set_index("metric")
    assert out[2] == (f"  a - b on ECE: {want.loc['ece', 'diff']:+.3f} "
                      "(lower is better; no interval: its coverage is not measured yet)")
    assert out[3].startswith("  a - b on accuracy at 90% coverage:") and "(higher is better;" in out[3]
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--metric", "ece_nope"]) == 2


def test_the_selectable_calibration_metrics_are_the_computed_ones_with_one_direction_each():
    """tally.schema names what a selection may use and each direction; this module computes them."""
    from tally import schema

    assert set(schema.CALIBRATION_METRICS) == set(cal.METRIC_NAMES)
    lower = {m for m in schema.CALIBRATION_METRICS if schema.mode_of(m) == "min"}
    assert lower == {"ece", "ece_worst_domain", "ece_worst_class", "brier", "nll", "aurc", *cal.SHOT_NAMES}
    assert all(cal.higher_is_better(m) == (m not in lower) for m in cal.METRIC_NAMES)
    assert schema.mode_of("val/ts_ece") == schema.mode_of("ece_domain:photo") == "min"
    assert schema.mode_of("test_sub/acc_at_cov80") == schema.mode_of("val/pair_acc_worst") == "max"
