"""One training run on the embedded data: it learns, writes the store layout, resumes exactly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from tally import results
from tally.training import load_checkpoint, train_run

pytestmark = pytest.mark.slow


def tiny_config(**train) -> dict:
    return {
        "data": {"source": "embedded", "setting": "domain", "held_out": ["noisy"]},
        "model": {"arch": "resnet10", "cut": "layer2"},
        "method": {"name": "tally"},
        "train": {"epochs": 4, "warmup_epochs": 1, "steps_per_epoch": 25, "batch_size": 32, "lr": 2e-3,
                  "device": "cpu", **train},
    }


def test_training_learns_and_writes_the_run_folder(tmp_path):
    metrics = train_run(tiny_config(), tmp_path / "run")
    run = results.read_run(tmp_path / "run")
    assert run.state == "done" and not run.missing
    assert set(run.eval_table["split"]) == {"val", "test_sub", "test_domain:noisy"}
    # 10 classes: chance is 0.1 on balanced validation
    assert metrics["val"]["pair_acc_mean"] > 0.3
    assert len(run.epochs) == 4 and list(run.epochs["phase"]) == ["warmup", "main", "main", "main"]
    assert run.status["best_epoch"] == int(run.epochs["val/pair_acc_mean"].idxmax())
    # the held-out domain never appears in training counts
    held = run.eval_table[run.eval_table["domain"] == "noisy"]
    assert (held["n_train"] == 0).all()

    # `tally evaluate` re-scores the kept checkpoint from the run folder alone: same numbers
    from tally.training import evaluate_run_split

    table, again = evaluate_run_split(tmp_path / "run", "test_domain:noisy")
    assert again == pytest.approx(metrics["test_domain:noisy"], nan_ok=True)


def test_resume_ends_with_the_same_weights(tmp_path):
    cfg = tiny_config(epochs=3, steps_per_epoch=4, batch_size=16)
    train_run(cfg, tmp_path / "straight")
    train_run(cfg, tmp_path / "resumed", stop_after_epoch=1)
    assert results.read_run(tmp_path / "resumed").state == "running"
    train_run(cfg, tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:  # the method's own RNG state
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert len(results.read_jsonl(tmp_path / "resumed" / "epochs.jsonl")) == 3


@pytest.mark.parametrize("patch, expected", [
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"method": {"name": "magic"}}, "method.name"),
    ({"data": {"source": "folder", "root": "/does/not/exist"}}, "/does/not/exist"),
])
def test_cli_rejects_bad_configs_with_one_line(tmp_path, patch, expected):
    cfg = tiny_config()
    for section, values in patch.items():
        cfg[section].update(values)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "tally.cli", "train", str(path), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written
