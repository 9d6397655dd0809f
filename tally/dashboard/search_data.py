"""Dashboard data of how a search went: learning curves, progress, importance, parallel coordinates.

Plain pandas on the results store, like tally.dashboard.data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tally.dashboard.data import CURVE_BASE_COLUMNS, FINISHED, TrialSet, param_columns


def curves(epochs_by_trial: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per-epoch records of several trials in one frame with a ``trial`` column."""
    parts = [df.assign(trial=label) for label, df in epochs_by_trial.items()
             if not df.empty and "epoch" in df]
    if not parts:
        return pd.DataFrame(columns=["trial", *CURVE_BASE_COLUMNS])
    return pd.concat(parts, ignore_index=True)


def curve_metrics(frame: pd.DataFrame) -> list[str]:
    """Numeric per-epoch columns worth plotting (train_loss first, then val/*)."""
    skip = {"epoch", "phase", "trial", "seconds"}
    cols = [c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])]
    return sorted(cols, key=lambda c: (c != "train_loss", not c.startswith("val/"), c))


def warmup_end(epochs: pd.DataFrame) -> float | None:
    """Last warm-up epoch (the ERM -> TALLY switch), None when the phase is not recorded."""
    if epochs.empty or "phase" not in epochs or "epoch" not in epochs:
        return None
    warm = epochs[epochs["phase"] == "warmup"]
    return float(warm["epoch"].max()) if not warm.empty and (epochs["phase"] != "warmup").any() else None


def search_progress(trials: TrialSet) -> pd.DataFrame:
    """Selection metric by trial order with the best value so far (the search's trajectory)."""
    frame, sel = trials.frame, trials.selection
    if sel.metric not in frame.columns:
        return pd.DataFrame(columns=["order", "trial_id", "status", "value", "best_so_far"])
    values = pd.to_numeric(frame[sel.metric], errors="coerce")
    out = frame[["order", "trial_id", "status"]].assign(value=values)
    out = out.dropna(subset=["value"]).sort_values("order")
    run = out["value"].cummax() if sel.mode == "max" else out["value"].cummin()
    return out.assign(best_so_far=run).reset_index(drop=True)


def finished_with_metric(trials: TrialSet) -> pd.DataFrame:
    frame, metric = trials.frame, trials.selection.metric
    if metric not in frame.columns:
        return frame.iloc[0:0]
    values = pd.to_numeric(frame[metric], errors="coerce")
    return frame[frame["status"].isin(FINISHED) & values.notna()]


@dataclass
class Importance:
    """Parameter importances (sum 1) and how they were obtained, or why they are unavailable."""

    values: pd.Series
    method: str


def param_importance(trials: TrialSet, min_trials: int = 5) -> Importance:
    """Optuna's importance on ``<exp>/study.db`` when usable, else a rank-correlation fallback."""
    empty = pd.Series(dtype=float)
    reason = ""
    study_path = trials.exp_dir / "study.db"
    if study_path.is_file():
        try:
            return _optuna_importance(study_path, trials.name, min_trials)
        except Exception as exc:  # noqa: BLE001 - any study problem falls back, with the reason shown
            reason = f"study.db unusable ({exc}); "
    else:
        reason = "no study.db; "
    done = finished_with_metric(trials)
    params = param_columns(trials.frame)
    if len(done) < min_trials or not params:
        return Importance(empty, f"unavailable: {reason}{len(done)} finished trial(s) with "
                                 f"{trials.selection.metric} (need {min_trials}) and "
                                 f"{len(params)} parameter(s)")
    y = pd.to_numeric(done[trials.selection.metric], errors="coerce")
    scores = {}
    for col in params:
        x = done[col]
        numeric = pd.to_numeric(x, errors="coerce")
        if numeric.notna().all() and x.map(lambda v: not isinstance(v, bool)).all():
            s = abs(numeric.corr(y, method="spearman"))
        else:
            s = _correlation_ratio(x.astype(str), y)
        scores[col.removeprefix("param.")] = 0.0 if s is None or not np.isfinite(s) else float(s)
    values = pd.Series(scores).sort_values(ascending=False)
    if values.sum() > 0:
        values = values / values.sum()
    return Importance(values, f"fallback ({reason.rstrip('; ')}): |Spearman correlation| (numeric) or "
                              f"correlation ratio (categorical) with {trials.selection.metric} over "
                              f"{len(done)} finished trials, normalised to sum 1")


def _correlation_ratio(groups: pd.Series, y: pd.Series) -> float:
    total = ((y - y.mean()) ** 2).sum()
    if total <= 0:
        return 0.0
    means = y.groupby(groups).transform("mean")
    return float(np.sqrt(((means - y.mean()) ** 2).sum() / total))


def _optuna_importance(study_path: Path, name: str, min_trials: int) -> Importance:
    import optuna  # heavy import, only for this view

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{study_path}"
    names = optuna.study.get_all_study_names(storage=storage)
    if not names:
        raise ValueError("it holds no study")
    study_name = name if name in names else names[-1]
    study = optuna.load_study(study_name=study_name, storage=storage)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < min_trials:
        raise ValueError(f"{len(complete)} complete trial(s), need {min_trials}")
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=32, seed=0)
    values = pd.Series(optuna.importance.get_param_importances(study, evaluator=evaluator), dtype=float)
    return Importance(values.sort_values(ascending=False),
                      f"Optuna fANOVA on study '{study_name}' ({len(complete)} complete trials)")


