"""Searches on a local Ray (2 CPUs): early stopping, a failing trial, resume after SIGKILL, DDP
memories, export + predict round trip, reproduction of a trial from its exported config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml

from tally import results
from tally.search import load_spec
from tests.waiting import alive, ray_workers_below, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BASE = {
    "data": {"source": "embedded", "setting": "sub", "image_size": 32},
    "model": {"arch": "resnet10", "cut": "layer2"},
    "method": {"name": "tally"},
    "train": {"epochs": 3, "warmup_epochs": 1, "steps_per_epoch": 6, "batch_size": 16, "lr": 1e-3,
              "device": "cpu"},
}


def write_spec(path: Path, name: str, trials: int, space: dict, early_stopping: bool = False,
               concurrency: int = 1, seed: int = 0, metric: str = "class_acc_worst", start_with=None) -> Path:
    spec = {"name": name, "base": BASE, "space": space, "start_with": start_with,
            "selection": {"metric": metric, "mode": "max"},
            "budget": {"trials": trials, "concurrency": concurrency,
                       "early_stopping": {"enabled": early_stopping, "grace_epochs": 1, "reduction_factor": 2}},
            "resources": {"workers": 1, "cpus_per_worker": 1}, "seed": seed}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory, local_ray):
    """A 5-trial search with ASHA on, run one trial at a time so the scheduler's decisions repeat.

    It starts with three given configs: lr 3e-3 learns and finishes; lr 1e-9 does not learn and
    falls below it at ASHA's first rung (stopped early); lr 1e30 diverges (fails). TPE then
    proposes two more.
    """
    from tally.search import run_search

    tmp = tmp_path_factory.mktemp("search")
    start = [{"train.lr": lr, "method.alpha": 0.5} for lr in (3.0e-3, 1.0e-9, 1.0e30)]
    spec_path = write_spec(tmp / "spec.yaml", "asha", trials=5, early_stopping=True, metric="pair_acc_mean",
                           start_with=start, space={
                               "train.lr": {"type": "categorical", "choices": [3.0e-3, 1.0e-9, 1.0e30]},
                               "method.alpha": {"type": "uniform", "low": 0.1, "high": 2.0}})
    spec = load_spec(spec_path)
    summary = run_search(spec, tmp / "store")
    return spec, tmp / "store" / "asha", summary


def test_search_completes_with_every_trial_in_the_store(searched):
    _, exp_dir, summary = searched
    assert len(summary) == 5
    assert set(summary["status"]) <= {"done", "failed", "stopped"}
    assert (summary["status"] == "done").any()
    stored = pd.read_parquet(exp_dir / "summary.parquet")
    assert sorted(stored["trial_id"]) == sorted(summary["trial_id"])
    for run_dir in results.iter_trial_dirs(exp_dir):
        run = results.read_run(run_dir)
        assert run.status.get("params"), run_dir
        if run.state == "done":
            assert not run.missing and {"val", "test_sub"} <= set(run.eval_table["split"])


def test_a_failing_trial_is_marked_failed_with_its_error(searched):
    _, _, summary = searched
    failed = summary[summary["status"] == "failed"]
    assert len(failed) >= 1
    assert all("diverged" in str(e) for e in failed["error"])
    assert (failed["param.train.lr"] == 1.0e30).all()


def test_the_trial_after_an_early_stop_runs_in_the_stopped_trials_actor(searched):
    """One worker: ASHA's stop ends the training thread at its next report, so Tune reuses the actor
    (its start and its torch import are paid once per concurrent slot); a failed trial's actor is not."""
    _, exp_dir, summary = searched
    by_lr = {}
    for run_dir in results.iter_trial_dirs(exp_dir):
        status = results.read_json(run_dir / "status.json")
        by_lr.setdefault(status["params"]["train.lr"], []).append((status["started"], status["owner"]["pid"],
                                                                   status["status"]))
    (_, done_pid, _), (_, stopped_pid, stopped), (_, failed_pid, failed) = (
        min(by_lr[lr]) for lr in (3.0e-3, 1.0e-9, 1.0e30))
    assert (stopped, failed) == ("stopped", "failed")
    assert done_pid == stopped_pid == failed_pid


def test_optuna_study_separates_complete_pruned_and_failed(searched):
    spec, exp_dir, summary = searched
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{exp_dir / 'study.db'}")
    states = sorted(t.state.name for t in study.trials)
    expected = sorted({"done": "COMPLETE", "failed": "FAIL", "stopped": "PRUNED"}[s] for s in summary["status"])
    assert states == expected
    # the given configs ran first, in order; early stopping stopped the lr 1e-9 one, and the
    # search still finished (the stopped trial's workers were released)
    first = sorted(study.trials, key=lambda t: t.number)[:3]
    assert [t.params["train.lr"] for t in first] == [3.0e-3, 1.0e-9, 1.0e30]
    assert [t.state.name for t in first] == ["COMPLETE", "PRUNED", "FAIL"]


