"""The results store: atomic writes, tolerant reads, one best-trial rule (validation only)."""

from __future__ import annotations

import pandas as pd
import pytest

from tally import results
from tally.errors import TallyError
from tally.results import write_json
from tests.waiting import wait_for


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
    # the direction is the metric's own (tally.schema.mode_of): a stored `mode` cannot turn it around
    sel = results.selection_of({"selection": {"metric": "macro_f1", "mode": "min"}})
    assert (sel.metric, sel.mode) == ("val/macro_f1", "max")
    assert (results.selection_of({"selection": {"metric": "ece"}}).mode, results.selection_of(
        {"selection": {"metric": "acc_at_cov90", "mode": "min"}}).mode) == ("min", "max")
    assert results.selection_of({"selection": {"metric": "val/acc"}}).metric == "val/acc"


@pytest.mark.parametrize("metric", ["ece", "ece_worst_domain", "brier", "nll", "aurc"])
def test_a_lower_is_better_metric_selects_the_lowest_validation_value(tmp_path, metric):
    """Trial folders as training writes them: accuracy in metrics.json, calibration in calibration.json.
    The pick is the LOWEST validation value among finished trials; test values and unfinished trials never
    count; ties go to the better mean pair accuracy."""
    exp = tmp_path / "exp"
    rows = [("a", "done", 0.30, 0.01, 0.9), ("b", "done", 0.10, 0.50, 0.5), ("c", "done", 0.20, 0.00, 0.9),
            ("d", "stopped", 0.01, 0.00, 0.9), ("e", "done", 0.10, 0.40, 0.6), ("f", "failed", 0.0, 0.0, 0.9)]
    for trial, status, val, test, mean in rows:
        write_json(exp / "trials" / trial / "status.json", {"status": status})
        write_json(exp / "trials" / trial / "metrics.json", {"val": {"pair_acc_mean": mean}})
        write_json(exp / "trials" / trial / "calibration.json",
                   {"temperature": 1.0, "metrics": {"val": {metric: val}, "test_sub": {metric: test}}})
    results.write_yaml(exp / "spec.yaml", {"name": "exp", "selection": {"metric": metric, "mode": "min"}})
    best, selection = results.best_of_experiment(exp)
    assert selection.mode == "min" and best[f"val/{metric}"] == 0.10
    assert best["trial_id"] == "e"  # b and e tie at 0.10: e has the better mean pair accuracy
    assert results.best_trial(results.summarise(exp), metric)["trial_id"] == "e"  # direction by default
    assert results.read_metrics(exp / "trials" / "a") == {"val": {"pair_acc_mean": 0.9, metric: 0.30},
                                                          "test_sub": {metric: 0.01}}
    # what the dashboard shows as the best trial and the runner-up follows the same direction
    from tally.dashboard import data as dd

    trials = dd.load_trials(exp)
    assert results.select_trial(trials.frame, trials.selection)["trial_id"] == "e"
    assert dd.default_comparison(trials, "e") == "d"  # the lowest of the others that ended (max: a)
    assert dd.experiment_overview(trials)["best_value"] == 0.10


def test_export_and_dashboard_pick_the_same_trial(tmp_path):
    """One rule: a spec without `selection:` selects on worst pair everywhere (export once used the mean)."""
    from tally.dashboard import data as dd
    from tally.deploy.export import resolve_trial

    exp = tmp_path / "exp"
    for trial, worst, mean in (("a", 0.2, 0.9), ("b", 0.4, 0.5)):
        write_json(exp / "trials" / trial / "status.json", {"status": "done"})
        write_json(exp / "trials" / trial / "metrics.json",
                   {"val": {"pair_acc_worst": worst, "pair_acc_mean": mean}})
    results.write_yaml(exp / "spec.yaml", {"name": "exp"})
    trials = dd.load_trials(exp)
    shown = results.select_trial(trials.frame, trials.selection)["trial_id"]
    assert shown == resolve_trial(exp, None).name == results.best_of_experiment(exp)[0]["trial_id"] == "b"


