"""The results store: plain files under a root, readable without Ray.

Layout (docs/CONTRACTS.md): an experiment folder holds ``spec.yaml``, ``summary.parquet``,
``study.db`` and ``trials/<trial_id>/``; a run (trial) folder holds ``config.yaml``,
``status.json``, ``epochs.jsonl``, ``eval.parquet``, ``metrics.json`` and ``checkpoints/``.
Every write is atomic (temp file + rename), so a reader never sees half a file, and readers
tolerate missing files: a running or failed trial shows what it has.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from tally import files
from tally.config import parse_yaml
from tally.errors import TallyError
from tally.schema import mode_of

STATUSES = ("pending", "running", "done", "failed", "stopped")
TRIALS_DIR = "trials"
DEFAULT_SELECTION = {"metric": "pair_acc_worst", "mode": "max"}  # a spec without `selection:`
CALIBRATION_FILE = "calibration.json"  # evaluation/calibration.py: the temperature and calibration metrics
NO_SPEC_METRIC = "pair_acc_mean"  # a folder of `tally train` runs: no spec says what to select on


# ---------------------------------------------------------------- atomic writes
# tally.files: temp file + rename in the same folder, created with the umask's mode, and never through
# a symlink (a link at the target is replaced, not followed).
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    files.write_atomic(path, data)


def write_bytes(path: Path, data: bytes) -> None:
    _atomic_write_bytes(path, data)


def write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")


def write_yaml(path: Path, obj) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    files.write_atomic(path, lambda f: df.to_parquet(f, index=False))


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line; a crash mid-line leaves a line that readers skip; a symlink is refused."""
    files.append_line(path, json.dumps(record, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------- run writer
def write_status(run_dir: Path, status: str, **fields) -> dict:
    """Merge ``fields`` into status.json and set the status."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    current = read_json(Path(run_dir) / "status.json") or {}
    if status == "running":  # who owns it: readers show "lost" once that process is gone
        fields.setdefault("owner", {"host": socket.gethostname(), "pid": os.getpid()})
    current.update(fields, status=status, updated=time.time())
    write_json(Path(run_dir) / "status.json", current)
    return current


def truncate_epochs(run_dir: Path, keep_through: int) -> None:
    """Drop epoch lines after ``keep_through`` (a resumed run re-does those epochs)."""
    path = Path(run_dir) / "epochs.jsonl"
    kept = [r for r in read_jsonl(path) if r.get("epoch", 0) <= keep_through]
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def experiment_dir(storage: str | Path, name: str) -> Path:
    """Where experiment ``name`` lives under a store root; a name may never leave the root."""
    root = Path(storage).expanduser().resolve()
    exp = (root / name).resolve()
    if root not in exp.parents:
        raise TallyError(f"--name: {name!r} would write outside the storage folder {root}")
    return exp


# ---------------------------------------------------------------- readers
# Readers never raise on content: a store is written by many processes over months, and one torn,
# hand-edited or foreign file must not take down the dashboard, the report or an export of every
# other trial. A missing file reads as None; a file that exists but cannot be used reads as None too,
# and `problem()` says why ("unreadable: ..."), for the views that list what they could not show.
def _load(path: Path, parse, expect: type | None) -> tuple[object | None, str | None]:
    try:
        data = files.read_bounded(path)  # a size cap: one huge file costs bounded memory
    except FileNotFoundError:
        return None, None
    except TallyError as e:
        return None, f"unreadable: {str(e).removeprefix(f'{path}: ')}"
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    try:
        value = files.check_depth(parse(data.decode("utf-8")), path)
    except UnicodeDecodeError:
        return None, "unreadable: not UTF-8 text"
    except RecursionError:  # json.loads of a file nested thousands deep
        return None, f"unreadable: nested deeper than {files.MAX_DEPTH} levels"
    except TallyError as e:
        return None, f"unreadable: {str(e).removeprefix(f'{path}: ')}"
    except (ValueError, yaml.YAMLError) as e:
        return None, f"unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if expect is not None and not isinstance(value, expect):
        return None, f"unreadable: expected a {expect.__name__}, got {type(value).__name__}"
    return value, None


def read_json(path: Path, expect: type | None = dict):
    """The JSON value of a file, or None (missing, torn, not UTF-8, or not of the expected type)."""
    return _load(path, json.loads, expect)[0]


def read_yaml(path: Path, expect: type | None = dict):
    """The YAML value of a file (config.parse_yaml: safe, no aliases, bounded depth), or None like read_json."""
    return _load(path, parse_yaml, expect)[0]


def problem(path: Path) -> str | None:
    """Why a store file that exists cannot be read ("unreadable: ..."); None if fine or missing."""
    path = Path(path)
    if path.suffix == ".parquet":
        if not path.exists():
            return None
        try:
            pd.read_parquet(path)
        except Exception as e:  # pyarrow raises its own types for foreign or torn files
            return f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        return None
    parse = parse_yaml if path.suffix in (".yaml", ".yml") else json.loads
    return _load(path, parse, dict)[1]


def read_jsonl(path: Path) -> list[dict]:
    try:
        lines = files.read_bounded(path, MAX_JSONL).decode("utf-8", errors="replace").splitlines()
    except (OSError, TallyError):
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue  # a torn last line from a killed writer (or a foreign one)
        if isinstance(record, dict):
            out.append(record)
    return out


def read_parquet(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        return None
    except Exception:  # torn or foreign: pyarrow's own error types; problem() says which
        return None


MAX_JSONL = 64 << 20  # epochs.jsonl: one short line per epoch
RUN_FILES = ("config.yaml", "status.json", "eval.parquet", "metrics.json")
HEARTBEAT = ".heartbeat"  # touched every HEARTBEAT_S by a running run's owner
HEARTBEAT_S = 30.0
LOST_AFTER_S = 600.0  # a running run on another host whose heartbeat is older than this is "lost"


@dataclass
class RunRecord:
    """Everything a run folder holds; missing or unreadable parts are None/empty, never an exception."""

    path: Path
    config: dict | None
    status: dict
    epochs: pd.DataFrame
    eval_table: pd.DataFrame | None
    metrics: dict | None
    missing: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> "unreadable: why"

    @property
    def state(self) -> str:
        return run_state(self.path, self.status)


def read_run(run_dir: Path) -> RunRecord:
    run_dir = Path(run_dir)
    config = read_yaml(run_dir / "config.yaml")
    status = read_json(run_dir / "status.json") or {}
    epochs = pd.DataFrame(read_jsonl(run_dir / "epochs.jsonl"))
    table = read_parquet(run_dir / "eval.parquet")
    metrics = clean_metrics(read_json(run_dir / "metrics.json"))
    values = dict(zip(RUN_FILES, (config, status or None, table, metrics), strict=True))
    missing = [name for name, value in values.items() if value is None]
    unreadable = {name: why for name in missing if (why := problem(run_dir / name))}
    return RunRecord(run_dir, config, status, epochs, table, metrics,
                     [m for m in missing if m not in unreadable], unreadable)


def clean_metrics(raw) -> dict | None:
    """metrics.json as {split: {metric: float}}; anything else in it is dropped, not raised on."""
    if not isinstance(raw, dict):
        return None
    return {str(split): {str(k): float(v) for k, v in values.items()
                         if isinstance(v, int | float) and not isinstance(v, bool)}
            for split, values in raw.items() if isinstance(values, dict)}


def read_metrics(run_dir: Path) -> dict | None:
    """Every metric of a run's kept checkpoint, {split: {metric: value}}: metrics.json (from the long
    table) and the calibration metrics training writes to calibration.json (from the logits), the
    former winning a name both hold. What selection, a trial's reports and summaries read; None when
    the run has neither file."""
    metrics = clean_metrics(read_json(Path(run_dir) / "metrics.json"))
    calibration = clean_metrics((read_json(Path(run_dir) / CALIBRATION_FILE) or {}).get("metrics"))
    if metrics is None and calibration is None:
        return None
    out = {split: dict(values) for split, values in (calibration or {}).items()}
    for split, values in (metrics or {}).items():
        out.setdefault(split, {}).update(values)
    return out


def run_state(run_dir: Path, status: dict) -> str:
    """The status a reader should show: the stored one, or "lost" for a "running" run whose owner is
    gone (same host: its pid is dead; another host: no heartbeat for LOST_AFTER_S)."""
    state = status.get("status", "pending")
    if state != "running" or not isinstance(state, str):
        return state if isinstance(state, str) else "pending"
    owner = status.get("owner")
    if isinstance(owner, dict) and owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        return "running" if _pid_alive(owner["pid"]) else "lost"
    beat = Path(run_dir) / HEARTBEAT
    try:
        age = time.time() - beat.stat().st_mtime
    except OSError:  # older runs have no heartbeat: fall back on the last status write
        updated = status.get("updated")
        age = time.time() - updated if isinstance(updated, int | float) else 0.0
    return "lost" if age > LOST_AFTER_S else "running"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@contextlib.contextmanager
def repeating(action, every_s: float, name: str, first: bool = True) -> Iterator[None]:
    """Call ``action`` every ``every_s`` seconds in a daemon thread while the body runs (``first``: also
    at once); heartbeats and lock renewals, whose failures must never stop the work."""
    stop = threading.Event()

    def loop() -> None:
        if not first and stop.wait(every_s):
            return
        while True:
            with contextlib.suppress(Exception):
                action()
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def heartbeat(run_dir: Path, every_s: float = HEARTBEAT_S):
    """Touch <run>/.heartbeat every few seconds while the body runs (a daemon thread), so readers on
    other hosts can tell a long epoch from a dead owner."""
    return repeating(lambda: files.touch(Path(run_dir) / HEARTBEAT), every_s, "tally-heartbeat")


# ---------------------------------------------------------------- exclusive writers
@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold <folder>/.lock while writing a run or an experiment: a second writer gets a one-line error
    naming the holder (host, pid, start time).

    The lock is the operating system's (flock: per open file, so even a second writer in the same
    process is refused; Linux maps it to NFS locks across hosts), so it dies with its process: a holder killed by SIGKILL leaves no stale lock. Where the file system has no locks,
    the recorded pid is checked instead (same host) and a lock older than LOST_AFTER_S without a live
    holder is taken over.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    fd = files.open_lock(path)  # never through a symlink: a linked .lock would truncate its target
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
                _check_lock_file(path, what)  # no OS locks here: judge by the recorded holder
            else:
                raise TallyError(f"{folder}: {what} is in use by {_holder(path)}; "
                                 "wait for it or pick another folder") from None
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the OS lock


def _holder(path: Path) -> str:
    info = read_json(path) or {}
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, int | float) else "?"
    return f"host {info.get('host', '?')} pid {info.get('pid', '?')} (since {when})"


def _check_lock_file(path: Path, what: str) -> None:
    info = read_json(path) or {}
    if not info:
        return
    same_host = info.get("host") == socket.gethostname()
    alive = _pid_alive(info["pid"]) if same_host and isinstance(info.get("pid"), int) else None
    fresh = isinstance(info.get("started"), int | float) and time.time() - info["started"] < LOST_AFTER_S
    if alive or (alive is None and fresh):
        raise TallyError(f"{path.parent}: {what} is in use by {_holder(path)}; wait for it or pick another folder")


def iter_trial_dirs(exp_dir: Path) -> Iterator[Path]:
    trials = Path(exp_dir) / TRIALS_DIR
    if trials.is_dir():
        yield from sorted(p for p in trials.iterdir() if p.is_dir())


def list_experiments(root: Path) -> list[Path]:
    """Experiment folders under ``root`` (a folder with a trials/ or spec.yaml)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and ((p / TRIALS_DIR).is_dir() or (p / "spec.yaml").is_file()))


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def trial_row(run_dir: Path) -> dict:
    """One summary row from a trial folder: id, status, params, metrics, timing, and which files are
    unreadable (the row is still made: one bad file hides only what it holds)."""
    run_dir = Path(run_dir)
    status = read_json(run_dir / "status.json") or {}
    config = read_yaml(run_dir / "config.yaml") or {}
    metrics = read_metrics(run_dir) or {}  # calibration metrics (calibration.json) are columns too
    unreadable = {name: why for name in ("status.json", "config.yaml", "metrics.json")
                  if (why := problem(run_dir / name))}

    def number(key):
        value = status.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    row = {"trial_id": run_dir.name, "status": run_state(run_dir, status),
           "error": _text(status.get("error")), "epoch": number("epoch"),
           "best_epoch": number("best_epoch"), "started": number("started"),
           "ended": number("ended"), "node": _text(status.get("node")),
           "ray_node_id": _text(status.get("ray_node_id")),
           "unreadable": "; ".join(f"{k}: {v}" for k, v in unreadable.items()) or None}
    if row["started"] is not None:
        row["duration_s"] = (row["ended"] or number("updated") or time.time()) - row["started"]
    params = status.get("params")
    for key, value in (params if isinstance(params, dict) else {}).items():
        row[f"param.{key}"] = value
    for key, value in flatten(config).items():
        row[f"config.{key}"] = value if not isinstance(value, list) else json.dumps(value)
    for split, values in metrics.items():
        for name, value in values.items():
            row[f"{split}/{name}"] = value
    return row


