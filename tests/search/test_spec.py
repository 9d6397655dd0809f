"""Search specs: the shipped ones validate, malformed ones fail on one line naming the field, and the
Optuna space/searcher record conditional params and trial outcomes (no Ray started)."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest
import yaml

from tally.errors import TallyError
from tally.search import Spec, budget_text, dry_run_text, load_spec, spec_from_raw
from tally.search.searcher import PruneAwareOptunaSearch
from tally.search.space import DefineByRun

SEARCHES = Path(__file__).resolve().parents[2] / "searches"

BASE = """\
base:
  data: {source: embedded, setting: sub, image_size: 32}
  model: {arch: resnet10, cut: layer2}
  method: {name: tally}
  train: {epochs: 4, warmup_epochs: 1, steps_per_epoch: 20, batch_size: 32, lr: 1.0e-3}
"""
SPACE = """\
space:
  method.alpha: {type: uniform, low: 0.1, high: 2.0}
  train.lr: {type: loguniform, low: 1e-4, high: 1e-2}
  train.warmup_epochs: {type: int, low: 1, high: 2}
  method.use_prototype: {type: categorical, choices: [true, false]}
  method.momentum: {type: uniform, low: 0.5, high: 0.95, when: {method.use_prototype: true}}
  method.loss_beta: {type: categorical, choices: [0.99, 0.999, null]}
