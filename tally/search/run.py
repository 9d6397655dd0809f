"""A search on Ray Tune: the Tuner, its store callback, and follow-ups (confirmation seeds, robustness).

The driver writes nothing before the spec is valid. Trials are Tune functions that launch a
TorchTrainer (tally.search.trial). The Optuna study lives in <experiment>/study.db (SQLite) so
optuna-dashboard can open it and a resumed search continues the same study.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import ray.train
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from tally import results
from tally.cluster import start_or_join
from tally.errors import TallyError
from tally.results import storage as bucket
from tally.schema import mode_of
from tally.search.banks import prepare_for_configs, prepare_for_spec
from tally.search.lean import one_worker, reuse_trial_actors
from tally.search.searcher import PruneAwareOptunaSearch
from tally.search.space import DefineByRun
from tally.search.trial import OBJECTIVE, launch_trainer, trial_function

TRAIN_DRIVER = "TRAIN_DRIVER"  # custom resource a trial's driver function takes (see RAY_NOTES)


# ---------------------------------------------------------------- Ray connection
def connect(address: str | None, concurrency: int, quiet: bool = True) -> None:
    """Join a cluster (--address, its token required) or start a local, loopback-only Ray sized for
    this machine (tally.cluster)."""
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    # Tune saves (and uploads) its experiment state every 10 s at first ("auto"); a 1-worker trial starts
    # within a second, so a driver killed in between left it out of the state, and the resumed search
    # failed it as an orphan and drew a new one. Every 2 s: a kill loses at most that much bookkeeping.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    if not address:
        # One machine: nothing preempts it, and the Train controller's default 2 s poll only delays
        # the end of every trial (bench/search_overhead.py: teardown 4.7 s -> 1.7 s per trial).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # The dashboard process serves the State API that Train's PlacementGroupCleaner needs to free
    # the workers of a trial stopped early; without it the next trial waits forever on 2 CPUs.
    # own_address: the cleaner must find this Ray, not another one on the machine.
    start_or_join(address, dashboard=True, quiet=quiet, own_address=True,
                  resources={TRAIN_DRIVER: concurrency}, object_store_memory=256 * 2**20)


@contextlib.contextmanager
def _console(quiet: bool):
    """Quiet: no Tune tables on the console. Ray 2.60's new output engine prints its experiment
    table and result paths even at verbose=0; the legacy reporter at verbose=0 prints nothing."""
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    # Tune logs a failed trial's whole Ray traceback (about 60 lines) at ERROR; the store callback
    # prints one line instead and the trial's status.json keeps the error
    controller_log = logging.getLogger("ray.tune.execution.tune_controller")
    level = controller_log.level
    if quiet:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        controller_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        controller_log.setLevel(level)
        if quiet and previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT")
        elif quiet:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


def trial_resources(resources: dict) -> dict:
    """What a trial's Tune actor takes.

    One worker: the trial is the worker (tally.search.trial), so it holds the worker's CPUs and GPU, and
    nothing else: a cluster declares the TRAIN_DRIVER slots on its head node, and a trial that asked for
    one would be placed there, never beside the CPUs and GPUs of the other nodes
    (tests/search/test_multinode.py). The search's concurrency caps trials as it is.
    N workers: Train's workers hold those, and the trial (their driver) takes a driver slot: the custom
    resource if the cluster has it (no CPU spent on a process that only waits), else 1 CPU."""
    if one_worker(resources):
        own = {"cpu": resources.get("cpus_per_worker", 1)}
        if resources.get("gpus_per_worker"):
            own["gpu"] = resources["gpus_per_worker"]
        return own
    return {TRAIN_DRIVER: 1} if ray.cluster_resources().get(TRAIN_DRIVER) else {"cpu": 1}


# ---------------------------------------------------------------- store callback
class StoreCallback(Callback):
    """Keeps the store honest from the driver: trials stopped early or killed get their status,
    and the summary table is refreshed as trials finish."""

    def __init__(self, exp_dir: str, group: str = results.TRIALS_DIR):
        self.exp_dir, self.group = exp_dir, group

    def _run_dir(self, trial) -> Path:
        run_id = trial.config.get("fixed_id", trial.trial_id)
        return Path(self.exp_dir) / self.group / run_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Tune calls this for trials that ended without error: finished, or stopped by the scheduler
        # (whose workers may have raised while being torn down: that is not a failure).
        run_dir = self._run_dir(trial)
        bucket.pull(self.exp_dir, run_dir.relative_to(self.exp_dir))  # a bucket store: the trial's own files
        status = results.read_json(run_dir / "status.json") or {}
        if status.get("status") != "done":
            results.write_status(run_dir, "stopped", ended=time.time(), error=None,
                                 reason="stopped early by the scheduler")
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info):
        run_dir = self._run_dir(trial)
        bucket.pull(self.exp_dir, run_dir.relative_to(self.exp_dir))
        status = results.read_json(run_dir / "status.json") or {}
        if status.get("status") != "failed":
            status = results.write_status(run_dir, "failed", ended=time.time(),
                                          error=_trial_error(trial))
        print(f"trial {run_dir.name} failed: {status.get('error')} (details: {run_dir / 'status.json'})", flush=True)
        self._refresh()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._refresh()

    def _refresh(self):
        bucket.pull(self.exp_dir, self.group)  # a bucket store: what the trials uploaded
        if self.group == results.TRIALS_DIR:
            results.refresh_summary(Path(self.exp_dir))
        bucket.push(self.exp_dir)  # statuses written here, the summary, the study


def _trial_error(trial) -> str:
    """The last line of a failed trial's error as Tune keeps it (its message, else its error file)."""
    text = getattr(trial, "error_msg", None)
    path = getattr(trial, "error_file", None) or getattr(trial, "local_error_file", None)
    if not text and path:
        with contextlib.suppress(OSError, TypeError):
            text = Path(path).read_text(errors="replace")
    return _first_line(text) or "trial errored (no message from Ray)"


