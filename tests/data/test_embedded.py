"""The embedded default dataset and the load_splits entry point."""

import json

import numpy as np
import pytest
from PIL import Image

from tally.data import describe, load_splits
from tally.data.embedded import DOMAIN_NAMES, MARKER, build_arrays, default_dir, load_embedded, materialise
from tally.errors import TallyError


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory):
    """Built once per test session (about two seconds)."""
    return materialise(tmp_path_factory.mktemp("cache") / "embedded-v1")


@pytest.fixture(scope="session")
def embedded_sub(embedded_root):
    return load_splits({"source": "embedded", "root": str(embedded_root)})


def test_structure(embedded_root):
    ds = load_embedded(embedded_root)
    assert len(ds) == 1797
    assert len(ds.domain_names) >= 4 and ds.class_names == [str(i) for i in range(10)]
    counts = ds.counts()
    assert (counts.max(0) - counts.min(0) <= 1).all(), "each class spread evenly over domains"
    stems = [p.rsplit("/", 1)[-1] for p in ds.paths]
    assert sorted(int(s[:4]) for s in stems) == list(range(1797)), "each scan in exactly one domain"
    info = json.loads((embedded_root / MARKER).read_text())
    assert info["n_images"] == 1797


def test_styles_differ_in_colour_statistics(embedded_root):
    ds = load_embedded(embedded_root)
    stats = []
    for d in range(len(ds.domain_names)):
        idx = np.flatnonzero(ds.domains == d)[:40]
        imgs = np.stack([np.asarray(Image.open(ds.paths[i])) for i in idx]).astype(np.float64)
        imgs = imgs.transpose(0, 3, 1, 2)
        stats.append(np.concatenate([imgs.mean(axis=(0, 2, 3)), imgs.std(axis=(2, 3)).mean(0)]))
    stats = np.array(stats)
    gaps = [np.abs(stats[i] - stats[j]).max() for i in range(len(stats)) for j in range(i + 1, len(stats))]
    assert min(gaps) > 15, "domains must be told apart by channel mean / std"


def test_reused_not_rebuilt(embedded_root):
    marker = embedded_root / MARKER
    before = marker.stat().st_mtime_ns
    assert materialise(embedded_root) == embedded_root
    assert marker.stat().st_mtime_ns == before


def test_materialised_files_are_the_seeded_rendering(embedded_root):
    labels, domains, pixels = build_arrays()
    labels2, domains2, pixels2 = build_arrays()
    assert (domains == domains2).all() and (pixels == pixels2).all()
    for i in (0, 1, 500, 1796):
        path = embedded_root / DOMAIN_NAMES[domains[i]] / str(labels[i]) / f"{i:04d}.png"
        assert (np.asarray(Image.open(path)) == pixels[i]).all()


def test_every_domain_long_tailed_with_own_head(embedded_sub):
    train = embedded_sub["train"].counts()
    assert (train.max(1) >= 30).all() and (train.min(1) <= 2).all()
    heads = train.argmax(1)
    assert len(set(heads.tolist())) == train.shape[0], "head classes must differ between domains"
    assert (embedded_sub["val"].counts() == 5).all() and (embedded_sub["test_sub"].counts() == 5).all()
    names = list(embedded_sub)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(embedded_sub[a].paths) & set(embedded_sub[b].paths)


def test_domain_setting(embedded_root):
    splits = load_splits({"source": "embedded", "root": str(embedded_root), "setting": "domain",
                          "held_out": ["noisy"], "split_seed": 1})
    assert set(splits) == {"train", "val", "test_sub", "test_domain:noisy"}
    noisy = splits["train"].domain_names.index("noisy")
    assert splits["train"].counts()[noisy].sum() == 0 and splits["val"].counts()[noisy].sum() == 0
    everything = load_splits({"source": "embedded", "root": str(embedded_root), "n_test": 1, "n_val": 1,
                              "max_per_class": 1000, "imbalance_factor": 1.0})
    all_noisy = sum(s.counts()[noisy] for s in everything.values())  # every embedded image, by pair
    assert (splits["test_domain:noisy"].counts()[noisy] == all_noisy).all()  # all of it tested
    assert all_noisy.min() > 5  # more than the n_test = 5 per pair kept before


def test_split_seed_changes_train_only_deterministically(embedded_root, embedded_sub):
    cfg = {"source": "embedded", "root": str(embedded_root)}
    assert load_splits(cfg)["train"].paths == embedded_sub["train"].paths
    other = load_splits({**cfg, "split_seed": 1})
    assert other["train"].paths != embedded_sub["train"].paths


def test_run_config_keys_are_accepted(embedded_root):
    cfg = {"source": "embedded", "root": str(embedded_root), "dataset": None, "setting": "sub",
           "held_out": [], "split_seed": 0, "imbalance": "step", "imbalance_factor": 10.0,
           "max_per_class": 20, "n_val": 3, "n_test": 4, "image_size": 32, "flip": False,
           "crop_padding": 2, "decode_workers": 0, "oracle_selection": False}
    splits = load_splits(cfg)
    assert (splits["val"].counts() == 3).all() and (splits["test_sub"].counts() == 4).all()
    assert sorted(set(splits["train"].counts().ravel().tolist())) == [2, 20]


@pytest.mark.parametrize("cfg,field", [
    ({"source": "ftp"}, "data.source"),
    ({"setting": "domain"}, "data.held_out"),
    ({"setting": "both"}, "data.setting"),
    ({"held_out": ["ink"]}, "data.held_out"),
    ({"split_seed": -1}, "data.split_seed"),
    ({"n_test": 0}, "data.n_test"),
    ({"imbalance_factor": "big"}, "data.imbalance_factor"),
    ({"heldout": ["ink"]}, "data.heldout"),
    ({"source": "folder"}, "data.root"),
    ({"setting": "domain", "held_out": ["sepia"]}, "unknown domain 'sepia'"),
])
def test_load_splits_errors_name_the_field(embedded_root, cfg, field):
    with pytest.raises(TallyError, match=field):
        load_splits({"root": str(embedded_root), **cfg} if cfg.get("source") != "folder" else cfg)


def test_wilds_missing_is_a_clear_error(tmp_path):
    try:
        import wilds  # noqa: F401
    except ImportError:
        with pytest.raises(TallyError, match=r"tally-platform\[wilds\]"):
            load_splits({"source": "wilds", "root": str(tmp_path)})
    else:
        with pytest.raises(TallyError, match="iwildcam"):
            load_splits({"source": "wilds", "root": str(tmp_path)})


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TALLY_CACHE", str(tmp_path))
    assert default_dir() == tmp_path / "embedded-v1"
    monkeypatch.delenv("TALLY_CACHE")
    assert default_dir().parts[-3:] == (".cache", "tally", "embedded-v1")


def test_incomplete_cache_dir_is_refused(tmp_path):
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "junk").write_text("x")
    with pytest.raises(TallyError, match="not a complete embedded dataset"):
        materialise(tmp_path / "emb")


def test_describe(embedded_sub):
    text = describe(embedded_sub)
    for name in ("train", "val", "test_sub", "ink", "noisy", "total"):
        assert name in text
