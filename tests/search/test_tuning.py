"""Every method tuned alike (`tune:`): the spaces and their generated table, equal trials per method,
what each selection rule reads, the re-runs, tuning curves, the from_search guard, the shipped
tuned spec's dry run; and (slow, local Ray) `tally benchmark` with tune on the embedded data."""

from __future__ import annotations

import importlib.util
import itertools
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tally import results
from tally.config import SCHEMA, validate
from tally.errors import TallyError
from tally.method.methods import METHODS
from tally.search import benchmark, tuning
from tally.search import space as space_mod
from tally.search.benchmark import benchmark_spec_from_raw
from tests.search.test_benchmark import RAW as UNTUNED
from tests.search.test_benchmark import changed

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")  # PACS
RAW = changed(UNTUNED, name="tuned", seeds=None,
              methods={"erm": {"method": {"name": "erm"}}, "tally": {"method": {"name": "tally"}},
                       "reweight": {"method": {"name": "reweight"}}},
              tune={"trials": 3, "seeds": 2, "space": {"train.batch_size": None}})


def raw(**changes) -> dict:
    return changed(RAW, **changes)


# ---------------------------------------------------------------- spaces
def test_spaces_doc_is_current():
    spec = importlib.util.spec_from_file_location("spaces", ROOT / "docs" / "spaces.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.TARGET.read_text() == tuning.spaces_markdown(), "run `python docs/spaces.py --write`"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_space_is_valid_and_holds_its_default_point(name):
    base_raw = {"data": {"source": "embedded"}, "method": {"name": name}}
    space = space_mod.check_space(tuning.method_space(name), base_raw, validate(base_raw))
    for path, param in space.items():
        value = tuning.default_point(name, path)
        if param["type"] == "categorical":
            assert any(type(c) is type(value) and c == value for c in param["choices"]), (path, value)
        else:
            assert param["low"] <= value <= param["high"], (path, value)
    assert set(METHODS[name].space) <= set(METHODS[name].defaults)
    assert {"train.lr", "train.weight_decay", "train.batch_size"} <= set(space)


def test_overrides_replace_or_fix_a_knob():
    space = tuning.method_space("tally", {"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}},
                                {"method.fold": None})
    assert space["train.lr"]["type"] == "uniform" and "method.fold" not in space
    assert space["method.alpha"] == METHODS["tally"].space["alpha"]
    assert tuning.default_point("erm", "train.lr") == SCHEMA["train"]["lr"].default


def test_draws_are_seeded_per_knob_and_trial_zero_is_the_default():
    space = {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
             "train.batch_size": {"type": "int", "low": 8, "high": 32, "step": 8},
             "method.beta": {"type": "categorical", "choices": [0.9, 0.99]}}
    assert tuning.draw(space, 0, 0) == {}
    a, b = tuning.draw(space, 1, 0), tuning.draw(space, 1, 0)
    assert a == b and 1e-4 <= a["train.lr"] <= 1e-2 and a["train.batch_size"] in (8, 16, 24, 32)
    # each knob its own stream: a method whose space lists other knobs before lr draws the same lr
    others_first = {"method.beta": space["method.beta"], "train.batch_size": space["train.batch_size"],
                    "train.lr": space["train.lr"]}
    assert tuning.draw(others_first, 1, 0)["train.lr"] == a["train.lr"]
    assert tuning.draw({"train.lr": space["train.lr"]}, 1, 0)["train.lr"] == a["train.lr"]
    assert tuning.draw(space, 2, 0)["train.lr"] != a["train.lr"]
    assert tuning.draw(space, 1, 1)["train.lr"] != a["train.lr"]
    lrs = [tuning.draw(space, k, 0)["train.lr"] for k in range(1, 200)]
    assert np.log10(min(lrs)) < -3.5 and np.log10(max(lrs)) > -2.5  # loguniform covers the range


# ---------------------------------------------------------------- the plan
def test_every_method_gets_the_same_trials_seed_and_budget():
    spec = benchmark_spec_from_raw(raw())
    tp = spec.tuning
    assert spec.runs == {} and tp is not None
    counts = tp.plan.groupby(["method", "setting"]).size()
    assert set(counts) == {3} and len(counts) == 3 * 2
    for run_id, cfg in tp.trials.items():
        assert cfg == validate(cfg)
        assert cfg["train"]["seed"] == cfg["method"]["seed"] == 0
        assert (cfg["train"]["epochs"], cfg["train"]["steps_per_epoch"], cfg["train"]["batch_size"]) == (2, 2, 16)
        assert cfg["model"] == tp.trials["erm-sub-t0"]["model"]
        # the held-out trials record the test domain per epoch for the oracle; the sub ones cannot
        assert cfg["data"]["oracle_selection"] == run_id.split("-")[1].startswith("heldout")
    # the shared knob takes the same value in trial k of every method; trial 0 is the base's
    lrs = {m: [tp.trials[f"{m}-sub-t{k}"]["train"]["lr"] for k in range(3)] for m in ("erm", "tally", "reweight")}
    assert lrs["erm"] == lrs["tally"] == lrs["reweight"] and lrs["erm"][0] == 1e-3 and len(set(lrs["erm"])) == 3
    assert tp.trials["tally-sub-t0"]["method"]["alpha"] == METHODS["tally"].defaults["alpha"]
    assert tp.trials["tally-sub-t1"]["method"]["alpha"] != METHODS["tally"].defaults["alpha"]
    text = benchmark.dry_run_text(spec)
    assert "erm: 6 trial runs + 4 train_val re-runs + 2 oracle re-runs = 12 runs" in text
    assert "every method 3 trials (random sampler, sampler seed 0" in text and "training steps" in text


def test_method_space_override_and_tune_errors():
    spec = benchmark_spec_from_raw(raw(methods={
        "erm": {"method": {"name": "erm"}},
        "tally": {"method": {"name": "tally"}, "space": {"method.alpha": {"type": "uniform", "low": 1.0, "high": 1.5}}}}))
    assert 1.0 <= spec.tuning.trials["tally-sub-t1"]["method"]["alpha"] <= 1.5


@pytest.mark.parametrize("changes,message", [
    ({"seeds": 2}, "seeds: with tune, tune.seeds"),
    ({"tune": {"trials": 0}}, "tune.trials: expected an integer >= 1"),
    ({"tune": {"sampler": "tpe"}}, "tune.sampler: expected one of random"),
    ({"tune": {"rules": ["oracle", "loo"]}}, "tune.rules: expected a list of distinct rules"),
    ({"tune": {"rules": ["train_val", "lodo"]}}, "tune.rules: lodo .* setting sub holds no domain out"),
    ({"tune": {"budget": 3}}, "tune.budget: unknown key"),
    ({"tune": {"space": {"train.lr": {"type": "uniform", "low": -1, "high": 1}}}}, r"methods.erm \(tune\): space.train.lr.low"),
    ({"methods": {"erm": {"method": {"name": "erm"}, "train": {"lr": 1.0}}, "tally": {"method": {"name": "tally"}}}},
     "methods.erm.train: not allowed with tune"),
    ({"methods": {"erm": {"method": {"name": "erm"}}, "tally": {"method": {"name": "tally"},
                                                                  "space": {"method.beta": {"type": "uniform", "low": 0, "high": 0.5}}}}},
     "space.method.beta: not a parameter of method 'tally'"),
])
def test_tune_errors_name_the_field(changes, message):
    with pytest.raises(TallyError, match=message):
        benchmark_spec_from_raw(raw(**changes))


# ---------------------------------------------------------------- what each rule reads
def _trial(exp, run_id, cfg, epochs):
    d = exp / tuning.TUNE_DIR / run_id
    results.write_yaml(d / "config.yaml", cfg)
    for e in epochs:
        results.append_jsonl(d / "epochs.jsonl", e)
    results.write_status(d, "done")


def _epochs(val, test, split="test_domain:noisy", metric="pair_acc_worst"):
    """Epoch 0 warm-up (the best of all, never kept), then the main epochs' values."""
    out = [{"epoch": 0, "phase": "warmup", f"val/{metric}": 0.99, "val/pair_acc_mean": 0.99,
            f"oracle:{split}/{metric}": 0.99, "seconds": 1.0}]
    for i, (v, t) in enumerate(zip(val, test, strict=True), start=1):
        out.append({"epoch": i, "phase": "main", f"val/{metric}": v, "val/pair_acc_mean": 0.5,
                    f"oracle:{split}/{metric}": t, f"oracle:{split}/pair_acc_mean": 0.5, "seconds": 2.0})
    return out


@pytest.fixture
def tuned_store(tmp_path):
    spec = benchmark_spec_from_raw(raw(settings=["domain:noisy"], methods={"erm": {"method": {"name": "erm"}},
                                                                          "tally": {"method": {"name": "tally"}}}))
    tp, exp = spec.tuning, tmp_path / "bench"
    # erm: t1 best on validation (epoch 2), t2 best on the test domain (epoch 1)
    values = {"t0": ([0.2, 0.3], [0.1, 0.2]), "t1": ([0.4, 0.6], [0.3, 0.1]), "t2": ([0.5, 0.1], [0.9, 0.2])}
    for run_id, cfg in tp.trials.items():
        val, test = values[run_id.split("-")[-1]]
        if run_id.startswith("tally"):
            val, test = val[::-1], test[::-1]
        _trial(exp, run_id, cfg, _epochs(val, test))
    return spec, tp, exp


def test_training_domain_rule_reads_validation_only_and_oracle_the_test_domain_only(tuned_store):
    spec, tp, exp = tuned_store
    chosen = tuning.picks(exp, tp).set_index(["method", "rule"])
    assert chosen.loc[("erm", "train_val"), ["trial", "epoch", "value"]].tolist() == [1, 2, 0.6]
    assert chosen.loc[("erm", "oracle"), ["trial", "epoch", "value"]].tolist() == [2, 1, 0.9]
    assert chosen.loc[("tally", "train_val"), ["trial", "epoch"]].tolist() == [1, 1]  # warm-up 0.99 never kept
    # rewrite every test-domain number: the training-domain pick does not move; the oracle's follows
    for run_id in tp.trials:
        d = exp / tuning.TUNE_DIR / run_id
        epochs = results.read_jsonl(d / "epochs.jsonl")
        (d / "epochs.jsonl").unlink()
        for e in epochs:
            if e["phase"] == "main":
                e["oracle:test_domain:noisy/pair_acc_worst"] = 0.95 if run_id == "erm-heldout-noisy-t0" else 0.05
            results.append_jsonl(d / "epochs.jsonl", e)
    again = tuning.picks(exp, tp).set_index(["method", "rule"])
    assert again.loc[("erm", "train_val"), "trial"] == 1 and again.loc[("erm", "oracle"), "trial"] == 0


def test_no_pick_until_every_trial_is_done_and_the_reruns(tuned_store):
    spec, tp, exp = tuned_store
    results.write_status(exp / tuning.TUNE_DIR / "erm-heldout-noisy-t2", "running")
    chosen = tuning.picks(exp, tp)
    assert set(chosen["method"]) == {"tally"}
    runs, plan = tuning.final_runs(tp, chosen)
    assert sorted(runs) == [f"tally-heldout-noisy-{r}-seed{s}" for r in ("oracle", "train_val") for s in (1, 2)]
    trial_of = dict(zip(plan["run"], plan["trial"], strict=True))
    assert {r: trial_of[f"tally-heldout-noisy-{r}-seed1"] for r in ("train_val", "oracle")} == {
        "train_val": 1, "oracle": 2}
    for run_id, cfg in runs.items():
        picked = tp.trials[f"tally-heldout-noisy-t{trial_of[run_id]}"]
        assert cfg["data"]["oracle_selection"] == ("-oracle-" in run_id)
        assert cfg["method"] == {**picked["method"], "seed": cfg["train"]["seed"]}
        assert {k: v for k, v in cfg["train"].items() if k != "seed"} == {
            k: v for k, v in picked["train"].items() if k != "seed"}
    assert set(plan["split"]) == {"test_domain:noisy"} and set(plan["seed"]) == {1, 2}


def test_sub_setting_gets_no_oracle():
    assert tuning.rules_for("sub", ["train_val", "lodo", "oracle"]) == ["train_val"]
    assert tuning.rules_for("heldout-ink", ["train_val", "lodo", "oracle"]) == ["train_val", "lodo", "oracle"]


# ---------------------------------------------------------------- leave-one-domain-out
LODO = {"trials": 3, "seeds": 2, "space": {"train.batch_size": None}, "rules": ["train_val", "lodo"]}


def test_lodo_plans_one_run_per_training_domain_of_each_trial():
    spec = benchmark_spec_from_raw(raw(settings=["domain:noisy"], tune=LODO))
    tp = spec.tuning
    assert sorted(tp.lodo) == sorted(f"{m}-heldout-noisy-t{k}-lodo-{d}" for m in ("erm", "tally", "reweight")
                                     for k in range(3) for d in ("ink", "inverted"))
    for p in tp.lodo_plan.itertuples():
        cfg, trial = tp.lodo[p.run], tp.trials[p.trial_run]
        assert cfg["data"]["held_out"] == ["noisy", p.also_out] and not cfg["data"]["oracle_selection"]
        assert cfg["train"]["select_from"] == "last"  # the lodo epoch rule: the last epoch
        # otherwise the trial's config itself: its method, model, seed and training budget
        assert cfg["method"] == trial["method"] and cfg["model"] == trial["model"]
        assert {k: v for k, v in cfg["train"].items() if k != "select_from"} == {
            k: v for k, v in trial["train"].items() if k != "select_from"}
    assert not any(c["train"]["select_from"] == "last" for c in tp.trials.values())
    text = benchmark.dry_run_text(spec)
    assert "erm: 3 trial runs + 6 lodo runs + 2 train_val re-runs + 2 lodo re-runs = 13 runs" in text
    assert "18 extra runs in all (2 per trial run)" in text


def test_lodo_is_refused_without_held_out_domains_or_with_one_training_domain(tmp_path, capsys):
    from tally.cli import main

    with pytest.raises(TallyError, match=r"^tune.rules: lodo needs at least 2 training domains to hold out in turn; setting heldout-a leaves 1 \(b\)$"):
        tuning.check_lodo(["lodo"], ["heldout-a"], ["a", "b"])
    tuning.check_lodo(["train_val", "oracle"], ["sub", "heldout-a"], ["a", "b"])  # no lodo: nothing to check
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(raw(tune=LODO)))  # settings: sub and domain:noisy
    assert main(["benchmark", str(tmp_path / "t.yaml"), "--dry-run", "--storage", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lodo (leave-one-domain-out) needs held-out-domain settings" in err
    assert not (tmp_path / "store").exists()


def _done_run(exp, run_id, cfg, metrics, epoch=1):
    d = exp / tuning.TUNE_DIR / run_id
    results.write_yaml(d / "config.yaml", cfg)
    results.write_json(d / "metrics.json", metrics)
    results.write_status(d, "done", best_epoch=epoch)


def _split(value, mean=0.5):
    return {"pair_acc_worst": value, "pair_acc_mean": mean}


@pytest.fixture
def lodo_store(tmp_path):
    """erm's trials: t2 best on the test domain (in every run), t1 best by the lodo mean, t0 best on ink
    alone; tally's: the same, trials reversed. Each lodo run also holds numbers on noisy (the test domain)."""
    spec = benchmark_spec_from_raw(raw(settings=["domain:noisy"], tune=LODO,
                                       methods={"erm": {"method": {"name": "erm"}}, "tally": {"method": {"name": "tally"}}}))
    tp, exp = spec.tuning, tmp_path / "bench"
    on = {0: {"ink": 0.9, "inverted": 0.1}, 1: {"ink": 0.6, "inverted": 0.6}, 2: {"ink": 0.2, "inverted": 0.3}}
    for run_id, cfg in tp.trials.items():
        k = int(run_id[-1])
        _trial(exp, run_id, cfg, _epochs([0.5, 0.5], [0.99 if k == 2 else 0.1] * 2))
    for p in tp.lodo_plan.itertuples():
        k = p.trial if p.method == "erm" else 2 - p.trial
        _done_run(exp, p.run, tp.lodo[p.run], {f"test_domain:{p.also_out}": _split(on[k][p.also_out], 0.4 + k / 10),
                                               "test_domain:noisy": _split(0.99 if k == 2 else 0.0)})
    return spec, tp, exp, on


def test_lodo_scores_each_trial_by_the_mean_over_its_held_out_training_domains(lodo_store):
    spec, tp, exp, on = lodo_store
    values = tuning.trial_values(exp, tp, "lodo").set_index("run")
    for k in range(3):
        assert values.loc[f"erm-heldout-noisy-t{k}", "value"] == pytest.approx(np.mean(list(on[k].values())))
        assert values.loc[f"erm-heldout-noisy-t{k}", "tiebreak"] == pytest.approx(0.4 + k / 10)
    chosen = tuning.picks(exp, tp).set_index(["method", "rule"])
    assert chosen.loc[("erm", "lodo"), ["trial", "run", "value", "epoch"]].tolist() == [
        1, "erm-heldout-noisy-t1", pytest.approx(0.6), 1]
    assert chosen.loc[("tally", "lodo"), "trial"] == 1
    # every number on the test domain rewritten, in the lodo runs and the trials: the lodo pick stays
    for p in tp.lodo_plan.itertuples():
        m = results.read_json(exp / tuning.TUNE_DIR / p.run / "metrics.json")
        results.write_json(exp / tuning.TUNE_DIR / p.run / "metrics.json", {**m, "test_domain:noisy": _split(1.0)})
    assert tuning.picks(exp, tp).set_index(["method", "rule"]).loc[("erm", "lodo"), "trial"] == 1
    # the pick's re-runs hold out the test domain only, keep their last epoch, and are the trial's config
    runs, plan = tuning.final_runs(tp, tuning.picks(exp, tp))
    for seed in (1, 2):
        cfg, trial = runs[f"erm-heldout-noisy-lodo-seed{seed}"], tp.trials["erm-heldout-noisy-t1"]
        assert cfg["data"]["held_out"] == ["noisy"] and cfg["train"]["select_from"] == "last"
        assert not cfg["data"]["oracle_selection"] and cfg["method"] == {**trial["method"], "seed": seed}
    assert runs["erm-heldout-noisy-train_val-seed1"]["train"]["select_from"] == "main"
    assert set(plan.loc[plan["rule"] == "lodo", "split"]) == {"test_domain:noisy"}


def test_no_lodo_score_until_every_training_domain_is_done(lodo_store):
    spec, tp, exp, on = lodo_store
    results.write_status(exp / tuning.TUNE_DIR / "erm-heldout-noisy-t1-lodo-inverted", "running")
    values = tuning.trial_values(exp, tp, "lodo")
    assert "erm-heldout-noisy-t1" not in set(values["run"]) and len(values) == 5
    chosen = tuning.picks(exp, tp)
    assert set(chosen.loc[chosen["rule"] == "lodo", "method"]) == {"tally"}  # erm: a trial is missing its score
    costs = tuning.cost(exp, tp, pd.DataFrame(columns=["run", "method"])).set_index("method")
    assert costs.loc["erm", "lodo_runs"] == 5 and costs.loc["tally", "lodo_runs"] == 6


def test_tuning_curves_and_cost(tuned_store):
    spec, tp, exp = tuned_store
    values = tuning.trial_values(exp, tp, "train_val")
    curves = tuning.tuning_curves(values, replicates=300)
    erm = curves[curves["method"] == "erm"]
    assert erm["best"].tolist() == [0.3, 0.6, 0.6]  # best so far in trial order
    assert (np.diff(erm["low"]) >= 0).all() and (erm["low"] <= erm["high"]).all()
    assert erm["low"].iloc[0] == pytest.approx(0.3) and erm["high"].iloc[0] == pytest.approx(0.6)
    assert erm["low"].iloc[-1] == erm["high"].iloc[-1] == 0.6  # all trials seen: every order agrees
    costs = tuning.cost(exp, tp, pd.DataFrame(columns=["run", "method"])).set_index("method")
    assert costs.loc["erm", "trials"] == 3 and costs.loc["erm", "wall_h"] == pytest.approx(3 * 5.0 / 3600)
    assert costs.loc["erm", "cpu_h"] == pytest.approx(3 * 5.0 / 3600) and costs.loc["erm", "gpu_h"] == 0
    text = tuning.tuning_markdown(curves, tuning.picks(exp, tp), costs.reset_index(), tp.tune)
    assert "| erm | 3 | 0 | 0 | 0.004 | 0.004 | 0.000 |" in text and "every method 3 trials" in text
    assert "| erm | heldout-noisy | oracle (test domain) | t2 | 90.0 | 1 |" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| erm | heldout-noisy | 30.0 [")]
    assert row.startswith("| erm | heldout-noisy | 30.0 [30.0, 60.0] | 60.0 [") and row.endswith("] | 60.0 |"), row


def test_a_lower_is_better_selection_metric_picks_the_lowest_epoch_trial_and_curve(tmp_path):
    """selection_metric: ece (lower is better): the kept epoch, the picked trial and the tuning curve all
    take the LOWEST value; read as higher-is-better every one of them would differ."""
    spec = benchmark_spec_from_raw(raw(settings=["domain:noisy"], selection_metric="ece",
                                       methods={"erm": {"method": {"name": "erm"}},
                                                "tally": {"method": {"name": "tally"}}}))
    tp, exp = spec.tuning, tmp_path / "bench"
    assert tuning.selection_mode(tp) == "min" and {c["train"]["selection_metric"] for c in tp.trials.values()} == {"ece"}
    # per main epoch (validation ECE, test-domain ECE); the warm-up's 0.99 is never kept
    values = {"t0": ([0.20, 0.15], [0.30, 0.20]), "t1": ([0.05, 0.30], [0.40, 0.50]), "t2": ([0.10, 0.08], [0.25, 0.01])}
    for run_id, cfg in tp.trials.items():
        _trial(exp, run_id, cfg, _epochs(*values[run_id.split("-")[-1]], metric="ece"))
    chosen = tuning.picks(exp, tp).set_index(["method", "rule"])
    assert chosen.loc[("erm", "train_val"), ["trial", "epoch", "value"]].tolist() == [1, 1, 0.05]
    assert chosen.loc[("erm", "oracle"), ["trial", "epoch", "value"]].tolist() == [2, 2, 0.01]
    trial_values = tuning.trial_values(exp, tp, "train_val")
    erm = trial_values[trial_values["method"] == "erm"]
    assert erm.sort_values("trial")["value"].tolist() == [0.15, 0.05, 0.08]
    curves = tuning.tuning_curves(trial_values, replicates=50, mode=tuning.selection_mode(tp))
    erm = curves[curves["method"] == "erm"]
    assert erm["best"].tolist() == [0.15, 0.05, 0.05] and (erm["low"] <= erm["best"]).all()
    costs = tuning.cost(exp, tp, pd.DataFrame(columns=["run", "method"]))
    text = tuning.tuning_markdown(curves, tuning.picks(exp, tp), costs, tp.tune, "ece")
    assert "| erm | heldout-noisy | training-domain validation | t1 | 0.0500 | 1 |" in text
    assert "(ece, lower is better" in text


def test_benchmark_selection_metric_is_checked_like_a_search_selection():
    with pytest.raises(TallyError, match="selection_metric: 'ts_brier' cannot be selected on"):
        benchmark_spec_from_raw(raw(selection_metric="ts_brier"))
    with pytest.raises(TallyError, match="selection_metric: expected a validation metric"):
        benchmark_spec_from_raw(raw(selection_metric="ece_class:0"))


# ---------------------------------------------------------------- no selection with test data
def _search(tmp_path, setting, held_out):
    exp = tmp_path / f"search-{setting}-{'-'.join(held_out)}"
    data = {**RAW["data"], "setting": setting, "held_out": held_out}
    cfg = validate({"data": data, "model": {"arch": "resnet10"}, "method": {"name": "tally"}, "train": {"lr": 2e-3}})
    results.write_yaml(exp / "spec.yaml", {"name": "s", "selection": {"metric": "pair_acc_mean", "mode": "max"}})
    results.write_yaml(exp / "trials" / "a" / "config.yaml", cfg)
    results.write_status(exp / "trials" / "a", "done")
    results.write_json(exp / "trials" / "a" / "metrics.json", {"val": {"pair_acc_mean": 0.5}})
    return exp


def test_from_search_must_have_held_out_the_benchmarks_domain(tmp_path):
    fixed = {k: v for k, v in RAW.items() if k != "tune"}
    fixed["seeds"] = 1
    sub = _search(tmp_path, "sub", [])
    methods = {"erm": {"method": {"name": "erm"}}, "tally": {"from_search": str(sub)}}
    with pytest.raises(TallyError, match=r"methods.tally.from_search: the search did not hold out domain 'noisy'"):
        benchmark_spec_from_raw({**fixed, "methods": methods})
    assert benchmark_spec_from_raw({**fixed, "methods": methods, "settings": ["sub"]}).runs  # sub on sub: fine
    noisy = _search(tmp_path, "domain", ["noisy"])
    methods["tally"] = {"from_search": str(noisy)}
    spec = benchmark_spec_from_raw({**fixed, "methods": methods, "settings": ["domain:noisy"]})
    assert spec.runs["tally-heldout-noisy-seed0"]["train"]["lr"] == pytest.approx(2e-3)
    with pytest.raises(TallyError, match="did not hold out domain 'ink'"):
        benchmark_spec_from_raw({**fixed, "methods": methods, "settings": ["domain:noisy", "domain:ink"]})


# ---------------------------------------------------------------- a paper dataset in this protocol
def test_pacs_tuned_spec_dry_run(tmp_path, monkeypatch, capsys):
    from tally.cli import main

    # the published PACS lists (copies; no images): a dry run reads the domain names, never an image
    monkeypatch.setenv("TALLY_DATA", str(ROOT / "tests" / "data" / "lists"))

    path = ROOT / "benchmarks" / "pacs-mlt.yaml"
    assert main(["benchmark", str(path), "--dry-run", "--storage", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "every method 20 trials" in out and "heldout-sketch -> test_domain:sketch" in out
    spec = yaml.safe_load(path.read_text())
    n = len(spec["methods"])
    assert f"{n} methods x 4 settings" in out
    assert "80 trial runs + 12 train_val re-runs + 12 oracle re-runs = 104 runs" in out
    assert not (tmp_path / "store").exists()
    # lodo's runs hold out two domains at once: the published lists have one set per held-out domain, so
    # the spec is refused before anything runs, naming the missing lists; with them it is counted
    spec["tune"]["rules"] = ["train_val", "lodo", "oracle"]
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(spec))
    assert main(["benchmark", str(tmp_path / "all.yaml"), "--dry-run", "--storage", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tune.rules: lodo holds out art_painting and cartoon together" in err
    assert "art_painting+cartoon" in err
    lists = tmp_path / "lists"
    shutil.copytree(ROOT / "tests" / "data" / "lists", lists)
    for a, b, d, split in itertools.product(DOMAINS, DOMAINS, DOMAINS, ("train", "val", "test")):
        if a != b:  # stand-ins for the two-domain lists (the sub ones): the dry run reads no image
            shutil.copy(lists / "PACS" / f"{d}_{split}_sub.txt", lists / "PACS" / f"{d}_{split}_{a}+{b}.txt")
    monkeypatch.setenv("TALLY_DATA", str(lists))
    assert main(["benchmark", str(tmp_path / "all.yaml"), "--dry-run", "--storage", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "80 trial runs + 240 lodo runs + 12 train_val re-runs + 12 lodo re-runs + 12 oracle re-runs = 356 runs" in out
    assert f"{240 * n} extra runs in all (3 per trial run)" in out


# ---------------------------------------------------------------- end to end on a local Ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tuned_benchmark_end_to_end(tmp_path, local_ray, capsys):
    """`tally benchmark` with tune on the embedded data: 2 methods x 2 trials on a held-out domain (noisy;
    training domains ink and inverted), all three rules, each rule's pick re-run once; equal trials, seeds
    and budget; each rule's pick is the best trial by what that rule may read (lodo: the runs that held
    out each training domain in turn, its score recomputed here from their eval tables); the tables are
    per rule, lodo's from runs that held out the test domain only; a rerun does nothing."""
    from tally import evaluation
    from tally.cli import main

    spec = raw(methods={"erm": {"method": {"name": "erm"}}, "tally": {"method": {"name": "tally"}}},
               settings=["domain:noisy"], tune={"trials": 2, "seeds": 1, "space": {"train.batch_size": None},
                                                "rules": ["train_val", "lodo", "oracle"]})
    spec["base"]["train"].update(epochs=2, warmup_epochs=1, steps_per_epoch=1)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    store = tmp_path / "store"
    assert main(["benchmark", str(tmp_path / "t.yaml"), "--storage", str(store)]) == 0
    printed = capsys.readouterr().out
    exp = store / "tuned"
    stored = sorted(p.name for p in (exp / tuning.TUNE_DIR).iterdir() if (p / "config.yaml").is_file())
    trials = [t for t in stored if "-lodo-" not in t]
    assert trials == [f"{m}-heldout-noisy-t{k}" for m in ("erm", "tally") for k in (0, 1)]
    assert sorted(set(stored) - set(trials)) == [f"{t}-lodo-{d}" for t in trials for d in ("ink", "inverted")]
    configs = {t: results.read_yaml(exp / tuning.TUNE_DIR / t / "config.yaml") for t in trials}
    for t, cfg in configs.items():
        assert results.read_json(exp / tuning.TUNE_DIR / t / "status.json")["status"] == "done"
        assert cfg["train"]["seed"] == 0 and (cfg["train"]["epochs"], cfg["train"]["steps_per_epoch"]) == (2, 1)
        epochs = results.read_jsonl(exp / tuning.TUNE_DIR / t / "epochs.jsonl")
        assert [e["epoch"] for e in epochs] == [0, 1]  # the full budget, no early stop
    assert configs["erm-heldout-noisy-t1"]["train"]["lr"] == configs["tally-heldout-noisy-t1"]["train"]["lr"]
    chosen = pd.read_csv(exp / "picks.csv")
    assert len(chosen) == 6
    for p in chosen[chosen["rule"] == "lodo"].itertuples():
        scores = {}
        for t in (t for t in trials if t.startswith(p.method + "-")):
            folds = []
            for d in ("ink", "inverted"):
                run = exp / tuning.TUNE_DIR / f"{t}-lodo-{d}"
                cfg = results.read_yaml(run / "config.yaml")
                assert cfg["data"]["held_out"] == ["noisy", d] and cfg["train"]["select_from"] == "last"
                assert {k: v for k, v in cfg["train"].items() if k != "select_from"} == {
                    k: v for k, v in configs[t]["train"].items() if k != "select_from"}
                assert results.read_json(run / "status.json")["best_epoch"] == 1  # the last epoch
                table = results.read_parquet(run / "eval.parquet")
                m = evaluation.split_metrics(table[table["split"] == f"test_domain:{d}"])
                folds.append((m["pair_acc_worst"], m["pair_acc_mean"]))
            scores[t] = tuple(np.mean(folds, axis=0))
        best = max(scores, key=lambda t: (*scores[t], -int(t[-1])))  # value, tie-break, then the lower trial
        assert p.run == best and p.value == pytest.approx(scores[best][0]) and p.epoch == 1
        # the reported test value: the pick re-run holding out the test domain only, its last epoch kept
        rerun = exp / benchmark.RUNS_DIR / f"{p.method}-heldout-noisy-lodo-seed1"
        cfg = results.read_yaml(rerun / "config.yaml")
        assert cfg["data"]["held_out"] == ["noisy"] and cfg["train"]["select_from"] == "last"
        assert cfg["method"] == {**configs[best]["method"], "seed": 1}
        assert cfg["train"]["lr"] == configs[best]["train"]["lr"]
        assert results.read_json(rerun / "status.json")["best_epoch"] == 1
        values = benchmark.load_benchmark(exp, "lodo")["values"]
        worst = values[(values["method"] == p.method) & (values["metric"] == "pair_acc_worst")]
        assert worst["run"].tolist() == [rerun.name]
        test = results.read_json(rerun / "metrics.json")["test_domain:noisy"]["pair_acc_worst"]
        assert worst["value"].tolist() == [pytest.approx(test)]
    assert (exp / "rules" / "lodo" / "table.csv").is_file() and (exp / "lodo_folds.csv").is_file()
    assert "## Selection rule: leave-one-domain-out cross-validation" in (exp / "table.md").read_text()
    for p in chosen[chosen["rule"] != "lodo"].itertuples():
        key = ("val/pair_acc_worst" if p.rule == "train_val" else "oracle:test_domain:noisy/pair_acc_worst")
        last = {t: results.read_jsonl(exp / tuning.TUNE_DIR / t / "epochs.jsonl")[-1][key]
                for t in trials if t.startswith(p.method + "-")}
        assert p.value == pytest.approx(max(last.values()))  # one main epoch: the kept one
        assert p.value == pytest.approx(last[f"{p.method}-heldout-noisy-t{p.trial}"])
        run = exp / benchmark.RUNS_DIR / f"{p.method}-heldout-noisy-{p.rule}-seed1"
        status = results.read_json(run / "status.json")
        assert status["status"] == "done"
        assert status["selection"]["split"] == ("val" if p.rule == "train_val" else "test_domain:noisy")
    assert "## Selection rule: training-domain validation" in printed or "Selection rule" in (exp / "table.md").read_text()
    assert "## Selection rule: oracle (test domain)" in (exp / "table.md").read_text()
    assert (exp / "rules" / "oracle" / "table.csv").is_file()
    assert main(["benchmark", str(tmp_path / "t.yaml"), "--storage", str(store)]) == 0
    assert "to do" not in capsys.readouterr().out  # resumable: nothing re-run
