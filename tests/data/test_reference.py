"""Reading the reference code's split lists: ROOT/<DATASET>/<domain>_<train|val|test>_<suffix>.txt."""

import json
from pathlib import Path

import pytest

from tally.data import load_splits
from tally.data import reference as reference_mod
from tally.data.reference import parse_list, read_reference
from tally.data.synthetic import make_folder_dataset
from tally.errors import TallyError

DOMAINS = ("art_painting", "photo", "sketch")  # an underscore in a domain name, as in PACS
CLASSES = ("dog", "house")


def lines(domain, cls_idx, idx):
    return "".join(f"{domain}/{CLASSES[c]}/{i:04d}.png {c}\n" for c in cls_idx for i in idx)


@pytest.fixture
def ref_root(tmp_path):
    """A reference layout: images and lists side by side in ROOT/PACS."""
    ds_dir = make_folder_dataset(tmp_path / "PACS", DOMAINS, CLASSES, per_pair=12)
    for d in DOMAINS:
        (ds_dir / f"{d}_train_sub.txt").write_text(lines(d, [0, 1], range(0, 6)))
        (ds_dir / f"{d}_val_sub.txt").write_text(lines(d, [0, 1], range(6, 8)))
        (ds_dir / f"{d}_test_sub.txt").write_text(lines(d, [0, 1], range(8, 12)) + "\n")
    # domain shift with sketch held out, as the reference generator writes it: training domains'
    # val lists empty, the held-out domain's images in its val list, no test list
    for d in ("art_painting", "photo"):
        (ds_dir / f"{d}_train_sketch.txt").write_text(lines(d, [0, 1], range(0, 12)))
        (ds_dir / f"{d}_val_sketch.txt").write_text("")
    (ds_dir / "sketch_train_sketch.txt").write_text("")
    (ds_dir / "sketch_val_sketch.txt").write_text(lines("sketch", [0, 1], range(12)))
    return tmp_path


def test_sub_lists(ref_root):
    splits = read_reference(ref_root, "PACS", "sub")
    assert list(splits) == ["train", "val", "test_sub"]
    train = splits["train"]
    assert train.domain_names == list(DOMAINS) and train.class_names == list(CLASSES)
    assert (train.counts() == 6).all() and (splits["val"].counts() == 2).all()
    assert (splits["test_sub"].counts() == 4).all()
    first = train.paths[0]
    assert first == str(ref_root.resolve() / "PACS" / "art_painting" / "dog" / "0000.png")
    img = train.load_image(0)
    assert img.shape == (3, 8, 8)


def test_sub_lists_through_load_splits(ref_root):
    splits = load_splits({"source": "reference", "root": str(ref_root), "dataset": "PACS"})
    assert len(splits["train"]) == 6 * len(DOMAINS) * len(CLASSES)


def test_empty_files_are_normal(ref_root):
    for d in DOMAINS:
        (ref_root / "PACS" / f"{d}_val_sub.txt").write_text("")
    (ref_root / "PACS" / "photo_test_sub.txt").unlink()  # missing counts as empty
    splits = read_reference(ref_root, "PACS", "sub")
    assert len(splits["val"]) == 0
    assert splits["test_sub"].counts()[DOMAINS.index("photo")].sum() == 0


def test_domain_shift_carves_training_domain_validation(ref_root):
    splits = read_reference(ref_root, "PACS", "domain", ["sketch"], seed=0, n_val=3)
    assert set(splits) == {"train", "val", "test_domain:sketch"}  # no training-domain test lists
    sk = DOMAINS.index("sketch")
    assert splits["train"].counts()[sk].sum() == 0 and splits["val"].counts()[sk].sum() == 0
    val = splits["val"].counts()
    assert (val[[0, 1]] == 3).all()
    assert not set(splits["val"].paths) & set(splits["train"].paths)
    assert len(splits["train"]) + len(splits["val"]) == 2 * 2 * 12
    assert splits["test_domain:sketch"].counts()[sk].tolist() == [12, 12]
    assert any("held-out domain" in n for n in splits["val"].notes)
    again = read_reference(ref_root, "PACS", "domain", ["sketch"], seed=0, n_val=3)
    assert again["val"].paths == splits["val"].paths


def test_domain_shift_prefers_training_domain_val_lists(ref_root):
    d = ref_root / "PACS"
    (d / "art_painting_train_sketch.txt").write_text(lines("art_painting", [0, 1], range(0, 10)))
    (d / "art_painting_val_sketch.txt").write_text(lines("art_painting", [0, 1], range(10, 12)))
    (d / "sketch_test_sketch.txt").write_text(lines("sketch", [0], range(3)))
    splits = read_reference(ref_root, "PACS", "domain", ["sketch"])
    assert splits["val"].counts()[0].tolist() == [2, 2] and splits["val"].counts()[1].sum() == 0
    assert splits["test_domain:sketch"].counts()[2].tolist() == [3, 0]  # the test list wins over val


@pytest.mark.parametrize("bad", ["art_painting/dog/0001.png", "art_painting/dog/0001.png dog",
                                 "art_painting/dog/0001.png -1"])