def test_experiment_dir_stays_inside_the_store(tmp_path):
    assert results.experiment_dir(tmp_path, "x") == (tmp_path / "x").resolve()
    with pytest.raises(TallyError, match="outside the storage folder"):
        results.experiment_dir(tmp_path, "../elsewhere")


def test_calibration_metrics_are_summary_columns_beside_metrics_json(tmp_path):
    run = tmp_path / "trials" / "t1"
    results.write_json(run / "metrics.json", {"val": {"acc": 0.5}})
    results.write_json(run / "calibration.json", {"temperature": 1.3, "fitted_on": "val",
                                                  "metrics": {"val": {"ece": 0.2, "acc": 0.9}, "test": {"ts_ece": 0.1}}})
    row = results.trial_row(run)
    assert row["val/ece"] == 0.2 and row["test/ts_ece"] == 0.1
    assert row["val/acc"] == 0.5  # metrics.json wins a name both hold
    (run / "calibration.json").write_text("[1]")  # unreadable: the accuracy columns remain
    assert "val/ece" not in results.trial_row(run) and results.trial_row(run)["val/acc"] == 0.5


def test_one_bad_file_hides_only_what_it_holds(tmp_path):
    run = tmp_path / "trials" / "t1"
    run.mkdir(parents=True)
    (run / "status.json").write_text("[1, 2]")  # valid JSON, wrong shape
    (run / "config.yaml").write_bytes(b"\xff\xfe not utf-8")
    (run / "metrics.json").write_text('{"val": {"acc": 0.5, "bad": "x"}, "junk": 3}')
    (run / "eval.parquet").write_text("not parquet")
    row = results.trial_row(run)
    assert row["status"] == "pending" and row["val/acc"] == 0.5 and "val/bad" not in row
    assert "status.json: unreadable: expected a dict, got list" in row["unreadable"]
    assert "config.yaml: unreadable: not UTF-8 text" in row["unreadable"]
    record = results.read_run(run)
    assert record.metrics == {"val": {"acc": 0.5}}
    assert set(record.unreadable) == {"status.json", "config.yaml", "eval.parquet"}
    assert record.unreadable["eval.parquet"].startswith("unreadable: ")
    (run / "spec.yaml").write_text("!!python/object:os.system {}\n")  # tags are refused, not run
    assert results.read_yaml(run / "spec.yaml") is None
    assert results.problem(run / "spec.yaml").startswith("unreadable: ")
    assert results.problem(run / "absent.json") is None


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    import os

    held = rf"run folder is in use by host \S+ pid {os.getpid()} "
    with results.exclusive(tmp_path / "run", "run folder"), pytest.raises(TallyError, match=held), \
            results.exclusive(tmp_path / "run", "run folder"):
        pass
    with results.exclusive(tmp_path / "run", "run folder"):  # released on exit
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    import signal
    import subprocess
    import sys

    code = ("import sys, time; from tally import results\n"
            "with results.exclusive(sys.argv[1], 'experiment'):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "exp")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(TallyError, match=f"pid {child.pid}"), results.exclusive(tmp_path / "exp", "experiment"):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with results.exclusive(tmp_path / "exp", "experiment"):
        pass


def test_running_runs_whose_owner_is_gone_read_as_lost(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    here = socket.gethostname()
    assert results.run_state(tmp_path, {"status": "running", "owner": {"host": here, "pid": os.getpid()}}) == "running"
    assert results.run_state(tmp_path, {"status": "running",
                                        "owner": {"host": here, "pid": int(dead.stdout)}}) == "lost"
    elsewhere = {"status": "running", "owner": {"host": "another-node", "pid": 1}}
    (tmp_path / results.HEARTBEAT).touch()
    assert results.run_state(tmp_path, elsewhere) == "running"
    old = time.time() - results.LOST_AFTER_S - 5
    os.utime(tmp_path / results.HEARTBEAT, (old, old))
    assert results.run_state(tmp_path, elsewhere) == "lost"
    assert results.run_state(tmp_path, {"status": "done"}) == "done"
    with results.heartbeat(tmp_path / "beat", every_s=0.05):
        (tmp_path / "beat").mkdir()
        wait_for((tmp_path / "beat" / results.HEARTBEAT).exists, timeout=60, what="the first heartbeat")


# ---------------------------------------------------------------- files that cannot hurt (issue 21)
def test_writes_never_follow_a_symlink(tmp_path):
    """A .lock, epochs.jsonl or status.json that is a link to another file leaves that file as it was."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(TallyError, match=r"\.lock: is a symbolic link; refusing to write through it"), \
            results.exclusive(run, "the run"):
        pass
    (run / "epochs.jsonl").symlink_to(victim)
    with pytest.raises(TallyError, match=r"epochs\.jsonl: is a symbolic link"):
        results.append_jsonl(run / "epochs.jsonl", {"epoch": 0})
    (run / "status.json").symlink_to(victim)
    results.write_status(run, "running", epoch=0)  # atomic: the link itself is replaced
    assert not (run / "status.json").is_symlink() and results.read_json(run / "status.json")["epoch"] == 0
    assert victim.read_text() == "precious"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_store_files_honour_the_umask(tmp_path, umask, mode):
    """A team sharing a store reads each other's results: files get 0o666 minus the umask, as open() gives."""
    import os
    import stat

    old = os.umask(umask)
    try:
        results.write_status(tmp_path, "running")
        results.write_parquet(tmp_path / "t.parquet", pd.DataFrame({"x": [1]}))
        results.append_jsonl(tmp_path / "epochs.jsonl", {"epoch": 0})
        results.truncate_epochs(tmp_path, 0)
        with results.exclusive(tmp_path / "exp", "the experiment"):
            pass
    finally:
        os.umask(old)
    paths = [tmp_path / n for n in ("status.json", "t.parquet", "epochs.jsonl")] + [tmp_path / "exp" / ".lock"]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in paths} == {p.name: oct(mode) for p in paths}


BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]", *(f"{chr(98 + i)}: &{chr(98 + i)} "
                  f"[*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
                  f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(7))]) + "\n"


