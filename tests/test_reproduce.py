"""`tally reproduce`: the paper's fixed configurations, where selection looks, and a small end-to-end run."""

from __future__ import annotations

import pytest

from tally.cli import main
from tally.errors import TallyError
from tally.reproduce import plan, reproduce


def test_pacs_dry_run_lists_the_papers_runs_without_data(capsys, monkeypatch):
    monkeypatch.delenv("TALLY_DATA", raising=False)
    assert main(["reproduce", "PACS", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 run(s)" in out and "PACS-sub-paper-seed2" in out
    assert "500 TALLY steps/epoch, batch 18, lr 1e-05, wd 1e-06, alpha 0.5" in out  # config.py:59-77
    assert "selection: val: the sub lists' validation sets" in out and "ORACLE" not in out


def test_terraincognita_reference_dry_run_says_it_selects_on_the_test_locations(capsys, monkeypatch):
    monkeypatch.delenv("TALLY_DATA", raising=False)
    assert main(["reproduce", "TerraIncognita", "--protocol", "reference", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 run(s)" in out and "test test_domain:ood" in out
    assert out.count("selection: ORACLE: the test locations (test_domain:ood), by macro_f1") == 3
    assert "lr 3e-05, wd 0, alpha 0.5" in out and "1000 TALLY steps/epoch" in out  # config.py:97-115
    assert "model.imagenet_weights v1" in out and "method.memory_snapshot True" in out


def test_domain_setting_runs_each_held_out_domain():
    runs = plan("VLCS", "domain", "paper", seeds=2, root="/nowhere")
    assert [r.setting for r in runs] == [d for d in ("Caltech101", "LabelMe", "SUN09", "VOC2007") for _ in (0, 1)]
    assert {r.config["method"]["alpha"] for r in runs} == {0.2} and runs[0].config["train"]["steps_per_epoch"] == 200
    assert all(r.selection.startswith("val: carved") for r in runs)
    ref = plan("VLCS", "domain", "reference", seeds=1, root="/nowhere")
    assert ref[0].config["data"]["oracle_selection"] and ref[0].selection.startswith("ORACLE")


def test_unknown_dataset_and_setting_are_refused():
    with pytest.raises(TallyError, match="DATASET"):
        plan("MNIST")
    with pytest.raises(TallyError, match="--setting"):
        plan("embedded", "ood")


@pytest.fixture
def one_thread():
    """A tiny network: one thread is faster than several competing for a shared machine's cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_embedded_end_to_end_writes_the_table(tmp_path, one_thread, capsys):
    text = reproduce("embedded", "sub", "paper", seeds=1, out=tmp_path, replicates=50)
    assert "training embedded-sub-paper-seed0" in capsys.readouterr().out
    table = (tmp_path / "table.md").read_text()
    assert table in text + "\n"
    row = next(line for line in table.splitlines() if line.startswith("| sub |"))
    assert row.count("[") == 2  # average and worst accuracy, each with its interval
    assert (tmp_path / "runs" / "embedded-sub-paper-seed0" / "metrics.json").is_file()
    again = reproduce("embedded", "sub", "paper", seeds=1, out=tmp_path, replicates=50)  # done runs are reused
    assert "training embedded" not in capsys.readouterr().out and again == text
    assert (tmp_path / "table.md").read_text() == table


def test_embedded_reference_protocol_trains_through_the_loop(tmp_path, one_thread):
    """The loop snapshots the memories each epoch (a TALLY step under memory_snapshot refuses to run
    without it) and the reference's switches reach the stored config."""
    text = reproduce("embedded", "sub", "reference", seeds=1, out=tmp_path, replicates=20)
    assert "| sub |" in text
    stored = (tmp_path / "runs" / "embedded-sub-reference-seed0" / "config.yaml").read_text()
    assert "memory_snapshot: true" in stored and "tie_rule: latest" in stored and "crop_padding: 0" in stored