def _text(value) -> str | None:
    return None if value is None else str(value)


def summarise(exp_dir: Path) -> pd.DataFrame:
    """The experiment's summary table, built from the trial folders."""
    rows = [trial_row(p) for p in iter_trial_dirs(exp_dir)]
    return pd.DataFrame(rows)


def refresh_summary(exp_dir: Path) -> pd.DataFrame:
    df = summarise(exp_dir)
    write_parquet(Path(exp_dir) / "summary.parquet", df)
    return df


def read_summary(exp_dir: Path) -> pd.DataFrame:
    """The stored summary when present, else one built from the trial folders."""
    df = read_parquet(Path(exp_dir) / "summary.parquet")
    return df if df is not None else summarise(exp_dir)


# ---------------------------------------------------------------- model selection
# One rule (as DomainBed's model_selection.py), used by the search, `tally export`, the report and the
# dashboard: the spec says which validation metric; only finished trials compete; ties go to the
# better validation mean pair accuracy, then to the first trial id. Test numbers never take part.
# Each metric's direction is tally.schema.mode_of (lower is better for ECE, Brier, NLL and AURC), never
# the spec's word alone.
@dataclass(frozen=True)
class Selection:
    """How the best trial is chosen: a validation metric column, a direction, and where that came from."""

    metric: str
    mode: str
    source: str
    # a multi-objective search: (first, second) validation columns and the pick's tolerance
    objectives: tuple[str, ...] = ()
    tolerance: float = 0.0

    @property
    def modes(self) -> tuple[str, ...]:
        """Each objective's direction ('max' or 'min')."""
        return tuple(mode_of(m) for m in self.objectives)