def test_the_dashboard_check_of_study_db_holds_for_a_real_search(searched):
    """tests/dashboard/test_scale.check_study (what optuna-dashboard reads) on the study.db written by
    the real PruneAwareOptunaSearch, not the store factory's imitation of it."""
    from tests.dashboard.test_scale import check_study

    _, exp_dir, _ = searched
    check_study(exp_dir)


def test_export_and_predict_round_trip(searched, tmp_path):
    _, exp_dir, summary = searched
    bundle = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, "-m", "tally.cli", "export", str(exp_dir), "--out", str(bundle)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {"config.yaml", "model.pt", "labels.json", "preprocessing.json", "metrics.json", "eval.parquet",
            "MODEL_CARD.md", "manifest.json"} <= {p.name for p in bundle.iterdir()}
    torch.load(bundle / "model.pt", weights_only=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    best_id = manifest["trial"]

    # the bundle's predictions on test_sub reproduce the stored evaluation exactly
    from tally.data import load_splits
    from tally.deploy.export import Predictor

    cfg = yaml.safe_load((bundle / "config.yaml").read_text())
    test = load_splits(cfg["data"])["test_sub"]
    predicted = Predictor(bundle).predict(test.samples["path"].tolist())
    classes = test.class_names
    correct = sum(label == classes[y] for (_, label, _), y in zip(predicted, test.samples["label"], strict=True))
    stored = json.loads((exp_dir / "trials" / best_id / "metrics.json").read_text())
    assert correct / len(test) == pytest.approx(stored["test_sub"]["acc"], abs=1e-12)

    images = test.samples["path"].tolist()[:2]
    proc = subprocess.run([sys.executable, "-m", "tally.cli", "predict", str(bundle), *images],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[1] in classes for line in lines)


def test_exported_config_reproduces_the_trial(searched, tmp_path):
    from tally.deploy.export import export_bundle
    from tally.training import train_run

    _, exp_dir, summary = searched
    trial = summary[summary["status"] == "done"].iloc[0]["trial_id"]
    bundle = export_bundle(exp_dir / "trials" / trial, tmp_path / "b")
    cfg = yaml.safe_load((bundle / "config.yaml").read_text())
    # bit-exact on CPU given the same thread count: a Ray Train worker with 1 CPU runs 1 thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = train_run(cfg, tmp_path / "again")
    finally:
        torch.set_num_threads(threads)
    stored = json.loads((exp_dir / "trials" / trial / "metrics.json").read_text())
    assert json.dumps(metrics, sort_keys=True) == json.dumps(stored, sort_keys=True)  # NaN-aware, exact


@pytest.mark.parametrize("batch_size", [16, 8], ids=["dense-all-reduce", "gathered-batch"])
def test_two_workers_hold_identical_memories(local_ray, tmp_path, batch_size):
    from tally.config import validate
    from tally.search.trial import launch_trainer
    from tally.training.distributed import gather_is_cheaper

    cfg = validate({**BASE, "train": {**BASE["train"], "epochs": 2, "batch_size": batch_size}})
    assert gather_is_cheaper(10, 2, batch_size) == (batch_size == 8)  # both sync paths run here
    launch_trainer(cfg, tmp_path / "run", {}, {"workers": 2, "cpus_per_worker": 1}, name="ddp",
                   storage_path=tmp_path / "ray", memory_dump_dir=tmp_path / "memories", in_tune=False)
    a = torch.load(tmp_path / "memories" / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "memories" / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["class_seen"].all() and a["prototypes"].abs().sum() > 0
    assert results.read_run(tmp_path / "run").state == "done"


def test_final_retrain_of_the_best_trial_on_two_workers(searched, tmp_path, capsys):
    """`tally train EXPERIMENT --final --workers 2`: the best trial's config on train + validation for the
    epochs it kept, data-parallel on Ray Train (the warm-up pass is sharded over both workers)."""
    from tally.cli import main
    from tally.config import validate
    from tally.data import load_splits

    _, exp_dir, _ = searched
    best, _ = results.best_of_experiment(exp_dir)
    trial = exp_dir / "trials" / best["trial_id"]
    kept = results.read_json(trial / "status.json")["best_epoch"]
    assert main(["train", str(exp_dir), "--final", "--workers", "2", "--out", str(tmp_path / "final")]) == 0
    assert "on Ray: 2 worker(s)" in capsys.readouterr().out
    run = results.read_run(tmp_path / "final")
    assert run.state == "done" and run.status["best_epoch"] == kept
    assert run.config["train"]["final"] and run.config["train"]["epochs"] == kept + 1
    assert run.config["method"] == results.read_yaml(trial / "config.yaml")["method"]
    splits = load_splits(validate(run.config)["data"])
    n, batch = len(splits["train"]) + len(splits["val"]), run.config["train"]["batch_size"]
    assert run.epochs["steps"].iloc[0] == -(-n // (2 * batch))
    # the same folder again is refused on the driver, before any worker starts
    assert main(["train", str(exp_dir), "--final", "--workers", "2", "--out", str(tmp_path / "final")]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_search_resumes_after_the_driver_is_killed(tmp_path, local_ray):
    """SIGKILL of the driver while a trial trains, then --resume: finished trials are not re-run, the
    interrupted one continues from its checkpoint, and the study and the store agree (nothing RUNNING)."""
    spec_path = write_spec(tmp_path / "spec.yaml", "killed", trials=3, space={
        "method.alpha": {"type": "uniform", "low": 0.1, "high": 2.0}})
    store = tmp_path / "store"
    command = [sys.executable, "-m", "tally.cli", "search", str(spec_path), "--storage", str(store)]
    env = dict(os.environ)  # Ray's token auth on, as for a user (tally.cluster)
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    exp_dir = store / "killed"
    deadline = time.time() + 600
    first_done = interrupted = None
    while time.time() < deadline and interrupted is None:
        time.sleep(0.5)
        for run_dir in results.iter_trial_dirs(exp_dir):
            state = (results.read_json(run_dir / "status.json") or {}).get("status")
            if state == "done":
                first_done = first_done or run_dir
            elif state == "running" and first_done is not None and results.read_jsonl(run_dir / "epochs.jsonl"):
                interrupted = run_dir
        assert driver.poll() is None, "the search ended before it could be killed"
    assert interrupted is not None, "no trial was caught mid-training"
    its_workers = ray_workers_below(driver.pid)  # the trial workers of the Ray the driver started
    driver.send_signal(signal.SIGKILL)
    first_status = results.read_json(first_done / "status.json")
    before = (first_done / "eval.parquet").read_bytes()
    epochs_before = results.read_jsonl(interrupted / "epochs.jsonl")
    driver.wait(timeout=60)
    # Ray's reaper takes the dead driver's workers down: none may still write when the resumed search starts
    wait_for(lambda: not any(alive(p) for p in its_workers), timeout=300,
             what="the killed driver's Ray workers to exit")

    proc = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=800, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Configuration for experiment" not in proc.stdout, "Tune's tables are not quiet"
    trial_dirs = list(results.iter_trial_dirs(exp_dir))
    assert len(trial_dirs) == 3
    assert all(results.read_run(d).state == "done" for d in trial_dirs)
    # the finished trial was not re-run: same start time, same evaluation
    assert results.read_json(first_done / "status.json")["started"] == first_status["started"]
    assert (first_done / "eval.parquet").read_bytes() == before
    # the interrupted trial continued from its checkpoint: its first epochs are the same records
    epochs_after = results.read_jsonl(interrupted / "epochs.jsonl")
    assert [r["epoch"] for r in epochs_after] == list(range(BASE["train"]["epochs"]))
    assert epochs_after[:len(epochs_before)] == epochs_before
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{exp_dir / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and states.count("COMPLETE") == 3, states


def test_dashboard_on_the_real_search_store(searched, monkeypatch):
    from tests.dashboard.test_app import check_all_views, check_grid, check_overview

    _, exp_dir, _ = searched
    root = exp_dir.parent
    check_overview(root, monkeypatch)
    check_grid(root, monkeypatch)
    check_all_views(root, monkeypatch)


def test_confirm_seeds_robustness_and_report(searched, capsys):
    from tally.cli import main as cli_main
    from tally.results import best_trial
    from tally.search import confirm_seeds, robustness

    spec, exp_dir, summary = searched
    best = best_trial(summary, spec.metric)["trial_id"]
    confirm = confirm_seeds(spec, exp_dir, best, 2)
    row = confirm[(confirm["split"] == "test_sub") & (confirm["metric"] == "acc")].iloc[0]
    runs = [json.loads((exp_dir / "confirm" / f"seed{s}" / "metrics.json").read_text())["test_sub"]["acc"]
            for s in (1, 2)]
    assert row["n"] == 2 and row["mean"] == pytest.approx(sum(runs) / 2)
    assert row["stderr"] == pytest.approx(abs(runs[0] - runs[1]) / 2)

    spec.resolved["robustness"] = {"settings": ["sub", "each_domain"], "seeds": 1}
    table = robustness(spec, exp_dir, best, ["noisy"])
    assert set(table["run"]) == {"sub-seed0", "heldout-noisy-seed0"}
    assert set(table[table["run"] == "heldout-noisy-seed0"]["split"]) == {"test_sub", "test_domain:noisy"}
    held = results.read_run(exp_dir / "robustness" / "heldout-noisy-seed0")
    assert held.status["selection"]["split"] == "val" and not held.status["selection"]["oracle"]

    assert cli_main(["report", str(exp_dir), "--group", "robustness", "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert "\\begin{tabular}" in latex and "noisy" in latex and "worst pair" in latex


def test_quiet_console_sets_and_restores_the_output_switch(monkeypatch):
    from tally.search.run import _console

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    with _console(quiet=True):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT")
    with _console(quiet=True):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    with _console(quiet=False):
        assert "RAY_AIR_NEW_OUTPUT" not in os.environ
