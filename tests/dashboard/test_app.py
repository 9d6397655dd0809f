"""The dashboard through Streamlit's AppTest (no browser): it renders every view of a store.

Checks are functions of a store path (``check_*``) whose expectations come from the store itself
(read with tally.results / tally.evaluation), not from how it was made, so any store can be tested:
add a builder to ``STORE_BUILDERS`` (e.g. a real tiny Ray search) and every generic test runs on it::

    STORE_BUILDERS["ray"] = lambda tmp: run_tiny_search(tmp)  # returns the results root

or call ``check_overview(root, monkeypatch)``, ``check_grid(...)``, ``check_all_views(...)`` directly.
"""

from __future__ import annotations

import base64
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from tally import evaluation as ev
from tally import results
from tally.dashboard import APP_PATH, grids
from tally.dashboard import data as dd
from tally.dashboard import search_data as dsearch
from tally.dashboard.app import ROOT_ENV, TABS
from tests import store_factory as sf  # noqa: E402

TIMEOUT = 60  # seconds per AppTest run: generous for 2 shared CPU cores; typical runs take < 2 s

STORE_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "synthetic": lambda tmp: sf.make_store(tmp).root,
}


# ---------------------------------------------------------------- helpers
def run_app(root: Path, monkeypatch: pytest.MonkeyPatch, **state) -> AppTest:
    """A first run of the app on ``root`` (given through the environment, as argv is pytest's)."""
    monkeypatch.setenv(ROOT_ENV, str(root))
    at = AppTest.from_file(str(APP_PATH), default_timeout=TIMEOUT)
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def show(at: AppTest, view: str, **widgets) -> AppTest:
    """Open a tab (keyed lazy tabs) and set widgets by key, then rerun."""
    at.session_state["view"] = view
    for key, value in widgets.items():
        at.session_state[key] = value
    return at.run()