"""
VALID = BASE + SPACE + "budget: {trials: 4, concurrency: 2}\n"


def write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TALLY_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


# --- the shipped specs ---------------------------------------------------------------------------------

PAPER = {  # dataset stem: lr, weight decay, steps/epoch, alpha, selection metric (METHOD.md table)
    "vlcs": (1e-5, 1e-6, 200, 0.2, "pair_acc_mean"),
    "pacs": (1e-5, 1e-6, 500, 0.5, "pair_acc_mean"),
    "officehome": (3e-5, 1e-6, 500, 0.5, "pair_acc_mean"),
    "domainnet": (3e-5, 1e-6, 1000, 0.5, "pair_acc_mean"),
    "terraincognita": (3e-5, 0.0, 1000, 0.5, "macro_f1"),
    "iwildcam": (3e-5, 0.0, 1000, 0.5, "macro_f1"),
}
HELD_OUT = {
    "vlcs": ["Caltech101", "LabelMe", "SUN09", "VOC2007"],
    "pacs": ["art_painting", "cartoon", "photo", "sketch"],
    "officehome": ["art", "clipart", "product", "real"],
    "domainnet": ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"],
}


def test_search_folder_has_one_spec_per_dataset_and_setting():
    expected = {"quickstart", "iwildcam-wilds", "terraincognita-ood"}
    for stem, domains in HELD_OUT.items():
        expected |= {f"{stem}-sub"} | {f"{stem}-{d.lower()}" for d in domains}
    assert {p.stem for p in SEARCHES.glob("*.yaml")} == expected


@pytest.mark.parametrize("path", sorted(SEARCHES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spec_validates(path, data_env):
    spec = load_spec(path)
    assert spec.name == path.stem
    base = spec.base
    if path.stem == "quickstart":
        assert base["data"]["source"] == "embedded" and base["model"]["arch"] == "resnet10"
        assert base["data"]["image_size"] == 32 and spec.resolved["budget"]["trials"] == 4
        assert spec.resolved["budget"]["concurrency"] == 2
        assert base["train"]["epochs"] * base["train"]["steps_per_epoch"] <= 150  # minutes, not hours
        return
    stem, setting = path.stem.split("-", 1)
    lr, wd, steps, alpha, metric = PAPER[stem]
    train = base["train"]
    assert (train["lr"], train["weight_decay"], train["steps_per_epoch"]) == (lr, wd, steps)
    assert (train["epochs"], train["warmup_epochs"], train["optimizer"], train["amsgrad"]) == (15, 7, "adam", True)
    assert train["batch_size"] == (16 if stem == "iwildcam" else 18)
    assert base["data"]["image_size"] == (448 if stem == "iwildcam" else 224)
    assert base["method"]["alpha"] == alpha and base["method"]["momentum"] == 0.8
    assert train["selection_metric"] == metric == spec.metric
    assert base["model"] == {"arch": "resnet50", "cut": "layer2", "pretrained": "imagenet",
                             "imagenet_weights": "default"}
    assert base["data"]["root"] == str(data_env)  # ${TALLY_DATA} expanded, nothing read
    assert spec.resolved["resources"]["gpus_per_worker"] == 1
    space = spec.space
    assert space["train.lr"]["low"] < lr < space["train.lr"]["high"]
    assert {"method.alpha", "method.fold", "method.momentum", "train.warmup_epochs", "method.loss_beta",
            "model.cut"} <= set(space)
    if setting == "sub" or stem == "iwildcam":
        assert base["data"]["setting"] == "sub" and base["data"]["held_out"] == []
    elif setting == "ood":
        assert base["data"]["setting"] == "ood" and base["data"]["held_out"] == []
    else:
        assert base["data"]["setting"] == "domain"
        assert [d.lower() for d in base["data"]["held_out"]] == [setting]


def test_data_root_env_var_must_be_set(tmp_path, monkeypatch):
    monkeypatch.delenv("TALLY_DATA", raising=False)
    with pytest.raises(TallyError, match=r"^base\.data\.root: environment variable TALLY_DATA is not set"):
        load_spec(SEARCHES / "pacs-sub.yaml")


# --- malformed specs: one line, naming the field path ---------------------------------------------------

RANGES = "  method.alpha: {type: uniform, low: 0.1, high: 2.0}\n"
BUDGET = "budget: {trials: 2}\n"
MALFORMED = [
    ("unknown-top-key", BASE + SPACE + BUDGET + "budgett: {trials: 2}\n", "budgett: unknown top-level key"),
    ("trials-zero", BASE + SPACE + "budget: {trials: 0}\n", "budget.trials: expected an integer >= 1, got 0"),
    ("trials-missing", BASE + SPACE + "budget: {concurrency: 2}\n", "budget.trials: missing"),
    ("concurrency-zero", BASE + SPACE + "budget: {trials: 2, concurrency: 0}\n", "budget.concurrency:"),
    ("grace-zero", BASE + SPACE + "budget: {trials: 2, early_stopping: {enabled: true, grace_epochs: 0}}\n",
     "budget.early_stopping.grace_epochs:"),
    ("grace-too-late", BASE + SPACE + "budget: {trials: 2, early_stopping: {enabled: true, grace_epochs: 4}}\n",
     "budget.early_stopping.grace_epochs: expected < train.epochs (4)"),
    ("reduction-one", BASE + SPACE + "budget: {trials: 2, early_stopping: {reduction_factor: 1}}\n",
     "budget.early_stopping.reduction_factor:"),
    ("base-lr-abc", BASE.replace("lr: 1.0e-3", "lr: abc") + SPACE + BUDGET,
     "base.train.lr: expected a number >= 0.0, got 'abc'"),
    ("no-such-field", BASE + "space:\n  train.learning_rate: {type: uniform, low: 0.1, high: 1}\n" + BUDGET,
     "space.train.learning_rate:"),
    ("not-a-method-param", BASE + "space:\n  method.gamma: {type: uniform, low: 0.1, high: 1}\n" + BUDGET,
     "space.method.gamma: not a parameter of method 'tally'"),
    ("no-section", BASE + "space:\n  lr: {type: uniform, low: 0.1, high: 1}\n" + BUDGET, "space.lr:"),
    ("unknown-type", BASE + "space:\n  train.lr: {type: normal, low: 0.1, high: 1}\n" + BUDGET,
     "space.train.lr.type: expected one of uniform, loguniform, int, categorical"),
    ("low-not-below-high", BASE + "space:\n  method.alpha: {type: uniform, low: 2, high: 1}\n" + BUDGET,
     "space.method.alpha.high: expected > low"),
    ("loguniform-negative", BASE + "space:\n  train.lr: {type: loguniform, low: -1, high: 1.0e-2}\n" + BUDGET,
     "space.train.lr.low: expected a number > 0 for a loguniform, got -1"),
    ("int-float-bound", BASE + "space:\n  train.warmup_epochs: {type: int, low: 1.5, high: 3}\n" + BUDGET,
     "space.train.warmup_epochs.low: expected an integer"),
    ("empty-choices", BASE + "space:\n  method.fold: {type: categorical, choices: []}\n" + BUDGET,
     "space.method.fold.choices: expected a non-empty list"),
    ("extra-key", BASE + "space:\n  method.alpha: {type: uniform, low: 0.1, high: 1, choices: [1]}\n" + BUDGET,
     "space.method.alpha.choices: unknown key for a uniform distribution"),
    ("when-not-earlier", BASE + "space:\n  method.momentum: {type: uniform, low: 0.5, high: 0.9, "
     "when: {method.use_prototype: true}}\n  method.use_prototype: {type: categorical, choices: [true, false]}\n"
     + BUDGET, "space.method.momentum.when: 'method.use_prototype' is not an earlier parameter"),
    ("when-value-not-a-choice", BASE + "space:\n  method.use_prototype: {type: categorical, choices: [true]}\n"
     "  method.momentum: {type: uniform, low: 0.5, high: 0.9, when: {method.use_prototype: false}}\n" + BUDGET,
     "space.method.momentum.when.method.use_prototype: expected one of"),
    ("warmup-above-epochs", BASE + "space:\n  train.warmup_epochs: {type: int, low: 1, high: 5}\n" + BUDGET,
     "space.train.warmup_epochs.high: 5 gives an invalid run config (train.warmup_epochs: expected <="),
    ("bad-choice-for-field", BASE + "space:\n  model.cut: {type: categorical, choices: [layer2, layer4]}\n"
     + BUDGET, "space.model.cut.choices[1]: 'layer4' gives an invalid run config"),
    ("uniform-on-a-switch", BASE + "space:\n  method.fold: {type: uniform, low: 0.1, high: 0.9}\n" + BUDGET,
     "space.method.fold.low: 0.1 gives an invalid run config (method.fold: expected true or false"),
    ("bad-metric", BASE + SPACE + BUDGET + "selection: {metric: accuracy}\n",
     "selection.metric: expected a validation metric, one of acc, "),
    ("bad-mode", BASE + SPACE + BUDGET + "selection: {mode: maximize}\n",
     "selection.mode: 'pair_acc_worst' is higher-is-better: expected 'max' (or leave it out), got 'maximize'"),
    # calibration metrics: their direction is theirs, and only what validation can measure honestly
    ("ece-mode-max", BASE + SPACE + BUDGET + "selection: {metric: ece, mode: max}\n",
     "selection.mode: 'ece' is lower-is-better: expected 'min' (or leave it out), got 'max'"),
    ("ts-ece", BASE + SPACE + BUDGET + "selection: {metric: ts_ece}\n",
     "selection.metric: 'ts_ece' cannot be selected on: the temperature is fitted on validation"),
    ("ts-objective", BASE + SPACE + BUDGET + "selection: {objectives: [pair_acc_mean, ts_nll]}\n",
     "selection.objectives[1]: 'ts_nll' cannot be selected on"),
    ("per-domain-ece", BASE + SPACE + BUDGET + "selection: {metric: 'ece_domain:photo'}\n",
     "selection.metric: expected a validation metric, one of"),
    ("selection-metric-mismatch", BASE.replace("lr: 1.0e-3}", "lr: 1.0e-3, selection_metric: acc}") + SPACE + BUDGET
     + "selection: {metric: brier}\n", "base.train.selection_metric: expected the search's selection.metric 'brier'"),
    ("workers-zero", BASE + SPACE + BUDGET + "resources: {workers: 0}\n", "resources.workers: expected an integer >= 1"),
    ("cpus-zero", BASE + SPACE + BUDGET + "resources: {cpus_per_worker: 0}\n", "resources.cpus_per_worker:"),
    ("gpus-negative", BASE + SPACE + BUDGET + "resources: {gpus_per_worker: -1}\n", "resources.gpus_per_worker:"),
    ("robustness-setting", BASE + SPACE + BUDGET + "robustness: {settings: [sub, domain]}\n",
     "robustness.settings[1]: expected one of sub, each_domain"),
    ("bad-name", "name: a/b\n" + BASE + SPACE + BUDGET, "name: expected an experiment name"),
    ("empty-space", BASE + "space: {}\n" + BUDGET, "space: expected a mapping"),
    ("final-base", BASE.replace("lr: 1.0e-3}", "lr: 1.0e-3, final: true}") + SPACE + BUDGET,
     "base.train.final: a search selects on validation"),
    ("final-searched", BASE + "space:\n  train.final: {type: categorical, choices: [true, false]}\n" + BUDGET,
     "space.train.final: a search selects on validation"),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_spec_names_the_field(tmp_path, text, message):
    yaml.safe_load(text)  # the case itself is valid YAML: the spec is what's wrong
    path = write(tmp_path, text)
    with pytest.raises(TallyError) as err:
        load_spec(path)
    # selection errors also name the file (the other fields' errors predate that and do not)
    assert str(err.value).removeprefix(f"{path}: ").startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_a_selection_error_names_the_file_the_field_and_the_value(tmp_path):
    path = write(tmp_path, BASE + SPACE + BUDGET + "selection: {metric: ts_ece}\n")
    with pytest.raises(TallyError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: selection.metric: 'ts_ece' cannot be selected on"), str(err.value)
    ok = load_spec(write(tmp_path, BASE + SPACE + BUDGET + "selection: {metric: acc_at_cov90}\n"))
    assert ok.resolved["selection"] == {"metric": "acc_at_cov90", "mode": "max"}  # higher is better
    assert load_spec(write(tmp_path, BASE + SPACE + BUDGET + "selection: {metric: aurc}\n")).mode == "min"


def test_file_problems_are_one_line(tmp_path):
    with pytest.raises(TallyError, match="search spec file not found"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(TallyError, match="not valid YAML"):
        load_spec(write(tmp_path, "base: {data: [\n"))
    with pytest.raises(TallyError, match="t.yaml: expected a YAML mapping, got list"):
        load_spec(write(tmp_path, "- 1\n"))


# --- resolution, names, trial configs, text ------------------------------------------------------------

def test_defaults_names_and_floats(tmp_path):
    spec = load_spec(write(tmp_path, VALID, "my-search.yaml"))
    r = spec.resolved
    assert spec.name == "my-search"  # the file stem
    assert load_spec(write(tmp_path, "name: named\n" + VALID), name_override="cli.1").name == "cli.1"
    assert r["selection"] == {"metric": "pair_acc_worst", "mode": "max"}
    assert r["resources"] == {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
    assert r["budget"]["early_stopping"] == {"enabled": False, "grace_epochs": 1, "reduction_factor": 2}
    assert r["robustness"] == {"settings": [], "seeds": 1} and r["seed"] == 0
    assert r["space"]["train.lr"] == {"type": "loguniform", "low": 1e-4, "high": 1e-2}  # 1e-4 is a float
    assert list(r["space"]) == ["method.alpha", "train.lr", "train.warmup_epochs", "method.use_prototype",
                                "method.momentum", "method.loss_beta"]
    assert r["space"]["method.momentum"]["when"] == {"method.use_prototype": True}
    with pytest.raises(TallyError, match=r"^--name: expected an experiment name"):
        load_spec(write(tmp_path, VALID), name_override="../x")


def test_trial_config_sets_params_and_validates(tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    cfg = spec.trial_config({"method.alpha": 0.3, "train.lr": 2e-3, "method.loss_beta": None,
                             "train.seed": 5})
    assert cfg["method"]["alpha"] == 0.3 and cfg["train"]["lr"] == 2e-3 and cfg["method"]["loss_beta"] is None
    assert cfg["method"]["seed"] == 5  # derived defaults follow a searched value
    assert cfg["method"]["momentum"] == 0.8 and cfg["train"]["epochs"] == 4  # untouched base values
    assert spec.base["method"]["alpha"] == 0.5  # the base is not modified
    with pytest.raises(TallyError, match=r"^trial config: train.warmup_epochs"):
        spec.trial_config({"train.warmup_epochs": 9})


def test_budget_and_dry_run_text(tmp_path, data_env):
    text = budget_text(load_spec(write(tmp_path, VALID)))
    assert "trials          4, at most 2 at once" in text
    assert "4 epochs x 20 steps (warm-up 1, searched), batch 32" in text
    assert "at most 16 epochs = 320 steps" in text
    assert "1 worker(s) x (1 CPU, 0 GPU) per trial" in text and "2 at once: 2 CPU, 0 GPU" in text
    assert "early stopping  off" in text
    assert "method.momentum" in text and "method.use_prototype = true" in text
    assert "[0.0001, 0.01]" in text and "0.99, 0.999, null" in text

    spec = load_spec(SEARCHES / "pacs-sub.yaml")
    dry = dry_run_text(spec)
    assert "ASHA on pair_acc_mean: trials compared after epoch(s) 10" in dry
    assert "4 at once: 16 CPU, 4 GPU" in dry
    assert "each_domain x 1 seed(s)" in dry
    resolved = yaml.safe_load(dry.split("# budget")[0])
    assert resolved["base"]["data"]["root"] == str(data_env) and resolved["name"] == "pacs-sub"


def test_robustness_runs(tmp_path):
    spec = load_spec(write(tmp_path, VALID + "robustness: {settings: [sub, each_domain], seeds: 2}\n"))
    runs = spec.robustness_configs({"method.alpha": 0.7}, ["a", "b"])
    assert [label for label, _ in runs] == ["sub-seed0", "sub-seed1", "heldout-a-seed0", "heldout-a-seed1",
                                           "heldout-b-seed0", "heldout-b-seed1"]
    _, cfg = runs[3]
    assert cfg["data"]["setting"] == "domain" and cfg["data"]["held_out"] == ["a"]
    assert cfg["train"]["seed"] == 1 and cfg["method"]["seed"] == 1 and cfg["method"]["alpha"] == 0.7


def test_validate_spec_from_a_mapping():
    raw = yaml.safe_load(VALID)
    spec = spec_from_raw(raw, "inline")
    assert spec.name == "inline" and spec.base["method"]["seed"] is None  # follows train.seed
    stored = yaml.safe_load(spec.to_yaml())  # an experiment's spec.yaml
    assert spec_from_raw(stored, "inline").resolved == spec.resolved  # resolving is idempotent
    again = Spec.from_resolved(stored)  # as a Ray trial sees it
    assert again.trial_config({"train.seed": 3}) == spec.trial_config({"train.seed": 3})


# --- the Optuna space and searcher (no Ray cluster) ------------------------------------------------------

def _space(tmp_path) -> dict:
    return load_spec(write(tmp_path, VALID)).space


def test_define_by_run_skips_unmet_conditions(tmp_path):
    fn = DefineByRun(_space(tmp_path))
    fixed = {"method.alpha": 1.0, "train.lr": 1e-3, "train.warmup_epochs": 2, "method.loss_beta": None}
    fn(optuna.trial.FixedTrial({**fixed, "method.use_prototype": False}))  # momentum never asked
    with pytest.raises(ValueError, match="method.momentum"):
        fn(optuna.trial.FixedTrial({**fixed, "method.use_prototype": True}))
    fn(optuna.trial.FixedTrial({**fixed, "method.use_prototype": True, "method.momentum": 0.6}))
    assert pickle.loads(pickle.dumps(fn)).space == fn.space  # Ray pickles it by reference


def test_prune_aware_search_tells_optuna_what_happened(tmp_path):
    search = PruneAwareOptunaSearch(space=DefineByRun(_space(tmp_path)), metric="score", mode="max", seed=0,
                                    storage=optuna.storages.InMemoryStorage())
    study = search._ot_study
    study.enqueue_trial({"method.use_prototype": False})
    configs = {t: search.suggest(t) for t in ("done", "stopped", "crashed", "nan")}
    assert "method.momentum" not in configs["done"] and configs["done"]["method.use_prototype"] is False
    assert all(0.1 <= c["method.alpha"] <= 2.0 and 1 <= c["train.warmup_epochs"] <= 2 for c in configs.values())
    for t in configs:
        search.on_trial_result(t, {"score": 0.25, "training_iteration": 1})
        search.on_trial_result(t, {"training_iteration": 2})  # a report without the metric is skipped
    search.on_trial_complete("done", {"score": 0.75, "training_iteration": 3, "final": True})
    search.on_trial_complete("stopped", {"score": 0.25, "training_iteration": 1})  # ASHA: no final
    search.on_trial_complete("crashed", {"score": 0.25, "training_iteration": 1}, error=True)
    search.on_trial_complete("nan", {"score": float("nan"), "final": True})
    search.on_trial_complete("done", {"score": 0.1, "final": True})  # a repeat is ignored
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    states = [trials[search._ot_trials[t].number].state.name for t in configs]
    assert states == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]
    done = trials[search._ot_trials["done"].number]
    assert done.value == 0.75 and "method.momentum" not in done.params
    assert trials[search._ot_trials["stopped"].number].intermediate_values == {1: 0.25}

    path = tmp_path / "searcher.pkl"  # Tune checkpoints the searcher by pickling it
    search.save(str(path))
    again = PruneAwareOptunaSearch(space=DefineByRun(_space(tmp_path)), metric="score", mode="max")
    again.restore(str(path))
    assert len(again._ot_study.get_trials()) == 4


def test_resumed_search_tolerates_a_trial_the_study_already_finished(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search = PruneAwareOptunaSearch(space=DefineByRun(_space(tmp_path)), metric="score", mode="max", seed=0,
                                    study_name="s", storage=optuna.storages.RDBStorage(url))
    search.suggest("t1")
    search.on_trial_result("t1", {"score": 0.25, "training_iteration": 1})
    search.save(str(tmp_path / "searcher.pkl"))  # Tune's checkpoint, taken before the trial ended
    search.on_trial_complete("t1", {"score": 0.75, "final": True})  # the study is told; the driver dies
    again = PruneAwareOptunaSearch(space=DefineByRun(_space(tmp_path)), metric="score", mode="max")
    again.restore(str(tmp_path / "searcher.pkl"))
    again.on_trial_result("t1", {"score": 0.5, "training_iteration": 2})  # the resumed trial goes on
    again.on_trial_complete("t1", {"score": 0.5, "final": True})
    (trial,) = optuna.load_study(study_name="s", storage=url).trials
    assert trial.state.name == "COMPLETE" and trial.value == 0.75


def test_data_root_expands_only_home_and_tally_variables(monkeypatch, tmp_path):
    """The expanded root is written into spec.yaml, every trial's config and every bundle: a spec must not be
    able to copy a secret of the environment into them."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "TOPSECRET")
    raw = yaml.safe_load((Path(__file__).parents[2] / "searches" / "quickstart.yaml").read_text())
    raw["base"]["data"]["root"] = "/data/${AWS_SECRET_ACCESS_KEY}"
    with pytest.raises(TallyError, match=r"base\.data\.root: \$\{AWS_SECRET_ACCESS_KEY\} is not expanded") as err:
        spec_from_raw(raw, "inline")
    assert "TOPSECRET" not in str(err.value)
    from tally.data.embedded import default_dir

    monkeypatch.setenv("TALLY_EMB", str(default_dir().parent))
    raw["base"]["data"]["root"] = "${TALLY_EMB}/" + default_dir().name
    assert spec_from_raw(raw, "inline").base["data"]["root"] == str(default_dir())
    raw["base"]["data"]["image_root"] = "${TALLY_EMB}/images"  # the same rule for data.image_root
    assert spec_from_raw(raw, "inline").base["data"]["image_root"] == str(default_dir().parent / "images")
    raw["base"]["data"]["image_root"] = "${AWS_SECRET_ACCESS_KEY}"
    with pytest.raises(TallyError, match=r"base\.data\.image_root: \$\{AWS_SECRET_ACCESS_KEY\} is not expanded"):
        spec_from_raw(raw, "inline")
