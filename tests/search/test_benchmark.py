"""`tally benchmark`: spec checks, the plan, tables from the store, paired differences and their verdict,
resumption; and (slow, local Ray) a multi-objective search whose pick a benchmark runs end to end."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from tally import evaluation, results
from tally.config import validate
from tally.errors import TallyError
from tally.evaluation import intervals
from tally.search import benchmark
from tally.search.benchmark import RUNS_DIR, benchmark_spec_from_raw

RAW = {
    "name": "bench",
    "data": {"source": "embedded", "image_size": 16, "shot_many_above": 40},
    "base": {"model": {"arch": "resnet10", "cut": "layer1"},
             "train": {"epochs": 2, "warmup_epochs": 1, "steps_per_epoch": 2, "batch_size": 16, "lr": 1e-3,
                       "device": "cpu"}},
    "methods": {"erm": {"method": {"name": "erm"}}, "tally": {"method": {"name": "tally", "alpha": 0.5}}},
    "baseline": "erm",
    "settings": ["sub", "domain:noisy"],
    "seeds": 2,
    "concurrency": 2,
    "report": {"replicates": 200},
}


def changed(spec: dict, **changes) -> dict:
    """A copy of a raw spec with top-level keys replaced (None removes one)."""
    out = copy.deepcopy(spec)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def raw(**changes) -> dict:
    return changed(RAW, **changes)


# ---------------------------------------------------------------- the spec and its plan
def test_plan_is_methods_x_settings_x_seeds_with_complete_configs():
    spec = benchmark_spec_from_raw(raw())
    assert list(spec.runs) == [f"{m}-{s}-seed{k}" for m in ("erm", "tally") for s in ("sub", "heldout-noisy")
                               for k in (0, 1)]
    cfg = spec.runs["tally-heldout-noisy-seed1"]
    assert cfg == validate(cfg)  # complete: `tally train` reproduces it
    assert cfg["data"]["setting"] == "domain" and cfg["data"]["held_out"] == ["noisy"]
    assert cfg["train"]["seed"] == cfg["method"]["seed"] == 1 and cfg["method"]["alpha"] == 0.5
    assert not cfg["data"]["oracle_selection"]  # held-out runs select on training-domain validation
    assert {c["train"]["selection_metric"] for c in spec.runs.values()} == {"pair_acc_worst"}
    assert spec.runs["erm-sub-seed0"]["data"]["setting"] == "sub"
    assert set(spec.plan["split"]) == {"test_sub", "test_domain:noisy"}
    assert spec.domain_names == ["ink", "inverted", "noisy"]


def test_data_root_expands_environment_variables(monkeypatch, tmp_path):
    monkeypatch.delenv("TALLY_BENCH_DATA", raising=False)
    with pytest.raises(TallyError, match="data.root: environment variable TALLY_BENCH_DATA is not set"):
        benchmark_spec_from_raw(raw(data={"source": "embedded", "root": "${TALLY_BENCH_DATA}/emb"}))
    from tally.data.embedded import default_dir

    monkeypatch.setenv("TALLY_BENCH_DATA", str(default_dir().parent))
    spec = benchmark_spec_from_raw(raw(data={"source": "embedded", "root": "${TALLY_BENCH_DATA}/" + default_dir().name}))
    assert spec.runs["erm-sub-seed0"]["data"]["root"] == str(default_dir())


def test_each_domain_and_seed_lists():
    spec = benchmark_spec_from_raw(raw(settings=["each_domain"], seeds=[3, 7]))
    assert sorted(set(spec.plan["setting"])) == ["heldout-ink", "heldout-inverted", "heldout-noisy"]
    assert sorted(set(spec.plan["seed"])) == [3, 7]


@pytest.mark.parametrize("changes,field", [
    ({"epochs": 3}, "epochs: unknown top-level key"),
    ({"name": "a/b"}, "name:"),
    ({"data": {"source": "embedded", "setting": "domain"}}, "data.setting: set by `settings`"),
    ({"data": {"source": "ftp"}}, "data.source"),
    ({"base": {"method": {"name": "tally"}}}, "base.method"),
    ({"methods": {}}, "methods:"),
    ({"methods": {"erm": {"method": {"name": "sgdm"}}}}, "methods.erm: method.name"),
    ({"methods": {"erm": {"train": {"lr": 1}}}}, "methods.erm.method"),
    ({"methods": {"erm": {"method": {"name": "erm"}, "train": {"lr": -1}}}}, "methods.erm: train.lr"),
    ({"methods": {"e-rm": {"method": {"name": "erm"}}}}, "methods.e-rm"),
    ({"methods": {"erm": {"method": {"name": "erm"}, "optimiser": {}}}}, "methods.erm.optimiser"),
    ({"baseline": "focal"}, "baseline:"),
    ({"baseline": ["erm", "tally"]}, "baseline: .* leaving at least one"),
    ({"settings": ["domain:sepia"]}, r"settings\[0\]: unknown domain 'sepia'"),
    ({"settings": ["sub", "sub"]}, r"settings\[1\]: sub is listed twice"),
    ({"settings": ["ood"]}, r"settings\[0\]"),
    ({"seeds": 0}, "seeds"),
    ({"seeds": [1, 1]}, "seeds"),
    ({"selection_metric": "shot_zero"}, "selection_metric"),
    ({"concurrency": 0}, "concurrency"),
    ({"resources": {"gpus": 1}}, "resources.gpus"),
    ({"report": {"replicates": 0}}, "report.replicates"),
    # integers numpy, torch and Optuna cannot take are refused here, not as a traceback mid-benchmark
    ({"report": {"replicates": 10**7}}, r"report.replicates: expected an integer in \[1, 1000000\]"),
    ({"report": {"bootstrap_seed": 2**32}}, "report.bootstrap_seed"),
    ({"seeds": [0, 2**32]}, r"seeds: expected a count >= 1 or a list of distinct integers in \[0, 4294967295\]"),
    ({"seeds": 10**9}, r"seeds: expected an integer in \[1, 10000\]"),
    ({"concurrency": 2**64}, "concurrency"),
    ({"methods": {"tally": {"from_search": "/nonexistent/exp"}}}, "methods.tally.from_search: .* not an experiment"),
])
def test_spec_errors_name_the_field(changes, field):
    with pytest.raises(TallyError, match=field):
        benchmark_spec_from_raw(raw(**changes))


def _searched_experiment(tmp_path, data: dict, trials: dict[str, tuple[float, float]], objectives=None):
    """An experiment folder as a search leaves it: spec.yaml and finished trials with configs and
    validation metrics (pair_acc_mean, pair_acc_worst)."""
    exp = tmp_path / "search"
    selection = {"metric": "pair_acc_worst", "mode": "max"}
    if objectives:
        selection.update(objectives=objectives, tolerance=0.01)
    results.write_yaml(exp / "spec.yaml", {"name": "search", "selection": selection})
    for i, (trial, (mean, worst)) in enumerate(trials.items()):
        cfg = validate({"data": data, "model": {"arch": "resnet10"}, "method": {"name": "tally", "alpha": 0.1 + i},
                        "train": {"lr": 1e-3 * (i + 1), "seed": 5}})
        results.write_yaml(exp / "trials" / trial / "config.yaml", cfg)
        results.write_status(exp / "trials" / trial, "done")
        results.write_json(exp / "trials" / trial / "metrics.json",
                           {"val": {"pair_acc_mean": mean, "pair_acc_worst": worst}})
    return exp


def test_from_search_takes_the_selected_trial_by_the_pareto_rule(tmp_path):
    data = {"source": "embedded", "image_size": 16, "shot_many_above": 40}
    # the best mean (a) is 0.02 ahead of c; b is within 0.01 of a and has the better worst pair
    exp = _searched_experiment(tmp_path, data, {"a": (0.80, 0.10), "b": (0.795, 0.30), "c": (0.78, 0.50)},
                               objectives=["pair_acc_mean", "pair_acc_worst"])
    spec = benchmark_spec_from_raw(raw(methods={"erm": {"method": {"name": "erm"}},
                                                "tally": {"from_search": str(exp)}}, settings=["sub"]))
    cfg = spec.runs["tally-sub-seed0"]
    assert cfg["train"]["lr"] == pytest.approx(2e-3) and cfg["method"]["alpha"] == pytest.approx(1.1)  # trial b
    assert cfg["train"]["seed"] == 0 and cfg["train"]["selection_metric"] == "pair_acc_worst"
    assert spec.resolved["methods"]["tally"]["from"].endswith("search:b")
    named = benchmark_spec_from_raw(raw(methods={"erm": {"method": {"name": "erm"}},
                                                 "tally": {"from_search": str(exp), "trial": "c"}}, settings=["sub"]))
    assert named.runs["tally-sub-seed0"]["train"]["lr"] == pytest.approx(3e-3)


def test_from_search_on_other_data_is_refused(tmp_path):
    exp = _searched_experiment(tmp_path, {"source": "embedded", "image_size": 32}, {"a": (0.5, 0.1)})
    with pytest.raises(TallyError, match=r"methods.tally.from_search: the search ran on other data \(data.image_size"):
        benchmark_spec_from_raw(raw(methods={"tally": {"from_search": str(exp)}}, baseline=None))


# ---------------------------------------------------------------- tables from a store
D, C = 3, 4
DOMAINS, CLASSES = ["ink", "inverted", "noisy"], ["0", "1", "2", "3"]


def _write_run(run_dir, cfg: dict, split: str, quality: float, seed: int) -> None:
    """A finished run folder as training leaves it: config, eval.parquet, predictions, metrics.json."""
    rng = np.random.default_rng(seed)
    train_counts = np.array([[40, 10, 2, 0], [0, 40, 10, 2], [2, 0, 40, 10]])
    domains = np.repeat(np.arange(D), C * 20) if split == "test_sub" else np.full(C * 20, 2)
    labels = np.tile(np.repeat(np.arange(C), 20), len(domains) // (C * 20))
    right = rng.random(len(labels)) < quality
    preds = np.where(right, labels, (labels + 1) % C)
    tables = [evaluation.pair_table(s, preds, labels, domains, CLASSES, DOMAINS, train_counts) for s in ("val", split)]
    table = pd.concat(tables, ignore_index=True)
    results.write_yaml(run_dir / "config.yaml", cfg)
    results.write_parquet(run_dir / "eval.parquet", table)
    intervals.write_predictions(run_dir, [intervals.prediction_frame(split, preds, labels, domains,
                                                                     np.ones(len(preds)))])
    results.write_json(run_dir / "metrics.json", evaluation.all_metrics(table, 40, 20))
    results.write_status(run_dir, "done")


@pytest.fixture
def store(tmp_path):
    """A benchmark folder whose runs are written by hand: tally better than erm in 'sub' on every seed."""
    spec = benchmark_spec_from_raw(raw(settings=["sub"], seeds=3))
    exp = tmp_path / "bench"
    for p in spec.plan.itertuples():
        quality = (0.9 if p.method == "tally" else 0.5) + 0.01 * p.seed
        _write_run(exp / RUNS_DIR / p.run, spec.runs[p.run], p.split, quality, seed=p.seed)
    return spec, exp


def test_table_numbers_are_the_runs_own_metrics(store):
    spec, exp = store
    out = benchmark.tables(exp, spec.plan, "erm", replicates=200)
    table = out["table"].set_index(["method", "setting", "metric"])
    for method in ("erm", "tally"):
        runs = [exp / RUNS_DIR / f"{method}-sub-seed{k}" for k in range(3)]
        per_seed = [results.read_json(r / "metrics.json")["test_sub"] for r in runs]
        for metric in evaluation.METRIC_NAMES:
            values = np.array([m[metric] for m in per_seed], dtype=float)
            row = table.loc[(method, "sub", metric)]
            if np.isnan(values).all():
                assert math.isnan(row["mean"])
                continue
            assert row["mean"] == pytest.approx(values.mean())
            # the SE carries the seed spread and the test-set noise the seeds share (their mean half-width)
            half = out["values"].set_index(["method", "metric"]).loc[(method, metric), "half"].mean()
            test_se = half / stats.norm.isf(0.025) if half == half else 0.0
            assert row["stderr"] == pytest.approx(math.hypot(values.std(ddof=1) / math.sqrt(3), test_se))
            assert row["values"] == pytest.approx(tuple(values))
        acc = evaluation.domain_accuracies(*(evaluation.count_arrays(pd.read_parquet(runs[0] / "eval.parquet"),
                                                                      "test_sub")[k] for k in ("n", "correct")))
        assert table.loc[(method, "sub", "domain_acc:noisy"), "values"][0] == pytest.approx(acc[2])


def test_calibration_metrics_join_the_table_as_extra_rows(store):
    spec, exp = store
    run = exp / RUNS_DIR / "tally-sub-seed0"
    results.write_json(run / "calibration.json", {"temperature": 1.5, "fitted_on": "val",
                                                  "metrics": {"test_sub": {"ece": 0.12, "ts_ece": 0.03}}})
    out = benchmark.tables(exp, spec.plan, "erm", replicates=20)
    values = out["values"].set_index(["run", "metric"])["value"]
    assert values[("tally-sub-seed0", "ece")] == 0.12 and values[("tally-sub-seed0", "ts_ece")] == 0.03
    assert ("tally-sub-seed1", "ece") not in values.index  # a run without calibration: no row, no error
    assert set(out["differences"]["metric"]).isdisjoint({"ece", "ts_ece"})  # verdicts stay accuracy-only


def test_differences_per_seed_and_the_verdict(store):
    spec, exp = store
    out = benchmark.tables(exp, spec.plan, "erm", replicates=200)
    per_seed = out["differences"]
    assert set(per_seed["seed"]) == {0, 1, 2} and set(per_seed["method"]) == {"tally"}
    row = per_seed[(per_seed["seed"] == 1) & (per_seed["metric"] == "acc")].iloc[0]
    a = results.read_json(exp / RUNS_DIR / "tally-sub-seed1" / "metrics.json")["test_sub"]["acc"]
    b = results.read_json(exp / RUNS_DIR / "erm-sub-seed1" / "metrics.json")["test_sub"]["acc"]
    assert row["diff"] == pytest.approx(a - b) and row["low"] < a - b < row["high"]
    summary = out["difference_summary"].set_index("metric")
    assert summary.at["acc", "verdict"] == "better"  # 0.9 vs 0.5 on 240 images: above 0 on every seed
    assert summary.at["acc", "mean_diff"] == pytest.approx(per_seed[per_seed["metric"] == "acc"]["diff"].mean())
    text = benchmark.markdown(out)
    assert "| tally - erm | accuracy |" not in text  # only the headline metrics are printed
    assert "| tally - erm | worst-class accuracy |" in text and "verdict rule" in text
    assert "\\begin{tabular}" in benchmark.latex(out)


def test_verdict_needs_every_seed():
    def frame(bounds):
        return pd.DataFrame([{"method": "m", "baseline": "b", "setting": "sub", "seed": k, "metric": "acc",
                              "a": 0.0, "b": 0.0, "diff": (lo + hi) / 2, "low": lo, "high": hi}
                             for k, (lo, hi) in enumerate(bounds)])
    verdict = lambda b: benchmark.difference_summary(frame(b))["verdict"].iat[0]  # noqa: E731
    assert verdict([(0.01, 0.2), (0.02, 0.1)]) == "better"
    assert verdict([(0.01, 0.2), (-0.01, 0.1)]) == "no clear difference"
    assert verdict([(-0.3, -0.1), (-0.2, -0.01)]) == "worse"
    summary = benchmark.difference_summary(frame([(0.0, 0.2), (0.2, 0.4)]))
    assert summary["stderr"].iat[0] == pytest.approx(np.std([0.1, 0.3], ddof=1) / math.sqrt(2))


def test_verdicts_count_the_comparisons_and_holm_adjusts_them(store):
    spec, exp = store
    plain = benchmark.tables(exp, spec.plan, "erm", replicates=100)["difference_summary"].set_index("metric")
    holm = benchmark.tables(exp, spec.plan, "erm", replicates=100, adjust="holm")["difference_summary"]
    m = int((holm["verdict"] != "n/a").sum())
    assert (holm["comparisons"] == m).all() and m > 5 and set(holm["adjust"]) == {"holm"}
    holm = holm.set_index("metric")
    assert holm.at["acc", "verdict"] == "better"  # 0.9 vs 0.5: survives the adjustment
    for metric, verdict in holm["verdict"].items():  # Holm never adds a verdict, and its intervals are wider
        if verdict in ("better", "worse"):
            assert plain.at[metric, "verdict"] == verdict
        lo_h = min(x[2] for x in holm.at[metric, "per_seed"])
        lo_p = min(x[2] for x in plain.at[metric, "per_seed"])
        assert lo_h <= lo_p or math.isnan(lo_p), metric
    acc_low = [min(x[2] for x in frame.at["acc", "per_seed"]) for frame in (holm, plain)]
    assert acc_low[0] < acc_low[1]  # judged at 1 - 0.05 / m first: a wider interval
    line = benchmark.verdict_line(holm.reset_index())
    assert f"{m} comparisons, Holm-adjusted" in line
    assert "not adjusted for multiplicity" in benchmark.verdict_line(plain.reset_index())
    with pytest.raises(TallyError, match="report.adjust: expected one of none, holm"):
        benchmark_spec_from_raw(raw(settings=["sub"], report={"adjust": "bonferroni"}))


def test_written_files_and_load_from_the_store(store):
    spec, exp = store
    out = benchmark.tables(exp, spec.plan, "erm", **spec.resolved["report"])  # as load_benchmark reads it
    benchmark.write_tables(exp, out)
    for name in ("table.md", "table.tex", "table.csv", "runs.csv", "differences.csv", "difference_summary.csv"):
        assert (exp / name).stat().st_size > 100, name
    csv = pd.read_csv(exp / "table.csv")
    assert set(csv.columns) == {"method", "setting", "metric", "mean", "stderr", "n", "values", "small"}
    results.write_yaml(exp / "spec.yaml", spec.resolved)
    results.write_parquet(exp / "plan.parquet", spec.plan)
    again = benchmark.load_benchmark(exp)
    pd.testing.assert_frame_equal(again["table"].drop(columns="values"), out["table"].drop(columns="values"))


def test_pending_runs_skip_done_and_refuse_a_changed_config(store):
    spec, exp = store
    assert benchmark.pending_runs(spec, exp) == {}
    (exp / RUNS_DIR / "erm-sub-seed2" / "metrics.json").unlink()
    results.write_status(exp / RUNS_DIR / "erm-sub-seed2", "failed")
    assert list(benchmark.pending_runs(spec, exp)) == ["erm-sub-seed2"]
    changed = benchmark_spec_from_raw(raw(settings=["sub"], seeds=3,
                                          methods={**RAW["methods"], "erm": {"method": {"name": "erm"},
                                                                             "train": {"lr": 0.1}}}))
    with pytest.raises(TallyError, match="erm-sub-seed0: holds a run with another config"):
        benchmark.pending_runs(changed, exp)


# ---------------------------------------------------------------- end to end on a local Ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_multi_objective_search_then_benchmark_end_to_end(tmp_path, local_ray, capsys):
    """A 2-trial multi-objective search on accuracy and a lower-is-better calibration metric (validation
    worst-domain ECE, issue 24), then `tally benchmark` of its pick against ERM on the subpopulation
    split over 2 seeds: the table equals the runs' metrics.json."""
    import optuna

    from tally.cli import main

    # 2 main epochs: the kept one is chosen by the lower-is-better metric
    base = {"data": RAW["data"], "model": RAW["base"]["model"], "method": {"name": "tally"},
            "train": {**RAW["base"]["train"], "epochs": 3}}
    search = {"name": "mo", "base": base, "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3}},
              "selection": {"objectives": ["pair_acc_mean", "ece_worst_domain"], "tolerance": 0.01},
              "budget": {"trials": 2, "concurrency": 2}}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    assert main(["search", str(tmp_path / "search.yaml"), "--storage", str(tmp_path / "store")]) == 0
    exp = tmp_path / "store" / "mo"
    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{exp / 'study.db'}")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    summary = results.summarise(exp)
    done = summary[summary["status"] == "done"]
    assert len(done) == 2
    # the kept checkpoint's validation calibration metric reached the trial's final report, which
    # Optuna was told, and equals what the store's selection reads (calibration.json)
    told = {tuple(t.values) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert told == {(r["val/pair_acc_mean"], r["val/ece_worst_domain"]) for _, r in done.iterrows()}
    for trial_id, value in zip(done["trial_id"], done["val/ece_worst_domain"], strict=True):
        # every epoch recorded it on validation; the kept epoch is the lowest of the main phase
        epochs = pd.DataFrame(results.read_jsonl(exp / "trials" / trial_id / "epochs.jsonl"))
        kept_from = epochs[epochs["phase"] == "main"].set_index("epoch")["val/ece_worst_domain"]
        kept = results.read_json(exp / "trials" / trial_id / "status.json")
        assert epochs["val/ece_worst_domain"].notna().all() and kept_from[kept["best_epoch"]] == kept_from.min()
        assert kept["selection"]["metric"] == "ece_worst_domain" and kept["selection"]["value"] == value
        assert kept_from[kept["best_epoch"]] == pytest.approx(value, abs=1e-6)  # the kept weights re-evaluated
        assert epochs["best_value"].dropna().iloc[-1] == kept_from.min()
    best, selection = results.best_of_experiment(exp)
    assert selection.modes == ("max", "min")
    assert best["trial_id"] == results.pick_from_front(summary, selection.objectives, 0.01)["trial_id"]

    # a subpopulation search's pick: the subpopulation split only (a held-out domain would be refused: the
    # search selected on that domain's validation images, part of its held-out test split)
    spec = raw(methods={"erm": {"method": {"name": "erm"}}, "tally": {"from_search": str(exp)}}, settings=["sub"])
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["benchmark", str(tmp_path / "bench.yaml"), "--storage", str(tmp_path / "store")]) == 0
    printed = capsys.readouterr().out
    assert "4 runs" in printed and "### sub (test_sub)" in printed
    bench = tmp_path / "store" / "bench"
    table = pd.read_csv(bench / "table.csv").set_index(["method", "setting", "metric"])
    for run_dir in sorted((bench / RUNS_DIR).iterdir()):
        assert results.read_json(run_dir / "status.json")["status"] == "done", run_dir
    for method in ("erm", "tally"):
        for setting, split in (("sub", "test_sub"),):
            values = [results.read_json(bench / RUNS_DIR / f"{method}-{setting}-seed{k}" / "metrics.json")[split]
                      for k in (0, 1)]
            for metric in ("pair_acc_mean", "class_acc_worst", "macro_f1", "shot_zero"):
                assert table.loc[(method, setting, metric), "mean"] == pytest.approx(
                    np.mean([v[metric] for v in values]))
    assert results.read_yaml(bench / RUNS_DIR / "tally-sub-seed1" / "config.yaml")["train"]["lr"] == pytest.approx(
        results.read_yaml(exp / "trials" / best["trial_id"] / "config.yaml")["train"]["lr"])
    assert main(["benchmark", str(tmp_path / "bench.yaml"), "--storage", str(tmp_path / "store")]) == 0
    assert "all 4 runs done" in capsys.readouterr().out  # the store is the truth: nothing re-run


