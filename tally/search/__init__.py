"""Many runs: a validated spec -> Ray Tune (Optuna, optional ASHA) -> the results store.

The front door of searches (as optuna/study/__init__.py is Optuna's): callers import from here.

- spec.py      the spec: every section checked before Ray starts; a trial's complete run config
- space.py     `space:` - its checks, and its define-by-run sampling for Optuna
- searcher.py  the Optuna searcher that tells pruned trials from complete and failed ones
- trial.py     the Ray side of one trial: a Tune function that trains (1 worker) or fits a TorchTrainer (N)
- run.py       the Tuner, its store callback, and the follow-ups (confirmation seeds, robustness)
- dry_run.py   what `tally search --dry-run` prints
- benchmark.py `tally benchmark`: methods x seeds x settings as fixed trials, the MDLT table, paired differences

Loading or checking a spec imports neither Ray nor Optuna (seconds at every `--dry-run` and in the
dashboard); the names that need Ray load on first use.
"""

from __future__ import annotations

import importlib

from tally.search.dry_run import budget_text, dry_run_text
from tally.search.spec import Spec, load_spec, spec_from_raw

_NEEDS_RAY = {
    "run_search": "tally.search.run",
    "run_fixed": "tally.search.run",
    "train_on_ray": "tally.search.run",
    "connect": "tally.search.run",
    "confirm_seeds": "tally.search.run",
    "robustness": "tally.search.run",
    "mean_and_stderr": "tally.search.run",
}

# the benchmark imports Ray only when it runs; loaded on first use like the names above
_BENCHMARK = {name: "tally.search.benchmark" for name in (
    "BenchmarkSpec", "load_benchmark_spec", "benchmark_spec_from_raw", "run_benchmark", "load_benchmark")}

__all__ = ["Spec", "budget_text", "dry_run_text", "load_spec", "spec_from_raw", *_NEEDS_RAY, *_BENCHMARK]


def __getattr__(name: str):
    if name in _NEEDS_RAY or name in _BENCHMARK:
        return getattr(importlib.import_module({**_NEEDS_RAY, **_BENCHMARK}[name]), name)
    raise AttributeError(f"module 'tally.search' has no attribute {name!r}")
