"""The results store: atomic writes, tolerant reads, one best-trial rule (validation only)."""

from __future__ import annotations

import pandas as pd
import pytest

from tally import results
from tally.errors import TallyError
from tally.results import write_json


def test_best_trial_uses_validation_only_and_breaks_ties_by_mean():
    summary = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d", "e"],
        "status": ["done", "done", "done", "stopped", "failed"],
        "val/pair_acc_worst": [0.2, 0.2, 0.1, 0.9, None],
        "val/pair_acc_mean": [0.5, 0.6, 0.9, 0.9, None],
        "test_sub/pair_acc_worst": [0.9, 0.0, 1.0, 1.0, None],  # must not matter
    })
    assert results.best_trial(summary, "pair_acc_worst")["trial_id"] == "b"  # tie -> better mean
    assert results.best_trial(summary, "val/pair_acc_mean")["trial_id"] == "c"  # stopped never wins
    assert results.best_trial(summary.iloc[3:], "pair_acc_worst") is None
    assert results.best_trial(pd.DataFrame(), "pair_acc_worst") is None


def test_reads_tolerate_missing_and_torn_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "epochs.jsonl").write_text('{"epoch": 0, "train_loss": 1.0}\n{"epoch": 1, "tra')
    record = results.read_run(run)
    assert len(record.epochs) == 1 and record.state == "pending"
    assert set(record.missing) == {"config.yaml", "status.json", "eval.parquet", "metrics.json"}


def test_atomic_writes_leave_no_temp_files(tmp_path):
    results.write_json(tmp_path / "a.json", {"x": 1})
    results.write_parquet(tmp_path / "t.parquet", pd.DataFrame({"x": [1, 2]}))
    results.write_status(tmp_path, "running", epoch=3)
    results.write_status(tmp_path, "done")
    assert results.read_json(tmp_path / "status.json")["epoch"] == 3  # merged, not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "status.json", "t.parquet"]


def test_truncate_epochs_for_resume(tmp_path):
    for epoch in range(4):
        results.append_jsonl(tmp_path / "epochs.jsonl", {"epoch": epoch})
    results.truncate_epochs(tmp_path, 1)
    assert [r["epoch"] for r in results.read_jsonl(tmp_path / "epochs.jsonl")] == [0, 1]


def test_selection_of_spec_variants():
    assert results.selection_of(None).metric == "val/pair_acc_mean"  # a folder of `tally train` runs
    assert results.selection_of({}).metric == "val/pair_acc_worst"  # the spec default
    sel = results.selection_of({"selection": {"metric": "macro_f1", "mode": "min"}})
    assert (sel.metric, sel.mode) == ("val/macro_f1", "min")
    assert results.selection_of({"selection": {"metric": "val/acc"}}).metric == "val/acc"


def test_export_and_dashboard_pick_the_same_trial(tmp_path):
    """One rule: a spec without `selection:` selects on worst pair everywhere (export once used the mean)."""
    from tally.dashboard import data as dd
    from tally.export import resolve_trial

    exp = tmp_path / "exp"
    for trial, worst, mean in (("a", 0.2, 0.9), ("b", 0.4, 0.5)):
        write_json(exp / "trials" / trial / "status.json", {"status": "done"})
        write_json(exp / "trials" / trial / "metrics.json",
                   {"val": {"pair_acc_worst": worst, "pair_acc_mean": mean}})
    results.write_yaml(exp / "spec.yaml", {"name": "exp"})
    trials = dd.load_trials(exp)
    shown = results.best_trial(trials.frame, trials.selection.metric, trials.selection.mode)["trial_id"]
    assert shown == resolve_trial(exp, None).name == results.best_of_experiment(exp)[0]["trial_id"] == "b"


def test_experiment_dir_stays_inside_the_store(tmp_path):
    assert results.experiment_dir(tmp_path, "x") == (tmp_path / "x").resolve()
    with pytest.raises(TallyError, match="outside the storage folder"):
        results.experiment_dir(tmp_path, "../elsewhere")