def selection_of(spec: dict | None) -> Selection:
    """An experiment's selection from its (resolved or stored) spec, with the documented defaults."""
    if not isinstance(spec, dict):
        return Selection(f"val/{NO_SPEC_METRIC}", "max", f"no spec.yaml: default {NO_SPEC_METRIC}")
    sel = spec.get("selection")
    sel = sel if isinstance(sel, dict) else {}
    metric = str(sel.get("metric") or DEFAULT_SELECTION["metric"])
    if "/" not in metric:
        metric = f"val/{metric}"
    mode = mode_of(metric)  # the metric's own direction: a spec.yaml's `mode` cannot turn an ECE around
    source = "spec.yaml selection" if sel.get("metric") else f"spec.yaml without selection: default {metric}"
    objectives = sel.get("objectives")
    if isinstance(objectives, list) and len(objectives) == 2 and all(isinstance(m, str) for m in objectives):
        columns = tuple(m if "/" in m else f"val/{m}" for m in objectives)
        tolerance = sel.get("tolerance", 0.01)
        tolerance = float(tolerance) if isinstance(tolerance, int | float) and not isinstance(tolerance, bool) else 0.01
        return Selection(columns[1], mode_of(columns[1]), f"Pareto front of ({_directed(columns[0])}, "
                         f"{_directed(columns[1])}): the best {columns[1]} among finished trials within "
                         f"{tolerance:g} of the best {columns[0]}", columns, tolerance)
    return Selection(metric, mode, source)


