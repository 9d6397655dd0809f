"""Split generator invariants: no leakage, held-out domains, imbalance shape, determinism, writing."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tally.data.folder import read_folder
from tally.data.reference import read_reference
from tally.data.splits import class_orders, generate, imbalance_profile, make_splits, write_splits
from tally.data.synthetic import make_folder_dataset
from tally.errors import TallyError

DOMAINS = ("a", "b", "c")
CLASSES = ("k0", "k1", "k2", "k3", "k4")
GEN = {"imbalance": "exp", "imbalance_factor": 8.0, "max_per_class": 16, "n_val": 2, "n_test": 2}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("folder") / "data", DOMAINS, CLASSES, per_pair=24)


@pytest.fixture(scope="module")
def ds(root):
    return read_folder(root)


def paths(split):
    return set(split.paths)


def assert_disjoint(splits):
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not paths(splits[a]) & paths(splits[b]), f"{a} and {b} share images"


def test_sub_setting_is_disjoint_and_balanced(ds):
    splits = make_splits(ds, "sub", seed=3, **GEN)
    assert list(splits) == ["train", "val", "test_sub"]
    assert_disjoint(splits)
    assert (splits["val"].counts() == 2).all()
    assert (splits["test_sub"].counts() == 2).all()
    for split in splits.values():
        assert split.class_names == list(CLASSES) and split.domain_names == list(DOMAINS)


def test_domain_setting_holds_out_domain(ds):
    splits = make_splits(ds, "domain", held_out=["b"], seed=3, **GEN)
    assert set(splits) == {"train", "val", "test_sub", "test_domain:b"}
    assert_disjoint(splits)
    b = DOMAINS.index("b")
    for name in ("train", "val", "test_sub"):
        counts = splits[name].counts()
        assert counts[b].sum() == 0, f"held-out domain leaked into {name}"
        assert (np.delete(counts, b, axis=0) > 0).any()
    held = splits["test_domain:b"].counts()
    # every image of the held-out domain is tested, not a balanced n_test per pair
    assert (held[b] == ds.counts()[b]).all() and held.sum() == 24 * len(CLASSES)
    assert (np.delete(splits["val"].counts(), b, axis=0) == 2).all()  # training-domain validation


def test_training_domains_identical_across_settings(ds):
    sub = make_splits(ds, "sub", seed=5, **GEN)
    dom = make_splits(ds, "domain", held_out=["c"], seed=5, **GEN)
    keep = [d != DOMAINS.index("c") for d in sub["train"].domains]
    assert sorted(np.array(sub["train"].paths)[keep]) == sorted(dom["train"].paths)


@pytest.mark.parametrize("kind,expected", [("exp", [16, 9, 5, 3, 2]), ("step", [16, 16, 2, 2, 2])])
def test_train_follows_imbalance_profile_in_each_domains_order(ds, kind, expected):
    assert imbalance_profile(5, 16, kind, 8.0).tolist() == expected
    seed = 11
    train = make_splits(ds, "sub", seed=seed, **{**GEN, "imbalance": kind})["train"].counts()
    orders = class_orders(seed, len(DOMAINS), len(CLASSES))
    for d in range(len(DOMAINS)):
        assert train[d, orders[d]].tolist() == expected
    heads = orders[:, 0]
    assert len(set(heads.tolist())) == len(DOMAINS), "head classes must differ per domain"
    assert len({tuple(o) for o in orders.tolist()}) == len(DOMAINS)


def test_evaluation_sets_are_capped_by_availability(tmp_path):
    per_pair = {(d, c): 20 for d in ("a", "b") for c in ("x", "y")}
    per_pair["a", "y"] = 3
    ds = read_folder(make_folder_dataset(tmp_path / "d", ("a", "b"), ("x", "y"), per_pair=per_pair))
    splits = make_splits(ds, "sub", seed=0, n_val=2, n_test=2, max_per_class=10)
    assert splits["test_sub"].counts()[0, 1] == 2
    assert splits["val"].counts()[0, 1] == 1
    assert splits["train"].counts()[0, 1] == 0  # nothing left after the evaluation sets
    assert_disjoint(splits)


def test_result_does_not_depend_on_row_order(ds):
    shuffled = ds.subset(np.random.default_rng(0).permutation(len(ds)))
    a, b = make_splits(ds, seed=2, **GEN), make_splits(shuffled, seed=2, **GEN)
    for name in a:
        assert a[name].paths == b[name].paths


def test_same_seed_byte_identical_lists_and_manifest(root, tmp_path):
    def files(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    one, _ = generate(root, tmp_path / "one", "domain", ["a"], seed=4, **GEN)
    two, _ = generate(root, tmp_path / "two", "domain", ["a"], seed=4, **GEN)
    other, _ = generate(root, tmp_path / "other", "domain", ["a"], seed=5, **GEN)
    assert files(one) == files(two)
    assert files(one)["manifest.json"] != files(other)["manifest.json"]
    assert files(one)["b_train_a.txt"] != files(other)["b_train_a.txt"]
    names = set(files(one))
    assert {f"{d}_{s}_a.txt" for d in DOMAINS for s in ("train", "val", "test")} | {"manifest.json"} == names
    assert files(one)["a_train_a.txt"] == b"" and files(one)["a_val_a.txt"] == b""
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_manifest_records_counts_and_hashes(root, tmp_path):
    import hashlib

    out, splits = generate(root, tmp_path / "s", "sub", seed=1, **GEN)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 1 and manifest["params"]["imbalance_factor"] == 8.0
    assert manifest["counts"]["train"] == splits["train"].counts().tolist()
    for name, sha in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha
    assert set(manifest["params"]["class_order"]) == set(DOMAINS)
    line = (out / "a_train_sub.txt").read_text().splitlines()[0]
    rel, label = line.rsplit(" ", 1)
    assert rel.startswith("a/") and (root / rel).is_file() and CLASSES[int(label)] in rel


def test_written_lists_read_back_identically(root, tmp_path):
    out, splits = generate(root, tmp_path / "lists", "domain", ["c"], seed=9, **GEN)
    back = read_reference(out, None, "domain", ["c"], image_root=root)  # data.image_root, as `splits make` prints
    assert set(back) == set(splits)
    for name, ds in splits.items():
        assert back[name].paths == ds.paths
        assert back[name].labels.tolist() == ds.labels.tolist()
        assert back[name].domains.tolist() == ds.domains.tolist()
        assert back[name].class_names == ds.class_names and back[name].domain_names == ds.domain_names
    assert any("val lists" in n for n in back["val"].notes)
    with pytest.raises(TallyError, match="set data.image_root: .* in your config if you made these lists"):
        read_reference(out, None, "domain", ["c"])  # its manifest's absolute image_root is outside the lists


def test_rewrite_replaces_lists_but_not_foreign_folders(root, tmp_path):
    out, _ = generate(root, tmp_path / "s", seed=1, **GEN)
    generate(root, out, seed=2, **GEN)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(TallyError, match="refusing"):
        generate(root, foreign, seed=1, **GEN)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_write_refuses_images_outside_root(ds, tmp_path):
    splits = make_splits(ds, seed=0, **GEN)
    with pytest.raises(TallyError, match="not under the image root"):
        write_splits(splits, tmp_path / "out", tmp_path / "elsewhere", {"setting": "sub"})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs,match", [
    ({"setting": "domain", "held_out": ["zz"]}, "unknown domain 'zz'"),
    ({"setting": "domain", "held_out": list(DOMAINS)}, "every domain"),
    ({"setting": "domain"}, "data.held_out"),
    ({"setting": "sub", "held_out": ["a"]}, "data.held_out"),
    ({"imbalance": "linear"}, "data.imbalance"),
    ({"imbalance_factor": 0.5}, "data.imbalance_factor"),
    ({"n_val": 0}, "data.n_val"),
    ({"max_per_class": 0}, "data.max_per_class"),
    ({"n_val": 12, "n_test": 12}, "training split would be empty"),
])
def test_generator_errors_name_the_field(ds, kwargs, match):
    with pytest.raises(TallyError, match=match):
        make_splits(ds, **kwargs)


# --- natural imbalance (the MDLT benchmark's protocol) -----------------------------------------------

@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Pairs of 40, 12, 4, 1 and 0 images: above, inside and below n_val + n_test = 3 + 6."""
    sizes = {"k0": 40, "k1": 12, "k2": 4, "k3": 1, "k4": 0}
    per_pair = {(d, c): n for d in DOMAINS for c, n in sizes.items()}
    return read_folder(make_folder_dataset(tmp_path_factory.mktemp("uneven") / "d", DOMAINS, CLASSES, per_pair))