def _first_line(text: str | None) -> str | None:
    if not text:
        return None
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else None


# ---------------------------------------------------------------- the search
def _same_spec(stored: dict, spec) -> bool:
    """The experiment's spec.yaml is the spec given, also when written before a run-config field was
    added (resolving it again fills the new defaults)."""
    from tally.search.spec import validate_spec

    if stored == spec.resolved:
        return True
    try:
        return validate_spec(stored, name=spec.name) == spec.resolved
    except TallyError:
        return False


def _tuner_path(exp_dir: Path) -> str:
    return f"{bucket.ray_path(exp_dir)}/tune"


def run_search(spec, storage: str | Path, address: str | None = None, resume: bool = False,
               quiet: bool = True) -> pd.DataFrame:
    """Run (or resume) the search of a validated spec; returns the summary table.

    The experiment folder is held exclusively for the whole search: a second `tally search` of the same
    experiment (or a --resume while the first still runs) fails at once, naming the holder.
    """
    exp_dir = bucket.experiment_dir(storage, spec.name)  # a bucket store: the driver's staging folder
    existed = exp_dir.exists()
    try:
        with bucket.exclusive(exp_dir, "experiment"):
            return _run_search(spec, exp_dir, address, resume, quiet)
    finally:
        if not existed and not any(p.name != ".lock" for p in exp_dir.iterdir()):
            (exp_dir / ".lock").unlink(missing_ok=True)  # a refused search leaves nothing behind
            exp_dir.rmdir()


