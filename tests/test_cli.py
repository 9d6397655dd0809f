"""The command line as a user meets it: help, dry runs, one-line errors with exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tally.cli import build_parser


def tally(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tally.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_every_documented_command_exists():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"train", "evaluate", "search", "export", "predict", "report", "splits", "data", "dashboard",
            "demo"} <= commands


def test_dry_run_prints_the_resolved_spec_and_budget(tmp_path):
    proc = tally("search", "searches/quickstart.yaml", "--dry-run", "--storage", tmp_path / "store")
    assert proc.returncode == 0, proc.stderr
    assert "trials" in proc.stdout and "method.alpha" in proc.stdout
    assert not (tmp_path / "store").exists()


def test_malformed_spec_exits_2_with_one_line_and_writes_nothing(tmp_path):
    spec = yaml.safe_load(Path("searches/quickstart.yaml").read_text())
    spec["budget"]["trials"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = tally("search", path, "--storage", tmp_path / "store")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "budget.trials" in proc.stderr
    assert not (tmp_path / "store").exists()


def test_missing_files_are_named(tmp_path):
    for args in (("train", tmp_path / "nope.yaml"), ("search", tmp_path / "nope.yaml"),
                 ("export", tmp_path / "nope", "--out", tmp_path / "b"), ("predict", tmp_path / "nope", "x.png")):
        proc = tally(*args)
        assert proc.returncode == 2, args
        assert "nope" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_bad_data_gives_one_line_and_exit_2(tmp_path, capsys):
    from tally.cli import main
    from tally.data.synthetic import make_folder_dataset

    root = make_folder_dataset(tmp_path / "data", per_pair=8, size=12)
    lists = tmp_path / "lists" / "DS"
    lists.mkdir(parents=True)
    (lists / "a_train_sub.txt").write_text("a/x/0000.png 0\nthis line has no label\n")
    (root / "a" / "x" / "broken.png").write_bytes(b"not an image at all")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"source": "folder", "root": str(root), "n_val": 1, "n_test": 1}}))
    cases = [
        (["data", "show", "--source", "folder", "--root", str(tmp_path / "nowhere")], "nowhere"),
        (["splits", "make", str(root), "--out", str(tmp_path / "o"), "--held-out", "zz"], "zz"),
        (["data", "show", "--source", "reference", "--root", str(tmp_path / "lists"), "--dataset", "DS"],
         "a_train_sub.txt:2"),
        (["data", "cache", str(config), "--workers", "0", "--cache-dir", str(tmp_path / "c")], "broken.png"),
    ]
    for argv, culprit in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and culprit in err, (argv, err)
    assert not (tmp_path / "o").exists()
    # the splits before the broken image's decoded: their banks are complete and kept; the broken
    # split's bank is not there, and nothing half-written is left
    from tally.config import validate
    from tally.data import load_splits
    from tally.data.bank import bank_path

    cfg = validate(yaml.safe_load(config.read_text()))
    splits = list(load_splits(cfg["data"]).values())
    broken = next(i for i, ds in enumerate(splits) if ds.samples["path"].str.endswith("broken.png").any())
    expected = {bank_path(ds, cfg["data"]["image_size"], tmp_path / "c")[0] for ds in splits[:broken]}
    assert broken > 0, "the broken image must not be in the first split decoded, or nothing is kept to check"
    assert set((tmp_path / "c").iterdir()) == expected
    assert all((p / "key.txt").is_file() for p in expected)


def test_train_scale_options_are_checked_before_anything_runs(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"source": "embedded"}, "train": {"device": "cpu"}}))
    for args, message in ((("--gpus-per-worker", "2"), "--gpus-per-worker: expected at most 1"),
                          (("--workers", "2", "--gpus-per-worker", "0.5"), "--gpus-per-worker: a fraction"),
                          (("--cpus-per-worker", "0"), "--cpus-per-worker: expected a number > 0"),
                          (("--workers", "0"), "--workers")):
        proc = tally("train", config, *args, "--out", tmp_path / "r")
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert not (tmp_path / "r").exists()
