"""The dashboard's data layer on hostile stores (issue 21): one bad experiment is an error row, a trial id
read from summary.parquet never points outside the experiment, and hostile files never take a page down."""

from __future__ import annotations

import pandas as pd
import pytest

from tally import results
from tally.dashboard import data as dd
from tally.errors import TallyError
from tests.results.test_store import BOMB


def _good(exp):
    run = exp / results.TRIALS_DIR / "t1"
    results.write_yaml(exp / "spec.yaml", {"selection": {"metric": "acc"}})
    results.write_status(run, "done", started=1.0, ended=2.0)
    results.write_yaml(run / "config.yaml", {"train": {"lr": 0.1}})
    results.write_json(run / "metrics.json", {"val": {"acc": 0.75}})


def test_a_hostile_experiment_never_breaks_the_others(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    _good(good)
    _good(bad)
    (bad / "spec.yaml").write_text("a: " + "[" * 100_000)
    run = bad / results.TRIALS_DIR / "t1"
    (run / "status.json").write_text("[" * 100_000 + "]" * 100_000)
    (run / "config.yaml").write_text(BOMB)
    # a stored summary whose trial ids point into the other experiment and out of the store
    results.write_parquet(bad / "summary.parquet", pd.DataFrame({
        "trial_id": ["t1", "../../good/trials/t1", "/etc"], "status": ["done"] * 3, "val/acc": [0.1, 0.9, 0.8]}))
    loaded = {e.name: dd.load_trials(e) for e in dd.experiments_under(tmp_path)}
    assert set(loaded) == {"good", "bad"}
    assert loaded["good"].frame["val/acc"].tolist() == [0.75] and loaded["good"].error is None
    frame = loaded["bad"].frame
    assert frame["trial_id"].tolist() == ["t1"], frame["trial_id"].tolist()
    notes = " | ".join(loaded["bad"].notes)
    assert "not a folder name" in notes and "spec.yaml" in notes and "nested deeper" in notes, notes
    assert frame.map(lambda v: len(str(v))).max().max() < 1000  # no cell of megabytes
    with pytest.raises(TallyError, match="not a safe name"):
        dd.trial_dir(loaded["bad"], "../../good/trials/t1")
    assert dd.read_epochs(bad, ["../../good/trials/t1", "t1"]).keys() == {"t1"}


def test_an_experiment_that_cannot_be_read_is_an_error_row(tmp_path, monkeypatch):
    _good(tmp_path / "good")
    _good(tmp_path / "broken")
    real = dd._fresh_summary

    def fresh(exp_dir, stamps, notes):
        if exp_dir.name == "broken":
            raise MemoryError("a store this page cannot hold")
        return real(exp_dir, stamps, notes)

    monkeypatch.setattr(dd, "_fresh_summary", fresh)
    rows = {r["experiment"]: r for r in (dd.experiment_overview(dd.load_trials(e))
                                         for e in dd.experiments_under(tmp_path))}
    assert rows["good"]["best_value"] == 0.75 and rows["good"]["error"] is None
    assert rows["broken"]["trials"] == 0 and "MemoryError: a store this page cannot hold" in rows["broken"]["error"]