def _run_search(spec, exp_dir: Path, address: str | None, resume: bool, quiet: bool) -> pd.DataFrame:
    tuner_path = _tuner_path(exp_dir)
    bucket.pull(exp_dir)  # a bucket store: its files and the study (a resumed search continues it)
    if not resume and any(not p.name.startswith(".") for p in exp_dir.iterdir()):
        raise TallyError(f"{bucket.display(exp_dir)}: experiment exists; pass --resume to continue it or --name for a new one")
    if resume:
        stored = results.read_yaml(exp_dir / "spec.yaml")
        if stored is None:
            raise TallyError(f"{bucket.display(exp_dir)}: nothing to resume (no spec.yaml)")
        if not _same_spec(stored, spec):
            raise TallyError(f"{bucket.display(exp_dir)}/spec.yaml differs from the spec given; refusing to resume")
    budget = spec.resolved["budget"]
    connect(address, budget["concurrency"], quiet=quiet)
    bank_dir = prepare_for_spec(spec, exp_dir.parent)  # decode once per cluster, before any trial
    exp_dir.mkdir(parents=True, exist_ok=True)
    results.write_yaml(exp_dir / "spec.yaml", spec.resolved)
    bucket.push(exp_dir)

    plan = {"exp_dir": str(exp_dir), "exp_uri": bucket.remote_of(exp_dir), "group": results.TRIALS_DIR,
            "spec": spec.resolved, "resources": spec.resolved["resources"],
            "bank_dir": str(bank_dir) if bank_dir else None}
    trainable = tune.with_resources(tune.with_parameters(trial_function, plan=plan),
                                    trial_resources(spec.resolved["resources"]))
    if resume and tune.Tuner.can_restore(tuner_path):
        tuner = tune.Tuner.restore(tuner_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        import optuna

        if quiet:  # its "new study created" line is noise next to the CLI's own output
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        selection = spec.resolved["selection"]
        storage_url = f"sqlite:///{exp_dir / 'study.db'}"
        metric, mode = optuna_objectives(selection)
        sampler = optuna.samplers.TPESampler
        if selection.get("objectives") and selection["sampler"] == "nsga2":
            sampler = optuna.samplers.NSGAIISampler
        searcher = PruneAwareOptunaSearch(
            space=DefineByRun(spec.resolved["space"]), metric=metric, mode=mode,
            points_to_evaluate=spec.resolved.get("start_with") or None,
            sampler=sampler(seed=spec.resolved["seed"]),
            study_name=spec.name, storage=optuna.storages.RDBStorage(storage_url))
        searcher = tune.search.ConcurrencyLimiter(searcher, max_concurrent=budget["concurrency"])
        stopping = budget["early_stopping"]
        scheduler = None
        if stopping["enabled"]:
            scheduler = ASHAScheduler(time_attr="training_iteration", metric=OBJECTIVE, mode=mode_of(selection["metric"]),
                                      max_t=spec.resolved["base"]["train"]["epochs"] + 1,
                                      grace_period=stopping["grace_epochs"],
                                      reduction_factor=stopping["reduction_factor"])
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=budget["trials"], max_concurrent_trials=budget["concurrency"],
                                        reuse_actors=reuse_trial_actors(stopping["enabled"], spec.resolved["resources"])),
            run_config=tune.RunConfig(name="tune", storage_path=bucket.ray_path(exp_dir),
                                      callbacks=[StoreCallback(str(exp_dir))], verbose=0 if quiet else 1,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    with _console(quiet):
        tuner.fit()
    bucket.pull(exp_dir, results.TRIALS_DIR)
    _close_orphans(exp_dir, spec.name)
    summary = results.refresh_summary(exp_dir)
    bucket.push(exp_dir)
    return summary


def optuna_objectives(selection: dict) -> tuple[str | list[str], str | list[str]]:
    """(metric, mode) for the searcher: a trial's `objective` in its metric's direction, or for a Pareto
    search (results.pick_from_front) its validation columns with one direction each (tally.schema.mode_of:
    'min' for an ECE, Brier, NLL, AURC), which OptunaSearch turns into the study's `directions`."""
    if selection.get("objectives"):
        return [f"val/{m}" for m in selection["objectives"]], [mode_of(m) for m in selection["objectives"]]
    return OBJECTIVE, mode_of(selection["metric"])


def _close_orphans(exp_dir: Path, study_name: str) -> None:
    """After the Tuner returns, nothing of this search can still be running: the experiment lock is
    ours and every trial Tune knew of has ended. A trial the killed driver had started but Tune's last
    experiment checkpoint never recorded is an orphan: Tune does not resume it, so without this the
    study would keep it RUNNING forever and the store would keep it "running". Both close it the same
    way: FAIL in the study, failed in the store, with the reason.
    """
    import optuna
    from optuna.trial import TrialState

    reason = "interrupted: the search driver stopped and the resumed search could not continue this trial"
    try:
        study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{exp_dir / 'study.db'}")
    except KeyError:  # no study (a search that failed before its first trial)
        study = None
    if study is not None:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial.number, state=TrialState.FAIL)
    for run_dir in results.iter_trial_dirs(exp_dir):
        status = results.read_json(run_dir / "status.json") or {}
        if status.get("status") in ("pending", "running"):
            results.write_status(run_dir, "failed", ended=time.time(), error=reason)


def run_fixed(exp_dir: Path, group: str, configs: dict[str, dict], resources: dict, concurrency: int) -> dict:
    """Run fixed configs (no search) as Tune trials under <exp>/<group>/<id>; returns metrics by id.
    Each config is validated here, once, on the driver: the workers train it as given."""
    from tally.config import validate

    configs = {run_id: validate(cfg, source=f"{group}/{run_id}") for run_id, cfg in configs.items()}
    with bucket.exclusive(exp_dir, "experiment"):
        return _run_fixed(exp_dir, group, configs, resources, concurrency)


