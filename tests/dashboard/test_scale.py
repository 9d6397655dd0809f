"""The dashboard's views for real scale (AppTest and the data layer): a DomainNet-sized grid, class
orders and the training-count profile, shot buckets, robustness, running trials with an ETA, the
timeline, Optuna's slice and contour plots, learning curves with stopped trials, a paged trials table,
CSV downloads, and the study.db that optuna-dashboard opens.

Expectations come from the store itself (tally.results / tally.evaluation / the files), not from how
the factory made it.
"""

from __future__ import annotations

import io
import json

import numpy as np
import optuna
import pandas as pd
import pytest

from tally import evaluation as ev
from tally import results
from tally.dashboard import data as dd
from tally.dashboard import grids, progress
from tally.dashboard import robustness as drob
from tally.dashboard import search_data as dsearch
from tests import store_factory as sf
from tests.dashboard.test_app import assert_ok, figures, frame, plotly_array, run_app, show, texts

DOMAINNET = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """pacs-domain: 12 trials with robustness runs and a study; domainnet: 345 classes x 6 domains."""
    root = tmp_path_factory.mktemp("scale")
    exps = {"pacs-domain": sf.make_experiment(root, "pacs-domain", 12, study=True, robustness=True),
            "domainnet": sf.make_experiment(root, "domainnet", 4, seed=3, domains=DOMAINNET, classes=345,
                                            statuses=["done"] * 4)}
    return root, exps


def _grid_figures(at) -> list[dict]:
    return [f for f in figures(at) if "pair accuracy" in f["layout"]["title"]["text"]]


# ---------------------------------------------------------------- the grid at DomainNet scale
def test_large_grid_has_no_cell_text_and_is_summarised(store, monkeypatch):
    root, exps = store
    exp = exps["domainnet"]
    at = show(run_app(root, monkeypatch, experiment="domainnet"), "Accuracy grid")
    assert_ok(at)
    figs = _grid_figures(at)
    assert len(figs) == 2  # test_sub and the held-out domain side by side
    for fig in figs:
        heat = fig["data"][0]
        assert len(heat["x"]) == 345 and "text" not in heat and "texttemplate" not in heat
        assert fig["layout"]["xaxis2"].get("tickmode") != "array"  # plotly thins the 345 labels
    assert "345 classes: the cells carry no text" in texts(at)
    table = results.read_parquet(exp.path / results.TRIALS_DIR / exp.best / "eval.parquet")
    worst = frame(at, "rank", "domain", "class", "acc", "shot")
    assert len(worst) == 20  # k defaults to 20 for large grids
    want = ev.worst_pairs(table, "test_sub", 20)
    assert worst["class"].tolist() == want["class"].tolist() and worst["domain"].tolist() == want["domain"].tolist()
    np.testing.assert_allclose(worst["acc"], want["correct"] / want["n"])
    assert set(worst["shot"]) <= set(grids.SHOT_BUCKETS)
    at.number_input(key="worst_k:domainnet").set_value(50).run()
    assert len(frame(at, "rank", "domain", "class", "acc", "shot")) == 50


def test_class_orders_and_profile(store, monkeypatch):
    root, exps = store
    exp = exps["pacs-domain"]
    table = results.read_parquet(exp.path / results.TRIALS_DIR / exp.best / "eval.parquet")
    counts = grids.training_counts(table)
    at = run_app(root, monkeypatch, experiment="pacs-domain")
    at = show(at, "Accuracy grid", **{"grid_order:pacs-domain": "name"})
    assert_ok(at)
    assert _grid_figures(at)[0]["data"][0]["x"] == sorted(exp.classes)
    at = show(at, "Accuracy grid", **{"grid_order:pacs-domain": "training count", "grid_domain:pacs-domain": "cartoon"})
    fig = _grid_figures(at)[0]
    x = fig["data"][0]["x"]
    assert counts.loc["cartoon", x].tolist() == sorted(counts.loc["cartoon"], reverse=True)
    assert plotly_array(fig["data"][1]["y"]).tolist() == counts.loc["cartoon", x].tolist()  # the profile follows
    at = show(at, "Accuracy grid", **{"grid_order:pacs-domain": "accuracy", "grid_domain:pacs-domain": "all domains",
                                      "detail_split:pacs-domain": "test_sub"})
    x = _grid_figures(at)[0]["data"][0]["x"]
    class_acc = ev.accuracy_grid(table, "test_sub").mean(axis=0)
    assert class_acc[x].dropna().tolist() == sorted(class_acc.dropna(), reverse=True)


