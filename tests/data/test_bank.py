"""Image bank: decode once, resize, stack; on-disk cache keyed by the file list and size."""

from pathlib import Path

import pytest
import torch

from tally.data.bank import ImageBank, bank_key, build_bank, cached_bank, load_bank, save_bank
from tally.data.folder import read_folder
from tally.data.synthetic import make_folder_dataset
from tally.errors import TallyError


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file a tensor's memory is mapped from (per /proc/self/maps), or None for anonymous memory."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, stop = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < stop:
            return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


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


def test_write_bank_lets_another_party_decode_rows(ds, tmp_path):
    import numpy as np

    from tally.data.bank import bank_path, decode_rows, write_bank

    path, key = bank_path(ds, 6, tmp_path)
    seen = {}

    def decode(images_npy):
        seen["partial"] = not (path / "key.txt").exists()  # nobody sees the bank before it is whole
        images = np.load(images_npy, mmap_mode="r+")
        decode_rows(images[:10], ds.paths[:10], 6)  # two "tasks", each its own rows
        decode_rows(images[10:], ds.paths[10:], 6)
        images.flush()

    write_bank(path, key, ds, 6, decode)
    assert seen["partial"]
    back = load_bank(path, key=key)
    assert torch.equal(back.images, build_bank(ds, 6).images) and back.labels.tolist() == ds.labels.tolist()
    assert not list(tmp_path.glob(".*")), "temporary folders left behind"


def test_write_bank_leaves_nothing_when_decoding_fails(ds, tmp_path):
    from tally.data.bank import bank_path, write_bank

    path, key = bank_path(ds, 6, tmp_path)

    def decode(images_npy):
        raise TallyError("cannot read image x.png")

    with pytest.raises(TallyError, match="x.png"):
        write_bank(path, key, ds, 6, decode)
    assert list(tmp_path.iterdir()) == []


def test_training_looks_in_the_search_folder_first_then_decodes(ds, tmp_path, monkeypatch):
    from tally.data.bank import bank_dirs, bank_for_training, use_bank_dir

    monkeypatch.delenv("TALLY_BANK_DIR", raising=False)
    monkeypatch.setenv("TALLY_CACHE", str(tmp_path / "default"))
    assert bank_dirs() == [tmp_path / "default" / "banks"]
    decoded = bank_for_training(ds, 6)
    assert mapped_file(decoded.images) is None  # nothing cached: decoded into memory
    use_bank_dir(tmp_path / "search")
    assert bank_dirs()[0] == tmp_path / "search"
    cached_bank(ds, 6, tmp_path / "search")
    found = bank_for_training(ds, 6)
    assert torch.equal(found.images, decoded.images)
    assert Path(mapped_file(found.images)).is_relative_to(tmp_path / "search")  # memory-mapped from there


def test_a_bank_larger_than_the_memory_limit_is_decoded_to_disk(ds, tmp_path, monkeypatch):
    from tally.data.bank import bank_for_training

    monkeypatch.delenv("TALLY_BANK_DIR", raising=False)
    monkeypatch.setenv("TALLY_CACHE", str(tmp_path / "default"))
    monkeypatch.setenv("TALLY_BANK_MEMORY_MB", "0")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    spilled = bank_for_training(ds, 6, workers=1)
    assert mapped_file(spilled.images).endswith("(deleted)")  # a memory-mapped file, already unlinked
    assert torch.equal(spilled.images, build_bank(ds, 6).images)
    assert spilled.labels.tolist() == ds.labels.tolist()
    assert list((tmp_path / "tmp").iterdir()) == []  # unlinked at once: nothing left behind
    assert not (tmp_path / "default").exists()  # and nothing cached
