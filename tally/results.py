"""The results store: plain files under a root, readable without Ray.

Layout (docs/CONTRACTS.md): an experiment folder holds ``spec.yaml``, ``summary.parquet``,
``study.db`` and ``trials/<trial_id>/``; a run (trial) folder holds ``config.yaml``,
``status.json``, ``epochs.jsonl``, ``eval.parquet``, ``metrics.json`` and ``checkpoints/``.
Every write is atomic (temp file + rename), so a reader never sees half a file, and readers
tolerate missing files: a running or failed trial shows what it has.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

STATUSES = ("pending", "running", "done", "failed", "stopped")
TRIALS_DIR = "trials"
DEFAULT_SELECTION = {"metric": "pair_acc_worst", "mode": "max"}  # a spec without `selection:`
NO_SPEC_METRIC = "pair_acc_mean"  # a folder of `tally train` runs: no spec says what to select on


# ---------------------------------------------------------------- atomic writes
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")


def write_yaml(path: Path, obj) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line; a crash mid-line leaves a line that readers skip."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")


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
    from tally.errors import TallyError

    root = Path(storage).expanduser().resolve()
    exp = (root / name).resolve()
    if root not in exp.parents:
        raise TallyError(f"--name: {name!r} would write outside the storage folder {root}")
    return exp


# ---------------------------------------------------------------- readers
def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_yaml(path: Path):
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        return None


def read_jsonl(path: Path) -> list[dict]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed writer
    return out


def read_parquet(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_parquet(path)
    except (FileNotFoundError, OSError, ValueError):
        return None


@dataclass
class RunRecord:
    """Everything a run folder holds; missing parts are None/empty, never an exception."""

    path: Path
    config: dict | None
    status: dict
    epochs: pd.DataFrame
    eval_table: pd.DataFrame | None
    metrics: dict | None
    missing: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        return self.status.get("status", "pending")


def read_run(run_dir: Path) -> RunRecord:
    run_dir = Path(run_dir)
    config = read_yaml(run_dir / "config.yaml")
    status = read_json(run_dir / "status.json") or {}
    epochs = pd.DataFrame(read_jsonl(run_dir / "epochs.jsonl"))
    table = read_parquet(run_dir / "eval.parquet")
    metrics = read_json(run_dir / "metrics.json")
    missing = [name for name, value in (("config.yaml", config), ("status.json", status or None),
                                        ("eval.parquet", table), ("metrics.json", metrics))
               if value is None]
    return RunRecord(run_dir, config, status, epochs, table, metrics, missing)


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
    """One summary row from a trial folder: id, status, params, metrics, timing."""
    run_dir = Path(run_dir)
    status = read_json(run_dir / "status.json") or {}
    config = read_yaml(run_dir / "config.yaml") or {}
    metrics = read_json(run_dir / "metrics.json") or {}
    row = {"trial_id": run_dir.name, "status": status.get("status", "pending"),
           "error": status.get("error"), "epoch": status.get("epoch"),
           "best_epoch": status.get("best_epoch"), "started": status.get("started"),
           "ended": status.get("ended"), "node": status.get("node"), "ray_node_id": status.get("ray_node_id")}
    if row["started"] is not None:
        row["duration_s"] = (row["ended"] or status.get("updated") or time.time()) - row["started"]
    for key, value in (status.get("params") or {}).items():
        row[f"param.{key}"] = value
    for key, value in flatten(config).items():
        row[f"config.{key}"] = value if not isinstance(value, list) else json.dumps(value)
    for split, values in metrics.items():
        for name, value in values.items():
            row[f"{split}/{name}"] = value
    return row


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
@dataclass(frozen=True)
class Selection:
    """How the best trial is chosen: a validation metric column, a direction, and where that came from."""

    metric: str
    mode: str
    source: str


def selection_of(spec: dict | None) -> Selection:
    """An experiment's selection from its (resolved or stored) spec, with the documented defaults."""
    if not isinstance(spec, dict):
        return Selection(f"val/{NO_SPEC_METRIC}", "max", f"no spec.yaml: default {NO_SPEC_METRIC}")
    sel = spec.get("selection")
    sel = sel if isinstance(sel, dict) else {}
    metric = str(sel.get("metric") or DEFAULT_SELECTION["metric"])
    if "/" not in metric:
        metric = f"val/{metric}"
    mode = str(sel.get("mode") or "max").lower()
    if mode not in ("max", "min"):
        mode = "max"
    source = "spec.yaml selection" if sel.get("metric") else f"spec.yaml without selection: default {metric}"
    return Selection(metric, mode, source)


def best_of_experiment(exp_dir: Path, summary: pd.DataFrame | None = None) -> tuple[pd.Series | None, Selection]:
    """The best trial of an experiment by its spec's selection, and that selection."""
    selection = selection_of(read_yaml(Path(exp_dir) / "spec.yaml"))
    summary = summarise(exp_dir) if summary is None else summary
    return best_trial(summary, selection.metric, selection.mode), selection


def best_trial(summary: pd.DataFrame, metric: str, mode: str = "max") -> pd.Series | None:
    """The best finished trial by a VALIDATION metric; test numbers never take part.

    ``metric`` is a column ('val/pair_acc_worst') or a metric name ('pair_acc_worst'). Only trials
    that ran to the end ('done') compete: a stopped trial's early numbers are not comparable. Ties go
    to the better mean pair accuracy (also validation), then to the first trial id. One rule for
    the search, `tally export` and the dashboard.
    """
    column = metric if "/" in metric else f"val/{metric}"
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
