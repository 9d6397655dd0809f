"""Multi-objective search: the spec's `selection.objectives`, the Pareto rule of tally.results, and what
the searcher tells Optuna (without Ray: Tune's calls are simulated). The real search is in
tests/search/test_benchmark.py (slow)."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest

from tally import results
from tally.errors import TallyError
from tally.search import spec_from_raw
from tally.search.searcher import PruneAwareOptunaSearch
from tally.search.space import DefineByRun
from tally.search.trial import FINAL, OBJECTIVE

SPEC = {"name": "mo", "base": {"method": {"name": "tally"}, "train": {"epochs": 2, "warmup_epochs": 1}},
        "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        "budget": {"trials": 3}}
OBJ = ("val/pair_acc_mean", "val/pair_acc_worst")


def summary(rows) -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": t, "status": s, OBJ[0]: m, OBJ[1]: w} for t, s, m, w in rows])


# ---------------------------------------------------------------- the spec
def test_objectives_resolve_with_defaults_and_the_epoch_metric():
    spec = spec_from_raw({**SPEC, "selection": {"objectives": ["pair_acc_mean", "pair_acc_worst"]}})
    assert spec.resolved["selection"] == {"metric": "pair_acc_worst", "mode": "max", "tolerance": 0.01,
                                          "sampler": "tpe", "objectives": ["pair_acc_mean", "pair_acc_worst"]}
    assert spec.base["train"]["selection_metric"] == "pair_acc_worst"  # a trial keeps epochs by the robust one
    plain = spec_from_raw({**SPEC, "selection": {"metric": "pair_acc_mean"}})
    assert set(plain.resolved["selection"]) == {"metric", "mode"}  # single-objective specs are unchanged


@pytest.mark.parametrize("selection,field", [
    ({"objectives": ["pair_acc_mean"]}, "selection.objectives"),
    ({"objectives": ["pair_acc_mean", "pair_acc_mean"]}, "selection.objectives"),
    ({"objectives": ["pair_acc_mean", "loss"]}, "selection.objectives"),
    ({"objectives": ["pair_acc_mean", "pair_acc_worst"], "tolerance": 2}, "selection.tolerance"),
    ({"objectives": ["pair_acc_mean", "pair_acc_worst"], "sampler": "cmaes"}, "selection.sampler"),
    ({"tolerance": 0.1}, "selection.tolerance: unknown key"),
])
def test_bad_objectives_name_the_field(selection, field):
    with pytest.raises(TallyError, match=field):
        spec_from_raw({**SPEC, "selection": selection})


# ---------------------------------------------------------------- the rule
def test_pareto_front_on_a_synthetic_table():
    table = summary([("a", "done", 0.80, 0.10), ("b", "done", 0.79, 0.30), ("c", "done", 0.70, 0.30),
                     ("d", "done", 0.60, 0.50), ("e", "failed", 0.99, 0.99), ("f", "done", 0.79, 0.30),
                     ("g", "stopped", 0.85, 0.60)])
    front = results.pareto_front(table, OBJ)
    # c is dominated by b; b and f tie (neither dominates the other); unfinished trials never count
    assert table["trial_id"][front].tolist() == ["a", "b", "d", "f"]


@pytest.mark.parametrize("tolerance,expected", [(0.0, "a"), (0.01, "b"), (0.05, "b"), (0.2, "d")])
def test_pick_best_worst_within_tolerance_of_the_best_mean(tolerance, expected):
    table = summary([("a", "done", 0.80, 0.10), ("b", "done", 0.795, 0.30), ("b2", "done", 0.79, 0.30),
                     ("c", "done", 0.76, 0.30), ("d", "done", 0.61, 0.50), ("e", "running", 0.9, 0.9)])
    picked = results.pick_from_front(table, OBJ, tolerance)
    assert picked["trial_id"] == expected  # b beats b2 (same worst, better mean) whatever the order
    assert results.pareto_front(table, OBJ)[picked.name]


def test_selection_of_a_multi_objective_spec_drives_best_of_experiment(tmp_path):
    spec = spec_from_raw({**SPEC, "selection": {"objectives": ["pair_acc_mean", "pair_acc_worst"],
                                                "tolerance": 0.05}})
    results.write_yaml(tmp_path / "spec.yaml", spec.resolved)
    selection = results.selection_of(spec.resolved)
    assert selection.objectives == OBJ and selection.tolerance == 0.05 and selection.metric == OBJ[1]
    assert "within 0.05 of the best val/pair_acc_mean" in selection.source
    table = summary([("a", "done", 0.80, 0.10), ("b", "done", 0.76, 0.30)])
    best, _ = results.best_of_experiment(tmp_path, table)
    assert best["trial_id"] == "b"  # single-objective best_trial on worst pair would agree; on mean it would not
    assert results.select_trial(table, results.Selection("val/pair_acc_mean", "max", "x"))["trial_id"] == "a"
    assert results.pick_from_front(summary([("a", "failed", 0.8, 0.1)]), OBJ, 0.01) is None


# ---------------------------------------------------------------- what Optuna is told
def test_searcher_tells_the_final_reports_values():
    study_storage = optuna.storages.InMemoryStorage()
    searcher = PruneAwareOptunaSearch(space=DefineByRun(SPEC["space"]), metric=list(OBJ), mode=["max", "max"],
                                      sampler=optuna.samplers.TPESampler(seed=0), study_name="s",
                                      storage=study_storage)
    assert searcher.suggest("t1") and searcher.suggest("t2") and searcher.suggest("t3") and searcher.suggest("t4")
    for epoch in range(3):  # epoch reports: Optuna takes no intermediate values for several objectives
        searcher.on_trial_result("t1", {"epoch": epoch, OBJ[0]: 0.9, OBJ[1]: 0.0, OBJECTIVE: 0.2, FINAL: 0})
    # the final report carries the kept checkpoint's validation values (tally.search.trial)
    searcher.on_trial_complete("t1", {OBJECTIVE: 0.2, FINAL: 1, OBJ[0]: 0.7, OBJ[1]: 0.2})
    searcher.on_trial_complete("t2", {OBJECTIVE: 0.1, FINAL: 0, OBJ[0]: 0.4, OBJ[1]: 0.1})  # stopped early
    searcher.on_trial_complete("t3", None, error=True)
    searcher.on_trial_complete("t4", {OBJECTIVE: 0.1, FINAL: 1, OBJ[0]: float("nan"), OBJ[1]: 0.1})
    study = optuna.load_study(study_name="s", storage=study_storage)
    states = [(t.state, t.values) for t in study.trials]
    assert states == [(optuna.trial.TrialState.COMPLETE, [0.7, 0.2]), (optuna.trial.TrialState.PRUNED, None),
                      (optuna.trial.TrialState.FAIL, None), (optuna.trial.TrialState.FAIL, None)]


def test_report_and_export_follow_the_pareto_rule(tmp_path, capsys):
    from tally import cli
    from tally.deploy.export import resolve_trial
    from tests.store_factory import make_experiment

    exp = make_experiment(tmp_path, "mo", n_trials=6, statuses=["done"] * 6).path
    spec = results.read_yaml(exp / "spec.yaml")
    spec["selection"] = {"metric": "pair_acc_worst", "mode": "max", "objectives": ["pair_acc_mean", "pair_acc_worst"],
                         "tolerance": 0.02}
    results.write_yaml(exp / "spec.yaml", spec)
    expected = results.pick_from_front(results.summarise(exp), OBJ, 0.02)["trial_id"]
    assert resolve_trial(exp, None).name == expected
    assert cli.main(["report", str(exp), "--replicates", "10"]) == 0
    assert f"selected: {expected} (Pareto front of (val/pair_acc_mean, val/pair_acc_worst)" in capsys.readouterr().err


# ---------------------------------------------------------------- a lower-is-better objective
CAL = ("val/pair_acc_mean", "val/ece_worst_domain")


def test_objectives_with_a_calibration_metric_resolve_each_direction():
    spec = spec_from_raw({**SPEC, "selection": {"objectives": ["pair_acc_mean", "ece_worst_domain"]}})
    assert spec.resolved["selection"]["mode"] == "min"  # the kept epoch: the lowest validation worst-domain ECE
    assert spec.base["train"]["selection_metric"] == "ece_worst_domain"
    selection = results.selection_of(spec.resolved)
    assert selection.objectives == CAL and selection.modes == ("max", "min") and selection.mode == "min"
    assert "val/ece_worst_domain (lower is better)" in selection.source

    from tally.search.run import optuna_objectives

    metric, mode = optuna_objectives(spec.resolved["selection"])
    assert (metric, mode) == (list(CAL), ["max", "min"])
    searcher = PruneAwareOptunaSearch(space=DefineByRun(SPEC["space"]), metric=metric, mode=mode,
                                      sampler=optuna.samplers.TPESampler(seed=0), study_name="s",
                                      storage=optuna.storages.InMemoryStorage())
    assert searcher._ot_study.directions == [optuna.study.StudyDirection.MAXIMIZE,
                                             optuna.study.StudyDirection.MINIMIZE]
    single = spec_from_raw({**SPEC, "selection": {"metric": "nll"}}).resolved["selection"]
    assert optuna_objectives(single) == (OBJECTIVE, "min")


def test_pareto_front_and_pick_take_each_objective_in_its_direction():
    table = pd.DataFrame([{"trial_id": t, "status": s, CAL[0]: m, CAL[1]: e} for t, s, m, e in [
        ("a", "done", 0.80, 0.30), ("b", "done", 0.795, 0.10), ("c", "done", 0.70, 0.10),
        ("d", "done", 0.60, 0.05), ("e", "failed", 0.99, 0.00), ("f", "done", 0.60, 0.40)]])
    # c is dominated by b (worse mean, same ECE); f by d. Read as higher-is-better, the ECE would make
    # f (the least calibrated) part of the front and d (the best calibrated) dominated by f
    assert table["trial_id"][results.pareto_front(table, CAL)].tolist() == ["a", "b", "d"]
    for tolerance, expected in ((0.0, "a"), (0.01, "b"), (0.2, "d")):
        assert results.pick_from_front(table, CAL, tolerance)["trial_id"] == expected
    # the first objective may be the lower-is-better one: within 0.06 of the lowest ECE, the best mean
    assert results.pick_from_front(table, CAL[::-1], 0.06)["trial_id"] == "b"
    assert results.pick_from_front(table, CAL[::-1], 0.0)["trial_id"] == "d"


def test_the_dashboards_pareto_band_follows_the_first_objectives_direction():
    from tally.dashboard import charts

    points = pd.DataFrame({"trial_id": ["a", "b"], "x": [0.1, 0.3], "y": [0.5, 0.6], "front": [True, True],
                           "picked": [True, False]})
    band = charts.pareto_figure(points, "x", "y", 0.05, ("min", "max")).layout.shapes[0]
    assert (band.x0, band.x1) == pytest.approx((0.1, 0.15))  # the lowest ECE and 0.05 above it
    band = charts.pareto_figure(points, "x", "y", 0.05).layout.shapes[0]
    assert (band.x0, band.x1) == pytest.approx((0.25, 0.3))