def test_natural_takes_balanced_evaluation_sets_then_trains_on_the_rest(uneven):
    splits = make_splits(uneven, "sub", seed=1, imbalance="natural", n_val=3, n_test=6)
    assert_disjoint(splits)
    n = uneven.counts()
    take = np.minimum(n, 9)
    assert (splits["val"].counts() == take // 3).all()  # a third of min(n, n_val + n_test)
    assert (splits["test_sub"].counts() == take - take // 3).all()
    assert (splits["train"].counts() == n - take).all()  # everything else: the natural imbalance
    assert splits["train"].counts()[:, 0].tolist() == [31, 31, 31] and splits["val"].counts()[0].tolist() == [
        3, 3, 1, 0, 0]
    again = make_splits(uneven.subset(np.random.default_rng(3).permutation(len(uneven))), "sub", seed=1,
                        imbalance="natural", n_val=3, n_test=6)
    assert all(again[k].paths == splits[k].paths for k in splits)  # deterministic, row order irrelevant
    other = make_splits(uneven, "sub", seed=2, imbalance="natural", n_val=3, n_test=6)
    assert other["val"].paths != splits["val"].paths


def test_natural_with_a_held_out_domain_tests_all_of_it(uneven):
    splits = make_splits(uneven, "domain", held_out=["c"], seed=0, imbalance="natural", n_val=3, n_test=6)
    c = DOMAINS.index("c")
    assert (splits["test_domain:c"].counts()[c] == uneven.counts()[c]).all()
    assert splits["train"].counts()[c].sum() == splits["val"].counts()[c].sum() == 0


def test_natural_matches_the_mdlt_csv_per_pair_sizes():
    """The benchmark's published TerraIncognita split (n_val 10 + n_test 20): same per-pair sizes."""
    from tally.data.benchmark_csv import read_csv_splits

    csv = read_csv_splits(Path(__file__).parent / "csv", "TerraIncognita_excerpt.csv")
    everything = csv["train"]
    everything = type(everything)(pd.concat([s.samples for s in csv.values()], ignore_index=True),
                                  everything.class_names, everything.domain_names)
    ours = make_splits(everything, "sub", seed=0, imbalance="natural", n_val=10, n_test=20)
    for name in ("train", "val", "test_sub"):
        assert (ours[name].counts() == csv[name].counts()).all(), name
    assert csv["val"].counts().sum() == 55  # includes pairs of 3, 12, 21 and 28 images


def test_natural_writes_lists_without_class_order(root, tmp_path):
    out, _ = generate(root, tmp_path / "n", "sub", seed=0, imbalance="natural", imbalance_factor=1.0,
                      max_per_class=None, n_val=2, n_test=4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["imbalance"] == "natural" and "class_order" not in manifest["params"]
    assert manifest["counts"]["train"] == [[18] * len(CLASSES)] * len(DOMAINS)


def test_no_carve_moves_validation_into_training_and_validates_on_the_held_out_domain(root):
    from tally.data import load_splits

    cfg = {"source": "folder", "root": str(root), "setting": "domain", "held_out": ["c"], "n_val": 2, "n_test": 2}
    carved = load_splits(cfg)
    full = load_splits({**cfg, "carve_validation": False})
    assert len(full["train"]) == len(carved["train"]) + len(carved["val"])
    assert set(full["train"].paths) == set(carved["train"].paths) | set(carved["val"].paths)
    assert full["val"].paths == full["test_domain:c"].paths == carved["test_domain:c"].paths
    assert full["val"].out_of_domain and any("ORACLE" in n for n in full["val"].notes)


@pytest.mark.parametrize(("name", "sizes"), [("VLCS", (30, 15)), ("PACS", (50, 25)), ("OfficeHome", (10, 5)),
                                             ("office_home", (10, 5)), ("terra_incognita", (20, 10)),
                                             ("DomainNet", (40, 20))])
def test_natural_takes_the_mdlt_caps_of_a_named_dataset(root, name, sizes):
    """create_mdlt_datasets.py:18-26: NUM_SAMPLES_PER_CLASS (num_test, num_val)."""
    from tally.data import resolve_data_cfg

    cfg = resolve_data_cfg({"source": "folder", "root": str(root), "dataset": name, "imbalance": "natural"})
    assert (cfg["n_test"], cfg["n_val"]) == sizes
    mine = resolve_data_cfg({"source": "folder", "root": str(root), "dataset": name, "imbalance": "natural",
                             "n_val": 3})
    assert (mine["n_test"], mine["n_val"]) == (sizes[0], 3)  # an explicit value wins
    assert resolve_data_cfg({"source": "folder", "root": str(root), "dataset": name})["n_test"] == 20  # exp


def test_natural_without_a_known_dataset_keeps_the_generic_sizes(root):
    from tally.data import resolve_data_cfg

    cfg = resolve_data_cfg({"source": "folder", "root": str(root), "dataset": "mine", "imbalance": "natural"})
    assert (cfg["n_test"], cfg["n_val"]) == (20, 10)
