"""The dataset table, the folder-layout reader and image decoding."""

import numpy as np
import pytest
import torch
from PIL import Image

from tally.data.dataset import MultiDomainDataset, make_samples, read_image
from tally.data.folder import read_folder
from tally.data.synthetic import make_folder_dataset
from tally.errors import TallyError


@pytest.fixture
def root(tmp_path):
    per_pair = {("d1", "cat"): 3, ("d1", "dog"): 2, ("d2", "cat"): 1}
    root = make_folder_dataset(tmp_path / "data", ("d2", "d1"), ("dog", "cat"), per_pair=per_pair)
    (root / "d2" / "dog").rmdir()  # a class missing from one domain
    (root / "d2" / "emu").mkdir()  # ... and one only another domain has
    Image.new("RGB", (5, 4), (1, 2, 3)).save(root / "d2" / "emu" / "e.bmp")
    (root / "d1" / "cat" / "notes.txt").write_text("not an image")
    (root / "d1" / "cat" / ".hidden.png").write_bytes(b"")
    (root / ".cache").mkdir()
    return root


def test_folder_reader_sorts_and_unions_classes(root):
    ds = read_folder(root)
    assert ds.domain_names == ["d1", "d2"]
    assert ds.class_names == ["cat", "dog", "emu"]
    assert ds.counts().tolist() == [[3, 2, 0], [1, 0, 1]]
    assert ds.paths == sorted(ds.paths)
    assert all(p.startswith(str(root.resolve())) for p in ds.paths)
    assert ds.samples["label"].dtype == np.int64 and ds.samples["domain"].dtype == np.int64


def test_folder_reader_domain_subset(root):
    ds = read_folder(root, domains=["d2"])
    assert ds.domain_names == ["d2"] and ds.class_names == ["cat", "emu"]


def test_missing_root_is_named(tmp_path):
    with pytest.raises(TallyError, match=str(tmp_path / "nope")):
        read_folder(tmp_path / "nope")


def test_unknown_domain_lists_known_ones(root):
    with pytest.raises(TallyError, match=r"unknown domain 'd9'.*known domains: d1, d2"):
        read_folder(root, domains=["d9"])


def test_folder_without_images(tmp_path):
    (tmp_path / "d" / "c").mkdir(parents=True)
    with pytest.raises(TallyError, match="no images"):
        read_folder(tmp_path)


@pytest.mark.parametrize("mode,ext", [("RGB", ".png"), ("L", ".png"), ("RGBA", ".png"), ("P", ".png"),
                                      ("RGB", ".jpg"), ("RGB", ".bmp"), ("RGB", ".webp"), ("I;16", ".png"),
                                      ("RGB", ".tiff")])
def test_read_image_always_uint8_rgb(tmp_path, mode, ext):
    rgb = np.zeros((6, 10, 3), dtype=np.uint8)
    rgb[:, :5] = (200, 100, 50)
    img = Image.fromarray(rgb).convert(mode) if mode != "I;16" else Image.fromarray(
        rgb[..., 0].astype(np.uint16) * 257)
    path = tmp_path / f"img{ext}"
    img.save(path)
    out = read_image(str(path))
    assert out.dtype == torch.uint8 and out.shape == (3, 6, 10)
    if mode == "RGB" and ext in (".png", ".bmp", ".tiff"):
        assert out[:, 0, 0].tolist() == [200, 100, 50] and out[:, 0, 9].tolist() == [0, 0, 0]


def test_unreadable_image_names_path(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(TallyError, match="broken.jpg"):
        read_image(str(bad))
    with pytest.raises(TallyError, match="missing.png"):
        read_image(str(tmp_path / "missing.png"))


def test_counts_subset_and_fingerprint(root):
    ds = read_folder(root)
    sub = ds.subset(ds.labels == 0)
    assert sub.class_names == ds.class_names and sub.domain_names == ds.domain_names
    assert sub.counts().tolist() == [[3, 0, 0], [1, 0, 0]]
    assert len(ds.subset([0, 2])) == 2
    assert sub.fingerprint() != ds.fingerprint()
    assert ds.subset(np.arange(len(ds))).fingerprint() == ds.fingerprint()


def test_load_image_decodes_sample(tmp_path):
    root = make_folder_dataset(tmp_path / "x", ("a", "b"), ("c",), per_pair=2, size=4)
    ds = read_folder(root)
    img = ds.load_image(3)  # domain b (index 1), class c, image 1
    assert img[:, 0, 0].tolist() == [50, 10, 1]


def test_out_of_range_labels_rejected():
    with pytest.raises(TallyError, match="label out of range"):
        MultiDomainDataset(make_samples(["/x.png"], [2], [0]), ["a", "b"], ["d"])


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("L", (3000, 2000)).save(big)  # small file, 6 M pixels declared
    monkeypatch.setenv("TALLY_MAX_PIXELS", "5000000")
    with pytest.raises(TallyError, match=r"big.png: image is 3000x2000 = 6000000 pixels; the limit is 5000000 \(TALLY_MAX_PIXELS"):
        read_image(str(big))
    monkeypatch.setenv("TALLY_MAX_PIXELS", "7000000")
    assert tuple(read_image(str(big)).shape) == (3, 2000, 3000)


def test_empty_class_folders_and_tiny_domains_are_stated(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", ("a", "b"), ("x", "y"), per_pair=6)
    (root / "a" / "z").mkdir()
    for f in (root / "b" / "y").iterdir():
        f.unlink()
    ds = read_folder(root)
    assert "warning: class folder a/z holds no images" in ds.notes
    assert any(n.startswith("warning: domain b has only 6 images") for n in ds.notes)
