"""Write a folder of small files all at once: build a hidden temporary sibling, then rename it in.

Readers (and concurrent writers such as parallel Ray workers) never see a half-written folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tally.errors import TallyError


def make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders; give the renamed result the usual 0755 so others can read it."""
    os.chmod(folder, 0o755)


def write_folder_atomically(out: Path, files: dict[str, str]) -> Path:
    """Replace out by a folder holding files; an existing out must be empty or hold a manifest.json."""
    out = out.expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise TallyError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not (out / "manifest.json").is_file():
            raise TallyError(f"{out}: folder is not empty and holds no split manifest; refusing to replace it")
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