def _directed(column: str) -> str:
    """A column with its direction when lower is better: 'val/ece (lower is better)'."""
    return column if mode_of(column) == "max" else f"{column} (lower is better)"


def best_of_experiment(exp_dir: Path, summary: pd.DataFrame | None = None) -> tuple[pd.Series | None, Selection]:
    """The best trial of an experiment by its spec's selection, and that selection."""
    selection = selection_of(read_yaml(Path(exp_dir) / "spec.yaml"))
    summary = summarise(exp_dir) if summary is None else summary
    return select_trial(summary, selection), selection


def select_trial(summary: pd.DataFrame, selection: Selection) -> pd.Series | None:
    """The trial a selection picks: the Pareto rule for a multi-objective search, else ``best_trial``."""
    if selection.objectives:
        return pick_from_front(summary, selection.objectives, selection.tolerance)
    return best_trial(summary, selection.metric, selection.mode)


def best_trial(summary: pd.DataFrame, metric: str, mode: str | None = None) -> pd.Series | None:
    """The best finished trial by a VALIDATION metric; test numbers never take part.

    ``metric`` is a column ('val/pair_acc_worst') or a metric name ('pair_acc_worst'); ``mode`` defaults
    to its direction (tally.schema.mode_of: 'min' for an ECE, Brier, NLL or AURC). Only trials
    that ran to the end ('done') compete: a stopped trial's early numbers are not comparable. Ties go
    to the better mean pair accuracy (also validation), then to the first trial id. One rule for
    the search, `tally export` and the dashboard.
    """
    column = metric if "/" in metric else f"val/{metric}"
    mode = mode or mode_of(column)
    if summary.empty or column not in summary or "status" not in summary:
        return None
    values = pd.to_numeric(summary[column], errors="coerce")
    keep = (summary["status"] == "done") & values.notna()
    if not keep.any():
        return None
    done = summary[keep].assign(_v=values[keep])
    tiebreak = "val/pair_acc_mean"
    keys, ascending = ["_v"], [mode == "min"]
    if tiebreak in done and tiebreak != column:
        done = done.assign(_t=pd.to_numeric(done[tiebreak], errors="coerce").fillna(-1.0))
        keys, ascending = [*keys, "_t"], [*ascending, False]
    ordered = done.sort_values([*keys, "trial_id"], ascending=[*ascending, True], kind="stable")
    return summary.loc[ordered.index[0]]


