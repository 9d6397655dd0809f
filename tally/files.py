"""Files that cannot hurt: names read from files, bounded reads, writes that never follow a link.

One home for each rule (ARCHITECTURE.md contract 9), called by the store, the bundles, the data
readers and the checkpoints:

- ``safe_component``: a name read from a file (a trial id, a provenance's trial) used in a path is a
  single, bounded path component, or a one-line error; such a name never chooses where we write.
- ``read_bounded``: a file read whole within a size cap (and, where asked, refused if it is a symlink),
  so one huge or foreign file costs a bounded amount of memory.
- ``check_depth``: parsed JSON/YAML nested deeper than any file we write is refused (deep nesting
  breaks every recursive consumer: pandas, Streamlit, our own flatten).
- ``write_atomic`` / ``append_line`` / ``open_lock`` / ``touch``: writes never follow a symlink at
  the target (a ``.lock`` linked to ~/.bashrc must not truncate it) and create files with the mode
  open() would give (0o666 minus the umask), so a team sharing a store can read each other's results.
- ``stops_deferred``: Ctrl-C or SIGTERM during an atomic write takes effect when the write is done.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tally.errors import TallyError

MAX_COMPONENT = 200      # characters in a name used as a path component (file systems allow 255 bytes)
MAX_STORE_FILE = 4 << 20  # a store's JSON/YAML file (status, config, spec, metrics): KBs in practice
MAX_DEPTH = 32            # nesting of a parsed JSON/YAML file: ours nest 5 deep at most
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


# ---------------------------------------------------------------- names
def safe_component(name: object, what: str) -> str:
    """``name`` if it is one safe path component, else a one-line TallyError naming ``what``.

    Safe: a non-empty string of at most MAX_COMPONENT characters, no '/', '\\', NUL or control
    characters, not '.' or '..', not hidden (a leading '.' is the store's own: locks, temporaries).
    """
    ok = (isinstance(name, str) and 0 < len(name) <= MAX_COMPONENT and not name.startswith(".")
          and not any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name))
    if not ok:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80]) + "..."
        raise TallyError(f"{what}: {shown} is not a safe name (expected one path component: no '/', '\\', "
                         f"'..', leading '.' or control characters, at most {MAX_COMPONENT} characters)")
    return name


# ---------------------------------------------------------------- reading
def read_bounded(path: str | Path, limit: int = MAX_STORE_FILE, *, no_symlink: bool = False) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, read once.

    A larger file, a non-regular file or (with ``no_symlink``) a symlink is a one-line TallyError;
    a missing file raises FileNotFoundError as open() does. Size is checked on what is read, not on a
    stat that could change before the read.
    """
    path = Path(path)
    if no_symlink and path.is_symlink():
        raise TallyError(f"{path}: is a symbolic link; refusing to read through it")
    try:
        fd = os.open(path, os.O_RDONLY | _CLOEXEC | (_NOFOLLOW if no_symlink else 0))
    except OSError as e:
        if no_symlink and e.errno == 40:  # ELOOP: a link swapped in after the check above
            raise TallyError(f"{path}: is a symbolic link; refusing to read through it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TallyError(f"{path}: not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TallyError(f"{path}: larger than {limit} bytes; refusing to read it")
    return data


def check_depth(value: object, where: str | Path, limit: int = MAX_DEPTH) -> object:
    """``value`` if its lists and mappings nest at most ``limit`` deep, else a one-line TallyError."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                raise TallyError(f"{where}: nested deeper than {limit} levels; refusing to read it")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


# ---------------------------------------------------------------- writing
def _refuse_link(path: Path) -> TallyError:
    return TallyError(f"{path}: is a symbolic link; refusing to write through it")


def _create(path: Path, flags: int) -> int:
    """os.open with mode 0o666: the kernel applies the umask, as open() does; never through a link."""
    try:
        return os.open(path, flags | _NOFOLLOW | _CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == 40:  # ELOOP: the last component is a symlink
            raise _refuse_link(path) from None
        raise


def write_atomic(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` by ``data`` (bytes, or a function writing to a binary file) all at once.

    A temporary sibling (created exclusively, umask honoured) is written, then renamed onto ``path``:
    a reader sees the old file or the new one, and a symlink at ``path`` is replaced, never followed.
    """
    with stops_deferred():
        _write_atomic(Path(path), data)


def _write_atomic(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = _create(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def stops_deferred():
    """SIGINT and SIGTERM arriving while the body runs reach their handlers right after it, not inside it.

    A KeyboardInterrupt raised inside torch.save's zip writer surfaced as a RuntimeError from its
    __exit__ ("unexpected pos"), hiding the stop: a run stopped by SIGTERM while saving its checkpoint
    exited 1, recorded "failed". Signals reach Python only in the main thread: elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not None:  # None: a handler set outside Python, left alone
            previous[signum] = signal.signal(signum, lambda received, frame: caught.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)  # its own handler now: KeyboardInterrupt, or the default action


def append_line(path: str | Path, line: str) -> None:
    """Append one line (a crash mid-line leaves a line readers skip); a symlink is refused."""
    fd = _create(Path(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with os.fdopen(fd, "ab") as f:
        f.write(line.encode())


def open_lock(path: str | Path) -> int:
    """A read-write descriptor of a lock file, created if missing; a symlink is refused."""
    return _create(Path(path), os.O_RDWR | os.O_CREAT)


def touch(path: str | Path) -> None:
    """Create ``path`` or set its times to now (heartbeats), never through a symlink."""
    fd = _create(Path(path), os.O_WRONLY | os.O_CREAT)
    try:
        os.utime(fd)
    finally:
        os.close(fd)
