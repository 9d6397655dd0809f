"""Resume consistency without Ray: orphans of a killed driver are closed the same way in study and store."""

from __future__ import annotations

import optuna

from tally import results
from tally.search.run import _close_orphans


def test_orphans_are_closed_in_the_study_and_the_store(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    study = optuna.create_study(study_name="exp", storage=f"sqlite:///{exp / 'study.db'}")
    done = study.ask()
    study.tell(done, 0.5)
    study.ask()  # a trial the killed driver started: RUNNING forever unless closed
    results.write_status(exp / "trials" / "a", "done")
    results.write_status(exp / "trials" / "b", "running")
    results.write_status(exp / "trials" / "c", "pending")
    _close_orphans(exp, "exp")
    states = [t.state.name for t in optuna.load_study(study_name="exp", storage=f"sqlite:///{exp / 'study.db'}").trials]
    assert states == ["COMPLETE", "FAIL"]
    assert [results.read_json(exp / "trials" / t / "status.json")["status"] for t in "abc"] == ["done", "failed",
                                                                                                 "failed"]
    assert results.read_json(exp / "trials" / "b" / "status.json")["error"].startswith("interrupted:")
