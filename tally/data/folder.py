"""Reader for the DomainBed-style folder layout ROOT/<domain>/<class>/<image>.

Names are sorted, so indices never depend on the order the filesystem lists entries in.
"""

from __future__ import annotations

import os
from pathlib import Path

from tally.data.dataset import MultiDomainDataset, make_samples
from tally.errors import TallyError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm",
                              ".pgm"})


TINY_DOMAIN = 10  # fewer images than this in a domain gets a warning in the split report


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _images_under(path: Path) -> list[str]:
    """Image files below one class folder (nested folders allowed), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames
                     if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    return sorted(found)


def list_domains(root: str | Path) -> list[str]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TallyError(f"dataset root not found: {root}")
    return _subdirs(root)


def read_folder(root: str | Path, domains: list[str] | None = None) -> MultiDomainDataset:
    """Read ROOT/<domain>/<class>/<image>; ``domains`` restricts (and names) the domain index space.

    Classes are the sorted union of class folders over the chosen domains, so a class missing
    from one domain is still in the index space (as an empty pair).
    """
    root = Path(root).expanduser().resolve()
    known = list_domains(root)
    if not known:
        raise TallyError(f"no domain folders under {root} (expected ROOT/<domain>/<class>/<image>)")
    if domains is not None:
        unknown = [d for d in domains if d not in known]
        if unknown:
            raise TallyError(f"unknown domain {unknown[0]!r} under {root}; known domains: {', '.join(known)}")
        chosen = [d for d in known if d in set(domains)]
    else:
        chosen = known
    class_dirs = {d: _subdirs(root / d) for d in chosen}
    class_names = sorted({c for names in class_dirs.values() for c in names})
    class_index = {c: i for i, c in enumerate(class_names)}
    paths, labels, doms, notes = [], [], [], []
    for d_idx, d in enumerate(chosen):
        start = len(paths)
        for c in class_dirs[d]:
            files = _images_under(root / d / c)
            if not files:
                notes.append(f"warning: class folder {d}/{c} holds no images")
            paths.extend(files)
            labels.extend([class_index[c]] * len(files))
            doms.extend([d_idx] * len(files))
        if len(paths) - start < TINY_DOMAIN:
            notes.append(f"warning: domain {d} has only {len(paths) - start} images: its pairs can hardly "
                         "be both trained and scored")
    if not paths:
        raise TallyError(f"no images under {root} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return MultiDomainDataset(make_samples(paths, labels, doms), class_names, chosen, notes)
