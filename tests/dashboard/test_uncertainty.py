"""Intervals on the dashboard: the data layer returns tally.evaluation.intervals' own numbers, and the app shows
them in the grid and compare views, a benchmark folder's tables, and a multi-objective Pareto front."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tally import evaluation as ev
from tally import results
from tally.dashboard import data as dd
from tally.dashboard import uncertainty as dun
from tally.evaluation import benchmark_tables as benchmark
from tally.evaluation import intervals
from tests import store_factory as sf
from tests.dashboard.test_app import assert_ok, figures, frame, plotly_array, run_app, show, texts


def keep_predictions(run_dir: Path, seed: int, quality: float = 0.7, setting: str = "sub") -> None:
    """Rewrite a run's eval.parquet from fresh synthetic predictions and keep them (predictions.parquet),
    as training does for test splits: the table and the predictions agree image by image."""
    rng = np.random.default_rng(seed)
    names = sf.Names()
    held_out = ()
    old = results.read_parquet(run_dir / "eval.parquet")
    train_counts = ev.count_arrays(old, "val")["n_train"]
    tables, frames = [], []
    for split in ("val", "test_sub"):
        labels, domains = sf._split_data(split, held_out, 20 if split == "val" else 10, names)
        preds = sf._predict(rng, labels, domains, train_counts, quality, [], len(names.classes))
        tables.append(ev.pair_table(split, preds, labels, domains, list(names.classes), list(names.domains),
                                    train_counts))
        if split.startswith("test"):
            frames.append(intervals.prediction_frame(split, preds, labels, domains, rng.random(len(labels))))
    table = pd.concat(tables, ignore_index=True)
    results.write_parquet(run_dir / "eval.parquet", table)
    results.write_json(run_dir / "metrics.json", ev.all_metrics(table))
    intervals.write_predictions(run_dir, frames)


@pytest.fixture()
def store(tmp_path) -> sf.Store:
    return sf.make_store(tmp_path, n_trials=6)


def _sub_trials(store) -> tuple[Path, list[str]]:
    exp = store.experiments["pacs-sub"].path
    return exp, sorted(store.experiments["pacs-sub"].statuses)


# ---------------------------------------------------------------- data layer
def test_run_intervals_are_the_intervals_of_the_run(store):
    exp, ids = _sub_trials(store)
    run_dir = exp / results.TRIALS_DIR / ids[0]
    for kept in (False, True):
        if kept:
            keep_predictions(run_dir, seed=3)
        run = dd.load_run(run_dir)
        got = dun.run_intervals(run)
        want = intervals.table_intervals(results.read_parquet(run_dir / "eval.parquet"),
                                         intervals.read_predictions(run_dir), replicates=dun.REPLICATES)
        pd.testing.assert_frame_equal(got, want)
        assert set(got.loc[got["metric"] == "pair_acc_worst", "method"]) == {"simultaneous"}
        wide = dun.interval_frame(got, ["val", "test_sub"])
        assert wide.at["pair_acc_worst", f"test_sub {dun.SMALL}"] == row_small(want, "pair_acc_worst")
        row = want[(want["split"] == "test_sub") & (want["metric"] == "pair_acc_worst")].iloc[0]
        assert wide.at["pair_acc_worst", "test_sub"] == row["value"]
        assert wide.at["pair_acc_worst", f"test_sub {dun.LOW}"] == row["low"]
        assert wide.at["pair_acc_worst", f"test_sub {dun.HIGH}"] == row["high"]
        assert row["low"] <= row["value"] <= row["high"]
        mean = want[(want["split"] == "test_sub") & (want["metric"] == "pair_acc_mean")].iloc[0]
        assert mean["low"] < mean["value"] < mean["high"]  # a real interval, not a point
        # the point values are the evaluator's (the dashboard's plain metric table)
        metrics = dd.run_metrics(run.eval_table)["test_sub"]
        for name in ev.METRIC_NAMES:
            np.testing.assert_allclose(wide.at[name, "test_sub"], metrics[name], equal_nan=True)


def test_old_table_blanks_what_it_cannot_support(store):
    exp, ids = _sub_trials(store)
    run_dir = exp / results.TRIALS_DIR / ids[0]
    table = results.read_parquet(run_dir / "eval.parquet").drop(columns=["predicted"])
    results.write_parquet(run_dir / "eval.parquet", table)
    got = dun.run_intervals(dd.load_run(run_dir))
    f1 = got[got["metric"] == "macro_f1"]
    assert f1[["value", "low", "high"]].isna().all().all()
    assert got[got["metric"] == "pair_acc_worst"]["low"].notna().all()


def test_paired_is_compare_runs_or_says_why(store):
    exp, ids = _sub_trials(store)
    a, b = (exp / results.TRIALS_DIR / t for t in ids[:2])
    diff, why = dun.paired(a, b, "test_sub")
    assert diff is None and a.name in why and b.name in why and intervals.PREDICTIONS_FILE in why
    keep_predictions(a, seed=1, quality=0.9)
    diff, why = dun.paired(a, b, "test_sub")
    assert diff is None and b.name in why and a.name not in why
    keep_predictions(b, seed=2, quality=0.5)
    diff, why = dun.paired(a, b, "test_sub", replicates=200)
    want, _ = intervals.compare_runs(a, b, splits=["test_sub"], replicates=200)
    assert "without image keys" in why  # keep_predictions writes an older run's file: paired by index
    pd.testing.assert_frame_equal(diff, want.set_index("metric")[["diff", "low", "high", "small_cells"]])


def row_small(frame: pd.DataFrame, metric: str) -> int:
    return int(frame[(frame["split"] == "test_sub") & (frame["metric"] == metric)]["small_cells"].iat[0])


def test_pareto_points_mark_front_and_pick(tmp_path):
    exp = _multi_objective(tmp_path)
    trials = dd.load_trials(exp.path)
    points = dun.pareto_points(trials)
    x, y = trials.selection.objectives
    summary = trials.frame
    done = summary[summary["status"] == "done"]
    assert sorted(points["trial_id"]) == sorted(done["trial_id"])
    front = results.pareto_front(summary, (x, y))
    assert set(points.loc[points["front"], "trial_id"]) == set(summary.loc[front, "trial_id"])
    pick = results.select_trial(summary, trials.selection)
    assert points.loc[points["picked"], "trial_id"].tolist() == [pick["trial_id"]]


# ---------------------------------------------------------------- stores for the app
def _multi_objective(root: Path) -> sf.Experiment:
    exp = sf.make_experiment(root, "pacs-pareto", 12, seed=4)
    spec = results.read_yaml(exp.path / "spec.yaml")
    spec["selection"] = {"objectives": ["pair_acc_mean", "pair_acc_worst"], "tolerance": 0.01}
    results.write_yaml(exp.path / "spec.yaml", spec)
    return exp


def write_benchmark_run(run_dir: Path, method: str, seed: int, quality: float) -> None:
    """One finished benchmark run of the sub setting: config, eval table, predictions of that quality, status."""
    results.write_yaml(run_dir / "config.yaml", {"data": {"source": "embedded", "setting": "sub"},
                                                 "method": {"name": method}, "train": {"seed": seed}})
    results.write_parquet(run_dir / "eval.parquet", sf.eval_table(
        np.random.default_rng(0), sf._train_counts(np.random.default_rng(0), ()), ("val",), (), 0.7))
    keep_predictions(run_dir, seed=10 * seed + len(method), quality=quality)
    results.write_json(run_dir / "status.json", {"status": "done"})


def make_benchmark(root: Path, name: str = "bench", seeds=(0, 1)) -> Path:
    """A finished benchmark folder as `tally benchmark` leaves it: spec.yaml, plan.parquet and one run
    folder per (method, seed) with config, eval table, metrics and predictions."""
    exp_dir = root / name
    rows = []
    for method, quality in (("tally", 0.9), ("erm", 0.5)):
        for seed in seeds:
            run = f"{method}-sub-seed{seed}"
            write_benchmark_run(exp_dir / benchmark.RUNS_DIR / run, method, seed, quality)
            rows.append({"run": run, "method": method, "setting": "sub", "split": "test_sub", "seed": seed})
    results.write_parquet(exp_dir / "plan.parquet", pd.DataFrame(rows))
    results.write_yaml(exp_dir / "spec.yaml", {"name": name, "baseline": ["erm"],
                                               "report": {"replicates": 200, "bootstrap_seed": 0}})
    return exp_dir


def test_benchmark_frames_are_load_benchmarks(tmp_path):
    exp_dir = make_benchmark(tmp_path)
    assert dun.is_benchmark(exp_dir) and not dun.is_benchmark(sf.make_experiment(tmp_path, "s", 2).path)
    out = benchmark.load_benchmark(exp_dir)
    assert dun.benchmark_settings(out) == ["sub"]
    assert out["difference_summary"]["comparisons"].iat[0] == (out["difference_summary"]["verdict"] != "n/a").sum()
    table = dun.seed_frame(out, "sub").set_index("method")
    stats = out["table"].set_index(["method", "metric"])
    assert table.at["tally", "worst pair"] == stats.at[("tally", "pair_acc_worst"), "mean"]
    assert table.at["tally", "worst pair SE"] == stats.at[("tally", "pair_acc_worst"), "stderr"]
    diff = dun.difference_frame(out, "sub").set_index("metric")
    summary = out["difference_summary"].set_index("metric")
    assert diff.at["pair_acc_mean", "verdict"] == summary.at["pair_acc_mean", "verdict"]
    assert diff.at["pair_acc_mean", "mean_diff"] == summary.at["pair_acc_mean", "mean_diff"]
    assert "seed 0: " in diff.at["pair_acc_mean", "per seed (diff [95% low, 95% high])"]


# ---------------------------------------------------------------- the app
def test_grid_view_shows_intervals(store, monkeypatch):
    exp, ids = _sub_trials(store)
    keep_predictions(exp / results.TRIALS_DIR / ids[1], seed=5)
    at = run_app(store.root, monkeypatch, experiment="pacs-sub")
    at = show(at, "Accuracy grid", **{"trial:pacs-sub": ids[1]})
    assert_ok(at)
    shown = frame(at, "test_sub", f"test_sub {dun.LOW}", f"test_sub {dun.HIGH}")
    want = intervals.table_intervals(results.read_parquet(exp / results.TRIALS_DIR / ids[1] / "eval.parquet"),
                                     intervals.read_predictions(exp / results.TRIALS_DIR / ids[1]),
                                     replicates=dun.REPLICATES).set_index(["split", "metric"])
    for metric in ("pair_acc_worst", "macro_f1", "shot_few"):
        np.testing.assert_allclose(shown.loc[metric, [f"test_sub {dun.LOW}", f"test_sub {dun.HIGH}"]].to_numpy(float),
                                   want.loc[("test_sub", metric), ["low", "high"]].to_numpy(float), equal_nan=True)
    assert "95% intervals over the test images" in texts(at) and dun.LEGEND_RUN in texts(at)


def test_compare_view_paired_difference(store, monkeypatch):
    exp, ids = _sub_trials(store)
    at = run_app(store.root, monkeypatch, experiment="pacs-sub")
    at = show(at, "Compare", **{"cmp_a:pacs-sub": ids[0], "cmp_b:pacs-sub": ids[1]})
    assert_ok(at)
    shown = frame(at, ids[0], f"{ids[0]} {dun.LOW}", ids[1], "A - B")
    assert f"A - B {dun.LOW}" not in shown.columns
    assert "no paired difference" in texts(at) and intervals.PREDICTIONS_FILE in texts(at)
    for seed, t in enumerate(ids[:2]):
        keep_predictions(exp / results.TRIALS_DIR / t, seed=seed, quality=0.9 - 0.4 * seed)
    at = show(at, "Compare")
    assert_ok(at)
    shown = frame(at, ids[0], "A - B", f"A - B {dun.LOW}", f"A - B {dun.HIGH}")
    want, _ = intervals.compare_runs(*(exp / results.TRIALS_DIR / t for t in ids[:2]), splits=["test_sub"],
                                     replicates=dun.REPLICATES)
    want = want.set_index("metric")
    np.testing.assert_allclose(shown.loc["pair_acc_mean", "A - B"], want.at["pair_acc_mean", "diff"])
    np.testing.assert_allclose(shown.loc["pair_acc_mean", [f"A - B {dun.LOW}", f"A - B {dun.HIGH}"]].to_numpy(float),
                               want.loc["pair_acc_mean", ["low", "high"]].to_numpy(float))


def test_benchmark_folder_is_selectable(store, monkeypatch):
    exp_dir = make_benchmark(store.root)
    at = run_app(store.root, monkeypatch, experiment="bench")
    assert_ok(at)
    assert "bench" in at.selectbox(key="experiment").options
    out = benchmark.load_benchmark(exp_dir)
    table = frame(at, "method", "worst pair", "worst pair SE").set_index("method")
    stats = out["table"].set_index(["method", "metric"])
    np.testing.assert_allclose(table.at["erm", "worst pair"], stats.at[("erm", "pair_acc_worst"), "mean"])
    diff = frame(at, "method", "baseline", "metric", "verdict")
    assert set(diff["verdict"]) <= {"better", "worse", "no clear difference", "n/a"}
    assert (diff.set_index("metric").at["pair_acc_mean", "verdict"]
            == out["difference_summary"].set_index("metric").at["pair_acc_mean", "verdict"])
    assert {b.key for b in at.get("download_button")} >= {"csv_bench_table", "csv_bench_diff", "csv_bench_seeds"}
    assert "verdict rule" in texts(at) and "comparisons" in texts(at) and "spread is itself uncertain" in texts(at)
    # the search experiments beside it still work
    at = run_app(store.root, monkeypatch, experiment="pacs-sub")
    assert_ok(at)
    assert "Experiment pacs-sub" in [s.value for s in at.subheader]


def test_the_experiment_list_shows_a_benchmark_as_a_benchmark(tmp_path, monkeypatch):
    """Not a search with "0 trials" and "best trial None": its kind and its own summary, in its own table."""
    sf.make_experiment(tmp_path, "a-search", 3)
    exp_dir = make_benchmark(tmp_path, seeds=(0, 1))
    results.write_json(exp_dir / benchmark.RUNS_DIR / "erm-sub-seed1" / "status.json", {"status": "running"})
    row = dd.benchmark_overview(exp_dir)
    assert row == {"experiment": "bench", "kind": "benchmark", "methods": "tally, erm", "settings": "sub",
                   "seeds": 2, "runs": "3 of 4 done"}
    at = run_app(tmp_path, monkeypatch, experiment="a-search")
    assert_ok(at)
    searches = frame(at, "experiment", "trials", "best_trial")
    assert list(searches["experiment"]) == ["a-search"] and set(searches["kind"]) == {"search"}
    assert frame(at, "experiment", "kind", "runs").to_dict("records") == [row]


TALLY_QUALITY = {"train_val": 0.9, "lodo": 0.6, "oracle": 0.3}


def make_tuned_benchmark(root: Path, name: str = "tuned", rules=("train_val", "oracle")) -> Path:
    """A tuned benchmark folder: each rule's re-runs (TALLY's quality differs by rule: TALLY_QUALITY),
    spec.yaml with its tune section, picks / curves / cost CSVs (and lodo_folds.csv with lodo)."""
    exp_dir = root / name
    rows = []
    for rule in rules:
        tally_quality = TALLY_QUALITY[rule]
        for method, quality in (("tally", tally_quality), ("erm", 0.5)):
            for seed in (1, 2):
                run = f"{method}-sub-{rule}-seed{seed}"
                write_benchmark_run(exp_dir / benchmark.RUNS_DIR / run, method, seed, quality)
                rows.append({"run": run, "method": method, "setting": "sub", "split": "test_sub", "seed": seed,
                             "rule": rule, "trial": 0})
    results.write_parquet(exp_dir / "plan.parquet", pd.DataFrame(rows))
    tune = {"trials": 2, "sampler": "random", "sampler_seed": 0, "trial_seed": 0, "seeds": 2,
            "rules": list(rules), "space": {}}
    results.write_yaml(exp_dir / "spec.yaml", {"name": name, "baseline": ["erm"], "tune": tune,
                                               "report": {"replicates": 200, "bootstrap_seed": 0}})
    curves = pd.DataFrame([{"method": m, "setting": "sub", "trials": n, "best": 0.5, "low": 0.4, "high": 0.6}
                           for m in ("tally", "erm") for n in (1, 2)])
    results.write_text(exp_dir / "curves.csv", curves.to_csv(index=False))
    picks = pd.DataFrame([{"method": m, "setting": "sub", "rule": r, "trial": 1, "run": f"{m}-sub-t1", "value": 0.5,
                           "epoch": 3} for m in ("tally", "erm") for r in rules])
    results.write_text(exp_dir / "picks.csv", picks.to_csv(index=False))
    cost = pd.DataFrame([{"method": m, "trials": 2, "reruns": 4, "wall_h": 0.1, "cpu_h": 0.1, "gpu_h": 0.0}
                         for m in ("tally", "erm")])
    results.write_text(exp_dir / "cost.csv", cost.to_csv(index=False))
    if "lodo" in rules:
        folds = pd.DataFrame([{"run": f"{m}-sub-t{k}-lodo-{d}", "trial_run": f"{m}-sub-t{k}", "method": m, "setting": "sub",
                               "trial": k, "also_out": d, "value": 0.25, "tiebreak": 0.5, "epoch": 3}
                              for m in ("tally", "erm") for k in (0, 1) for d in ("ink", "inverted")])
        results.write_text(exp_dir / "lodo_folds.csv", folds.to_csv(index=False))
    return exp_dir


def test_tuned_benchmark_one_rule_at_a_time(store, monkeypatch):
    exp_dir = make_tuned_benchmark(store.root)
    first, oracle = benchmark.load_benchmark(exp_dir), benchmark.load_benchmark(exp_dir, "oracle")
    assert set(first["values"]["run"]) == {f"{m}-sub-train_val-seed{s}" for m in ("tally", "erm") for s in (1, 2)}
    assert set(oracle["values"]["run"]) == {f"{m}-sub-oracle-seed{s}" for m in ("tally", "erm") for s in (1, 2)}
    at = run_app(store.root, monkeypatch, experiment="tuned")
    assert_ok(at)
    [radio] = [r for r in at.radio if r.key == "bench_rule:tuned"]
    assert radio.options == ["training-domain validation", "oracle (test domain)"]
    table = frame(at, "method", "worst pair").set_index("method")
    stats = first["table"].set_index(["method", "metric"])
    np.testing.assert_allclose(table.at["tally", "avg pair"], stats.at[("tally", "pair_acc_mean"), "mean"])
    assert any("best training-domain validation value" in f["layout"].get("title", {}).get("text", "")
               for f in figures(at))
    assert "What each rule picked" in texts(at) and "Cost per method" in texts(at)
    radio.set_value("oracle")
    at = at.run()
    assert_ok(at)
    table = frame(at, "method", "worst pair").set_index("method")
    stats = oracle["table"].set_index(["method", "metric"])
    np.testing.assert_allclose(table.at["tally", "avg pair"], stats.at[("tally", "pair_acc_mean"), "mean"])


def test_search_view_pareto_front(tmp_path, monkeypatch):
    exp = _multi_objective(tmp_path)
    at = run_app(tmp_path, monkeypatch)
    at = show(at, "Search")
    assert_ok(at)
    [fig] = [f for f in figures(at) if "Pareto front" in f["layout"].get("title", {}).get("text", "")]
    traces = {t["name"]: t for t in fig["data"]}
    trials = dd.load_trials(exp.path)
    summary = trials.frame
    x, y = trials.selection.objectives
    front = summary[results.pareto_front(summary, (x, y))]
    assert sorted(traces["Pareto front"]["text"]) == sorted(front["trial_id"])
    pick = results.select_trial(summary, trials.selection)
    assert traces["picked"]["text"] == [pick["trial_id"]]
    np.testing.assert_allclose([plotly_array(traces["picked"][a])[0] for a in "xy"], [pick[x], pick[y]])


def test_tuned_benchmark_shows_the_leave_one_domain_out_rule(store, monkeypatch):
    exp_dir = make_tuned_benchmark(store.root, "tuned3", rules=("train_val", "lodo", "oracle"))
    at = run_app(store.root, monkeypatch, experiment="tuned3")
    assert_ok(at)
    [radio] = [r for r in at.radio if r.key == "bench_rule:tuned3"]
    assert radio.options == ["training-domain validation", "leave-one-domain-out cross-validation",
                             "oracle (test domain)"]
    radio.set_value("lodo")
    at = at.run()
    assert_ok(at)
    assert any("leave-one-domain-out cross-validation: each trial's config trained again" in c.value for c in at.caption)
    table = frame(at, "method", "worst pair").set_index("method")
    stats = benchmark.load_benchmark(exp_dir, "lodo")["table"].set_index(["method", "metric"])
    np.testing.assert_allclose(table.at["tally", "avg pair"], stats.at[("tally", "pair_acc_mean"), "mean"])
    assert "Leave-one-domain-out runs" in texts(at)
    assert len(frame(at, "also_out")) == 8  # every lodo run of the setting
