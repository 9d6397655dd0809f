"""Results stores on object storage: s3://, gs:// and any URI that pyarrow.fs resolves.

A store in a bucket is used through local *staging folders*: every process works on plain local files
exactly as with a POSIX store (tally.results: atomic writes, tolerant readers), and copies them to or
from the bucket. A staging folder remembers its bucket prefix (a ``.remote`` file), so code that holds
only the local folder can still ``pull`` and ``push`` it; for an ordinary folder both are no-ops, so
the POSIX behaviour is untouched.

What object storage guarantees, and what it does not (platform/README.md says the same for users):

- One object is written all or nothing: a PUT (and a multipart upload, at its completion) is the
  publish step, so a reader sees the old object or the new one, never half. A temporary key plus a
  server-side copy would publish no more atomically (the copy is itself one PUT) and would leak
  temporary keys when a writer dies, so each file is uploaded straight to its key.
- There is no rename and nothing spans two objects: a reader may see a run's new epochs.jsonl next to
  its old status.json. Uploads therefore send ``status.json`` last, so a status never points at files
  that are not there yet (a "done" run has its eval tables and metrics), and a run's resume point
  (checkpoints/last.pt) after its epoch records (COMMIT_ORDER).
- There are no POSIX locks. The experiment lock is a ``.lock`` object: on S3 created with a conditional
  write (If-None-Match: *), which only one writer can win, and renewed while the search runs; a holder
  that stopped renewing for LEASE_S (or whose pid is dead on this host) is taken over with If-Match on
  its ETag. Where conditional writes are unavailable (another store, or no boto3) it is a documented
  best-effort lease: write, wait, read back, and refuse if someone else's token is there.
- SQLite (the Optuna study) cannot live in a bucket: it stays in the driver's staging folder and is
  uploaded after each trial event; a resumed search downloads it first.

Endpoint and credentials come from the usual environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION; GOOGLE_APPLICATION_CREDENTIALS for gs://), which pyarrow,
Ray and boto3 all read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from tally import files
from tally.errors import TallyError
from tally.results import store as results

STAGING_ENV = "TALLY_STAGING"  # where staging folders live (default $TALLY_CACHE/staging): node-local
REMOTE_FILE = ".remote"        # in a staging folder: the bucket prefix it mirrors
SYNC_STATE = ".sync-state.json"  # in a staging folder: what was last copied, to copy only changes
# Uploaded last, in this order, after a folder's other files: the order training commits them. A kill
# mid-upload then leaves a consistent run: last.pt (the resume point) is never newer than the epoch
# records (a resumed run re-does and re-records the epochs after it), best.pt is never older than what
# last.pt says is best, and status.json never announces files that are not there yet.
COMMIT_ORDER = ("best.pt", "last.pt", "status.json")
READ_SKIP = ("checkpoints", "ray")  # readers never need Ray's state or the weights (export fetches its own)
SETTLE_S = 5.0    # an object changed this close to our last copy of it is copied again (1 s timestamps)
LEASE_S = 120.0   # a lock not renewed for this long is taken over
RENEW_S = 20.0    # how often a holder renews it


# ---------------------------------------------------------------- locations
def is_remote(location: str | os.PathLike | None) -> bool:
    """True for a URI of object storage (s3://bucket/prefix, gs://...); False for a path or file://.

    Every store location passes here first, so a URI carrying credentials is refused here
    (``check_no_credentials``), before it can reach a folder name, a file, the console or the dashboard.
    """
    if location is None or isinstance(location, os.PathLike):
        return False
    scheme = urlsplit(str(location)).scheme
    remote = "://" in str(location) and len(scheme) > 1 and scheme != "file"
    if remote:
        check_no_credentials(str(location))
    return remote


def has_credentials(uri: str) -> bool:
    """True when a URI holds a user or password (scheme://KEY:SECRET@bucket/...)."""
    return "@" in urlsplit(uri).netloc


def check_no_credentials(uri: str) -> str:
    """``uri``, or a one-line error (the secret not repeated) when it carries credentials."""
    if has_credentials(uri):
        parts = urlsplit(uri)
        shown = f"{parts.scheme}://***@{parts.netloc.rsplit('@', 1)[1]}{parts.path}"
        raise TallyError(f"{shown}: credentials in a store URI are refused (they would be copied into folder "
                         "names, .remote files, logs and the dashboard); use the environment "
                         "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) or a "
                         "credentials file")
    return uri


def join(uri: str, *names: str) -> str:
    """``uri/name/...``; a name may never climb out of the prefix (no '..', no empty parts)."""
    for name in names:
        parts = str(name).split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise TallyError(f"{name!r}: not a valid name inside {uri} (empty part, '.' or '..')")
    return "/".join([uri.rstrip("/"), *(str(n) for n in names)])


@functools.lru_cache(maxsize=16)
def _filesystem_of(root: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(root)[0]


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) of a URI; one filesystem per bucket, reused."""
    parts = urlsplit(check_no_credentials(uri))
    if not parts.netloc:
        raise TallyError(f"{uri}: expected scheme://bucket/prefix")
    try:
        fs = _filesystem_of(f"{parts.scheme}://{parts.netloc}")
    except Exception as e:  # pyarrow: ArrowInvalid for unknown schemes, OSError for bad credentials
        raise TallyError(f"{uri}: {_first_line(e)}") from None
    return fs, f"{parts.netloc}{parts.path}".rstrip("/")


def staging_root() -> Path:
    env = os.environ.get(STAGING_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("TALLY_CACHE") or "~/.cache/tally").expanduser() / "staging"


def stage(uri: str, role: str) -> Path:
    """The local staging folder of ``uri`` for one role (driver, trial, rank0, read, ...).

    Roles keep apart the processes of one host that copy the same prefix: a trial's worker and the
    driver must never download over each other's unsent writes.
    """
    parts = urlsplit(check_no_credentials(uri))
    if not parts.netloc:
        raise TallyError(f"{uri}: expected scheme://bucket/prefix")
    names = [parts.scheme, parts.netloc, *(p for p in parts.path.split("/") if p)]
    if any(n in (".", "..") for n in names):
        raise TallyError(f"{uri}: '.' and '..' are not allowed in a store URI")
    local = staging_root() / role / Path(*names)
    local.mkdir(parents=True, exist_ok=True)
    if remote_of(local) != uri:
        results.write_text(local / REMOTE_FILE, uri + "\n")
    return local


def remote_of(local: str | Path) -> str | None:
    """The bucket prefix a staging folder mirrors; None for any other folder.

    Only a folder ``stage`` made counts: it lies at staging_root()/<role>/<scheme>/<bucket>/<prefix...>
    and its ``.remote`` (a regular file, not a link) names exactly that URI. A stray ``.remote`` anywhere
    else (copied with a folder, or planted) must never make a local store a mirror: a pull deletes the
    local files the bucket lacks.
    """
    local = Path(local)
    path = local / REMOTE_FILE
    try:
        text = files.read_bounded(path, 4096, no_symlink=True).decode("utf-8").strip()
    except (OSError, TallyError, UnicodeDecodeError):
        return None
    if has_credentials(text) or not is_remote(text):
        return None
    parts = urlsplit(text)
    names = [parts.scheme, parts.netloc, *(p for p in parts.path.split("/") if p)]
    try:
        rel = local.resolve().relative_to(staging_root().resolve()).parts
    except (OSError, ValueError):
        return None
    return text if list(rel[1:]) == names else None


def experiment_dir(location: str | Path, name: str) -> Path:
    """Where the search driver works on experiment ``name``: the folder itself for a POSIX store, the
    driver's staging folder for a bucket (pull it before reading, push it after writing)."""
    if not is_remote(location):
        return results.experiment_dir(location, name)
    return stage(join(str(location), name), "driver")


def ray_path(exp_dir: Path) -> str:
    """Ray's storage_path for an experiment: the bucket itself for a bucket store (Ray Tune and Train
    write their own state there through pyarrow), else <experiment>/ray."""
    uri = remote_of(exp_dir)
    return join(uri, "ray") if uri else str(Path(exp_dir) / "ray")


def display(local: Path) -> str:
    """How to name a folder to a user: its bucket URI when it is a staging folder."""
    return remote_of(local) or str(local)


# ---------------------------------------------------------------- copying
def _listing(fs, base: str) -> dict[str, tuple[int, int]]:
    """rel path -> (size, mtime ns) of every object under ``base``."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            mtime = info.mtime_ns if info.mtime_ns is not None else 0
            out[info.path[len(base):].lstrip("/")] = (info.size, mtime)
    return out


def _skipped(rel: str, skip: Iterable[str]) -> bool:
    parts = rel.split("/")
    hidden = any(p.startswith(".") for p in parts[:-1]) or (parts[-1].startswith(".") and parts[-1] != results.HEARTBEAT)
    return hidden or any(p in skip for p in parts[:-1])


def _safe(rel: str) -> bool:
    return bool(rel) and not any(p in ("", ".", "..") for p in rel.split("/"))


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _read_state(local: Path) -> dict:
    state = results.read_json(local / SYNC_STATE)
    return state if isinstance(state, dict) else {}


def _under(rel: str, under: str) -> bool:
    return not under or rel == under or rel.startswith(under + "/")


def pull(local: Path, under: str | os.PathLike = "", skip: Iterable[str] = READ_SKIP) -> list[str]:
    """Make a staging folder (or its subfolder ``under``) equal to the bucket; returns what changed.

    The bucket wins: a local file that differs is replaced (written to a temporary file and renamed,
    so local readers never see half a file) and a local file the bucket no longer has is removed.
    Files unchanged on both sides since the last copy are not transferred. Folders named in ``skip``
    and dot-files are left alone. A no-op for an ordinary folder.
    """
    local = Path(local)
    uri = remote_of(local)
    if uri is None:
        return []
    under = "" if str(under) in ("", ".") else Path(under).as_posix()
    skip = tuple(skip)
    fs, base = filesystem(uri)
    with _errors(uri):
        remote = {rel: info for rel, info in _listing(fs, join(base, under) if under else base).items()}
    remote = {(f"{under}/{rel}" if under else rel): info for rel, info in remote.items()}
    state = _read_state(local)
    changed = []
    for rel, (size, mtime) in sorted(remote.items()):
        if _skipped(rel, skip) or not _safe(rel):
            continue  # a key with '..' or an empty part is not ours: never written outside the folder
        known = state.get(rel, {})
        path = local / rel
        settled = known.get("copied_at", 0) - mtime / 1e9 > SETTLE_S
        if known.get("remote") == [size, mtime] and known.get("local") == _stat(path) and settled:
            continue
        try:
            with _errors(uri):
                _fetch(fs, join(base, rel), path)
        except FileNotFoundError:  # deleted since the listing
            continue
        if path.name == results.HEARTBEAT:  # its meaning is its time: the owner's last sign of life
            os.utime(path, ns=(mtime, mtime))
        state[rel] = {"remote": [size, mtime], "local": _stat(path), "copied_at": time.time()}
        changed.append(rel)
    scope = local / under if under else local
    for path in sorted(scope.rglob("*")) if scope.is_dir() else []:
        rel = path.relative_to(local).as_posix()
        if path.is_file() and not _skipped(rel, skip) and rel not in remote:
            path.unlink(missing_ok=True)
            state.pop(rel, None)
            changed.append(rel)
    results.write_json(local / SYNC_STATE, state)
    return changed


def push(local: Path, skip: Iterable[str] = ()) -> list[str]:
    """Upload what changed in a staging folder since the last copy, in COMMIT_ORDER; returns what was
    sent. Each file is one object write: the publish step (see the module doc).
    Nothing is deleted in the bucket. A no-op for an ordinary folder."""
    local = Path(local)
    uri = remote_of(local)
    if uri is None:
        return []
    fs, base = filesystem(uri)
    state = _read_state(local)
    todo = []
    for path in local.rglob("*"):
        rel = path.relative_to(local).as_posix()
        if not path.is_file() or _skipped(rel, skip):
            continue
        stat = _stat(path)
        if stat is not None and state.get(rel, {}).get("local") != stat:
            rank = COMMIT_ORDER.index(path.name) + 1 if path.name in COMMIT_ORDER else 0
            todo.append((rank, rel, stat))
    sent = []
    for _, rel, stat in sorted(todo):
        try:
            with _errors(uri):
                _send(fs, local / rel, join(base, rel))
        except FileNotFoundError:  # removed since the walk
            continue
        state[rel] = {"local": stat}
        sent.append(rel)
    if sent:  # what the bucket now holds, so a pull does not fetch our own uploads back
        with _errors(uri):
            infos = fs.get_file_info([join(base, rel) for rel in sent])
        for rel, info in zip(sent, infos, strict=True):
            state[rel].update(remote=[info.size, info.mtime_ns or 0], copied_at=time.time())
    results.write_json(local / SYNC_STATE, state)
    return sent


def _fetch(fs, src: str, dst: Path) -> None:
    """Download to a temporary file beside ``dst``, then rename: local readers never see half a file
    (tally.files.write_atomic: umask honoured, a link at ``dst`` replaced, never followed)."""
    def download(out) -> None:
        with fs.open_input_stream(src) as f:
            while block := f.read(1 << 22):
                out.write(block)

    files.write_atomic(dst, download)


def _send(fs, src: Path, dst: str) -> None:
    """One object write. Why one C++ call and not a Python copy loop: pyarrow's output stream has no
    abort, and closing it (as `with` does on an exception, e.g. Ctrl-C mid-copy) would publish the part
    written so far. Inside copy_files no Python signal can interrupt, and a process killed mid-upload
    never completes its PUT or multipart upload, so the object stays the old one."""
    import pyarrow.fs as pafs

    pafs.copy_files(str(src), dst, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                    use_threads=False)


@contextlib.contextmanager
def _errors(uri: str) -> Iterator[None]:
    """Storage errors (no bucket, no credentials, unreachable endpoint) as one line naming the URI."""
    try:
        yield
    except FileNotFoundError:
        raise  # an object or file gone between listing and copying: the callers skip it
    except OSError as e:
        raise TallyError(f"{uri}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def heartbeat(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """While the body runs, rewrite the run's ``.heartbeat`` object every HEARTBEAT_S, so readers of the
    bucket can tell a long epoch from a dead owner (results.run_state reads its time, which pull keeps).
    A no-op for an ordinary folder, whose heartbeat file the run touches itself."""
    uri = remote_of(run_dir)
    if uri is None or not enabled:
        yield
        return
    fs, base = filesystem(uri)

    def beat() -> None:
        with fs.open_output_stream(join(base, results.HEARTBEAT)):
            pass  # an empty object: its time is the message

    with results.repeating(beat, results.HEARTBEAT_S, "tally-bucket-heartbeat"):
        yield


# ---------------------------------------------------------------- readers
_PULLED: dict[str, float] = {}


def read_mirror(location: str | os.PathLike, max_age_s: float = 0.0) -> Path:
    """A local folder to read a store from: the path itself, or for a URI a read-only mirror refreshed
    from the bucket (at most every ``max_age_s`` seconds; without checkpoints and Ray's state)."""
    if not is_remote(location):
        return Path(location).expanduser()
    local = stage(str(location).rstrip("/"), "read")
    last = _PULLED.get(str(local))
    if last is None or time.monotonic() - last >= max_age_s:
        pull(local)
        _PULLED[str(local)] = time.monotonic()
    return local


def fetch_run(run_dir: Path) -> None:
    """Complete a run folder of a read mirror with its checkpoints (what an export needs); a no-op
    for a folder of a POSIX store."""
    run_dir = Path(run_dir)
    root = next((p for p in (run_dir, *run_dir.parents) if remote_of(p)), None)
    if root is not None:
        pull(root, run_dir.relative_to(root), skip=("ray",))


# ---------------------------------------------------------------- the experiment lock
@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold an experiment: the OS lock of a POSIX folder (results.exclusive), or the ``.lock`` object
    of a staging folder's bucket prefix, renewed in the background while the body runs."""
    uri = remote_of(folder)
    if uri is None:
        with results.exclusive(folder, what):
            yield
        return
    lease = _Lease(join(uri, ".lock"), what)
    lease.acquire()
    try:
        with results.repeating(lease.renew, RENEW_S, "tally-lease", first=False):
            yield
    finally:
        lease.release()


class _Lease:
    """A lock object holding {host, pid, started, renewed, token}.

    S3 with boto3: created with If-None-Match: * and replaced or removed only with If-Match on the
    ETag we hold, so two writers can never both win. Elsewhere: best effort (write, wait, read back).
    """

    def __init__(self, uri: str, what: str):
        self.uri, self.what = uri, what
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.started = time.time()
        self.s3 = _s3_client() if urlsplit(uri).scheme == "s3" else None
        parts = urlsplit(uri)
        self.bucket, self.key = parts.netloc, parts.path.lstrip("/")

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                           "renewed": time.time(), "token": self.token}).encode()

    # -- reading
    def _read(self) -> tuple[dict | None, str | None]:
        if self.s3 is not None:
            try:
                obj = self.s3.get_object(Bucket=self.bucket, Key=self.key)
            except self.s3.exceptions.NoSuchKey:
                return None, None
            return _json_dict(obj["Body"].read()), obj["ETag"]
        fs, path = filesystem(self.uri)
        try:
            with fs.open_input_stream(path) as f:
                return _json_dict(f.read()), None
        except FileNotFoundError:
            return None, None

    def _refuse(self, holder: dict | None) -> TallyError:
        return TallyError(f"{self.uri.rsplit('/', 1)[0]}: {self.what} is in use by {_holder_text(holder)}; "
                          f"wait for it (a holder that stops renewing is taken over after {LEASE_S:.0f} s)")

    # -- taking, renewing, giving back
    def acquire(self) -> None:
        if self.s3 is not None:
            try:
                self.etag = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                               IfNoneMatch="*")["ETag"]
                return
            except Exception as e:
                if _code(e) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    if _code(e) in ("NotImplemented", "InvalidArgument"):  # no conditional writes here
                        self.s3 = None
                        return self.acquire()
                    raise TallyError(f"{self.uri}: {_first_line(e)}") from None
            holder, etag = self._read()
            if holder is not None and not _stale(holder):
                raise self._refuse(holder)
            try:  # take over a stale lock: only the writer whose ETag still matches wins
                kwargs = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
                self.etag = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                               **kwargs)["ETag"]
            except Exception as e:
                if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise self._refuse(self._read()[0]) from None
                raise TallyError(f"{self.uri}: {_first_line(e)}") from None
            return
        holder, _ = self._read()  # best effort: no conditional writes
        if holder is not None and not _stale(holder):
            raise self._refuse(holder)
        self._write_plain()
        time.sleep(1.0)  # a concurrent taker's write lands in this window; the last one wins
        holder, _ = self._read()
        if not holder or holder.get("token") != self.token:
            raise self._refuse(holder)

    def _write_plain(self) -> None:
        fs, path = filesystem(self.uri)
        with _errors(self.uri), fs.open_output_stream(path) as out:
            out.write(self._body())

    def renew(self) -> None:
        try:
            if self.s3 is not None:
                self.etag = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                               IfMatch=self.etag)["ETag"]
                return
            holder, _ = self._read()
            if holder and holder.get("token") == self.token:
                self._write_plain()
                return
        except Exception as e:  # noqa: BLE001 - a renewal that fails is reported, the search goes on
            if _code(e) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                print(f"warning: could not renew the lock {self.uri}: {_first_line(e)}", file=sys.stderr)
                return
        print(f"warning: the lock {self.uri} was taken over by {_holder_text(self._read()[0])}",
              file=sys.stderr)

    def release(self) -> None:
        with contextlib.suppress(Exception):
            if self.s3 is not None:
                self.s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
                return
            holder, _ = self._read()
            if holder and holder.get("token") == self.token:
                fs, path = filesystem(self.uri)
                fs.delete_file(path)


def _s3_client():
    """boto3's S3 client (endpoint and credentials from the environment), or None without boto3."""
    try:
        import boto3
    except ImportError:
        return None
    return boto3.client("s3")


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _json_dict(data: bytes) -> dict | None:
    try:
        value = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _stale(holder: dict) -> bool:
    """The holder is gone: its pid is dead on this host, or it stopped renewing for LEASE_S."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not results._pid_alive(holder["pid"])
    renewed = holder.get("renewed")
    return not isinstance(renewed, int | float) or time.time() - renewed > LEASE_S


def _holder_text(holder: dict | None) -> str:
    holder = holder or {}
    started = holder.get("started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, int | float) else "?")
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} (since {when})"
