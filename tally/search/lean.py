"""Trials that start fast: what each trial's Ray Train run does not need to start.

Ray Train V2 starts a handful of processes per trial (bench/search_overhead.py lists them with
their CPU seconds). Each costs a Python start, Ray's imports, and often torch's: 1-2 s of CPU here.
What can go without changing what a trial computes:

- the DatasetManager actor (and, once per cluster, Ray Data's autoscaling coordinator): Train
  creates them for every run, also one without Ray Datasets; our trials read image banks.
- the trial actor itself, between trials that end normally: Tune reuses it when no scheduler stops
  trials early (an ASHA stop leaves its TorchTrainer thread running, and reuse then fails the next
  trial: docs/STATUS.md), so its start and its imports (torch among them) are paid once per
  concurrent slot, not once per trial.

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


def reuse_trial_actors(early_stopping: bool) -> bool:
    """Whether Tune may run the next trial in the previous trial's actor (see the module docstring)."""
    return not early_stopping
