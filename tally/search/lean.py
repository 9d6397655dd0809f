"""Trials that start fast: what a trial does not need to start.

Ray Train V2 starts a handful of processes per run (bench/search_overhead.py lists them with their
CPU seconds). Each costs a Python start, Ray's imports, and often torch's: 1-2 s of CPU here.
What can go without changing what a trial computes:

- all of Train, for a trial of one worker: the trial is the worker (tally.search.trial); Train's
  controller, worker, placement group and its cleaner start only for data-parallel trials.
- the DatasetManager actor (and, once per cluster, Ray Data's autoscaling coordinator): Train
  creates them for every run, also one without Ray Datasets; our trials read image banks.
- the trial actor itself, between trials: Tune reuses it, so its start and its imports (torch
  among them) are paid once per concurrent slot, not once per trial. A 1-worker trial that ASHA
  stops ends its training thread at its next report (Tune's synchronous reporting), so its actor
  is reused too. A data-parallel trial's thread waits in TorchTrainer.fit, which an ASHA stop does
  not end in time, and reuse then fails the next trial (docs/STATUS.md): with early stopping, those
  trials get fresh actors.

And one thing a trial needs to end cleanly: Train's PlacementGroupCleaner frees the workers of a
trial whose controller died (an ASHA stop). It asks the State API of "the" local Ray, found through
RAY_ADDRESS or by looking for running Ray processes; with two local Rays on one machine (two
searches at once, or a shared machine) it finds both, raises, stops watching, and the next trials
wait for CPUs that never come back. tally.cluster.own_cluster_address gives the processes of a
local Ray its address.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback


class LeanTorchTrainer(TorchTrainer):
    """A TorchTrainer that starts no Ray Data machinery when it is given no datasets."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]


def one_worker(resources: dict) -> bool:
    """Whether a trial runs in its own process, without Ray Train (see the module docstring)."""
    return resources.get("workers", 1) == 1


def reuse_trial_actors(early_stopping: bool, resources: dict) -> bool:
    """Whether Tune may run the next trial in the previous trial's actor (see the module docstring)."""
    return one_worker(resources) or not early_stopping
