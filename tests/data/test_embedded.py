"""The embedded default dataset and the load_splits entry point."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tally.data import describe, load_splits
from tally.data.embedded import (
    DOMAIN_NAMES,
    MARKER,
    VARIANTS,
    build_arrays,
    default_dir,
    file_name,
    ink_maps,
    load_embedded,
    materialise,
    scan_ids,
)
from tally.errors import TallyError


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory):
    """Built once per test session (about two seconds)."""
    return materialise(tmp_path_factory.mktemp("cache") / "embedded-v2")


@pytest.fixture(scope="session")
def embedded_sub(embedded_root):
    return load_splits({"source": "embedded", "root": str(embedded_root)})


def test_structure(embedded_root):
    ds = load_embedded(embedded_root)
    assert len(ds) == 1797 * VARIANTS
    assert ds.domain_names == sorted(DOMAIN_NAMES) and len(ds.domain_names) == 3
    assert ds.class_names == [str(i) for i in range(10)]
    counts = ds.counts() // VARIANTS
    assert (counts.max(0) - counts.min(0) <= 1).all(), "each class spread evenly over domains"
    assert counts.min() >= 40 + 18, "every pair has 20 + 20 evaluation scans and up to 18 training scans"
    ids = scan_ids(ds)
    assert (np.bincount(ids) == VARIANTS).all() and len(np.bincount(ids)) == 1797, "each scan: every variant once"
    frame = pd.DataFrame({"scan": ids, "domain": ds.domains, "label": ds.labels})
    assert (frame.groupby("scan")[["domain", "label"]].nunique() == 1).all().all(), "a scan's variants share its pair"
    info = json.loads((embedded_root / MARKER).read_text())
    assert info["n_scans"] == 1797 and info["variants"] == VARIANTS


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


def test_variants_are_distortions_of_their_scan():
    from sklearn.datasets import load_digits

    images = load_digits().images[:50]
    plain, other = ink_maps(images, 0), ink_maps(images, 2)
    assert (ink_maps(images, 2) == other).all(), "deterministic"
    diff = np.abs(plain - other).mean(axis=(1, 2))
    assert (diff > 0.01).all(), "a variant is not the scan itself"
    # a mild distortion: nearer its own scan than to almost every other scan
    dist = np.abs(other[:, None] - plain[None]).mean(axis=(2, 3))
    rank = (dist < dist[np.arange(50), np.arange(50)][:, None]).sum(1)
    assert np.median(rank) == 0 and (rank <= 3).mean() > 0.9


def test_reused_not_rebuilt(embedded_root):
    marker = embedded_root / MARKER
    before = marker.stat().st_mtime_ns
    assert materialise(embedded_root) == embedded_root
    assert marker.stat().st_mtime_ns == before


def test_materialised_files_are_the_seeded_rendering(embedded_root):
    labels, domains, pixels = build_arrays()
    labels2, domains2, pixels2 = build_arrays()
    assert (domains == domains2).all() and (pixels == pixels2).all()
    for i, v in ((0, 0), (1, 3), (500, 1), (1796, 2)):
        path = embedded_root / DOMAIN_NAMES[domains[i]] / str(labels[i]) / file_name(i, v)
        assert (np.asarray(Image.open(path)) == pixels[v, i]).all()


def test_every_domain_long_tailed_with_own_head_few_and_zero_shot(embedded_sub):
    train = embedded_sub["train"].counts()
    assert (train.max(1) == 18 * VARIANTS).all() and (train.min(1) == 0).all(), "a zero-shot pair in every domain"
    assert ((train > 0) & (train <= 20)).sum(1).min() >= 4, "few-shot pairs in every domain"
    assert (train.sum(0) > 0).all(), "every class is trained on in some domain"
    heads = train.argmax(1)
    assert len(set(heads.tolist())) == train.shape[0], "head classes must differ between domains"
    assert (embedded_sub["val"].counts() == 20).all() and (embedded_sub["test_sub"].counts() == 20).all()


@pytest.mark.parametrize("setting", [{}, {"setting": "domain", "held_out": ["inverted"]}, {"split_seed": 3},
                                     {"imbalance": "natural"}])
def test_no_scan_crosses_splits(embedded_root, setting):
    """Variants of a scan are near-copies: a scan in two splits would leak test images into training."""
    splits = load_splits({"source": "embedded", "root": str(embedded_root), **setting})
    scans = {name: scan_ids(ds) for name, ds in splits.items()}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if not (a.startswith("test") and b.startswith("test")):  # test_sub and a held-out domain's test
                assert not set(scans[a]) & set(scans[b]), (a, b)       # are scored apart, never trained on
    assert (np.bincount(scans["train"])[np.unique(scans["train"])] == VARIANTS).all(), "training: every variant"
    for name in names[1:]:
        assert len(set(scans[name])) == len(scans[name]), f"{name}: one image (the scan itself) per scan"
        assert all(p.endswith("-v0.png") for p in splits[name].paths)


def test_domain_setting(embedded_root):
    splits = load_splits({"source": "embedded", "root": str(embedded_root), "setting": "domain",
                          "held_out": ["noisy"], "split_seed": 1})
    assert set(splits) == {"train", "val", "test_sub", "test_domain:noisy"}
    noisy = splits["train"].domain_names.index("noisy")
    assert splits["train"].counts()[noisy].sum() == 0 and splits["val"].counts()[noisy].sum() == 0
    every_scan = load_embedded(embedded_root).counts()[noisy] // VARIANTS
    assert (splits["test_domain:noisy"].counts()[noisy] == every_scan).all()  # every scan of it, tested once
    assert every_scan.min() > 20  # more than the n_test = 20 per pair kept before


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
    assert sorted(set(splits["train"].counts().ravel().tolist())) == [2 * VARIANTS, 20 * VARIANTS]  # scans x variants


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
    from tally.data.iwildcam import import_wilds

    try:
        import_wilds()
    except ImportError:
        with pytest.raises(TallyError, match=r"tally-platform\[wilds\]"):
            load_splits({"source": "wilds", "root": str(tmp_path)})
    else:
        with pytest.raises(TallyError, match="iwildcam"):
            load_splits({"source": "wilds", "root": str(tmp_path)})


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TALLY_CACHE", str(tmp_path))
    assert default_dir() == tmp_path / "embedded-v2"
    monkeypatch.delenv("TALLY_CACHE")
    assert default_dir().parts[-3:] == (".cache", "tally", "embedded-v2")


def test_incomplete_cache_dir_is_refused(tmp_path):
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "junk").write_text("x")
    with pytest.raises(TallyError, match="not a complete embedded dataset"):
        materialise(tmp_path / "emb")


def test_describe(embedded_sub):
    text = describe(embedded_sub)
    for name in ("train", "val", "test_sub", "ink", "noisy", "total"):
        assert name in text
