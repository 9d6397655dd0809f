"""A 1-worker trial is its own worker (tally.search.trial): no Ray Train process starts for it, and
consecutive trials run in one Tune actor; a data-parallel trial still runs on Ray Train."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tally import results
from tests.waiting import descendants

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def tiny(seed: int) -> dict:
    return {"data": {"source": "embedded", "setting": "sub", "image_size": 32},
            "model": {"arch": "resnet10", "cut": "layer2"}, "method": {"name": "tally"},
            "train": {"epochs": 2, "warmup_epochs": 1, "steps_per_epoch": 2, "batch_size": 16, "lr": 1e-3,
                      "device": "cpu", "seed": seed}}


class RayTitles:
    """The titles (ray::<class>) of every Ray worker process below this one, sampled while it runs."""

    def __init__(self):
        self.seen: set[tuple[int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            for pid in descendants(os.getpid()):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                if title.startswith("ray::"):
                    self.seen.add((pid, title.split()[0].split(".")[0]))
            time.sleep(0.1)


def owner_pids(group_dir: Path) -> dict[str, int]:
    """Run id -> the process that wrote the run's first status (the trial's Tune actor)."""
    return {d.name: results.read_json(d / "status.json")["owner"]["pid"] for d in sorted(group_dir.iterdir())}


def test_one_worker_trials_train_in_one_tune_actor_without_ray_train(tmp_path, local_ray):
    from tally.search import run_fixed

    configs = {f"c{i}": tiny(i) for i in range(3)}
    for cfg in configs.values():  # a heap of a few hundred MiB per run: a reused actor must not keep it
        cfg["model"], cfg["data"]["image_size"] = {"arch": "resnet18", "cut": "layer2"}, 64
    with RayTitles() as before:  # Train processes of earlier tests of this Ray may still be alive
        time.sleep(0.5)
    with RayTitles() as titles:
        metrics = run_fixed(tmp_path / "exp", "runs", configs, {"workers": 1, "cpus_per_worker": 1}, 1)
    assert all(m.get("test_sub") for m in metrics.values()), metrics
    started = [t for t in titles.seen - before.seen if "Train" in t[1]]
    assert not started, started  # no controller, no worker actor
    pids = owner_pids(tmp_path / "exp" / "runs")
    assert len(set(pids.values())) == 1 and os.getpid() not in pids.values(), pids  # one actor, reused
    # each trial's own peak (the actor's high-water mark is reset per trial) and no growth from one trial
    # to the next: without release_cpu_memory the peaks rose about 300 MiB per trial here
    peaks = [results.read_json(tmp_path / "exp" / "runs" / r / "status.json")["peak_rss_mib"] for r in configs]
    assert all(p > 0 for p in peaks) and max(peaks) - min(peaks) < 120, peaks


def test_a_data_parallel_trial_still_runs_on_ray_train(tmp_path, local_ray):
    from tally.search import run_fixed

    with RayTitles() as titles:
        metrics = run_fixed(tmp_path / "exp", "runs", {"ddp": tiny(0)}, {"workers": 2, "cpus_per_worker": 1}, 1)
    assert metrics["ddp"].get("test_sub")
    assert any("RayTrainWorker" in t[1] for t in titles.seen), titles.seen
