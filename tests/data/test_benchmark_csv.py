"""Data source `csv`: the MDLT benchmark's split CSVs (real excerpt in tests/data/csv; see lists/README.md)."""

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tally.data import load_splits
from tally.errors import TallyError

EXCERPT = Path(__file__).parent / "csv" / "TerraIncognita_excerpt.csv"
NAMES = {"train": "train", "val": "val", "test": "test_sub"}


def rows():
    with open(EXCERPT, newline="") as f:
        return list(csv.DictReader(f))


def as_counter(ds) -> Counter:
    grid = ds.counts()
    return Counter({(d, c): int(grid[i, c]) for i, d in enumerate(ds.domain_names)
                    for c in range(grid.shape[1]) if grid[i, c]})


@pytest.fixture
def benchmark_root(tmp_path):
    """The benchmark's layout: ROOT/terra_incognita/TerraIncognita.csv beside the images."""
    (tmp_path / "terra_incognita").mkdir()
    shutil.copy(EXCERPT, tmp_path / "terra_incognita" / "TerraIncognita.csv")
    return tmp_path


def test_counts_per_pair_and_split(benchmark_root):
    splits = load_splits({"source": "csv", "root": str(benchmark_root), "dataset": "TerraIncognita"})
    assert list(splits) == ["train", "val", "test_sub"]
    for split, name in NAMES.items():
        expected = Counter((r["env"], int(r["label"])) for r in rows() if r["split"] == split)
        assert as_counter(splits[name]) == expected, split
    train = splits["train"]
    assert train.domain_names == ["location_100", "location_38", "location_46"]  # sorted env names
    assert train.class_names == ["bird", "bobcat", "cat", "coyote", "dog"]  # label i: i-th class folder
    first = rows()[0]
    assert train.paths[0] == str(benchmark_root / "terra_incognita" / first["path"])
    assert sum(len(s) for s in splits.values()) == len(rows()) == 265


def test_held_out_domain_is_tested_on_all_its_rows():
    splits = load_splits({"source": "csv", "root": str(EXCERPT.parent), "dataset": EXCERPT.name,
                          "setting": "domain", "held_out": ["location_38"]})
    assert set(splits) == {"train", "val", "test_sub", "test_domain:location_38"}
    held = Counter(int(r["label"]) for r in rows() if r["env"] == "location_38")
    got = splits["test_domain:location_38"]
    assert Counter({c: n for (d, c), n in as_counter(got).items()}) == held and len(got) == 3 + 12 + 48
    for name in ("train", "val", "test_sub"):
        assert "location_38" not in {d for d, _ in as_counter(splits[name])}


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace(",train\n", ",training\n", 1), r"row \d+: split 'training' is not one of"),
    (lambda t: t.replace("env,label,path,split", "env,label,file,split"), "missing column 'path'"),
    (lambda t: t.replace("location_100,0,", "location_100,x,", 1), r"row 2: label 'x' is not a class index"),
    # a label that would size every per-class array, and paths that leave the image folder (issue 21)
    (lambda t: t.replace("location_100,0,", "location_100,1000000000000,", 1),
     r"bad\.csv: row 2: label '1000000000000' is not a class index \(an integer in \[0, 999999\]\)"),
    (lambda t: t.replace("location_100,0,", "location_100,0,../../", 1), r"bad\.csv: row 2: path '\.\./\.\./.*' leaves"),
    (lambda t: t.replace("location_100,0,", "location_100,0,/etc/", 1), r"bad\.csv: row 2: path '/etc/.*' leaves"),
    (lambda t: t.replace("location_100,0,", "location_100,0,a\\..\\..\\", 1), r"row 2: path 'a\\\\\.\..*' leaves"),
])
def test_malformed_csv_is_refused(tmp_path, edit, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(edit(EXCERPT.read_text()))
    with pytest.raises(TallyError, match=message):
        load_splits({"source": "csv", "root": str(tmp_path), "dataset": "bad.csv"})


@pytest.mark.parametrize("cfg, message", [
    ({"dataset": "Terra"}, "data.dataset: expected one of VLCS, PACS, OfficeHome, TerraIncognita"),
    ({"dataset": "TerraIncognita"}, "split CSV not found"),
    ({"dataset": EXCERPT.name, "setting": "domain", "held_out": ["location_1"]}, "unknown domain 'location_1'"),
    ({"dataset": EXCERPT.name, "setting": "ood"}, "data.setting: 'ood'"),
    ({"dataset": f"../{EXCERPT.parent.name}/{EXCERPT.name}"}, "data.dataset: .* leaves data.root"),
])
def test_bad_config_is_refused(cfg, message):
    with pytest.raises(TallyError, match=message):
        load_splits({"source": "csv", "root": str(EXCERPT.parent), **cfg})