def assert_ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def figures(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def plotly_array(value) -> np.ndarray:
    """A figure's array as JSON holds it: a list, or plotly's typed array ({dtype, bdata, shape})."""
    if isinstance(value, dict) and "bdata" in value:
        data = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        return data.reshape([int(n) for n in str(shape).split(",")]) if shape else data
    return np.asarray(value)


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("info", "warning", "error", "success", "caption", "markdown")
             for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def frame(at: AppTest, *columns: str, index: str | None = None) -> pd.DataFrame:
    """The first st.dataframe holding ``columns`` (or index label ``index``): dataframes have no key."""
    for el in at.dataframe:
        value = el.value
        if set(columns) <= set(value.columns) and (index is None or index in value.index):
            return value
    raise AssertionError(f"no dataframe with columns {columns} / index {index}")


def first_experiment(root: Path) -> Path:
    return dd.experiments_under(root)[0]


def trial_with_eval(exp: Path) -> str:
    for path in results.iter_trial_dirs(exp):
        if (path / "eval.parquet").is_file():
            return path.name
    raise AssertionError(f"no trial with eval.parquet in {exp}")


def trial_without_eval(exp: Path) -> str | None:
    for path in results.iter_trial_dirs(exp):
        if not (path / "eval.parquet").is_file():
            return path.name
    return None


# ---------------------------------------------------------------- generic checks (any store)
def check_overview(root: Path, monkeypatch) -> AppTest:
    """Renders; status counts of the selected experiment; every experiment listed."""
    at = run_app(root, monkeypatch)
    assert_ok(at)
    exp = first_experiment(root)
    counts = results.summarise(exp)["status"].value_counts().to_dict()
    shown = {m.label: int(m.value) for m in at.metric}
    for status in dd.SHOWN_STATUSES:
        assert shown[status] == counts.get(status, 0), (status, shown, counts)
    assert shown["trials"] == sum(counts.values())
    experiments = {p.name for p in dd.experiments_under(root)}
    if len(experiments) > 1:  # one experiment: no list (the page is that experiment)
        assert set(frame(at, "experiment", "best_trial")["experiment"]) == experiments
    return at


def check_grid(root: Path, monkeypatch) -> AppTest:
    """Selecting a trial shows one heat map per test split with D x C cells in training-count order,
    each non-empty cell labelled with its accuracy alone (counts on hover), empty pairs blank, under
    the classes' training-count profile; the shot-bucket summary agrees with the evaluator and the
    worst pairs are the evaluator's."""
    exp = first_experiment(root)
    trial = trial_with_eval(exp)
    at = run_app(root, monkeypatch)
    at = show(at, "Accuracy grid", **{f"trial:{exp.name}": trial})
    assert_ok(at)
    table = results.read_parquet(exp / results.TRIALS_DIR / trial / "eval.parquet")
    tests = dd.test_splits(dd.table_splits(table)) or dd.table_splits(table)
    heatmaps = [f for f in figures(at) if f["data"][0]["type"] == "heatmap"
                and "pair accuracy" in f["layout"]["title"]["text"]]
    assert len(heatmaps) == len(tests)
    order = grids.class_order(table, "training count")
    counts = ev.accuracy_grid(table, tests[0], "n_train")
    assert list(counts.sum(axis=0)[order]) == sorted(counts.sum(axis=0), reverse=True)  # long tail to the right
    for fig, split in zip(heatmaps, tests, strict=True):
        keep = ev.accuracy_grid(table, split, "n").sum(axis=1) > 0  # absent domains get no row
        acc = ev.accuracy_grid(table, split)[keep][order]
        n_train = ev.accuracy_grid(table, split, "n_train")[keep][order]
        trace, bars = fig["data"]
        assert split in fig["layout"]["title"]["text"] and trial in fig["layout"]["title"]["text"]
        assert trace["y"] == list(acc.index) and trace["x"] == order
        z = np.array([[np.nan if v is None else v for v in row] for row in trace["z"]], dtype=float)
        np.testing.assert_allclose(z, acc.to_numpy(), equal_nan=True)
        if len(order) <= grids.LARGE_GRID_CLASSES:
            want = [["" if np.isnan(v) else f"{v:.2f}" for v in row] for row in acc.to_numpy()]
            assert trace["text"] == want  # the value alone: nothing to cut off
        else:
            assert "text" not in trace
        assert plotly_array(trace["customdata"])[:, :, 1].tolist() == n_train.to_numpy().tolist()  # hover
        assert "n train %{customdata[1]}" in trace["hovertemplate"]
        assert bars["type"] == "bar" and bars["x"] == order
        assert plotly_array(bars["y"]).tolist() == counts.sum(axis=0)[order].tolist()
    split = at.selectbox(key=f"detail_split:{exp.name}").value
    worst = frame(at, "rank", "domain", "class", "acc", "n_train", "shot")
    expected = ev.worst_pairs(table, split, len(worst))
    assert list(zip(worst["domain"], worst["class"], strict=True)) == list(
        zip(expected["domain"], expected["class"], strict=True))
    assert list(worst["acc"]) == sorted(worst["acc"])
    shots = frame(at, "many", "medium", "few", "zero", index="all domains")
    metrics = ev.split_metrics(table[table["split"] == split])
    for bucket in grids.SHOT_BUCKETS:
        np.testing.assert_allclose(shots.at["all domains", bucket], metrics[f"shot_{bucket}"], equal_nan=True)
    return at


def check_all_views(root: Path, monkeypatch) -> None:
    """Every tab renders for the default trial and for a trial without results; every table shown
    comes with its CSV download button."""
    exp = first_experiment(root)
    at = run_app(root, monkeypatch)
    for view in TABS:
        assert_ok(show(at, view))
        labels = [b.proto.label for b in at.get("download_button")]
        assert labels.count("Download CSV") == len(at.dataframe), (view, labels, len(at.dataframe))
    missing = trial_without_eval(exp)
    if missing is not None:
        at = show(at, "Trials", **{f"trial:{exp.name}": missing})
        for view in TABS:
            assert_ok(show(at, view))


@pytest.fixture(scope="module", params=sorted(STORE_BUILDERS))
def store_root(request, tmp_path_factory) -> Path:
    return STORE_BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


def test_overview_counts(store_root, monkeypatch):
    check_overview(store_root, monkeypatch)


def test_selected_trial_grid(store_root, monkeypatch):
    check_grid(store_root, monkeypatch)


def test_every_view_renders(store_root, monkeypatch):
    check_all_views(store_root, monkeypatch)


# ---------------------------------------------------------------- the synthetic store's cases
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> sf.Store:
    return sf.make_store(tmp_path_factory.mktemp("store"))


def test_empty_root_is_friendly(tmp_path, monkeypatch):
    at = run_app(tmp_path, monkeypatch)
    assert_ok(at)
    assert "No experiments under" in texts(at)
    at = run_app(tmp_path / "nowhere", monkeypatch)
    assert_ok(at)
    assert "does not exist" in texts(at)


def test_experiment_without_trials(tmp_path, monkeypatch):
    results.write_yaml(tmp_path / "just-started" / "spec.yaml", {"selection": {"metric": "acc"}})
    at = run_app(tmp_path, monkeypatch)
    assert_ok(at)
    assert "has no trials yet" in texts(at)


def test_best_trial_and_spec(store, monkeypatch):
    exp = store.experiments["pacs-domain"]
    at = run_app(store.root, monkeypatch)
    assert f"Best trial: **{exp.best}**" in texts(at)
    assert at.selectbox(key="trial:pacs-domain").value == exp.best
    assert not at.code  # the spec is drawn when its expander opens (it slowed the first page)
    at.session_state["spec_open:pacs-domain"] = True
    at.run()
    assert any("pair_acc_worst" in c.value for c in at.code)  # spec.yaml shown


def test_failed_trial_shows_error(store, monkeypatch):
    at = run_app(store.root, monkeypatch)
    failed = store.experiments["pacs-domain"].trials_with("failed")
    assert failed
    errors = [e.value for e in at.error]
    assert any(failed[0] in e and "CUDA out of memory" in e for e in errors), errors
    at.session_state[f"error_open:{failed[0]}"] = True
    at.run()
    assert any("Traceback" in c.value for c in at.code)
    table = frame(at, "trial_id", "status", "error")
    assert "CUDA out of memory" in table.loc[table["trial_id"] == failed[0], "error"].iloc[0]


def test_status_and_text_filters(store, monkeypatch):
    at = run_app(store.root, monkeypatch)
    at.multiselect(key="status_filter:pacs-domain").set_value(["failed", "stopped"]).run()
    shown = frame(at, "trial_id", "status", "error")
    assert set(shown["status"]) == {"failed", "stopped"}
    every = sorted(set(store.experiments["pacs-domain"].statuses.values()))
    at.multiselect(key="status_filter:pacs-domain").set_value(every)
    at.text_input(key="text_filter:pacs-domain").set_value("trial_0001").run()
    assert list(frame(at, "trial_id", "status", "error")["trial_id"]) == ["trial_0001"]


@pytest.mark.parametrize("status", ["pending", "running"])
def test_trial_without_results(store, monkeypatch, status):
    """A trial folder with only config.yaml (pending) or a running one: views say what is missing."""
    trial = store.experiments["pacs-domain"].trials_with(status)[0]
    at = run_app(store.root, monkeypatch, **{"trial:pacs-domain": trial})
    at = show(at, "Accuracy grid")
    assert_ok(at)
    assert "has no evaluation table" in texts(at) and "eval.parquet" in texts(at)
    at = show(at, "Curves")
    assert_ok(at)
    if status == "running":
        assert any(f["layout"]["title"]["text"] == "train_loss" for f in figures(at))
    else:
        assert "No per-epoch records" in texts(at)


def test_old_store_without_summary_or_metrics(tmp_path, monkeypatch):
    exp = sf.make_experiment(tmp_path, "old", 8, seed=3)
    sf.strip_to_old_version(exp)
    at = run_app(tmp_path, monkeypatch)
    assert_ok(at)
    notes = texts(at)
    assert "no summary.parquet" in notes and "metrics recomputed from eval.parquet" in notes
    assert f"Best trial: **{exp.best}**" in notes
    table = frame(at, "trial_id", "status", "error")
    finished = exp.trials_with("done") + exp.trials_with("stopped")
    assert table["val/pair_acc_worst"].notna().sum() == len(finished)
    for view in TABS:
        assert_ok(show(at, view))


def test_store_without_spec_or_status(tmp_path, monkeypatch):
    """An older layout: no spec.yaml, a trial with no status.json, an eval table without 'predicted'."""
    exp = sf.make_experiment(tmp_path, "legacy", 6, seed=4, spec=False, summary=False)
    done = exp.trials_with("done")[0]
    trial_dir = exp.path / results.TRIALS_DIR / done
    table = results.read_parquet(trial_dir / "eval.parquet")
    results.write_parquet(trial_dir / "eval.parquet", table.drop(columns=["predicted", "domain_idx"]))
    (exp.path / results.TRIALS_DIR / exp.trials_with("done")[1] / "status.json").unlink()
    at = run_app(tmp_path, monkeypatch, **{"trial:legacy": done})
    assert_ok(at)
    assert "no spec.yaml" in texts(at)
    at = show(at, "Accuracy grid")
    assert_ok(at)
    assert "lacks 'predicted'" in texts(at)
    metrics = frame(at, index="macro_f1")
    assert metrics.loc["macro_f1"].isna().all() and metrics.loc["acc"].notna().all()
    for view in TABS:
        assert_ok(show(at, view))


def test_compare_two_trials(store, monkeypatch):
    at = run_app(store.root, monkeypatch, experiment="pacs-sub")
    at = show(at, "Compare")
    assert_ok(at)
    b = at.selectbox(key="cmp_b:pacs-sub").value
    trials = dd.load_trials(store.experiments["pacs-sub"].path)
    assert trials.frame.set_index("trial_id").at[b, "param.method.name"] == "erm"  # the ERM baseline
    figs = {f["data"][0]["type"]: f for f in figures(at)}
    assert figs["heatmap"]["data"][0]["colorscale"][0][1] is not None
    bars = [f for f in figures(at) if f["data"][0]["type"] == "bar"][0]
    assert {t["name"] for t in bars["data"]} == {at.selectbox(key="cmp_a:pacs-sub").value, b}
    a = at.selectbox(key="cmp_a:pacs-sub").value
    a_table = results.read_parquet(dd.trial_dir(trials, a) / "eval.parquet")
    b_table = results.read_parquet(dd.trial_dir(trials, b) / "eval.parquet")
    diff = ev.difference_grid(a_table, b_table, "test_sub").dropna(how="all")  # no row for absent domains
    z = np.array([[np.nan if v is None else v for v in row] for row in figs["heatmap"]["data"][0]["z"]],
                 dtype=float)
    np.testing.assert_allclose(z, diff.to_numpy(), equal_nan=True)


def test_search_view(store, monkeypatch):
    at = run_app(store.root, monkeypatch)
    at = show(at, "Search")
    assert_ok(at)
    kinds = [f["data"][0]["type"] for f in figures(at)]
    assert "parcoords" in kinds and "scatter" in kinds
    # this store has no study.db and 10 trials with parameters: the rank-correlation fallback draws bars
    assert "bar" in kinds, kinds
    assert any(c.value.startswith(dd.plain("fallback (no study.db)")) for c in at.caption), [c.value for c in at.caption]


def _fake_export(monkeypatch, bundle) -> None:
    """Stands in for tally.deploy.export (which imports torch, and needs real checkpoints)."""
    module = types.ModuleType("tally.deploy.export")
    module.bundle_zip_bytes = bundle
    monkeypatch.setitem(sys.modules, "tally.deploy.export", module)


def test_export_panel(store, monkeypatch):
    _fake_export(monkeypatch, lambda run_dir: b"PK-fake-" + Path(run_dir).name.encode())
    at = show(run_app(store.root, monkeypatch), "Export")
    assert_ok(at)
    best = store.experiments["pacs-domain"].best
    assert at.selectbox(key="export:pacs-domain").value == best
    at.button(key="build_bundle").click().run()
    assert_ok(at)
    buttons = [b.proto.label for b in at.get("download_button") if b.proto.label != "Download CSV"]
    assert buttons == ["Download config.yaml", "Download bundle (zip)"]


def test_export_panel_builds_the_real_bundle(tmp_path, monkeypatch):
    """The panel's zip is tally.deploy.export's own bundle: it unpacks to a bundle that verifies and predicts."""
    import io
    import zipfile

    from tally.deploy.export import Predictor
    from tests.bundle_factory import tiny_run

    exp = tmp_path / "store" / "real"
    tiny_run(exp / results.TRIALS_DIR / "t1")
    results.write_yaml(exp / "spec.yaml", {"name": "real", "selection": {"metric": "pair_acc_mean"}})
    at = show(run_app(tmp_path / "store", monkeypatch), "Export")
    assert_ok(at)
    at.button(key="build_bundle").click().run()
    assert_ok(at)
    data = next(b for b in at.get("download_button") if b.proto.label == "Download bundle (zip)")
    payload = at.session_state[f"bundle:{exp / results.TRIALS_DIR / 't1'}"]
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        zf.extractall(tmp_path / "unzipped")
    bundle = tmp_path / "unzipped" / "t1"
    predictor = Predictor(bundle)
    assert predictor.bundle_id.startswith("t1@") and data is not None


def test_export_panel_errors(store, monkeypatch):
    """A trial without checkpoints gives a message; a missing tally.deploy.export a warning, never a crash."""
    def no_checkpoint(run_dir):
        raise FileNotFoundError(f"{run_dir}/checkpoints/best.pt")

    _fake_export(monkeypatch, no_checkpoint)
    at = show(run_app(store.root, monkeypatch), "Export")
    at.button(key="build_bundle").click().run()
    assert_ok(at)
    assert "Could not build the bundle" in texts(at)
    monkeypatch.setitem(sys.modules, "tally.deploy.export", None)  # `import tally.deploy.export` now fails
    at = show(run_app(store.root, monkeypatch), "Export")
    assert_ok(at)
    assert "Bundle export is unavailable" in texts(at)


def test_root_may_be_an_experiment(store, monkeypatch):
    at = run_app(store.experiments["pacs-sub"].path, monkeypatch)
    assert_ok(at)
    assert at.selectbox(key="experiment").value == "pacs-sub (the root)"


# ---------------------------------------------------------------- data layer
def test_summary_is_refreshed_for_trials_written_after_it(tmp_path):
    exp = sf.make_experiment(tmp_path, "live", 6, seed=5)
    running = exp.trials_with("running")[0]
    before = dd.load_trials(exp.path)
    assert before.frame.set_index("trial_id").at[running, "status"] == "running"
    results.write_status(exp.path / results.TRIALS_DIR / running, "failed", error="boom")
    sf.make_trial(exp.path, "trial_9999", "running", sf._params(np.random.default_rng(0), "tally"),
                  np.random.default_rng(0), setting="sub", held_out=(), order=99,
                  train_counts=np.zeros((4, 7), dtype=np.int64))
    after = dd.load_trials(exp.path).frame.set_index("trial_id")
    assert after.at[running, "status"] == "failed" and after.at[running, "error"] == "boom"
    assert after.at["trial_9999", "status"] == "running"
    assert dd.experiment_signature(exp.path) != dd.experiment_signature(tmp_path / "nothing")


def test_importance_fallback_and_optuna(tmp_path):
    plain = dd.load_trials(sf.make_experiment(tmp_path, "plain", 12, seed=6).path)
    imp = dsearch.param_importance(plain)
    assert imp.method.startswith("fallback") and abs(imp.values.sum() - 1) < 1e-9
    assert set(imp.values.index) == {c.removeprefix("param.") for c in dd.param_columns(plain.frame)}
    studied = dd.load_trials(sf.make_experiment(tmp_path, "studied", 12, seed=6, study=True).path)
    imp = dsearch.param_importance(studied)
    assert imp.method.startswith("Optuna") and abs(imp.values.sum() - 1) < 1e-6
    few = dd.load_trials(sf.make_experiment(tmp_path, "few", 3, seed=6, statuses=["done"] * 3).path)
    assert dsearch.param_importance(few).values.empty


def test_parallel_dimensions_encode_categories_and_log_scale(store):
    trials = dd.load_trials(store.experiments["pacs-domain"].path)
    dims, color = dsearch.parallel_dimensions(trials)
    by_label = {d.label: d for d in dims}
    assert "log10(train.lr)" in by_label
    assert by_label["model.cut"].ticktext == sorted(set(by_label["model.cut"].ticktext))
    assert len(color) == len(dsearch.finished_with_metric(trials)) == len(by_label["method.alpha"].values)


def test_launch_command_binds_localhost(tmp_path):
    from tally.dashboard import launch

    cmd = launch.command(tmp_path, port=8765)
    assert cmd[1:4] == ["-m", "tally.dashboard.serve", "run"] and Path(cmd[4]).is_file()
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8765"
    assert cmd[-2:] == ["--root", str(tmp_path.resolve())]



def test_checkout_entry_point_runs_the_same_app(store, monkeypatch):
    """`streamlit run dashboard/app.py -- --root R` (the documented path) renders the packaged app."""
    monkeypatch.setattr(sys, "argv", ["dashboard/app.py", "--root", str(store.root)])
    monkeypatch.delenv(ROOT_ENV, raising=False)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py"),
                           default_timeout=TIMEOUT).run()
    assert_ok(at)
    assert str(store.root.resolve()) in at.caption[0].value