def test_shot_table_matches_the_evaluator():
    rng = np.random.default_rng(0)
    names = sf.Names.of(classes=60)
    table = sf.eval_table(rng, sf._train_counts(rng, (), names), ("test_sub",), (), 0.9, names)
    g = grids.grid(table, "test_sub")
    shots = grids.shot_table(g)
    metrics = ev.split_metrics(table)
    for b in grids.SHOT_BUCKETS:
        np.testing.assert_allclose(shots.at["all domains", b], metrics[f"shot_{b}"], equal_nan=True)
        pairs = ((grids.shot_bucket(g.n_train.to_numpy()) == b) & (g.n.to_numpy() > 0)).sum()
        assert shots.at["all domains", f"{b} pairs"] == pairs == shots[f"{b} pairs"].iloc[:-1].sum()
    photo = ev.split_metrics(table[table["domain"] == "photo"])  # one domain's own buckets
    np.testing.assert_allclose(shots.loc["photo", list(grids.SHOT_BUCKETS)].to_numpy(dtype=float),
                               [photo[f"shot_{b}"] for b in grids.SHOT_BUCKETS], equal_nan=True)
    assert grids.shot_bucket([0, 1, 20, 21, 100, 101]).tolist() == ["zero", "few", "few", "medium", "medium", "many"]


# ---------------------------------------------------------------- robustness
def test_robustness_view_one_row_per_setting(store, monkeypatch):
    root, exps = store
    exp = exps["pacs-domain"]
    at = show(run_app(root, monkeypatch, experiment="pacs-domain"), "Robustness")
    assert_ok(at)
    shown = frame(at, "setting", "split", "runs_done", "pair_acc_worst")
    assert shown["setting"].tolist() == ["sub", *sorted(f"heldout-{d}" for d in exp.domains)]
    for row in shown.itertuples():
        run = next(r for r in exp.robustness if drob.setting_of(r) == row.setting)
        metrics = results.read_json(exp.path / "robustness" / run / "metrics.json")
        if exp.robustness[run] == "done":
            assert row.split == ("test_sub" if row.setting == "sub" else f"test_domain:{row.setting[8:]}")
            assert row.pair_acc_worst == pytest.approx(metrics[row.split]["pair_acc_worst"])
            assert row.runs_done == 1
        else:  # still running: listed, no numbers yet
            assert metrics is None and row.runs_done == 0 and np.isnan(row.pair_acc_worst)
    assert f"trial {exp.best}" in texts(at)


def test_robustness_from_the_parquet_alone(tmp_path):
    exp = sf.make_experiment(tmp_path, "rob", 6, robustness=True)
    for folder in (exp.path / "robustness").iterdir():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    table = drob.robustness_table(drob.robustness_runs(exp.path))
    stored = pd.read_parquet(exp.path / "robustness.parquet")
    sub = stored[(stored["run"].str.startswith("sub")) & (stored["split"] == "test_sub")]
    assert table.set_index("setting").at["sub", "acc"] == pytest.approx(sub["acc"].iloc[0])
    assert drob.robustness_table(drob.robustness_runs(tmp_path / "nothing")).empty


# ---------------------------------------------------------------- running trials, timeline
def test_eta_from_epoch_times():
    epochs = pd.DataFrame({"epoch": [0, 1, 2], "phase": ["warmup", "warmup", "main"], "seconds": [100., 120., 10.]})
    # 7 method epochs left at 10 s (the warm-up's 110 s median is not used for them)
    assert progress.remaining_seconds(epochs, total=10, warmup=2) == pytest.approx(70.0)
    early = epochs.iloc[:1]  # 1 warm-up epoch left at 100 s, 8 method epochs at the only median known
    assert progress.remaining_seconds(early, total=10, warmup=2) == pytest.approx(100 + 8 * 100)
    assert np.isnan(progress.remaining_seconds(epochs.drop(columns="seconds"), 10, 2))


