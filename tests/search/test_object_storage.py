"""A search whose store is a bucket (moto's S3 server on 127.0.0.1): it is killed (SIGKILL) and resumed,
then the dashboard (AppTest), `tally report` and `tally export` read it from the bucket.

Everything below is checked in the bucket itself (through a fresh read mirror), not in the driver's or
the trials' staging folders: the bucket is the store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tally import results
from tally.results import storage
from tests.s3_server import s3_server
from tests.search.test_run import write_spec
from tests.waiting import alive, ray_workers_below, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

EPOCHS = 3


@pytest.fixture(scope="module")
def bucket():
    with s3_server() as uri:
        yield uri


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "tally.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _bucket_view(uri: str) -> Path:
    """The store as the bucket holds it now: a fresh pull (read role, no checkpoints, no Ray state)."""
    return storage.read_mirror(uri, max_age_s=0)


def _tune_recorded(exp_uri: str, trial_id: str) -> bool:
    """Whether Tune's experiment state in the bucket lists the trial. A trial started after Tune's last
    experiment checkpoint is an orphan when the driver dies (run._close_orphans fails it and the search
    draws a new one); 1-worker trials start within a second, often before that checkpoint."""
    fs, base = storage.filesystem(exp_uri)
    for key in storage._listing(fs, base):
        if key.startswith("ray/tune/experiment_state") and key.endswith(".json"):
            with fs.open_input_stream(f"{base}/{key}") as f:
                if trial_id in f.read().decode(errors="replace"):
                    return True
    return False


@pytest.fixture(scope="module")
def killed_and_resumed(bucket, tmp_path_factory):
    """Two trials one at a time; the driver is killed while the second trains, then resumed."""
    tmp = tmp_path_factory.mktemp("bucket-search")
    spec_path = write_spec(tmp / "spec.yaml", "in-bucket", trials=2,
                           space={"method.alpha": {"type": "uniform", "low": 0.1, "high": 2.0}})
    spec = yaml.safe_load(spec_path.read_text())
    spec["base"]["train"].update(epochs=EPOCHS, steps_per_epoch=4)
    spec_path.write_text(yaml.safe_dump(spec))
    store = storage.join(bucket, "store")
    exp_uri = storage.join(store, "in-bucket")
    command = ["search", str(spec_path), "--storage", store]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    driver = subprocess.Popen([sys.executable, "-m", "tally.cli", *command], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 600
    first_done = interrupted = None
    while time.time() < deadline and interrupted is None:
        time.sleep(1.0)
        view = _bucket_view(exp_uri)
        for run_dir in results.iter_trial_dirs(view):
            state = (results.read_json(run_dir / "status.json") or {}).get("status")
            if state == "done":
                first_done = first_done or run_dir.name
            elif (state == "running" and first_done and results.read_jsonl(run_dir / "epochs.jsonl")
                  and _tune_recorded(exp_uri, run_dir.name)):
                interrupted = run_dir.name
        assert driver.poll() is None, "the search ended before it could be killed"
    assert interrupted is not None, "no trial was caught mid-training"
    its_workers = ray_workers_below(driver.pid)  # the trial workers of the Ray the driver started
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    view = _bucket_view(exp_uri)
    before = {"first_status": results.read_json(view / "trials" / first_done / "status.json"),
              "first_eval": (view / "trials" / first_done / "eval.parquet").read_bytes(),
              "epochs": results.read_jsonl(view / "trials" / interrupted / "epochs.jsonl")}
    # Ray's reaper takes the dead driver's workers down: none may still write when the resumed search starts
    wait_for(lambda: not any(alive(p) for p in its_workers), timeout=300,
             what="the killed driver's Ray workers to exit")

    proc = _cli(*command, "--resume")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"results: {exp_uri}" in proc.stdout
    return store, exp_uri, first_done, interrupted, before


def test_the_resumed_search_continues_in_the_bucket(killed_and_resumed):
    store, exp_uri, first_done, interrupted, before = killed_and_resumed
    view = _bucket_view(exp_uri)
    trial_dirs = list(results.iter_trial_dirs(view))
    assert sorted(d.name for d in trial_dirs) == sorted([first_done, interrupted])
    assert all(results.read_run(d).state == "done" for d in trial_dirs)
    assert sorted(results.read_summary(view)["trial_id"]) == sorted([first_done, interrupted])
    # the finished trial was not re-run; the interrupted one continued from the checkpoint in the bucket
    assert results.read_json(view / "trials" / first_done / "status.json")["started"] == before["first_status"]["started"]
    assert (view / "trials" / first_done / "eval.parquet").read_bytes() == before["first_eval"]
    epochs = results.read_jsonl(view / "trials" / interrupted / "epochs.jsonl")
    assert [r["epoch"] for r in epochs] == list(range(EPOCHS))
    assert epochs[:len(before["epochs"])] == before["epochs"]
    # the study came back from the bucket with both trials and nothing left RUNNING
    study = optuna.load_study(study_name="in-bucket", storage=f"sqlite:///{view / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    # Ray's own state and the checkpoints are in the bucket too; the lock was given back
    fs, base = storage.filesystem(exp_uri)
    keys = storage._listing(fs, base)
    assert any(k.startswith("ray/tune/") for k in keys)
    assert f"trials/{interrupted}/checkpoints/best.pt" in keys
    assert ".lock" not in keys


def test_the_dashboard_reads_the_bucket(killed_and_resumed, monkeypatch):
    from tests.dashboard.test_app import TABS, assert_ok, run_app, show

    store, *_ = killed_and_resumed
    at = run_app(store, monkeypatch)  # the root is the URI itself
    assert_ok(at)
    shown = {m.label: int(m.value) for m in at.metric}
    assert shown["trials"] == 2 and shown["done"] == 2, shown
    assert [h.value for h in at.subheader][:1] == ["Experiment in-bucket"]
    for view in TABS:
        assert_ok(show(at, view))


def test_report_and_export_from_the_bucket(killed_and_resumed, tmp_path):
    store, exp_uri, *_ = killed_and_resumed
    proc = _cli("report", exp_uri)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # one test_sub row per trial the bucket holds (both finished), and the rule's pick named
    rows = [line for line in proc.stdout.splitlines() if "test_sub" in line]
    trials = sorted(d.name for d in results.iter_trial_dirs(_bucket_view(exp_uri)))
    assert len(trials) == 2 and all(sum(t in row for row in rows) == 1 for t in trials), proc.stdout
    best, _ = results.best_of_experiment(_bucket_view(exp_uri))
    assert f"selected: {best['trial_id']}" in proc.stderr

    bundle = tmp_path / "bundle"
    proc = _cli("export", exp_uri, "--out", str(bundle))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    best, _ = results.best_of_experiment(_bucket_view(exp_uri))
    assert f"exported {best['trial_id']}" in proc.stdout
    manifest = results.read_json(bundle / "manifest.json")
    assert manifest and any(name.endswith((".pt", ".safetensors")) for name in manifest["sha256"])
