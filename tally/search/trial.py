"""The Ray side of one trial: a Tune function that trains the run itself (one worker) or through a
TorchTrainer (N workers, DDP).

One worker, the usual case: the Tune trial is the worker. It holds the worker's CPUs and GPU (on any
node: tally.search.run.trial_resources), and runs the same training function in its own process, reporting each epoch with
ray.tune.report. Ray Train's supervision stack (controller, placement group and its cleaner, worker
actor, synchronisation actor), about five processes each importing Ray and torch, is what a 1-worker
trial paid for nothing (bench/search_overhead.py measures the difference).

N workers: Train V2 (Ray 2.60): the Tune trial builds and fits a TorchTrainer; rank 0's reports reach
Tune through TuneReportCallback.

Either way the trial's run folder in the results store holds its own checkpoints, so a restarted trial
resumes from there (shared storage on a cluster).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import ray.tune
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.tune.integration.ray_train import TuneReportCallback

from tally import results
from tally.method.perf import peak_rss_mib, release_cpu_memory, reset_peak_rss
from tally.results import storage as bucket
from tally.schema import mode_of
from tally.search.lean import LeanTorchTrainer, one_worker
from tally.search.rendezvous import BoundTorchConfig
from tally.search.spec import Spec

OBJECTIVE = "objective"  # the best-so-far validation selection metric of a trial
FINAL = "final"          # 1 on a trial's last report: it ran to the end (the searcher reads it)


def train_worker(loop_config: dict) -> None:
    """Runs in every Train worker (a trial of N workers, or `tally train --workers N`)."""
    context = ray.train.get_context()
    train_trial(loop_config, rank=context.get_world_rank(), world_size=context.get_world_size(),
                device=ray.train.torch.get_device(), report_to=ray.train.report)


def train_trial(loop_config: dict, rank: int, world_size: int, device, report_to: Callable[[dict], None]) -> None:
    """The same training function as `tally train`, reporting each epoch to Ray (``report_to``:
    ray.train.report in a Train worker, ray.tune.report in a 1-worker trial)."""
    # imported here, not at the top: a Train controller unpickles this module too, and torchvision's
    # import (torch._dynamo) costs it seconds per trial
    from tally.data.bank import use_bank_dir
    from tally.training import RunContext, train_run

    use_bank_dir(loop_config.get("bank_dir"))  # the search's pre-decoded banks (tally.search.banks)

    reset_peak_rss()  # a reused trial actor: this trial's peak, not an earlier one's
    metric = loop_config["config"]["train"]["selection_metric"]
    better = max if mode_of(metric) == "max" else min  # lower is better for ECE, Brier, NLL, AURC
    best = {"value": -math.inf if better is max else math.inf}
    run_dir = Path(loop_config["run_dir"])
    if loop_config.get("run_uri"):  # a bucket store: each rank works on its own local copy of the run
        run_dir = bucket.stage(loop_config["run_uri"], f"rank{rank}")
        bucket.pull(run_dir, skip=())  # with its checkpoints: a resumed trial continues from them
    main = rank == 0

    def report(record: dict, _checkpoint_dir) -> None:
        # the objective follows the kept-epoch rule (train.select_from): the kept epoch's value; before
        # any epoch may be kept (warm-up), this epoch's value, so early stopping has a signal
        value = record.get("best_value")
        if value is None:
            value = record.get(f"val/{metric}")
        if value is not None and not math.isnan(value):
            best["value"] = value if record.get("best_value") is not None else better(best["value"], value)
        numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if main:
            bucket.push(run_dir)  # before Tune hears of the epoch: a scheduler may stop the trial right after
        report_to({**numbers, OBJECTIVE: best["value"], FINAL: 0})

    ctx = RunContext(rank=rank, world_size=world_size, device=device, report=report, progress=False,
                     extra_status={"params": loop_config.get("params", {}),
                                   "ray_node_id": ray.get_runtime_context().get_node_id()},
                     memory_dump_dir=Path(loop_config["memory_dump_dir"]) if loop_config.get("memory_dump_dir") else None)
    try:  # validated once, by Spec.trial_config (or run_fixed on the driver)
        with bucket.heartbeat(run_dir, enabled=main):
            metrics = train_run(loop_config["config"], run_dir, resume=True, ctx=ctx, validated=True)
        if main:  # what the trial's process held at most during it (tests/search/test_scale.py bounds it)
            status = results.read_json(run_dir / "status.json") or {}
            results.write_status(run_dir, status.get("status", "done"), peak_rss_mib=peak_rss_mib())
    finally:
        if main:
            bucket.push(run_dir)  # the final state: done with its tables, or failed with its error
    final = {OBJECTIVE: best["value"], FINAL: 1}
    if metrics:
        # the kept checkpoint's validation numbers, calibration ones included (calibration.json):
        # a multi-objective searcher reads its objectives here
        val = (results.read_metrics(run_dir) or metrics).get("val", {})
        selection = val.get(metric)
        final[OBJECTIVE] = selection if selection is not None else best["value"]
        final.update({f"val/{k}": v for k, v in val.items()})
    report_to(final)


def _loop_config(config: dict, run_dir: Path, params: dict, memory_dump_dir: Path | None, bank_dir: str | None) -> dict:
    return {"config": config, "run_dir": str(run_dir), "run_uri": bucket.remote_of(run_dir), "params": params,
            "memory_dump_dir": str(memory_dump_dir) if memory_dump_dir else None, "bank_dir": bank_dir}


def trial_device(resources: dict):
    """The device of a 1-worker trial: its GPU (Ray sets CUDA_VISIBLE_DEVICES to the one it gave the
    trial, so it is cuda:0 here, as ray.train.torch.get_device says in a worker), else the CPU."""
    import torch

    if resources.get("gpus_per_worker", 0) and ray.get_gpu_ids():
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def launch_trainer(config: dict, run_dir: Path, params: dict, resources: dict, name: str,
                   storage_path: Path | str, memory_dump_dir: Path | None = None, in_tune: bool = True,
                   bank_dir: str | None = None) -> None:
    """Fit one TorchTrainer for one trial (N workers; NCCL on GPUs, gloo on CPUs).

    ``in_tune``: called from a Tune trial, whose reports then reach Tune; False for a plain Train run.
    """
    gpus = resources.get("gpus_per_worker", 0)
    per_worker = {"CPU": resources.get("cpus_per_worker", 1)}
    if gpus:
        per_worker["GPU"] = gpus
    trainer = LeanTorchTrainer(  # a TorchTrainer without Ray Data's actors (tally.search.lean)
        train_worker,
        train_loop_config=_loop_config(config, run_dir, params, memory_dump_dir, bank_dir),
        torch_config=BoundTorchConfig(backend="nccl" if gpus else "gloo"),  # its store on the node address
        scaling_config=ScalingConfig(num_workers=resources.get("workers", 1), use_gpu=bool(gpus),
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=str(storage_path),
                             failure_config=FailureConfig(max_failures=0, controller_failure_limit=1),
                             callbacks=[TuneReportCallback()] if in_tune else []),
    )
    trainer.fit()


def trial_function(params: dict, *, plan: dict) -> None:
    """One Tune trial. ``plan``: exp_dir, group, resources, and either the spec (searched params)
    or fixed configs keyed by run id (confirmation seeds, robustness settings)."""
    exp_dir = Path(plan["exp_dir"])
    if "fixed_id" in params:
        run_id = params["fixed_id"]
        config = plan["configs"][run_id]
        shown_params = {}
    else:
        run_id = ray.tune.get_context().get_trial_id()
        config = Spec.from_resolved(plan["spec"]).trial_config(params)
        shown_params = params
    run_dir = exp_dir / plan["group"] / run_id
    if plan.get("exp_uri"):  # a bucket store: this node's copy of the run (statuses, metrics)
        run_dir = bucket.stage(bucket.join(plan["exp_uri"], plan["group"], run_id), "trial")
        bucket.pull(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    status = results.read_json(run_dir / "status.json") or {}
    metrics = results.read_metrics(run_dir)  # calibration metrics included: a search may select on them
    value = (metrics or {}).get("val", {}).get(config["train"]["selection_metric"])
    if status.get("status") == "done" and value is not None:
        # A resumed search replays a trial that finished after the killed driver's last Tune
        # checkpoint: the store already holds its result, so report it instead of training again.
        ray.tune.report({OBJECTIVE: value, FINAL: 1, **{f"val/{k}": v for k, v in metrics["val"].items()}})
        return
    if status.get("status") is None:
        results.write_status(run_dir, "pending", params=shown_params)
        bucket.push(run_dir)
    # Final states the worker cannot write (stopped early, killed) are written by the driver's
    # StoreCallback: only it knows whether an ending was the scheduler's decision or an error.
    resources = plan["resources"]
    if one_worker(resources):  # this trial is the worker (module docstring)
        # an ASHA stop ends the training thread at its next report (SystemExit); the store push in its
        # `finally` must fit in the time Tune gives it before reusing this actor (default 2 s)
        os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "120")
        try:
            train_trial(_loop_config(config, run_dir, shown_params, None, plan.get("bank_dir")), rank=0,
                        world_size=1, device=trial_device(resources), report_to=ray.tune.report)
        finally:
            release_cpu_memory()  # this actor runs the next trial: no heap kept from this one
        return
    launch_trainer(config, run_dir, shown_params, resources, name=f"train-{run_id}",
                   storage_path=f"{plan['exp_uri']}/ray/train" if plan.get("exp_uri") else exp_dir / "ray" / "train",
                   bank_dir=plan.get("bank_dir"))
