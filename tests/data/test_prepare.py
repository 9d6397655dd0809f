"""`tally data prepare`: download layouts -> the layout the reference's lists expect, by symlinks.

The downloads are built here from the real list files in tests/data/lists (empty image files).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tally.data import load_splits
from tally.data.cli import add_commands
from tally.data.prepare import layout_of, prepare
from tally.errors import TallyError

LISTS = Path(__file__).parent / "lists"
REPO = Path(__file__).resolve().parents[2]


def run(argv):
    parser = argparse.ArgumentParser(prog="tally")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def listed(list_dir: Path) -> dict[str, int]:
    """Every listed path once -> label, read with plain str.split."""
    out = {}
    for f in sorted(list_dir.glob("*.txt")):
        for line in f.read_text().splitlines():
            if line.strip():
                rel, label = line.rsplit(None, 1)
                out.setdefault(rel, int(label))
    return out


def build_download(folder: Path, rels) -> Path:
    """Empty image files at each listed path under folder (DomainBed's layout for PACS / terra_incognita).

    Hard links to one empty file: creating thousands of inodes is slow on some test machines.
    """
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / ".empty"
    empty.write_bytes(b"")
    for rel in rels:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(empty, path)
    return folder


def copy_lists(names: str, dst: Path) -> Path:
    """A folder with some of the real lists (glob ``names`` in tests/data/lists)."""
    dst.mkdir(parents=True)
    for f in LISTS.glob(names):
        shutil.copy(f, dst / f.name)
    return dst


def snapshot(root: Path) -> set:
    return {(str(p.relative_to(root)), p.is_symlink(), p.is_dir()) for p in root.rglob("*")}


def test_pacs_from_domainbed_layout(tmp_path, capsys):
    lists = copy_lists("PACS/photo_*.txt", tmp_path / "lists" / "PACS")  # one domain's lists: all of photo
    rels = listed(lists)
    assert len(rels) == 1670
    build_download(tmp_path / "dl" / "PACS", rels)
    before = snapshot(tmp_path / "dl")
    out = tmp_path / "root"
    assert run(["data", "prepare", "PACS", "--from", str(tmp_path / "dl"), "--out", str(out),
                "--lists", str(lists)]) == 0
    text = capsys.readouterr().out
    assert f"{len(rels)} listed images, {len(rels)} linked now, 0 already there, 0 missing" in text
    for rel in rels:  # every listed image is a link into the download
        dst = out / "PACS" / rel
        assert dst.is_symlink() and Path(os.readlink(dst)) == tmp_path / "dl" / "PACS" / rel
    for f in lists.glob("*.txt"):  # the lists are copied as they are
        assert (out / "PACS" / f.name).read_bytes() == f.read_bytes()
    assert snapshot(tmp_path / "dl") == before  # the download is never written to
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl", "lists", "root"]  # nothing outside --out
    # the printed per-(domain, class) table matches counts made here from the list files
    expected = Counter((rel.split("/")[0], label) for rel, label in rels.items())
    table = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in text.splitlines()
             if line.startswith("  ") and line.split()[0] in ("art_painting", "cartoon", "photo", "sketch")}
    assert set(table) == {"photo"}
    assert {(d, c): n for d, row in table.items() for c, n in enumerate(row[:-1]) if n} == dict(expected)
    assert "lists *_sub.txt: train" in text and "lists *_photo.txt: train" in text
    # the layout now loads, and a second run finds everything in place
    splits = load_splits({"source": "reference", "root": str(out), "dataset": "PACS"})
    assert all(Path(p).is_file() for p in splits["train"].paths)
    again = prepare("PACS", tmp_path / "dl", out)
    assert (again.linked, again.present, again.missing) == (0, len(rels), [])


def test_terra_incognita_ood_layout(tmp_path):
    rels = listed(LISTS / "terra_incognita")
    build_download(tmp_path / "domainbed" / "terra_incognita", rels)
    report = prepare("TerraIncognita", tmp_path / "domainbed", tmp_path / "root", LISTS / "terra_incognita")
    assert report.linked == len(rels) == 303 + 1048 + 1005 and not report.missing
    assert dict(report.totals) == {"ood": Counter({"train": 303, "val": 1048, "test": 1005})}
    splits = load_splits({"source": "reference", "root": str(tmp_path / "root"), "dataset": "terra_incognita",
                          "setting": "ood"})
    assert all(Path(p).is_file() for p in splits["val"].paths)


def test_missing_images_are_reported_with_exit_2(tmp_path):
    lists = copy_lists("terra_incognita/location_0_*.txt", tmp_path / "lists")
    rels = sorted(listed(lists))
    build_download(tmp_path / "dl" / "terra_incognita", rels)
    gone = [r for r in rels if r.startswith("location_0/coyote/")][:5]
    for rel in gone:
        (tmp_path / "dl" / "terra_incognita" / rel).unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "tally.cli", "data", "prepare", "terra_incognita", "--from", str(tmp_path / "dl"),
         "--out", str(tmp_path / "root"), "--lists", str(lists)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and f"5 of {len(rels)} listed images are missing" in err[0]
    first = re.search(r"\(first: ([^)]*)\)", err[0]).group(1).split(", ")
    assert len(first) == 3 and set(first) <= set(gone)
    assert "eccv_18_all_images_sm/" in err[0]  # where the other locations are
    assert f"{len(rels) - 5} linked now" in proc.stdout and "5 missing" in proc.stdout
    assert not (tmp_path / "root" / "terra_incognita" / gone[0]).exists()


def test_officehome_from_domainbed_names(tmp_path):
    """The lists say officehome/real/bed/00059.png; DomainBed has office_home/Real World/Bed/00059.jpg."""
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "real_train_sub.txt").write_text("real/bed/00059.png 3\nreal/alarm_clock/00001.png 0\n")
    (lists / "art_test_sub.txt").write_text("art/desk_lamp/00007.png 15\n")
    (lists / "art_val_sub.txt").write_text("")
    dl = tmp_path / "dl" / "office_home"
    for rel in ("Real World/Bed/00059.jpg", "Real World/Alarm_Clock/00001.jpg", "Art/Desk_Lamp/00007.jpg",
                "Art/Desk_Lamp/00008.jpg"):
        (dl / rel).parent.mkdir(parents=True, exist_ok=True)
        (dl / rel).write_bytes(b"x")
    report = prepare("OfficeHome", tmp_path / "dl", tmp_path / "root", lists)
    assert report.linked == 3 and not report.missing
    link = tmp_path / "root" / "officehome" / "real" / "bed" / "00059.png"
    assert Path(os.readlink(link)) == dl / "Real World" / "Bed" / "00059.jpg"
    assert not (tmp_path / "root" / "officehome" / "art" / "desk_lamp" / "00008.png").exists()  # not listed


def test_dataset_names_and_bad_input(tmp_path):
    assert layout_of("OfficeHome").folder == layout_of("office_home").folder == "officehome"
    assert layout_of("terraincognita").folder == "terra_incognita"
    assert layout_of("DomainNet").folder == "domainnet"
    with pytest.raises(TallyError, match="DATASET: expected one of"):
        layout_of("cifar")
    (tmp_path / "dl" / "PACS").mkdir(parents=True)
    with pytest.raises(TallyError, match="no split lists in .*: pass --lists"):
        prepare("PACS", tmp_path / "dl", tmp_path / "root")
    with pytest.raises(TallyError, match="--lists: no split lists"):
        prepare("PACS", tmp_path / "dl", tmp_path / "root", tmp_path / "dl")


def test_never_writes_outside_out(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "photo_train_sub.txt").write_text("photo/../../../escape.jpg 0\n")
    with pytest.raises(TallyError, match="leaves the image root"):
        prepare("PACS", tmp_path, tmp_path / "root", lists)
    assert not (tmp_path / "root").exists()  # refused before anything was written
    # a folder inside --out that links elsewhere is not written through
    (lists / "photo_train_sub.txt").write_text("photo/dog/1.jpg 0\n")
    build_download(tmp_path / "dl" / "PACS", ["photo/dog/1.jpg"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "root" / "PACS").mkdir(parents=True)
    (tmp_path / "root" / "PACS" / "photo").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(TallyError, match="refusing to write outside --out"):
        prepare("PACS", tmp_path / "dl", tmp_path / "root", lists)
    assert not any(elsewhere.iterdir())


def test_terra_incognita_from_domainbed_plus_raw_archive(tmp_path):
    """DomainBed keeps 4 locations; the rest come from Caltech Camera Traps' flat eccv_18_all_images_sm/."""
    lists = copy_lists("terra_incognita/*.txt", tmp_path / "lists")
    rels = sorted(listed(lists))
    in_domainbed = [r for r in rels if r.startswith("location_0/")]  # pretend DomainBed kept location_0
    build_download(tmp_path / "dl" / "terra_incognita", in_domainbed)
    build_download(tmp_path / "dl" / "eccv_18_all_images_sm", sorted({r.split("/")[-1] for r in rels}))
    report = prepare("terra_incognita", tmp_path / "dl", tmp_path / "root", lists)
    assert report.linked == len(rels) and not report.missing
    folder = tmp_path / "root" / "terra_incognita"
    assert Path(os.readlink(folder / in_domainbed[0])) == tmp_path / "dl" / "terra_incognita" / in_domainbed[0]
    other = next(r for r in rels if r.startswith("location_90/"))
    assert Path(os.readlink(folder / other)) == tmp_path / "dl" / "eccv_18_all_images_sm" / other.split("/")[-1]