def test_shipped_benchmark_spec_dry_run_writes_nothing(tmp_path, capsys):
    from pathlib import Path

    from tally.cli import main

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "embedded.yaml"
    spec = benchmark.load_benchmark_spec(path)
    assert spec.name == "benchmark-embedded" and len(spec.runs) == 3 * 4 * 3
    assert spec.resolved["baseline"] == ["erm", "reweight"]
    assert main(["benchmark", str(path), "--dry-run", "--storage", str(tmp_path / "store")]) == 0
    assert "36 runs" in capsys.readouterr().out and not (tmp_path / "store").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("seeds: 3", "seeds: -1"))
    assert main(["benchmark", str(bad), "--storage", str(tmp_path / "store")]) == 2
    assert capsys.readouterr().err.strip() == "error: seeds: expected an integer in [1, 10000], got -1"
    assert not (tmp_path / "store").exists()


def test_data_root_never_expands_other_variables(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "TOPSECRET")
    with pytest.raises(TallyError, match=r"data\.root: \$\{AWS_SECRET_ACCESS_KEY\} is not expanded") as err:
        benchmark_spec_from_raw(raw(data={"source": "embedded", "root": "${AWS_SECRET_ACCESS_KEY}/emb"}))
    assert "TOPSECRET" not in str(err.value)
