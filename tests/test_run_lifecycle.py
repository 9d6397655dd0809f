"""A run's folder tells the truth about the run: one writer, SIGTERM is a stop, a full disk is named,
no temporary file survives, and a dead owner reads as "lost"."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tally import results
from tally.errors import TallyError
from tally.training import checkpoints, train_run

pytestmark = pytest.mark.slow

TINY = {
    "data": {"source": "embedded", "setting": "sub", "image_size": 16},
    "model": {"arch": "resnet10", "cut": "layer1"},
    "method": {"name": "erm"},
    "train": {"epochs": 3, "warmup_epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "device": "cpu",
              "eval_batch_size": 512},
}


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp")]


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path, one_thread):
    code = ("import sys, time; from tally import results\n"
            "with results.exclusive(sys.argv[1], 'run folder'):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TallyError, match=f"run folder is in use by host .* pid {holder.pid}"):
            train_run(TINY, tmp_path / "run")
        assert not (tmp_path / "run" / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    train_run(TINY, tmp_path / "run")  # the holder is gone: its lock went with it
    assert results.read_json(tmp_path / "run" / "status.json")["status"] == "done"


def test_sigterm_stops_the_run_and_keeps_its_checkpoint(tmp_path):
    config = tmp_path / "c.yaml"
    slow = {**TINY, "train": {**TINY["train"], "epochs": 40, "steps_per_epoch": 4}}
    config.write_text(yaml.safe_dump(slow))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "train", str(config), "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not results.read_jsonl(run / "epochs.jsonl"):
        time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    status = results.read_json(run / "status.json")
    assert proc.returncode == 130, proc.stderr.read()[-3000:]  # what ended the run otherwise
    assert status["status"] == "stopped" and "SIGTERM" in status["error"]
    assert results.read_run(run).state == "stopped"
    assert (run / "checkpoints" / "last.pt").is_file() and temp_files(run) == []


def test_a_full_disk_is_reported_and_leaves_no_temporary_file(tmp_path, monkeypatch, one_thread):
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:  # the second epoch's checkpoint: half a file, then the disk is full
            if hasattr(f, "write"):  # checkpoints are written through an open temporary file
                f.write(b"partial")
            else:
                Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(getattr(f, "name", f)))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save)
    with pytest.raises(OSError):
        train_run(TINY, tmp_path / "run")
    status = results.read_json(tmp_path / "run" / "status.json")
    assert status["status"] == "failed" and status["error"].startswith("disk full: no space left on device")
    assert temp_files(tmp_path / "run") == []


def test_a_run_whose_owner_died_reads_as_lost(tmp_path, one_thread):
    train_run(TINY, tmp_path / "run", stop_after_epoch=0)  # ends as a crash would: still "running"
    status = results.read_json(tmp_path / "run" / "status.json")
    assert status["status"] == "running" and status["owner"]["pid"] == os.getpid()
    assert results.read_run(tmp_path / "run").state == "running"  # this process is its owner, alive
    status["owner"]["pid"] = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                            capture_output=True, text=True, check=True).stdout.strip()
    status["owner"]["pid"] = int(status["owner"]["pid"])
    results.write_json(tmp_path / "run" / "status.json", status)
    assert results.read_run(tmp_path / "run").state == "lost"
    assert (tmp_path / "run" / results.HEARTBEAT).exists()