# ---------------------------------------------------------------- multi-objective selection
# A multi-objective search keeps a Pareto front of two validation metrics, each in its own direction
# (tally.schema.mode_of: e.g. pair_acc_mean up, ece_worst_domain down). One rule picks from it (search,
# `tally export`, `tally benchmark`, the dashboard): among finished trials whose first objective is
# within `tolerance` of the best first objective, the best second objective; ties go to the better
# first objective, then to the first trial id. The pick is always on the front: a trial dominating it
# would be eligible too and win the comparison or the tie.
def _finished_objectives(summary: pd.DataFrame, objectives: tuple[str, ...]) -> pd.DataFrame | None:
    """Finished trials' objective values, each ORIENTED so that higher is better (a lower-is-better
    metric negated); None when no finished trial has them all."""
    columns = [m if "/" in m else f"val/{m}" for m in objectives]
    if summary.empty or "status" not in summary or any(c not in summary for c in columns):
        return None
    values = summary[columns].apply(pd.to_numeric, errors="coerce")
    keep = (summary["status"] == "done") & values.notna().all(axis=1)
    signs = [1.0 if mode_of(c) == "max" else -1.0 for c in columns]
    return values[keep] * signs if keep.any() else None


def pareto_front(summary: pd.DataFrame, objectives: tuple[str, ...]) -> pd.Series:
    """True for each finished trial that no other finished trial dominates (at least as good on every
    objective and better on one, each in its direction), on validation columns; False for the others and
    for unfinished trials."""
    front = pd.Series(False, index=summary.index)
    values = _finished_objectives(summary, objectives)
    if values is None:
        return front
    v = values.to_numpy(dtype=float)
    geq = (v[:, None, :] >= v[None, :, :]).all(axis=2)  # geq[i, j]: i at least as good as j everywhere (oriented)
    gt = (v[:, None, :] > v[None, :, :]).any(axis=2)
    dominated = (geq & gt).any(axis=0)
    front[values.index[~dominated]] = True
    return front


def pick_from_front(summary: pd.DataFrame, objectives: tuple[str, ...], tolerance: float) -> pd.Series | None:
    """The multi-objective pick (the rule above); None when no trial finished with both values."""
    values = _finished_objectives(summary, objectives)
    if values is None:
        return None
    first, second = values.columns  # oriented: higher is better for both
    near = values[values[first] >= values[first].max() - tolerance - 1e-12]  # 1e-12: float round-off
    ordered = near.assign(_id=summary.loc[near.index, "trial_id"]).sort_values(
        [second, first, "_id"], ascending=[False, False, True], kind="stable")
    return summary.loc[ordered.index[0]]