@dataclass
class Dimension:
    """One axis of the parallel-coordinates view (categorical values encoded as codes)."""

    label: str
    values: list
    tickvals: list | None = None
    ticktext: list | None = None


def parallel_dimensions(trials: TrialSet) -> tuple[list[Dimension], list[float]]:
    """Axes over the searched parameters plus the metric, for finished trials; colour = metric.

    A positive numeric parameter spanning more than a decade (learning rates) is shown as log10;
    parameters that never vary are left out (an axis with one value says nothing).
    """
    done = finished_with_metric(trials)
    dims = []
    for col in param_columns(trials.frame):
        x = done[col]
        if x.astype(str).nunique() < 2:
            continue
        label = col.removeprefix("param.").removeprefix("config.")
        numeric = pd.to_numeric(x, errors="coerce")
        is_bool = x.map(lambda v: isinstance(v, (bool, np.bool_))).any()
        if numeric.notna().all() and not is_bool and len(x):
            if (numeric > 0).all() and numeric.max() / numeric.min() > 10:
                dims.append(Dimension(f"log10({label})", np.log10(numeric).tolist()))
            else:
                dims.append(Dimension(label, numeric.tolist()))
        else:
            cats = sorted(pd.unique(x.astype(str)))
            codes = {c: i for i, c in enumerate(cats)}
            dims.append(Dimension(label, [codes[v] for v in x.astype(str)], list(range(len(cats))), cats))
    metric = pd.to_numeric(done[trials.selection.metric], errors="coerce").tolist() if len(done) else []
    if dims:
        dims.append(Dimension(trials.selection.metric, metric))
    return dims, metric


# ---------------------------------------------------------------- intermediate values (all trials)
def intermediate_values(trials: TrialSet, epochs_by_trial: dict[str, pd.DataFrame],
                        metric: str | None = None) -> pd.DataFrame:
    """Long frame (trial_id, status, epoch, value) of one per-epoch metric (default: the selection
    metric) for every trial with epoch records: done, running, failed and ASHA-stopped alike, so the
    trials the scheduler stopped show where they were when it stopped them (Optuna's
    intermediate-values plot)."""
    metric = metric or trials.selection.metric
    status = dict(zip(trials.frame["trial_id"], trials.frame["status"], strict=True))
    parts = []
    for trial_id, epochs in epochs_by_trial.items():
        if epochs.empty or metric not in epochs or "epoch" not in epochs:
            continue
        part = pd.DataFrame({"trial_id": trial_id, "status": status.get(trial_id, "pending"),
                             "epoch": pd.to_numeric(epochs["epoch"], errors="coerce"),
                             "value": pd.to_numeric(epochs[metric], errors="coerce")})
        parts.append(part.dropna())
    if not parts:
        return pd.DataFrame(columns=["trial_id", "status", "epoch", "value"])
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------- Optuna's slice and contour plots
def param_study(trials: TrialSet):
    """The finished trials as an in-memory Optuna study, for optuna.visualization's slice and contour
    plots (what optuna-dashboard users know) without depending on study.db: a store without one
    (fixed runs, an older version) plots the same way.

    Done trials are COMPLETE with the selection metric; ASHA-stopped ones are PRUNED (Optuna leaves
    them out of these plots, as the search's own study does). Distributions are inferred from the
    values: numbers as floats (log scale when positive and spanning more than a decade), the rest as
    categories. Returns (study, parameter names); parameters that never vary are left out.
    """
    import optuna  # heavy import, only for the Search view

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    frame, sel = trials.frame, trials.selection
    values = pd.to_numeric(frame[sel.metric], errors="coerce") if sel.metric in frame else None
    done = frame[(frame["status"] == "done") & values.notna()] if values is not None else frame.iloc[0:0]
    dists, columns = {}, {}
    for col in param_columns(frame):
        x = done[col]
        name = col.removeprefix("param.").removeprefix("config.")
        if x.isna().any() or x.astype(str).nunique() < 2:
            continue
        numeric = pd.to_numeric(x, errors="coerce")
        is_bool = x.map(lambda v: isinstance(v, bool | np.bool_)).any()
        if numeric.notna().all() and not is_bool:
            lo, hi = float(numeric.min()), float(numeric.max())
            dists[name] = optuna.distributions.FloatDistribution(lo, hi, log=lo > 0 and hi / lo > 10)
            columns[name] = numeric.astype(float)
        else:
            as_text = x.astype(str) if x.map(type).nunique() > 1 else x
            choices = sorted(pd.unique(as_text), key=str)
            dists[name] = optuna.distributions.CategoricalDistribution(
                [c.item() if hasattr(c, "item") else c for c in choices])
            columns[name] = as_text.map(lambda c: c.item() if hasattr(c, "item") else c)
    study = optuna.create_study(direction="maximize" if sel.mode == "max" else "minimize")
    study.add_trials([optuna.trial.create_trial(
        params={n: columns[n].loc[i] for n in dists}, distributions=dists, value=float(values.loc[i]),
        user_attrs={"trial_id": str(done.at[i, "trial_id"])}) for i in done.index])
    return study, list(dists)
