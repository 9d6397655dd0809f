"""`splits make` and `data show` as registered by tally.data.cli.add_commands."""

import argparse
import json

import pytest
import yaml

from tally.data.cli import add_commands
from tally.data.synthetic import make_folder_dataset
from tally.errors import TallyError


def run(argv):
    parser = argparse.ArgumentParser(prog="tally")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("cli") / "data", ("p", "q", "r"), ("u", "v"),
                               per_pair=12)


def test_splits_make_then_show(root, tmp_path, capsys):
    out = tmp_path / "lists"
    assert run(["splits", "make", str(root), "--out", str(out), "--held-out", "q", "--seed", "3",
                "--n-val", "2", "--n-test", "3", "--max-per-class", "6"]) == 0
    text = capsys.readouterr().out
    assert "test_domain:q" in text and str(out) in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["setting"] == "domain" and manifest["held_out"] == ["q"] and manifest["seed"] == 3
    assert (out / "p_train_q.txt").is_file() and (out / "q_test_q.txt").is_file()
    # it prints the config lines that read the lists back, image_root (the user's choice) included
    printed = yaml.safe_load(text[text.index("data:\n"):])["data"]
    assert printed == {"source": "reference", "root": str(out.resolve()), "image_root": str(root.resolve()),
                       "setting": "domain", "held_out": ["q"]}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": printed}))
    assert run(["data", "show", "--config", str(cfg)]) == 0
    shown = capsys.readouterr().out
    assert "test_domain:q: 24 images" in shown and "val lists" in shown  # all 2 x 12 images of q

    assert run(["data", "show", "--source", "reference", "--root", str(out), "--image-root", str(root),
                "--held-out", "q"]) == 0
    assert capsys.readouterr().out == shown
    with pytest.raises(TallyError, match="set data.image_root: "):  # the manifest alone is not trusted
        run(["data", "show", "--source", "reference", "--root", str(out), "--held-out", "q"])


def test_data_show_folder_and_config(root, tmp_path, capsys):
    assert run(["data", "show", "--source", "folder", "--root", str(root), "--n-val", "1", "--n-test", "1"]) == 0
    assert "train:" in capsys.readouterr().out
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data:\n  source: folder\n  root: {root}\n  setting: domain\n  held_out: [r]\n"
                   "  n_val: 1\n  n_test: 1\n")
    assert run(["data", "show", "--config", str(cfg)]) == 0
    assert "test_domain:r" in capsys.readouterr().out


def test_errors_are_tally_errors(root, tmp_path):
    with pytest.raises(TallyError, match="unknown domain 'zz'"):
        run(["splits", "make", str(root), "--out", str(tmp_path / "o"), "--held-out", "zz"])
    with pytest.raises(TallyError, match="not found"):
        run(["splits", "make", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])


def test_data_show_ood_and_natural(root, capsys):
    from pathlib import Path

    lists = Path(__file__).parent / "lists"
    assert run(["data", "show", "--source", "reference", "--root", str(lists), "--dataset", "terra_incognita",
                "--setting", "ood"]) == 0
    shown = capsys.readouterr().out
    assert "val (out of domain): 1048 images" in shown and "test_domain:ood: 1005 images" in shown
    assert run(["data", "show", "--source", "folder", "--root", str(root), "--imbalance", "natural",
                "--n-val", "2", "--n-test", "4"]) == 0
    shown = capsys.readouterr().out
    assert "train: 36 images" in shown and "natural imbalance" in shown  # 3 x 2 pairs x (12 - 6)
