"""Decode a dataset once into a uint8 (N, 3, S, S) tensor: training then only indexes tensors.

Decoding and resizing are the usual bottleneck; doing them once (optionally in DataLoader worker
processes) and keeping the result, in memory or in an on-disk cache, takes them off the hot path.
A search decodes each bank once per cluster before its trials start (tally.search.banks) and its
trials memory-map it: resident memory then does not grow with the dataset.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tally.data.atomic import make_readable
from tally.data.dataset import MultiDomainDataset, read_image
from tally.errors import TallyError

BANK_FORMAT = "tally-bank-v1"


@dataclass
class ImageBank:
    """Images uint8 (N, 3, S, S), labels int64 (N,), domains int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    domains: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])


class _Resized(Dataset):
    """Decode + resize one image: what each DataLoader worker does."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return resize_square(read_image(self.paths[i]), self.size)


def resize_square(img: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    if img.shape[-2:] == (size, size):
        return img
    return TF.resize(img, [size, size], antialias=True)


def decode_rows(out: np.ndarray, paths: list[str], size: int) -> None:
    """Decode + resize paths into out[i] (uint8 (n, 3, S, S), e.g. rows of a memory-mapped bank):
    one process, one image at a time, so memory stays at one image whatever the shard size."""
    for i, path in enumerate(paths):
        out[i] = resize_square(read_image(path), size).numpy()


def bank_bytes(n: int, size: int) -> int:
    return int(n) * 3 * int(size) * int(size)


def _decode_into(images: torch.Tensor, ds: MultiDomainDataset, size: int, workers: int,
                 batch_size: int) -> None:
    if not len(ds):
        return
    loader = DataLoader(_Resized(ds.paths, size), batch_size=batch_size, shuffle=False,
                        num_workers=workers, persistent_workers=False)
    pos = 0
    for batch in loader:
        images[pos: pos + len(batch)] = batch
        pos += len(batch)


def build_bank(ds: MultiDomainDataset, size: int, workers: int = 0, batch_size: int = 64) -> ImageBank:
    """Decode every image of ds once, resized to size x size; workers > 0 decodes in parallel."""
    images = torch.empty((len(ds), 3, size, size), dtype=torch.uint8)
    _decode_into(images, ds, size, workers, batch_size)
    return ImageBank(images, torch.from_numpy(ds.labels.copy()), torch.from_numpy(ds.domains.copy()))


def bank_key(ds: MultiDomainDataset, size: int) -> str:
    """What a cached bank must match: the sample list (paths, labels, domains, names) and the size."""
    return f"{ds.fingerprint()}-{int(size)}"


# On disk a bank is a folder of .npy files (images.npy memory-maps: banks larger than RAM work) plus
# key.txt; it is written to a temporary sibling and renamed in, so a reader never sees half a bank.
def _write_bank_folder(path: Path, key: str, fill) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fill(tmp)
        (tmp / "key.txt").write_text(f"{BANK_FORMAT}\n{key}\n", encoding="utf-8")
        make_readable(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except OSError:
        if (path / "key.txt").is_file():  # a concurrent writer got there first: same content
            shutil.rmtree(tmp, ignore_errors=True)
            return path
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_bank(path: str | Path, key: str, ds: MultiDomainDataset, size: int,
               decode: Callable[[Path], None]) -> Path:
    """Write a bank whose images another party decodes: images.npy is created at its full size in a
    temporary folder beside ``path``, ``decode(images_npy)`` fills it (any process that sees the folder
    may open it with np.load(mmap_mode="r+") and write its rows), then the folder is renamed in whole."""
    def fill(tmp: Path) -> None:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(ds), 3, size, size))
        del images  # header and size on disk; the decoders open it themselves
        decode(tmp / "images.npy")
        np.save(tmp / "labels.npy", ds.labels, allow_pickle=False)
        np.save(tmp / "domains.npy", ds.domains, allow_pickle=False)

    return _write_bank_folder(Path(path), key, fill)


def save_bank(bank: ImageBank, path: str | Path, key: str = "") -> Path:
    """Write bank as a folder of .npy arrays (loaded safely: no pickle) with its key."""
    def fill(tmp: Path) -> None:
        np.save(tmp / "images.npy", bank.images.contiguous().numpy(), allow_pickle=False)
        np.save(tmp / "labels.npy", bank.labels.numpy().astype(np.int64), allow_pickle=False)
        np.save(tmp / "domains.npy", bank.domains.numpy().astype(np.int64), allow_pickle=False)

    return _write_bank_folder(Path(path), key, fill)


def load_bank(path: str | Path, mmap: bool = True, key: str | None = None) -> ImageBank:
    """Load a saved bank (images memory-mapped copy-on-write by default); with ``key``, refuse a stale one."""
    path = Path(path).expanduser()
    try:
        lines = (path / "key.txt").read_text(encoding="utf-8").splitlines()
    except OSError:
        raise TallyError(f"image bank not found or incomplete: {path}") from None
    if not lines or lines[0] != BANK_FORMAT:
        raise TallyError(f"{path}: not a tally image bank")
    if key is not None and (lines[1:2] or [""])[0] != key:
        raise TallyError(f"{path}: image bank is stale (built for other images or another size)")
    try:
        images = np.load(path / "images.npy", mmap_mode="c" if mmap else None, allow_pickle=False)
        labels = np.load(path / "labels.npy", allow_pickle=False)
        domains = np.load(path / "domains.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise TallyError(f"cannot read image bank {path}: {e}") from None
    if images.ndim != 4 or images.dtype != np.uint8 or not len(images) == len(labels) == len(domains):
        raise TallyError(f"{path}: image bank arrays do not fit together")
    return ImageBank(torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(domains))


def default_cache_dir() -> Path:
    """Where `tally data cache` writes banks and training looks for them."""
    return Path(os.environ.get("TALLY_CACHE") or "~/.cache/tally").expanduser() / "banks"


# A search's trials look in the search's bank folder first (set in each Train worker, see
# tally.search.trial); `tally search --cache DIR` sets it for the driver too.
BANK_DIR_ENV = "TALLY_BANK_DIR"


def use_bank_dir(path: str | Path | None) -> None:
    """Make bank_for_training look in ``path`` (a search's shared bank folder) before the default cache."""
    if path:
        os.environ[BANK_DIR_ENV] = str(path)


def bank_dirs() -> list[Path]:
    """Where bank_for_training looks, in order: the search's bank folder, then the default cache."""
    first = os.environ.get(BANK_DIR_ENV)
    return [*([Path(first).expanduser()] if first else []), default_cache_dir()]


def bank_path(ds: MultiDomainDataset, size: int, cache_dir: str | Path) -> tuple[Path, str]:
    """(folder, key) of the bank of exactly these samples at this size under cache_dir."""
    key = bank_key(ds, size)
    return Path(cache_dir).expanduser() / f"bank-{key[:24]}-{int(size)}", key


def find_cached_bank(ds: MultiDomainDataset, size: int, cache_dir: str | Path | None = None,
                     mmap: bool = True) -> ImageBank | None:
    """The cached bank of exactly these samples at this size, or None (a stale one never matches)."""
    path, key = bank_path(ds, size, cache_dir or default_cache_dir())
    if not (path / "key.txt").is_file():
        return None
    try:
        return load_bank(path, mmap=mmap, key=key)
    except TallyError:
        return None


def memory_limit() -> int:
    """Bytes of decoded images a run may hold in RAM (TALLY_BANK_MEMORY_MB; default a quarter of RAM:
    several trials share a node). Larger banks are decoded to disk instead (spill_bank)."""
    value = os.environ.get("TALLY_BANK_MEMORY_MB", "")
    if value.isdigit():
        return int(value) * 2**20
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def bank_for_training(ds: MultiDomainDataset, size: int, workers: int = 0) -> ImageBank:
    """The bank a run trains on: a cached one (a search's pre-flight or `tally data cache` made it;
    memory-mapped), else decoded now: into memory when it fits memory_limit(), else to disk."""
    for cache_dir in bank_dirs():
        found = find_cached_bank(ds, size, cache_dir)
        if found is not None:
            return found
    if bank_bytes(len(ds), size) <= memory_limit():
        return build_bank(ds, size, workers=workers)
    return spill_bank(ds, size, workers=workers)


def spill_bank(ds: MultiDomainDataset, size: int, workers: int = 0, batch_size: int = 64,
               directory: str | Path | None = None) -> ImageBank:
    """Where no bank can be cached (a one-off run too large for RAM): DataLoader workers decode batches
    straight into a memory-mapped temporary file (TMPDIR, or ``directory``), so resident memory stays
    bounded. The file is unlinked at once: the mapping keeps it alive and nothing is left behind."""
    if not len(ds):
        return build_bank(ds, size)
    fd, name = tempfile.mkstemp(prefix="tally-bank-", suffix=".npy", dir=directory)
    os.close(fd)
    try:
        images = np.lib.format.open_memmap(name, mode="w+", dtype=np.uint8, shape=(len(ds), 3, size, size))
    except OSError as e:
        raise TallyError(f"cannot write a temporary image bank of {bank_bytes(len(ds), size) / 2**30:.1f} GiB "
                         f"in {Path(name).parent} ({e}); set TMPDIR or run `tally data cache` first") from None
    finally:
        os.unlink(name)
    pixels = torch.from_numpy(images)
    _decode_into(pixels, ds, size, workers, batch_size)
    return ImageBank(pixels, torch.from_numpy(ds.labels.copy()), torch.from_numpy(ds.domains.copy()))


def cached_bank(ds: MultiDomainDataset, size: int, cache_dir: str | Path, workers: int = 0,
                mmap: bool = True, batch_size: int = 64) -> ImageBank:
    """build_bank through an on-disk cache keyed by the sample list and size (stale caches never match).

    A missing entry is decoded straight into a memory-mapped file, so the bank never has to fit in RAM.
    """
    path, key = bank_path(ds, size, cache_dir)
    found = find_cached_bank(ds, size, cache_dir, mmap=mmap)
    if found is not None:
        return found

    def fill(tmp: Path) -> None:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(ds), 3, size, size))
        _decode_into(torch.from_numpy(images), ds, size, workers, batch_size)
        images.flush()
        del images
        np.save(tmp / "labels.npy", ds.labels, allow_pickle=False)
        np.save(tmp / "domains.npy", ds.domains, allow_pickle=False)

    _write_bank_folder(path, key, fill)
    return load_bank(path, mmap=mmap, key=key)
