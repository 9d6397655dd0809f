"""`tally report`: every metric with its interval, seeds folded to mean ± SE, thresholds per dataset."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from tally import cli, evaluation
from tally.evaluation.intervals import prediction_frame, write_predictions
from tally.evaluation.report import experiment_table, format_table, seed_table

D, C = 2, 3
# training counts 70 (many only for OfficeHome: > 60), 22 (few only for TerraIncognita: <= 25), 5
TRAIN = np.array([[70, 22, 5], [70, 22, 5]])


def write_run(run_dir, seed: int, method: str = "tally", dataset: str | None = None, p: float = 0.7,
              predictions: bool = True):
    rng = np.random.default_rng(seed)
    lab = np.tile(np.repeat(np.arange(C), 20), D)
    dom = np.repeat(np.arange(D), C * 20)
    pred = np.where(rng.random(lab.size) < p, lab, (lab + 1) % C)
    run_dir.mkdir(parents=True)
    tables = [evaluation.pair_table(s, pred, lab, dom, ["a", "b", "c"], ["x", "y"], TRAIN) for s in ("val", "test")]
    pd.concat(tables, ignore_index=True).to_parquet(run_dir / "eval.parquet")
    if predictions:
        write_predictions(run_dir, [prediction_frame("test", pred, lab, dom, np.ones(lab.size))])
    cfg = {"data": {"source": "reference", "dataset": dataset, "split_seed": 0},
           "method": {"name": method, "seed": seed}, "train": {"seed": seed, "lr": 1e-3 if method == "tally" else 1e-4}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tables[1]


@pytest.fixture
def experiment(tmp_path):
    exp = tmp_path / "exp"
    tables = {f"tally-s{s}": write_run(exp / "trials" / f"tally-s{s}", s) for s in (0, 1, 2)}
    tables["erm-s0"] = write_run(exp / "trials" / "erm-s0", 10, "erm", p=0.5, predictions=False)
    return exp, tables


def test_every_metric_has_an_interval_around_the_runs_own_value(experiment):
    exp, tables = experiment
    frame = experiment_table(exp, replicates=300).set_index("run")
    assert set(frame["split"]) == {"test"}  # validation is never reported
    for run, table in tables.items():
        metrics = evaluation.split_metrics(table)
        row = frame.loc[run]
        assert row["avg pair"] == pytest.approx(metrics["pair_acc_mean"])
        assert row["worst class"] == pytest.approx(metrics["class_acc_worst"])
        assert row["macro F1"] == pytest.approx(metrics["macro_f1"])
        assert row["x"] == pytest.approx(evaluation.accuracy_grid(table, "test").loc["x"].mean())
        for col in ("x", "y", "avg pair", "worst domain", "worst class", "worst pair", "macro F1", "medium", "few"):
            assert row[col + ":low"] <= row[col] <= row[col + ":high"], (run, col)
        assert row["avg pair:low"] < row["avg pair"] < row["avg pair:high"]
    text = format_table(frame.reset_index())
    assert "| run | method | split | x | y | avg pair |" in text.splitlines()[0]
    assert text.count("[") >= 4 * 9  # every metric cell of every run carries an interval


def test_shot_thresholds_come_from_the_dataset_and_the_flags(tmp_path):
    exp = tmp_path / "exp"
    table = write_run(exp / "trials" / "office", 0, dataset="OfficeHome")
    write_run(exp / "trials" / "terra", 0, dataset="TerraIncognita")
    frame = experiment_table(exp, replicates=0).set_index("run")
    acc = evaluation.accuracy_grid(table, "test").mean(axis=0)  # per class: training counts 70, 22, 5
    assert frame.at["office", "many"] == pytest.approx(acc["a"])  # 70 > 60
    assert frame.at["office", "medium"] == pytest.approx(acc["b"])
    assert math.isnan(frame.at["terra", "many"])  # 70 is medium for TerraIncognita
    assert frame.at["terra", "few"] == pytest.approx((acc["b"] + acc["c"]) / 2)  # 22 <= 25
    flagged = experiment_table(exp, replicates=0, many_above=80, few_at_most=4).set_index("run")
    assert math.isnan(flagged.at["office", "many"]) and math.isnan(flagged.at["office", "few"])
    assert "many:low" not in flagged.columns  # replicates 0: point values only


def test_seeds_fold_into_mean_stderr_and_seed_values(experiment):
    exp, tables = experiment
    folded = seed_table(experiment_table(exp, replicates=0)).set_index("method")
    assert folded.at["tally", "seeds"] == 3 and folded.at["erm", "seeds"] == 1
    values = [evaluation.split_metrics(tables[f"tally-s{s}"])["pair_acc_worst"] for s in (0, 1, 2)]
    assert folded.at["tally", "worst pair"] == pytest.approx(np.mean(values))
    assert folded.at["tally", "worst pair:se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(3))
    assert folded.at["tally", "worst pair:values"] == pytest.approx(tuple(values))
    assert math.isnan(folded.at["erm", "worst pair:se"])
    md = format_table(folded.reset_index())
    assert "±" in md and f"({100 * values[0]:.1f}, {100 * values[1]:.1f}, {100 * values[2]:.1f})" in md
    assert r"$\pm$" in format_table(folded.reset_index(), "latex")
    # with the runs' intervals the SE also carries the test-set noise all seeds share: larger
    with_test = seed_table(experiment_table(exp, replicates=50)).set_index("method")
    assert with_test.at["tally", "worst pair:se"] > folded.at["tally", "worst pair:se"]
    assert with_test.at["erm", "avg pair:se"] > 0  # one seed: the test-set noise alone


def test_report_command_with_interval_and_seed_flags(experiment, capsys):
    exp, _ = experiment
    assert cli.main(["report", str(exp), "--replicates", "100", "--bootstrap-seed", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 4 + 1 and "[" in lines[2]
    assert lines[-1].startswith("[ ] = 95% interval over the test images")  # the legend line
    assert cli.main(["report", str(exp), "--seeds", "--format", "latex", "--few-at-most", "5"]) == 0
    out = capsys.readouterr().out
    assert r"\pm" in out and "the spread is itself uncertain" in out.splitlines()[-1]
    assert cli.main(["report", str(exp), "--many-above", "5", "--few-at-most", "5"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_failed_lost_and_unreadable_runs_are_listed_not_dropped(experiment, capsys):
    from tally import results

    exp, _ = experiment
    results.write_status(exp / "trials" / "broken", "failed", error="TallyError: training diverged")
    (exp / "trials" / "torn").mkdir()
    (exp / "trials" / "torn" / "eval.parquet").write_bytes(b"PAR1 torn")
    results.write_json(exp / "trials" / "torn" / "status.json", {"status": "done"})
    assert cli.main(["report", str(exp), "--replicates", "10"]) == 0
    out, err = capsys.readouterr()
    assert "not in the table (2 of the trials):" in err
    assert "broken: failed: TallyError: training diverged" in err
    assert "torn: done; eval.parquet unreadable: " in err
    assert "broken" not in out and "torn" not in out and "tally-s0" in out


def test_calibration_columns_for_runs_that_kept_logits(experiment):
    from tally.evaluation import calibration

    exp, tables = experiment
    run_dir = exp / "trials" / "tally-s0"
    rng = np.random.default_rng(0)
    lab = np.tile(np.repeat(np.arange(C), 20), D)
    dom = np.repeat(np.arange(D), C * 20)
    table = tables["tally-s0"]  # the run's predictions, rebuilt from its seed as write_run drew them
    pred = np.where(np.random.default_rng(0).random(lab.size) < 0.7, lab, (lab + 1) % C)
    rebuilt = evaluation.pair_table("test", pred, lab, dom, ["a", "b", "c"], ["x", "y"], TRAIN)
    assert rebuilt["correct"].tolist() == table["correct"].tolist()
    logits = 3 * np.eye(C)[pred] + rng.uniform(-1, 1, (lab.size, C))
    calibration.write_logits(run_dir, {"val": (logits, lab, dom), "test": (logits, lab, dom)})
    frame = experiment_table(exp, replicates=50).set_index("run")
    want = calibration.calibration_intervals(run_dir, ["test"], replicates=50).set_index("metric")
    row = frame.loc["tally-s0"]
    assert row["ECE"] == pytest.approx(want.loc["ece", "value"])
    assert row["ECE after T"] == pytest.approx(want.loc["ts_ece", "value"])
    # 120 test images (< calibration.MIN_IMAGES): AURC is shown without an interval (coverage not reached)
    assert math.isnan(row["AURC:low"]) and math.isnan(row["AURC:high"]) and not math.isnan(row["AURC"])
    assert math.isnan(frame.loc["tally-s1", "ECE"])  # no logits: no calibration, shown as --
    assert "| ECE | ECE after T | worst-domain ECE | AURC |" in format_table(frame.reset_index()).splitlines()[0]


def test_a_run_that_selected_on_test_images_says_oracle(tmp_path):
    exp = tmp_path / "exp"
    write_run(exp / "trials" / "clean", 0)
    write_run(exp / "trials" / "oracle", 1)
    cfg = yaml.safe_load((exp / "trials" / "oracle" / "config.yaml").read_text())
    cfg["data"]["oracle_selection"] = True
    (exp / "trials" / "oracle" / "config.yaml").write_text(yaml.safe_dump(cfg))
    frame = experiment_table(exp, replicates=0).set_index("run")
    assert frame.at["oracle", "method"] == "tally (ORACLE selection)" and frame.at["clean", "method"] == "tally"