def test_running_trials_panel(store, monkeypatch):
    root, exps = store
    exp = exps["pacs-domain"]
    running = exp.trials_with("running")[0]
    at = run_app(root, monkeypatch, experiment="pacs-domain")
    assert_ok(at)
    table = frame(at, "trial_id", "epochs_done", "epochs_total", "eta")
    assert table["trial_id"].tolist() == [running]
    epochs = results.read_jsonl(exp.path / results.TRIALS_DIR / running / "epochs.jsonl")
    config = results.read_yaml(exp.path / results.TRIALS_DIR / running / "config.yaml")
    assert table["epochs_done"].iloc[0] == len(epochs) and table["epochs_total"].iloc[0] == config["train"]["epochs"]
    assert table["last_value"].iloc[0] == pytest.approx(epochs[-1][exp.metric])
    trials = dd.load_trials(exp.path)
    now = (exp.path / results.TRIALS_DIR / running / "epochs.jsonl").stat().st_mtime  # just after an epoch
    row = progress.running_progress(trials, dd.read_epochs(exp.path, [running]), now=now).iloc[0]
    left = (config["train"]["epochs"] - len(epochs)) * np.median([e["seconds"] for e in epochs])
    assert row["eta_s"] == pytest.approx(left)


def test_timeline(store, monkeypatch):
    root, exps = store
    exp = exps["pacs-domain"]
    trials = dd.load_trials(exp.path)
    line = progress.timeline(trials, now=sf.T0 + 10_000)
    started = [t for t, s in exp.statuses.items() if s != "pending"]
    assert sorted(line["trial_id"]) == sorted(started)
    status = {t: results.read_json(exp.path / results.TRIALS_DIR / t / "status.json") for t in started}
    for row in line.itertuples():
        assert row.start == pd.to_datetime(status[row.trial_id]["started"], unit="s")
        assert row.node == status[row.trial_id]["node"]
        if row.status == "running":
            assert row.end == pd.to_datetime(sf.T0 + 10_000, unit="s")
        else:
            assert row.end == pd.to_datetime(status[row.trial_id]["ended"], unit="s")
    at = show(run_app(root, monkeypatch, experiment="pacs-domain"), "Timeline")
    assert_ok(at)
    bars = [t for f in figures(at) for t in f["data"] if t["type"] == "bar"]
    assert sorted(y for t in bars for y in t["y"]) == sorted(started)
    assert {t["name"] for t in bars} == {s for t, s in exp.statuses.items() if s != "pending"}
    at = show(at, "Timeline", **{"timeline_lane:pacs-domain": "node"})
    assert {y for f in figures(at) for t in f["data"] for y in t["y"]} == {"node-0", "node-1"}


# ---------------------------------------------------------------- what optuna-dashboard users expect
def test_slice_and_contour(store, monkeypatch):
    root, exps = store
    exp = exps["pacs-domain"]
    trials = dd.load_trials(exp.path)
    study, params = dsearch.param_study(trials)
    done = exp.trials_with("done")
    assert sorted(t.user_attrs["trial_id"] for t in study.trials) == sorted(done)
    assert set(params) == {"train.lr", "method.alpha", "method.momentum", "model.cut", "method.fold"}
    assert study.trials[0].distributions["train.lr"].log  # a learning rate spans decades
    for t in study.trials:
        status = results.read_json(exp.path / results.TRIALS_DIR / t.user_attrs["trial_id"] / "status.json")
        assert t.params == {k: status["params"][k] for k in params}
    at = run_app(root, monkeypatch, experiment="pacs-domain")
    at = show(at, "Search", **{"slice_params:pacs-domain": ["train.lr", "model.cut"],
                               "contour_x:pacs-domain": "train.lr", "contour_y:pacs-domain": "method.alpha"})
    assert_ok(at)
    figs = figures(at)
    slice_fig = next(f for f in figs if "Slice" in f["layout"].get("title", {}).get("text", ""))
    values = sorted(v for t in slice_fig["data"] if t["type"] == "scatter" for v in plotly_array(t["y"]).tolist())
    expected = sorted(trials.frame.set_index("trial_id").loc[done, exp.metric].tolist() * 2)  # 2 panels
    np.testing.assert_allclose(values, expected)
    assert any(t["type"] == "contour" for f in figs for t in f["data"])


def test_curves_include_stopped_trials(store, monkeypatch):
    root, exps = store
    exp = exps["pacs-domain"]
    at = show(run_app(root, monkeypatch, experiment="pacs-domain"), "Curves")
    assert_ok(at)
    fig = next(f for f in figures(at) if "every trial" in f["layout"]["title"]["text"])
    stopped = exp.trials_with("stopped")
    trace = next(t for t in fig["data"] if t["name"].startswith("stopped"))
    assert trace["name"] == f"stopped ({len(stopped)})"
    ids = {i for i in trace["customdata"] if i}
    assert ids == set(stopped)
    got = [v for v in trace["y"] if v is not None]
    want = [r[exp.metric] for t in stopped
            for r in results.read_jsonl(exp.path / results.TRIALS_DIR / t / "epochs.jsonl")]
    np.testing.assert_allclose(sorted(got), sorted(want))