def test_bad_files_hide_only_what_they_hold(tmp_path, monkeypatch):
    """A status.json holding a list, a non-UTF-8 status.json and a garbage spec.yaml: the page renders,
    the healthy experiment is untouched, and each bad file is named."""
    healthy = sf.make_experiment(tmp_path, "healthy", 4, seed=1)
    broken = sf.make_experiment(tmp_path, "broken", 4, seed=2)
    trials = sorted(p.name for p in (broken.path / results.TRIALS_DIR).iterdir())
    (broken.path / results.TRIALS_DIR / trials[0] / "status.json").write_text("[1, 2]")
    (broken.path / results.TRIALS_DIR / trials[1] / "status.json").write_bytes(b"\xff\xfe{}")
    (broken.path / "spec.yaml").write_text("selection: [unclosed\n")
    (broken.path / "summary.parquet").unlink(missing_ok=True)
    loaded = dd.load_trials(broken.path)
    assert any("unreadable: " in n and "spec" in n for n in loaded.notes), loaded.notes
    assert f"trial {trials[0]}: status.json: unreadable: expected a dict, got list" in loaded.notes
    assert f"trial {trials[1]}: status.json: unreadable: not UTF-8 text" in loaded.notes
    at = run_app(tmp_path, monkeypatch)
    assert_ok(at)
    at.selectbox(key="experiment").select(next(o for o in at.selectbox(key="experiment").options
                                               if o.startswith("broken"))).run()
    assert_ok(at)
    captions = " ".join(c.value for c in at.caption)
    assert dd.plain(f"trial {trials[0]}: status.json: unreadable") in captions  # store text, escaped
    assert all("unreadable" not in n for n in dd.load_trials(healthy.path).notes)


