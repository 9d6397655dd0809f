"""Write a folder of small files all at once: build a hidden temporary sibling, then rename it in.

Readers (and concurrent writers such as parallel Ray workers) never see a half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tally.errors import TallyError


def make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders; give the renamed result the usual 0755 so others can read it."""
    os.chmod(folder, 0o755)


SPLITS_FORMAT = "tally-splits-v1"


def _check_split_folder(out: Path) -> None:
    """Refuse to replace anything but a folder of split lists: a manifest.json of SPLITS_FORMAT beside
    .txt lists only (a bundle also holds a manifest.json, and must never be deleted by `tally splits`)."""
    from tally import files

    try:
        manifest = json.loads(files.read_bounded(out / "manifest.json", 16 << 20, no_symlink=True).decode("utf-8"))
    except FileNotFoundError:
        raise TallyError(f"{out}: folder is not empty and holds no split manifest; refusing to replace it") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        manifest = None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != SPLITS_FORMAT:
        raise TallyError(f"{out}: its manifest.json is not a split manifest (format {found!r}, expected "
                         f"{SPLITS_FORMAT!r}); refusing to replace the folder")
    other = sorted(p.name for p in out.iterdir() if p.name != "manifest.json" and p.suffix != ".txt")
    if other:
        raise TallyError(f"{out}: holds files other than split lists (first: {other[0]}); refusing to replace it")


def write_folder_atomically(out: Path, files: dict[str, str]) -> Path:
    """Replace out by a folder holding files; an existing out must be empty or hold a manifest.json."""
    out = out.expanduser().absolute()
    if out.is_symlink() or out.exists():
        if out.is_symlink() or not out.is_dir():
            raise TallyError(f"{out}: exists and is not a folder")
        if any(out.iterdir()):
            _check_split_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, text in files.items():
            target = tmp / name
            if target.parent != tmp:
                raise TallyError(f"refusing to write {name!r} outside {out}")
            target.write_text(text, encoding="utf-8")
        make_readable(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
