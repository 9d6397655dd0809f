"""The Optuna searcher of a search: it tells Optuna which trials completed, were pruned or failed."""

from __future__ import annotations

import logging
import math
import numbers

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from tally.search.trial import FINAL

logger = logging.getLogger(__name__)


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch whose study records what happened to each trial.

    The base class tells COMPLETE whenever the last result holds the metric: an ASHA-stopped trial then
    enters TPE with its early (lower) value as if it had finished, and an errored trial that reported
    once counts as a success. Here: error -> FAIL, stopped before its final report -> PRUNED (Optuna
    keeps its intermediate values, reported per epoch), final report -> COMPLETE with the metric.
    A final report without a finite metric is a FAIL.

    Multi-objective (``metric`` a list of validation columns): the final report's values, which are the
    kept checkpoint's; Optuna takes no intermediate values for several objectives, so the same states
    apply without them.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not (isinstance(self.metric, list) or _finite(result.get(self.metric))):
            return
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            # the study told it before the driver died, Tune's checkpoint had not recorded it yet:
            # the resumed trial replays its reports; the study already has its outcome
            logger.info("optuna: trial %s already finished in the study; result not re-reported", trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return None
        result = result or {}
        if isinstance(self.metric, list):
            value = [result.get(m) for m in self.metric]
            finite = all(_finite(v) for v in value)
        else:
            value = result.get(self.metric)
            finite = _finite(value)
        if error:
            state, value = TrialState.FAIL, None
        elif not result.get(FINAL):
            state, value = TrialState.PRUNED, None
        elif finite:
            state, value = TrialState.COMPLETE, [float(v) for v in value] if isinstance(value, list) else float(value)
        else:
            state, value = TrialState.FAIL, None
        try:
            self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
        except (ValueError, RuntimeError) as exc:  # e.g. already told before a restore: keep searching
            logger.warning("optuna tell for trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)
        return None


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
