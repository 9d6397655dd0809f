"""Dashboard data of time: the progress and ETA of running trials, and the timeline of a search.

Plain pandas on the store (status.json start/end/node via the trials table, epochs.jsonl for epoch
times); nothing here imports streamlit. Why an ETA from the epoch times rather than from durations of
finished trials: a running trial's own epochs are the best predictor of its next ones (same node,
same config), and warm-up epochs (a full pass over the data) are timed apart from method epochs.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from tally import results
from tally.dashboard.data import TrialSet

PROGRESS_COLUMNS = ("trial_id", "node", "epochs_done", "epochs_total", "last_epoch", "last_value",
                    "seconds_per_epoch", "eta_s")


def _config_int(row: pd.Series, key: str) -> float:
    value = pd.to_numeric(pd.Series([row.get(key)]), errors="coerce").iloc[0]
    return float(value) if pd.notna(value) else float("nan")


def remaining_seconds(epochs: pd.DataFrame, total: float, warmup: float) -> float:
    """Seconds the epochs still to run will take, at the median time of this trial's epochs of the same
    phase (warm-up or method); NaN when no epoch time is recorded or the total is unknown."""
    if epochs.empty or "seconds" not in epochs or not np.isfinite(total):
        return float("nan")
    done = len(epochs)
    secs = pd.to_numeric(epochs["seconds"], errors="coerce")
    phase = epochs["phase"] if "phase" in epochs else pd.Series("main", index=epochs.index)
    overall = float(secs.median()) if secs.notna().any() else float("nan")
    per_phase = {p: float(s.median()) for p, s in secs.groupby(phase) if s.notna().any()}
    warmup = warmup if np.isfinite(warmup) else 0.0
    left_warm = max(0, int(warmup) - done)
    left_main = max(0, int(total) - max(done, int(warmup)))
    return (left_warm * per_phase.get("warmup", overall)
            + left_main * per_phase.get("main", overall)) if (left_warm or left_main) else 0.0


def running_progress(trials: TrialSet, epochs_by_trial: dict[str, pd.DataFrame],
                     now: float | None = None) -> pd.DataFrame:
    """One row per running trial: node, epochs done of the total, the last validation value of the
    selection metric, the median seconds per epoch and the ETA in seconds from ``now``.

    The ETA counts from the end of the last recorded epoch (the mtime of epochs.jsonl), so it falls
    while an epoch runs rather than jumping at each refresh.
    """
    now = time.time() if now is None else now
    frame = trials.frame
    running = frame[frame["status"] == "running"]
    metric = trials.selection.metric
    rows = []
    for _, row in running.iterrows():
        trial_id = str(row["trial_id"])
        epochs = epochs_by_trial.get(trial_id, pd.DataFrame())
        total = _config_int(row, "config.train.epochs")
        warmup = _config_int(row, "config.train.warmup_epochs")
        left = remaining_seconds(epochs, total, warmup)
        last_write = (trials.exp_dir / results.TRIALS_DIR / trial_id / "epochs.jsonl")
        try:
            since = max(0.0, now - last_write.stat().st_mtime)
        except OSError:
            since = 0.0
        values = pd.to_numeric(epochs[metric], errors="coerce").dropna() if metric in epochs else pd.Series()
        secs = pd.to_numeric(epochs["seconds"], errors="coerce") if "seconds" in epochs else pd.Series()
        rows.append({"trial_id": trial_id, "node": row.get("node"), "epochs_done": len(epochs),
                     "epochs_total": total, "last_epoch": epochs["epoch"].iloc[-1] if "epoch" in epochs else None,
                     "last_value": float(values.iloc[-1]) if len(values) else float("nan"),
                     "seconds_per_epoch": float(secs.median()) if secs.notna().any() else float("nan"),
                     "eta_s": max(0.0, left - since) if np.isfinite(left) else float("nan")})
    return pd.DataFrame(rows, columns=list(PROGRESS_COLUMNS))


def timeline(trials: TrialSet, now: float | None = None) -> pd.DataFrame:
    """Start, end, status, node and duration of every trial that started; a running trial ends now.

    Times are datetimes (local wall clock as the store recorded it, seconds since the epoch in UTC).
    """
    now = time.time() if now is None else now
    frame = trials.frame
    started = pd.to_numeric(frame["started"], errors="coerce")
    keep = started.notna()
    f = frame[keep]
    start = started[keep]
    ended = pd.to_numeric(f["ended"], errors="coerce")
    end = ended.where(ended.notna(), start + pd.to_numeric(f["duration_s"], errors="coerce"))
    end = end.where(f["status"] != "running", now).fillna(now)
    node = f["node"].astype(object).where(f["node"].notna(), "?") if "node" in f else "?"
    out = pd.DataFrame({"trial_id": f["trial_id"].astype(str), "status": f["status"], "node": node,
                        "start": pd.to_datetime(start, unit="s"), "end": pd.to_datetime(end, unit="s"),
                        "duration_s": (end - start).to_numpy()})
    return out.sort_values(["start", "trial_id"], kind="stable").reset_index(drop=True)
