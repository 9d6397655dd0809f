"""Image bank: decode once, resize, stack; on-disk cache keyed by the file list and size."""

import pytest
import torch

from tally.data.bank import ImageBank, bank_key, build_bank, cached_bank, load_bank, save_bank
from tally.data.folder import read_folder
from tally.data.synthetic import make_folder_dataset
from tally.errors import TallyError


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = make_folder_dataset(tmp_path_factory.mktemp("bank") / "d", ("a", "b"), ("x", "y", "z"),
                               per_pair=3, size=10)
    return read_folder(root)


def test_build_bank_shapes_and_content(ds):
    bank = build_bank(ds, 6)
    assert isinstance(bank, ImageBank) and len(bank) == len(ds) == 18
    assert bank.images.shape == (18, 3, 6, 6) and bank.images.dtype == torch.uint8
    assert bank.labels.dtype == torch.int64 and bank.labels.tolist() == ds.labels.tolist()
    assert bank.domains.tolist() == ds.domains.tolist()
    # flat colours survive the antialiased resize
    assert bank.images[4, :, 3, 3].tolist() == ds.load_image(4)[:, 0, 0].tolist()


def test_workers_give_the_same_bank(ds):
    assert torch.equal(build_bank(ds, 6, workers=1).images, build_bank(ds, 6).images)


def test_empty_dataset(ds):
    bank = build_bank(ds.subset([]), 8)
    assert bank.images.shape == (0, 3, 8, 8) and len(bank) == 0


def test_round_trip_and_stale_key(ds, tmp_path):
    bank = build_bank(ds, 6)
    key = bank_key(ds, 6)
    path = save_bank(bank, tmp_path / "b", key=key)
    for mmap in (True, False):
        back = load_bank(path, mmap=mmap, key=key)
        assert torch.equal(back.images, bank.images) and torch.equal(back.labels, bank.labels)
        assert torch.equal(back.domains, bank.domains)
    assert bank_key(ds, 8) != key and bank_key(ds.subset(range(5)), 6) != key
    with pytest.raises(TallyError, match="stale"):
        load_bank(path, key=bank_key(ds, 8))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "key.txt").write_text("something else\n")
    with pytest.raises(TallyError, match="junk"):
        load_bank(tmp_path / "junk")
    with pytest.raises(TallyError, match="missing"):
        load_bank(tmp_path / "missing")


def test_cached_bank_reuses_and_rebuilds(ds, tmp_path):
    first = cached_bank(ds, 6, tmp_path)
    assert torch.equal(first.images, build_bank(ds, 6).images)
    files = list(tmp_path.glob("bank-*/images.npy"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = cached_bank(ds, 6, tmp_path)
    assert torch.equal(again.images, first.images) and files[0].stat().st_mtime_ns == stamp
    again.images[0] = 0  # copy-on-write: the cache on disk is never modified through a loaded bank
    assert torch.equal(cached_bank(ds, 6, tmp_path).images, first.images)
    cached_bank(ds.subset(range(4)), 6, tmp_path)  # other images: a new entry, never the old one
    cached_bank(ds, 4, tmp_path)  # other size
    assert len(list(tmp_path.glob("bank-*"))) == 3
    assert not list(tmp_path.glob(".*")), "temporary folders left behind"