def test_study_db_opens_with_optuna(store):
    """What `optuna-dashboard sqlite:///<exp>/study.db` reads: the study loads through Optuna's API with
    every finished trial (done: COMPLETE with its selection value; stopped: PRUNED) and its parameters."""
    _, exps = store
    check_study(exps["pacs-domain"].path)


def check_study(exp_dir) -> None:
    """Any store: study.db holds one trial per finished store trial, with the same parameters."""
    storage = f"sqlite:///{exp_dir / 'study.db'}"
    (name,) = optuna.study.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    trials = dd.load_trials(exp_dir)
    frame = trials.frame.set_index("trial_id")

    searched = {name for t in study.trials for name in t.distributions}  # fixed params are not sampled

    def params_of(trial_id):
        status = results.read_json(exp_dir / results.TRIALS_DIR / trial_id / "status.json")
        return json.dumps({k: v for k, v in status["params"].items() if k in searched}, sort_keys=True)

    for state, store_status in ((optuna.trial.TrialState.COMPLETE, "done"),
                                (optuna.trial.TrialState.PRUNED, "stopped")):
        in_study = sorted(json.dumps(t.params, sort_keys=True) for t in study.get_trials(states=(state,)))
        in_store = sorted(params_of(t) for t in frame.index[frame["status"] == store_status])
        assert in_study == in_store, state
    complete = {json.dumps(t.params, sort_keys=True): t.value
                for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    for trial_id in frame.index[frame["status"] == "done"]:
        assert complete[params_of(trial_id)] == pytest.approx(frame.at[trial_id, trials.selection.metric])


# ---------------------------------------------------------------- paging and CSV
def test_trials_table_is_paged_and_sorted_over_all_rows(tmp_path, monkeypatch):
    exp = sf.make_experiment(tmp_path, "many", 60, seed=9)
    metric = exp.metric
    at = run_app(tmp_path, monkeypatch, **{"page_size:many": 25, "sort_by:many": metric, "sort_desc:many": True,
                                           "page:many": 2})
    assert_ok(at)
    shown = frame(at, "trial_id", "status", "error")
    everything = dd.load_trials(exp.path).frame
    want = dd.sort_trials(everything, metric, descending=True)["trial_id"].tolist()[25:50]
    assert len(shown) == 25 and shown["trial_id"].tolist() == want
    values = pd.to_numeric(dd.sort_trials(everything, metric, True)[metric])
    assert values.iloc[:values.notna().sum()].is_monotonic_decreasing and values.iloc[values.notna().sum():].isna().all()
    assert "Trials 26–50 of 60 shown" in texts(at)
    at = show(at, "Trials", **{"page:many": 99})  # past the end: the last page
    assert frame(at, "trial_id", "status", "error")["trial_id"].tolist() == want[:0] + dd.sort_trials(
        everything, metric, True)["trial_id"].tolist()[50:]


def test_csv_download_round_trips():
    table = pd.DataFrame({"trial_id": ["a", "b"], "val/acc": [0.5, float("nan")], "error": [None, "x, y"]})
    back = pd.read_csv(io.BytesIO(dd.csv_bytes(table)))
    assert back["trial_id"].tolist() == ["a", "b"] and back["error"].iloc[1] == "x, y"
    assert back["val/acc"].iloc[0] == 0.5 and np.isnan(back["val/acc"].iloc[1])


def test_five_thousand_trial_pages_stay_small(tmp_path):
    """The data layer pages and sorts a large table without touching rows it does not show."""
    frame_ = pd.DataFrame({"trial_id": [f"t{i:04d}" for i in range(5000)], "status": "done",
                           "val/acc": np.random.default_rng(0).random(5000)})
    ordered = dd.sort_trials(frame_, "val/acc", descending=True)
    assert dd.page_count(len(ordered), 50) == 100
    last = dd.page(ordered, 100, 50)
    assert len(last) == 50 and last["val/acc"].iloc[-1] == frame_["val/acc"].min()


def test_new_data_modules_never_import_streamlit():
    """grids, progress and robustness are data layer (as data and search_data): plain pandas, no Streamlit."""
    import ast
    from pathlib import Path

    import tally.dashboard as pkg

    for name in ("grids", "progress", "robustness", "data", "search_data"):
        tree = ast.parse((Path(pkg.__file__).parent / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.split(".")[0] == "streamlit" for m in imported), name
        assert not any(m in imported for m in ("tally.dashboard.cache", "tally.dashboard.views")), name