def _run_fixed(exp_dir: Path, group: str, configs: dict[str, dict], resources: dict, concurrency: int) -> dict:
    bank_dir = prepare_for_configs(list(configs.values()), exp_dir.parent)
    plan = {"exp_dir": str(exp_dir), "exp_uri": bucket.remote_of(exp_dir), "group": group, "configs": configs,
            "resources": resources, "bank_dir": str(bank_dir)}
    trainable = tune.with_resources(tune.with_parameters(trial_function, plan=plan), trial_resources(resources))
    tuner = tune.Tuner(
        trainable, param_space={"fixed_id": tune.grid_search(sorted(configs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency,
                                    reuse_actors=reuse_trial_actors(False, resources)),
        run_config=tune.RunConfig(name=group, storage_path=bucket.ray_path(exp_dir), verbose=0,
                                  callbacks=[StoreCallback(str(exp_dir), group)]))
    with _console(quiet=True):
        tuner.fit()
    bucket.pull(exp_dir, group)
    # metrics.json and the calibration metrics: confirmation seeds and robustness runs report both
    return {run_id: results.read_metrics(exp_dir / group / run_id) or {} for run_id in configs}


# ---------------------------------------------------------------- one run at a chosen scale
def train_on_ray(config: dict, run_dir: Path, resources: dict, address: str | None, resume: bool = False) -> dict:
    """`tally train --workers N` (or --gpus-per-worker, --address): one data-parallel TorchTrainer
    outside Tune, over the same training function; returns the run's metrics.

    ``config`` is validated. The banks are decoded once (Ray tasks) before the workers start.
    """
    from tally.training import check_run_folder

    run_dir = Path(run_dir).resolve()  # Train's storage path must be absolute
    check_run_folder(run_dir, config, resume)  # the driver refuses what rank 0 would, before Ray starts
    connect(address, concurrency=1)
    bank_dir = prepare_for_configs([config], run_dir.parent)
    try:
        launch_trainer(config, run_dir, {}, resources, name=f"train-{run_dir.name}",
                       storage_path=run_dir / "ray", in_tune=False, bank_dir=str(bank_dir))
    except ray.train.TrainingFailedError as e:  # the worker's own error is in the run's status
        status = results.read_json(run_dir / "status.json") or {}
        raise TallyError(f"{run_dir}: training failed: {status.get('error') or str(e).splitlines()[0]}") from None
    metrics = results.read_json(run_dir / "metrics.json")
    if metrics is None:  # rank 0 ran on another node and wrote the run folder on its own disk
        raise TallyError(f"{run_dir}: the run finished but its metrics.json is not here; with --address, "
                         "--out must be a folder every node sees (a shared volume)")
    return metrics


# ---------------------------------------------------------------- follow-ups of a finished search
def confirm_seeds(spec, exp_dir: Path, trial_id: str, k: int) -> pd.DataFrame:
    """Re-run the chosen config with K new seeds; mean and standard error of every metric."""
    base = results.read_yaml(exp_dir / results.TRIALS_DIR / trial_id / "config.yaml")
    configs = {}
    for i in range(1, k + 1):
        cfg = _copy(base)
        cfg["train"]["seed"] = cfg["method"]["seed"] = base["train"]["seed"] + i  # mixing draws too
        configs[f"seed{cfg['train']['seed']}"] = cfg
    metrics = run_fixed(exp_dir, "confirm", configs, spec.resolved["resources"],
                        spec.resolved["budget"]["concurrency"])
    table = mean_and_stderr(metrics)
    results.write_parquet(exp_dir / "confirm.parquet", table)
    bucket.push(exp_dir)
    return table


def robustness(spec, exp_dir: Path, trial_id: str, domain_names: list[str]) -> pd.DataFrame:
    """Score the chosen config on other settings: subpopulation shift and/or each held-out domain.
    Held-out-domain runs select their epoch on training-domain validation."""
    params = (results.read_json(exp_dir / results.TRIALS_DIR / trial_id / "status.json") or {}).get("params", {})
    configs = dict(spec.robustness_configs(params, domain_names))
    metrics = run_fixed(exp_dir, "robustness", configs, spec.resolved["resources"],
                        spec.resolved["budget"]["concurrency"])
    rows = [{"run": run_id, "split": split, **values}
            for run_id, by_split in metrics.items() for split, values in by_split.items() if split != "val"]
    table = pd.DataFrame(rows)
    results.write_parquet(exp_dir / "robustness.parquet", table)
    bucket.push(exp_dir)
    return table


def mean_and_stderr(metrics_by_run: dict[str, dict]) -> pd.DataFrame:
    """Rows split x metric: mean, standard error (ddof=1 / sqrt n), n runs."""
    rows = []
    frame = pd.DataFrame([{"run": run, "split": split, "metric": m, "value": v}
                          for run, by_split in metrics_by_run.items()
                          for split, values in by_split.items() for m, v in values.items()])
    if frame.empty:
        return frame
    for (split, metric), group in frame.groupby(["split", "metric"], sort=True):
        values = group["value"].dropna().to_numpy(dtype=float)
        n = len(values)
        stderr = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        rows.append({"split": split, "metric": metric, "mean": float(values.mean()) if n else math.nan,
                     "stderr": stderr, "n": n})
    return pd.DataFrame(rows)


def _copy(cfg: dict) -> dict:
    import copy

    return copy.deepcopy(cfg)
