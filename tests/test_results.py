"""The results store: atomic writes, tolerant reads, one best-trial rule (validation only)."""

from __future__ import annotations

import pandas as pd

from tally import results


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