def test_oracle_selected_trials_are_labelled(tmp_path, monkeypatch):
    """Trials that selected their epoch on test images (protocol: reference, a held-out domain) say
    ORACLE beside the best trial and in a warning; an ordinary experiment says nothing of it."""
    exp = sf.make_experiment(tmp_path, "reference-domain", 4, seed=3, summary=False)
    oracle = sorted(p.name for p in (exp.path / results.TRIALS_DIR).iterdir())[:3]
    for trial_id in oracle:
        path = exp.path / results.TRIALS_DIR / trial_id / "config.yaml"
        cfg = results.read_yaml(path)
        cfg["data"]["oracle_selection"] = True
        results.write_yaml(path, cfg)
    at = run_app(tmp_path, monkeypatch)
    assert_ok(at)
    shown = texts(at)
    assert "ORACLE selection: 3 of 4 trials selected their epoch on test images" in shown
    assert ("ORACLE: its epoch was selected on test images" in shown) == (exp.best in oracle)
    assert sorted(dd.oracle_trials(dd.load_trials(exp.path).frame)) == oracle

    plain = sf.make_experiment(tmp_path / "other", "sub-plain", 4, seed=3, setting="sub")
    at = run_app(tmp_path / "other", monkeypatch)
    assert_ok(at)
    assert "ORACLE" not in texts(at) and dd.oracle_trials(dd.load_trials(plain.path).frame) == []