def test_hostile_store_files_are_unreadable_not_fatal(tmp_path):
    """Deeply nested, huge or alias-bomb files read as unreadable (named), never as an exception or a
    cell of megabytes; the other files of the run still show."""
    run = tmp_path / "trials" / "t1"
    results.write_json(run / "metrics.json", {"val": {"acc": 0.5}})
    (run / "status.json").write_text("[" * 100_000 + "]" * 100_000)  # 200 KB
    (run / "config.yaml").write_text(BOMB)
    assert len(BOMB) < 600
    row = results.trial_row(run)
    assert row["val/acc"] == 0.5 and row["status"] == "pending"
    assert "status.json: unreadable: nested deeper than" in row["unreadable"]
    assert "config.yaml: unreadable:" in row["unreadable"] and "aliases" in row["unreadable"]
    assert max(len(str(v)) for v in row.values()) < 1000
    (run / "config.yaml").write_text("a:\n" + "".join(" " * i + "- \n" for i in range(1, 200)))
    (run / "status.json").write_text('{"status": "done", "x": "' + "y" * (5 << 20) + '"}')
    record = results.read_run(run)
    assert record.unreadable["status.json"].startswith("unreadable: larger than")
    assert record.config is None and "nested deeper" in record.unreadable["config.yaml"], record.unreadable
    (tmp_path / "spec.yaml").write_text("[" * 50_000)
    assert results.best_of_experiment(tmp_path)[1].source.startswith("no spec.yaml")