def test_malformed_line_names_file_and_line(ref_root, bad):
    f = ref_root / "PACS" / "photo_train_sub.txt"
    f.write_text(f"photo/dog/0000.png 0\n\n{bad}\n")
    with pytest.raises(TallyError) as err:
        read_reference(ref_root, "PACS", "sub")
    assert f"{f}:3:" in str(err.value)


def test_parse_list_allows_spaces_in_paths(tmp_path):
    f = tmp_path / "x_train_sub.txt"
    f.write_text("a b/c d.jpg 3\n")
    assert parse_list(f) == (["a b/c d.jpg"], [3])


def test_missing_folder_and_lists(tmp_path):
    with pytest.raises(TallyError, match="not found"):
        read_reference(tmp_path, "VLCS", "sub")
    (tmp_path / "VLCS").mkdir()
    with pytest.raises(TallyError, match="no split lists"):
        read_reference(tmp_path, "VLCS", "sub")


def test_held_out_without_test_images_is_an_error(ref_root):
    (ref_root / "PACS" / "sketch_val_sketch.txt").write_text("")
    with pytest.raises(TallyError, match="held-out domain 'sketch'"):
        read_reference(ref_root, "PACS", "domain", ["sketch"])


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "photo/../../x.png", "C:/x.png"])
def test_list_paths_stay_inside_the_image_root(tmp_path, path):
    f = tmp_path / "photo_train_sub.txt"
    f.write_text(f"photo/dog/1.png 0\n{path} 1\n")
    with pytest.raises(TallyError, match=r"photo_train_sub.txt:2: path .* leaves the image root"):
        parse_list(f)


@pytest.mark.parametrize("named", ["/etc", "outside", "../outside", "sub/../../outside"])
def test_a_manifest_may_not_send_the_reader_outside_the_lists(ref_root, monkeypatch, named):
    """A lists folder (often downloaded) names images relative to its image root; a manifest naming any
    folder would undo the refusal of '..' in the paths. Refused before a list is read."""
    outside = ref_root / "outside"
    outside.mkdir()
    value = str(outside) if named == "outside" else named
    manifest = ref_root / "PACS" / "manifest.json"
    manifest.write_text(json.dumps({"image_root": value}))
    read = []
    monkeypatch.setattr(reference_mod, "parse_list", lambda f: read.append(f))
    with pytest.raises(TallyError) as err:
        read_reference(ref_root, "PACS", "sub")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{manifest}: image_root {value!r} is outside")
    assert message.endswith(f"set data.image_root: {value} in your config if you made these lists")
    assert read == []


def test_a_manifest_image_root_inside_the_lists_folder_is_honoured(tmp_path):
    lists = tmp_path / "lists"
    make_folder_dataset(lists / "images", ("photo",), CLASSES, per_pair=4)
    for split in ("train", "val", "test"):
        (lists / f"photo_{split}_sub.txt").write_text(lines("photo", [0, 1], range(4)))
    for named in ("images", "./images/", str(lists / "images")):  # relative, or absolute under the lists
        (lists / "manifest.json").write_text(json.dumps({"image_root": named}))
        paths = read_reference(lists, None, "sub")["train"].paths
        assert paths[0] == str(lists.resolve() / "images" / "photo" / "dog" / "0000.png")
        assert all(Path(p).is_file() for p in paths)


def test_data_image_root_wins_over_the_manifest(ref_root, tmp_path):
    """The user's own data.image_root is trusted, whatever the manifest says (here: a refused folder)."""
    (ref_root / "PACS" / "manifest.json").write_text(json.dumps({"image_root": "/etc"}))
    mine = tmp_path / "mine"
    for got in (read_reference(ref_root, "PACS", "sub", image_root=mine),
                load_splits({"source": "reference", "root": str(ref_root), "dataset": "PACS",
                             "image_root": str(mine)})):
        assert got["train"].paths[0] == str(mine.resolve() / "art_painting" / "dog" / "0000.png")


def test_labels_must_index_the_classes(ref_root):
    lists = ref_root / "PACS"
    (lists / "photo_test_sub.txt").write_text("photo/dog/0000.png 50000000\n")
    with pytest.raises(TallyError, match="label 50000000 is not a class index"):
        read_reference(ref_root, "PACS", "sub")
    (lists / "photo_test_sub.txt").write_text("photo/dog/0000.png 5\n")  # classes 2, 3, 4 in no list
    with pytest.raises(TallyError, match=r"labels run to 5 but 3 of them are in no list \(first: \[2, 3, 4\]\)"):
        read_reference(ref_root, "PACS", "sub")


def test_no_carve_trains_on_the_full_lists_and_validates_on_the_held_out_domain(ref_root):
    """carve_validation false (protocol reference): what the reference reads, labelled oracle."""
    splits = load_splits({"source": "reference", "root": str(ref_root), "dataset": "PACS", "setting": "domain",
                          "held_out": ["sketch"], "carve_validation": False})
    sk = DOMAINS.index("sketch")
    assert len(splits["train"]) == 2 * 2 * 12  # every training-list image
    assert splits["val"].counts()[sk].tolist() == [12, 12] and splits["val"].counts().sum() == 24
    assert splits["val"].out_of_domain and any("ORACLE" in n for n in splits["val"].notes)
    assert splits["test_domain:sketch"].paths == splits["val"].paths  # its val list is its test set
