"""The reference's own split lists, as published (copies in tests/data/lists; see its README).

Counts are checked against counts computed here independently, with plain Python, from the files.
Every paper spec in searches/ is resolved against the index of all published list files.
"""

import hashlib
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tally.data import load_splits
from tally.data.reference import read_reference
from tally.errors import TallyError

LISTS = Path(__file__).parent / "lists"
SEARCHES = Path(__file__).resolve().parents[2] / "searches"
EMPTY_BLOB = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
NAME = re.compile(r"^(.+?)_(train|val|test)_(.+)\.txt$")
# domain names as the reference's dataset.py lists them (folder -> domains)
REFERENCE_DOMAINS = {
    "VLCS": {"Caltech101", "LabelMe", "SUN09", "VOC2007"},
    "PACS": {"art_painting", "cartoon", "photo", "sketch"},
    "officehome": {"art", "clipart", "product", "real"},
    "domainnet": {"clipart", "infograph", "painting", "quickdraw", "real", "sketch"},
    "terra_incognita": {f"location_{i}" for i in (38, 46, 100, 43, 88, 33, 61, 0, 115, 78, 130, 28, 108, 40,
                                                  90, 120, 105, 7, 125, 51)},
}


def index() -> dict[str, tuple[str, str]]:
    """folder/file -> (git blob sha1, size) for every list the reference publishes."""
    rows = {}
    for line in (LISTS / "published_index.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            path, sha, size = line.split("\t")
            rows[path] = (sha, size)
    return rows


def pair_counts(files) -> Counter:
    """(domain from the file name, label) -> lines, read with nothing but str.split."""
    counts = Counter()
    for f in files:
        domain = NAME.match(f.name).group(1)
        for line in f.read_text().splitlines():
            if line.strip():
                counts[domain, int(line.split()[-1])] += 1
    return counts


def as_counter(ds) -> Counter:
    grid = ds.counts()
    return Counter({(d, c): int(grid[i, c]) for i, d in enumerate(ds.domain_names)
                    for c in range(grid.shape[1]) if grid[i, c]})


def test_copies_are_the_published_files():
    published = index()
    copies = sorted(p for p in LISTS.rglob("*.txt"))
    assert len(copies) == 24 + 9
    for p in copies:
        data = p.read_bytes()
        sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        assert published[f"{p.parent.name}/{p.name}"] == (sha, str(len(data))), p.name


def test_published_folders_and_domains_are_the_references():
    by_folder: dict[str, set[str]] = {}
    for path in index():
        folder, name = path.split("/")
        by_folder.setdefault(folder, set()).add(NAME.match(name).group(1))
    assert by_folder == REFERENCE_DOMAINS


def test_terra_incognita_is_one_fixed_ood_split_10_5_5():
    roles: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for path, (sha, _) in index().items():
        folder, name = path.split("/")
        if folder == "terra_incognita":
            domain, split, suffix = NAME.match(name).groups()
            assert suffix == "ood"
            if sha != EMPTY_BLOB:
                roles[split].add(domain)
    assert [len(roles[s]) for s in ("train", "val", "test")] == [10, 5, 5]
    assert not (roles["train"] & roles["val"] or roles["train"] & roles["test"] or roles["val"] & roles["test"])


def test_pacs_sub_counts_per_pair():
    splits = read_reference(LISTS, "PACS", "sub")
    assert splits["train"].domain_names == sorted(REFERENCE_DOMAINS["PACS"])
    # label order is the reference's (house 0 ... guitar 6), names from the class folders
    assert splits["train"].class_names == ["house", "horse", "elephant", "dog", "person", "giraffe", "guitar"]
    for split, name in (("train", "train"), ("val", "val"), ("test", "test_sub")):
        expected = pair_counts(sorted(LISTS.glob(f"PACS/*_{split}_sub.txt")))
        assert as_counter(splits[name]) == expected, split


def test_pacs_photo_held_out_counts_per_pair():
    splits = load_splits({"source": "reference", "root": str(LISTS), "dataset": "PACS", "setting": "domain",
                          "held_out": ["photo"], "n_val": 10})
    assert set(splits) == {"train", "val", "test_domain:photo"}
    trainable = pair_counts(sorted(LISTS.glob("PACS/*_train_photo.txt")))
    assert as_counter(splits["train"]) + as_counter(splits["val"]) == trainable  # val carved from train lists
    assert all(n <= 10 for n in as_counter(splits["val"]).values())
    assert all(d != "photo" for d, _ in trainable)
    held = pair_counts([LISTS / "PACS/photo_test_photo.txt"])
    assert as_counter(splits["test_domain:photo"]) == held and sum(held.values()) == 1670  # all of photo


def test_terra_incognita_ood_counts_and_flag():
    splits = load_splits({"source": "reference", "root": str(LISTS), "dataset": "terra_incognita",
                          "setting": "ood"})
    assert list(splits) == ["train", "val", "test_domain:ood"]
    for split, name in (("train", "train"), ("val", "val"), ("test", "test_domain:ood")):
        expected = pair_counts(sorted(LISTS.glob(f"terra_incognita/*_{split}_ood.txt")))
        assert as_counter(splits[name]) == expected, split
    assert {d for d, _ in as_counter(splits["train"])} == {"location_0"}
    assert {d for d, _ in as_counter(splits["val"])} == {"location_40"}
    assert {d for d, _ in as_counter(splits["test_domain:ood"])} == {"location_90"}
    assert splits["val"].out_of_domain and not splits["train"].out_of_domain
    assert not splits["test_domain:ood"].out_of_domain
    assert any("OUT OF DOMAIN" in n for n in splits["val"].notes)
    assert splits["train"].class_names == ["bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum",
                                           "rabbit", "raccoon", "squirrel"]


def test_ood_split_refuses_a_domain_in_two_roles(tmp_path):
    shutil.copytree(LISTS / "terra_incognita", tmp_path / "t")
    line = (tmp_path / "t/location_40_val_ood.txt").read_text().splitlines()[0]
    (tmp_path / "t/location_40_train_ood.txt").write_text(line + "\n")
    with pytest.raises(TallyError, match="location_40 has images in both location_40_train_ood.txt"):
        read_reference(tmp_path, "t", "ood")


@pytest.mark.parametrize("cfg, message", [
    ({"setting": "ood", "held_out": ["location_90"]}, "data.held_out: only used with data.setting 'domain'"),
    ({"setting": "ood", "source": "folder"}, "data.setting: 'ood' reads the reference's fixed"),
    ({"dataset": "TerraIncognita"}, r"data\.dataset 'terra_incognita'\?"),
])
def test_ood_misuse_is_refused(cfg, message):
    base = {"source": "reference", "root": str(LISTS), "dataset": "terra_incognita", "setting": "ood"}
    with pytest.raises(TallyError, match=message):
        load_splits({**base, **cfg})


def test_empty_validation_split_is_refused_at_load(tmp_path):
    shutil.copytree(LISTS / "PACS", tmp_path / "PACS")
    for f in (tmp_path / "PACS").glob("*_val_sub.txt"):
        f.write_text("")
    with pytest.raises(TallyError, match=r"^data: the validation split 'val' is empty \(source 'reference'"):
        load_splits({"source": "reference", "root": str(tmp_path), "dataset": "PACS"})


# --- every paper spec resolves its lists -------------------------------------------------------------

def paper_specs():
    out = []
    for path in sorted(SEARCHES.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())["base"]["data"]
        if data["source"] == "reference":
            out.append(pytest.param(data, id=path.stem))
    return out


def fake_published(root: Path, folder: str) -> None:
    """The folder's published list files by name; a non-empty one gets 4 lines per class of 2 classes
    (resolution is checked, not counts: the real files are too big to copy)."""
    (root / folder).mkdir(parents=True)
    for path, (sha, _) in index().items():
        f, name = path.split("/")
        if f != folder:
            continue
        domain = NAME.match(name).group(1)
        lines = "" if sha == EMPTY_BLOB else "".join(f"{domain}/k{c}/{i}.jpg {c}\n" for c in (0, 1)
                                                     for i in range(4))
        (root / folder / name).write_text(lines)


def test_every_dataset_has_paper_specs():
    folders = {p.values[0]["dataset"] for p in paper_specs()}
    assert folders == set(REFERENCE_DOMAINS)
    # VLCS, PACS, officehome: sub + 4 held out; domainnet: sub + 6; terra_incognita: the one OOD split
    assert len(paper_specs()) == 5 + 5 + 5 + 7 + 1
    assert not list(SEARCHES.glob("terraincognita-location_*.yaml"))


@pytest.mark.parametrize("data", paper_specs())
def test_paper_spec_resolves_the_published_lists(data, tmp_path):
    fake_published(tmp_path, data["dataset"])
    assert set(data.get("held_out", [])) <= REFERENCE_DOMAINS[data["dataset"]]
    splits = load_splits({**data, "root": str(tmp_path), "image_size": 224})
    assert splits["train"].domain_names == sorted(REFERENCE_DOMAINS[data["dataset"]])
    assert len(splits["train"]) and len(splits["val"])
    if data["setting"] == "sub":
        assert set(splits) == {"train", "val", "test_sub"} and len(splits["test_sub"])
    elif data["setting"] == "domain":
        held = data["held_out"][0]
        assert set(splits) == {"train", "val", f"test_domain:{held}"}
        assert len(splits[f"test_domain:{held}"]) and not splits["val"].out_of_domain
    else:
        assert data["setting"] == "ood" and set(splits) == {"train", "val", "test_domain:ood"}
        assert splits["val"].out_of_domain
        per_role = [int((s.counts().sum(1) > 0).sum()) for s in splits.values()]
        assert per_role == [10, 5, 5]
