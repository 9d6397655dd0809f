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
