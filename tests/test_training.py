"""One training run on the embedded data: it learns, writes the store layout, resumes exactly, keeps
only epochs after the warm-up, and refuses settings that cannot work before anything runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from tally import evaluation, results
from tally.errors import TallyError
from tally.training import evaluate_run_split, load_checkpoint, train_run


def tiny_config(**train) -> dict:
    return {
        "data": {"source": "embedded", "setting": "domain", "held_out": ["noisy"]},
        "model": {"arch": "resnet10", "cut": "layer2"},
        "method": {"name": "tally"},
        "train": {"epochs": 4, "warmup_epochs": 1, "steps_per_epoch": 25, "batch_size": 32, "lr": 2e-3,
                  "device": "cpu", **train},
    }


@pytest.mark.slow
def test_training_learns_and_writes_the_run_folder(tmp_path):
    metrics = train_run(tiny_config(), tmp_path / "run")
    run = results.read_run(tmp_path / "run")
    assert run.state == "done" and not run.missing
    assert set(run.eval_table["split"]) == {"val", "test_sub", "test_domain:noisy"}
    # 10 classes: chance is 0.1 on balanced validation
    assert metrics["val"]["pair_acc_mean"] > 0.3
    assert len(run.epochs) == 4 and list(run.epochs["phase"]) == ["warmup", "main", "main", "main"]
    main = run.epochs[run.epochs["phase"] == "main"]  # the warm-up epoch is never kept
    assert run.status["best_epoch"] == int(main["val/pair_acc_mean"].idxmax())
    # the held-out domain never appears in training counts
    held = run.eval_table[run.eval_table["domain"] == "noisy"]
    assert (held["n_train"] == 0).all()

    # `tally evaluate` re-scores the kept checkpoint from the run folder alone: same numbers
    table, again = evaluate_run_split(tmp_path / "run", "test_domain:noisy")
    assert again == pytest.approx(metrics["test_domain:noisy"], nan_ok=True)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_only_epochs_after_the_warmup_may_be_kept(tmp_path, monkeypatch):
    """Validation is made worse at every epoch, so by value alone the first (warm-up) epoch would win:
    the reference's protocol keeps the first TALLY epoch; select_from: all keeps the warm-up epoch."""
    real, calls = evaluation.split_metrics, []

    def worse_every_epoch(*args, **kwargs):
        metrics = real(*args, **kwargs)
        calls.append(1)
        return metrics | {"pair_acc_mean": 1.0 / len(calls)}

    monkeypatch.setattr(evaluation, "split_metrics", worse_every_epoch)
    for select_from, kept in (("main", 2), ("all", 0)):
        calls.clear()
        cfg = tiny_config(epochs=3, warmup_epochs=2, steps_per_epoch=2, batch_size=32, select_from=select_from)
        cfg["data"]["max_per_class"] = 12
        train_run(cfg, tmp_path / select_from)
        run = results.read_run(tmp_path / select_from)
        epochs = results.read_jsonl(tmp_path / select_from / "epochs.jsonl")
        before = None if select_from == "main" else 0  # nothing kept during the warm-up
        assert run.status["best_epoch"] == kept
        assert [e["best_epoch"] for e in epochs] == [before, before, kept]
        assert load_checkpoint(tmp_path / select_from / "checkpoints" / "best.pt")["epoch"] == kept


@pytest.mark.parametrize("patch, field", [
    ({"method": {"name": "tally", "alpha": 0}}, "method.alpha"),
    ({"method": {"name": "mixstyle", "alpha": 0.0}}, "method.alpha"),
    ({"method": {"name": "tally", "loss_beta": 1.0}}, "method.loss_beta"),
    ({"method": {"name": "tally", "momentum": 1.5}}, "method.momentum"),
    ({"method": {"name": "tally", "stem_pass": "twice"}}, "method.stem_pass"),
    ({"method": {"name": "reweight", "beta": None}}, "method.beta"),
    ({"train": {"epochs": 2, "warmup_epochs": 2}}, "train.warmup_epochs"),
    ({"method": {"name": "erm"}, "train": {"epochs": 2, "warmup_epochs": 2}}, "train.select_from"),
    ({"train": {"select_from": "warmup"}}, "train.select_from"),
    ({"train": {"sync_bn": "yes"}}, "train.sync_bn"),
])
def test_settings_that_cannot_work_are_refused_before_anything_runs(tmp_path, patch, field):
    cfg = tiny_config()
    for section, values in patch.items():
        cfg[section] = {**cfg[section], **values} if section == "train" else values
    with pytest.raises(TallyError, match=rf"^{field}: "):
        train_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_erm_run_without_a_main_phase_is_fine_when_every_epoch_may_be_kept():
    from tally.config import validate

    cfg = validate(tiny_config(epochs=2, warmup_epochs=2, select_from="all") | {"method": {"name": "erm"}})
    assert cfg["train"]["select_from"] == "all"
