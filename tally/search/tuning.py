"""Every method tuned alike: a benchmark's ``tune:`` section (DomainBed's protocol, Gulrajani and
Lopez-Paz 2021: domainbed/hparams_registry.py and domainbed/model_selection.py).

Each method's search space is its own (``Method.space`` beside its defaults) plus the shared knobs
(SHARED_SPACE: lr, weight decay, batch size); a spec overrides any entry (``tune.space`` for every
method, ``methods.<label>.space`` for one; null fixes a knob at the base value). Every method gets
the same number of trials, drawn by the same random sampler with the same sampler seed: trial 0 is
the default point (the method's defaults at the base's train values, as DomainBed's hparams_seed 0),
trial k >= 1 draws each knob from its own stream seeded by (sampler_seed, k, knob), so a knob with
the same distribution takes the same value in trial k of every method. Every trial trains with the
same seed (``tune.trial_seed``), the same model and the same training budget (the base's epochs and
steps), and none is stopped early.

Selection rules (RULES). One rule chooses both the trial and the epoch:
- ``train_val``, training-domain validation (DomainBed's IIDAccuracySelectionMethod): a trial's value
  is the best ``val/<metric>`` over its eligible epochs (train.select_from; ties to the better mean
  pair accuracy, as tally.training.run keeps epochs); reads the training domains' validation only.
- ``oracle``, test-domain oracle (DomainBed's OracleSelectionMethod, which takes the last step; here
  the best epoch on the test domain, as ``data.oracle_selection`` keeps it): a trial's value is the best
  ``oracle:test_domain:<X>/<metric>`` over its eligible epochs; reads the held-out domain's test split
  only. Only for held-out-domain settings (a subpopulation split has no test domain). To give it the
  per-epoch test numbers, the trials of a held-out setting run with ``data.oracle_selection`` on: the
  test split is then evaluated each epoch and recorded under ``oracle:``, which ``train_val`` never
  reads (the weights do not depend on what is recorded).
- ``lodo``, leave-one-domain-out cross-validation (DomainBed's LeaveOneOutSelectionMethod): for a
  held-out test domain T and training domains D1..Dk, every trial's config is trained k more times
  (LODO runs, beside the trials under ``tune/``), run i holding out Di as well as T; the trial's score
  is the mean over i of ``<metric>`` on ``test_domain:<Di>`` of run i. It never reads T. Epoch rule:
  the last epoch (train.select_from 'last'), in the LODO runs and in the pick's re-runs (which hold out
  T only). DomainBed's rule also picks the step (the argmax over steps of the mean); we do not, because
  each re-run seed would then need its own k LODO runs to choose its epoch. The Di numbers come from each
  LODO run's final evaluation (metrics.json, every split), not from the per-epoch records, which hold the
  validation split (and an oracle's first test domain) only. Opt-in (it costs k extra runs per trial);
  refused for a subpopulation setting, for fewer than 2 training domains, and for data without a split
  holding out two domains at once (the reference's published lists come one set per held-out domain).

The config a rule picks is then re-run with ``tune.seeds`` seeds (1..seeds; the trials used
trial_seed), selecting its epoch by the same rule; the benchmark's tables are per rule.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tally import config as config_mod
from tally import results
from tally.config import set_path
from tally.errors import TallyError
from tally.evaluation.benchmark_tables import (  # noqa: F401 - re-exported
    EARLY_STOPPING,
    RULE_NOTES,
    RULES,
    budget_text,
)
from tally.method.methods import METHODS
from tally.schema import check_int, check_section, mode_of
from tally.search import space as space_mod

TUNE_DIR = "tune"
LODO_COLUMNS = ["run", "trial_run", "method", "setting", "trial", "also_out"]
SHARED_SPACE = {  # the knobs every method has (DomainBed: lr, weight_decay, batch_size)
    "train.lr": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-2},
    "train.weight_decay": {"type": "loguniform", "low": 1.0e-6, "high": 1.0e-2},
    "train.batch_size": {"type": "categorical", "choices": [8, 18, 32, 64]},
}
SAMPLERS = ("random",)
# lodo is asked for by name: it trains every trial k more times (k training domains)
DEFAULT_TUNE = {"trials": 8, "sampler": "random", "sampler_seed": 0, "trial_seed": 0, "seeds": 3,
                "rules": ["train_val", "oracle"], "space": {}}


# ---------------------------------------------------------------- spaces
def method_space(name: str, *overrides: dict | None) -> dict:
    """A method's raw space (run-config paths): SHARED_SPACE, its own, then each override (null drops)."""
    out = {**copy.deepcopy(SHARED_SPACE), **{f"method.{k}": copy.deepcopy(v) for k, v in METHODS[name].space.items()}}
    for override in overrides:
        for path, entry in (override or {}).items():
            if entry is None:
                out.pop(path, None)
            else:
                out[path] = entry
    return out


def default_point(name: str, path: str):
    """A knob's default: the method's default, or the run config's (tally.config.SCHEMA)."""
    section, field = path.split(".")
    if section == "method":
        return METHODS[name].defaults[field]
    return config_mod.SCHEMA[section][field].default


def describe(param: dict) -> str:
    if param["type"] == "categorical":
        return "one of " + ", ".join(_text(c) for c in param["choices"])
    step = f", step {param['step']}" if param.get("step", 1) != 1 else ""
    return f"{param['type']} [{param['low']:g}, {param['high']:g}]{step}"


def spaces_markdown() -> str:
    """docs/SPACES.md: every registered method's space, the default point marked (generated)."""
    lines = ["# Search spaces (generated by `python docs/spaces.py --write`; do not edit)", "",
             "Each method's own knobs (`Method.space` in tally/method/methods.py) and the shared ones",
             "(`SHARED_SPACE` in tally/search/tuning.py). A benchmark's `tune:` draws every method's trials from",
             "these; `tune.space` (all methods) or `methods.<label>.space` (one) overrides an entry, null fixes it.",
             "Trial 0 is the default point: the method's defaults at the benchmark's base train values (the",
             "default column shows the run config's own default where the base sets none).", "",
             "| method | knob | distribution | default |", "|---|---|---|---|"]
    for name in sorted(METHODS):
        for path, param in method_space(name).items():
            value = default_point(name, path)
            lines.append(f"| {name} | {path} | {describe(param)} | {_text(value)} |")
    lines += ["", "Selection rules (`tune.rules`; default `[train_val, oracle]`):", ""]
    lines += [f"- `{k}`, {v}: {RULE_NOTES[k]}." for k, v in RULES.items()]
    lines += ["", "`lodo` costs k extra runs per trial for a held-out setting with k training domains (the dry run",
              "counts them); it needs held-out-domain settings with at least 2 training domains.", ""]
    return "\n".join(lines)


def _text(value) -> str:
    """A value as the spec's YAML writes it (null, true / false)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# ---------------------------------------------------------------- the tune section
def check_tune(raw) -> dict:
    tune = check_section("tune", raw, DEFAULT_TUNE)
    tune["trials"] = check_int("tune.trials", tune["trials"], 1)
    tune["seeds"] = check_int("tune.seeds", tune["seeds"], 1)
    tune["sampler_seed"] = check_int("tune.sampler_seed", tune["sampler_seed"], 0)
    tune["trial_seed"] = check_int("tune.trial_seed", tune["trial_seed"], 0)
    if tune["sampler"] not in SAMPLERS:
        raise TallyError(f"tune.sampler: expected one of {', '.join(SAMPLERS)} (every method's trials drawn "
                         f"alike, independent of results), got {tune['sampler']!r}")
    rules = tune["rules"]
    if (not isinstance(rules, list) or not rules or len(set(map(str, rules))) < len(rules)
            or any(r not in RULES for r in rules)):
        raise TallyError(f"tune.rules: expected a list of distinct rules from {', '.join(RULES)}, got {rules!r}")
    if not isinstance(tune["space"], dict):
        raise TallyError(f"tune.space: expected a mapping of run-config paths to distributions, got {tune['space']!r}")
    return tune


@dataclass
class TunePlan:
    """The trials of a tuned benchmark: id -> complete config, and their plan (run, method, setting,
    trial, params). ``methods``: label -> (method config, checked space)."""

    tune: dict
    trials: dict[str, dict]
    plan: pd.DataFrame
    methods: dict[str, tuple[dict, dict]]
    settings: list[str]
    data: dict
    resources: dict
    n_train: int = 0  # training images of the subpopulation split (the dry run's estimate)
    # the lodo rule's runs (id -> config, under tune/ too) and their plan: run, trial_run (the trial whose
    # config it trains), method, setting, trial, also_out (the training domain it holds out as well)
    lodo: dict[str, dict] = field(default_factory=dict)
    lodo_plan: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=LODO_COLUMNS))


def check_lodo(rules: list[str], settings: list[str], domain_names: list[str]) -> None:
    """lodo holds each training domain out in turn: it needs a held-out test domain and >= 2 training domains."""
    if "lodo" not in rules:
        return
    for setting in settings:
        if setting == "sub":
            raise TallyError("tune.rules: lodo (leave-one-domain-out) needs held-out-domain settings; setting sub "
                             "holds no domain out (tune it in a benchmark without lodo)")
        left = lodo_domains(setting, domain_names)
        if len(left) < 2:
            raise TallyError(f"tune.rules: lodo needs at least 2 training domains to hold out in turn; setting "
                             f"{setting} leaves {len(left)} ({', '.join(left) or 'none'})")


def check_lodo_data(tp: TunePlan) -> None:
    """Every lodo run's data must exist before anything runs: it holds out two domains at once, which
    split lists (the reference's come one set per held-out domain) may not provide."""
    from tally.data import load_splits

    for held, data in sorted({tuple(c["data"]["held_out"]): c["data"] for c in tp.lodo.values()}.items()):
        try:
            load_splits(data)
        except TallyError as e:
            raise TallyError(f"tune.rules: lodo holds out {' and '.join(held)} together, and the data has no such "
                             f"split ({e})") from None


def lodo_domains(setting: str, domain_names: list[str]) -> list[str]:
    """The training domains of a held-out setting: the lodo runs hold out each in turn."""
    return [d for d in domain_names if d != setting.removeprefix("heldout-")]


def plan_trials(tune: dict, methods: dict[str, dict], own_spaces: dict[str, dict], data: dict,
                settings: list[str], resources: dict, n_train: int = 0,
                domain_names: list[str] | None = None) -> TunePlan:
    """Check each method's space against its base config, draw its trials, build every trial run (and,
    with lodo, each trial's runs with one training domain held out as well)."""
    check_lodo(tune["rules"], settings, list(domain_names or []))
    checked, trials, rows, lodo, lodo_rows = {}, {}, [], {}, []
    for label, cfg in methods.items():
        raw_base = {**copy.deepcopy(cfg), "data": {**data, "setting": "sub", "held_out": []}}
        base = config_mod.validate(raw_base, source=f"methods.{label}")
        raw_space = method_space(cfg["method"]["name"], tune["space"], own_spaces.get(label))
        try:
            space = space_mod.check_space(raw_space, raw_base, base) if raw_space else {}
        except TallyError as e:
            raise TallyError(f"methods.{label} (tune): {e}") from None
        checked[label] = (cfg, space)
        for k in range(tune["trials"]):
            params = draw(space, k, tune["sampler_seed"])
            trial_cfg = copy.deepcopy(cfg)
            for path, value in params.items():
                set_path(trial_cfg, path, value)
            for setting in settings:
                run_id = f"{label}-{setting}-t{k}"
                oracle = "oracle" in tune["rules"] and setting != "sub"
                trials[run_id] = run_config(trial_cfg, data, setting, tune["trial_seed"], oracle, f"tune/{run_id}")
                rows.append({"run": run_id, "method": label, "setting": setting, "trial": k,
                             "params": dict(params)})
                for other in lodo_domains(setting, domain_names or []) if "lodo" in tune["rules"] else []:
                    lodo_id = f"{run_id}-lodo-{other}"
                    lodo[lodo_id] = run_config(trial_cfg, data, setting, tune["trial_seed"], False, f"tune/{lodo_id}",
                                               also_out=other)
                    lodo_rows.append({"run": lodo_id, "trial_run": run_id, "method": label, "setting": setting,
                                      "trial": k, "also_out": other})
    return TunePlan(tune, trials, pd.DataFrame(rows, columns=["run", "method", "setting", "trial", "params"]),
                    checked, list(settings), data, resources, n_train, lodo,
                    pd.DataFrame(lodo_rows, columns=LODO_COLUMNS))


def draw(space: dict, k: int, sampler_seed: int) -> dict:
    """Trial k's values: {} (the default point) for k = 0, else one draw per knob from a stream seeded by
    (sampler_seed, k, the knob's path), so methods sharing a knob's distribution share its values."""
    if k == 0:
        return {}
    chosen: dict = {}
    for path, p in space.items():
        if not space_mod._met(p.get("when"), chosen):
            continue
        rng = np.random.default_rng([sampler_seed, k, zlib.crc32(path.encode())])
        if p["type"] == "categorical":
            chosen[path] = p["choices"][int(rng.integers(len(p["choices"])))]
        elif p["type"] == "int":
            chosen[path] = int(p["low"] + p.get("step", 1) * rng.integers((p["high"] - p["low"]) // p.get("step", 1) + 1))
        elif p["type"] == "loguniform":
            chosen[path] = float(math.exp(rng.uniform(math.log(p["low"]), math.log(p["high"]))))
        else:
            chosen[path] = float(rng.uniform(p["low"], p["high"]))
    return chosen


def run_config(cfg: dict, data: dict, setting: str, seed: int, oracle: bool, path: str,
               also_out: str | None = None, last: bool = False) -> dict:
    """One run's complete config: the method's sections, the data in this setting, the seed (train and
    method), and whether its epoch is kept on the held-out test domain (the oracle rule only). A lodo
    run holds ``also_out`` out as well; lodo runs and the lodo pick's re-runs (``last``) keep the last epoch."""
    held = [] if setting == "sub" else [setting.removeprefix("heldout-")]
    if also_out is not None:
        held, last = [*held, also_out], True
    raw = {"data": {**data, "setting": "sub" if setting == "sub" else "domain", "held_out": held,
                    "oracle_selection": bool(oracle)},
           "model": copy.deepcopy(cfg["model"]), "method": copy.deepcopy(cfg["method"]),
           "train": {**copy.deepcopy(cfg["train"]), "seed": seed}}
    raw["method"]["seed"] = seed
    if last:
        raw["train"]["select_from"] = "last"
    try:
        return config_mod.validate(raw, source=path)
    except TallyError as e:
        raise TallyError(f"{path}: {e}") from None


def rules_for(setting: str, rules: list[str]) -> list[str]:
    """The oracle and lodo need a test domain: a subpopulation split gets the training-domain rule only."""
    return [r for r in rules if r == "train_val" or setting != "sub"]


def final_seeds(tune: dict) -> list[int]:
    return list(range(1, tune["seeds"] + 1))


# ---------------------------------------------------------------- selection
def epoch_value(record: dict, rule: str, metric: str, split: str) -> tuple[float, float] | None:
    """An epoch's selection key under a rule: (value, tie-break), or None where it has no value. The
    training-domain rule reads ``val/`` keys only, the oracle ``oracle:<test split>/`` keys only."""
    key = f"val/{metric}" if rule == "train_val" else f"oracle:{split}/{metric}"
    tie = "val/pair_acc_mean" if rule == "train_val" else f"oracle:{split}/pair_acc_mean"
    value = record.get(key)
    if value is None or not math.isfinite(value):
        return None
    tiebreak = record.get(tie)
    return float(value), float(tiebreak) if tiebreak is not None and math.isfinite(tiebreak) else -math.inf


def trial_values(exp_dir: Path, tp: TunePlan, rule: str) -> pd.DataFrame:
    """Each finished trial's value under a rule: run, method, setting, trial, value, tiebreak, epoch."""
    if rule == "lodo":
        return lodo_values(exp_dir, tp)
    rows = []
    for p in tp.plan.itertuples(index=False):
        if rule not in rules_for(p.setting, tp.tune["rules"]):
            continue
        run_dir = Path(exp_dir) / TUNE_DIR / p.run
        if (results.read_json(run_dir / "status.json") or {}).get("status") != "done":
            continue
        cfg = tp.trials[p.run]
        split = "test_sub" if p.setting == "sub" else f"test_domain:{p.setting.removeprefix('heldout-')}"
        sign = 1.0 if mode_of(cfg["train"]["selection_metric"]) == "max" else -1.0  # lower is better: ECE, ...
        best = None
        for record in results.read_jsonl(run_dir / "epochs.jsonl"):
            if record.get("phase") != "main" and cfg["train"]["select_from"] != "all":
                continue
            key = epoch_value(record, rule, cfg["train"]["selection_metric"], split)
            if key is not None and (best is None or (sign * key[0], key[1]) > (sign * best[0][0], best[0][1])):
                best = (key, record["epoch"])
        if best is not None:
            rows.append({"run": p.run, "method": p.method, "setting": p.setting, "trial": p.trial,
                         "value": best[0][0], "tiebreak": best[0][1], "epoch": best[1]})
    return pd.DataFrame(rows, columns=["run", "method", "setting", "trial", "value", "tiebreak", "epoch"])


def lodo_folds(exp_dir: Path, tp: TunePlan) -> pd.DataFrame:
    """Each finished lodo run's number on the training domain it held out as well (read from its final
    evaluation, metrics.json: the kept epoch is the last): LODO_COLUMNS + value, tiebreak, epoch."""
    rows = []
    for p in tp.lodo_plan.itertuples(index=False):
        run_dir = Path(exp_dir) / TUNE_DIR / p.run
        status = results.read_json(run_dir / "status.json") or {}
        split = (results.read_json(run_dir / "metrics.json") or {}).get(f"test_domain:{p.also_out}")
        if status.get("status") != "done" or split is None:
            continue
        value = split.get(tp.lodo[p.run]["train"]["selection_metric"])
        tie = split.get("pair_acc_mean")
        # a missing value is NaN, never +-inf: it sorts last in either direction (lower-is-better metrics too)
        value = float(value) if value is not None and math.isfinite(value) else math.nan
        rows.append({**p._asdict(), "value": value, "tiebreak": _number(tie), "epoch": status.get("best_epoch")})
    return pd.DataFrame(rows, columns=[*LODO_COLUMNS, "value", "tiebreak", "epoch"])


def lodo_values(exp_dir: Path, tp: TunePlan) -> pd.DataFrame:
    """Each trial's lodo score once all its k lodo runs are done: the mean of their values on the domain
    each held out as well (tie-break: the mean of their mean pair accuracies); epoch: the last one."""
    folds, rows = lodo_folds(exp_dir, tp), []
    wanted = tp.lodo_plan.groupby("trial_run").size()
    for trial_run, r in folds.groupby("trial_run", sort=False):
        if len(r) < wanted[trial_run]:
            continue  # a score from some of the training domains would favour the trials that ran first
        first = r.iloc[0]
        rows.append({"run": trial_run, "method": first["method"], "setting": first["setting"], "trial": first["trial"],
                     "value": r["value"].mean(skipna=False), "tiebreak": r["tiebreak"].mean(), "epoch": int(r["epoch"].max())})
    return pd.DataFrame(rows, columns=["run", "method", "setting", "trial", "value", "tiebreak", "epoch"])


def _number(x) -> float:
    return float(x) if x is not None and math.isfinite(x) else -math.inf


def selection_mode(tp: TunePlan) -> str:
    """'max' or 'min': the direction of the metric every trial selects on (the benchmark's one
    selection_metric; tally.schema.mode_of)."""
    metrics = {cfg["train"]["selection_metric"] for cfg in tp.trials.values()}
    return mode_of(next(iter(metrics))) if metrics else "max"


def picks(exp_dir: Path, tp: TunePlan) -> pd.DataFrame:
    """Per method, setting and rule: the trial the rule picks (best value in the metric's direction,
    then tie-break, then the lower trial number) once every trial of that method and setting is done."""
    rows = []
    lower = selection_mode(tp) == "min"
    for rule in tp.tune["rules"]:
        values = trial_values(exp_dir, tp, rule)
        for (method, setting), r in values.groupby(["method", "setting"], sort=False):
            if len(r) < tp.tune["trials"]:
                continue  # a rule compares all the trials every method got, or none
            best = r.sort_values(["value", "tiebreak", "trial"], ascending=[lower, False, True]).iloc[0]
            rows.append({"method": method, "setting": setting, "rule": rule, "trial": int(best["trial"]),
                         "run": best["run"], "value": float(best["value"]), "epoch": int(best["epoch"])})
    return pd.DataFrame(rows, columns=["method", "setting", "rule", "trial", "run", "value", "epoch"])


def final_runs(tp: TunePlan, chosen: pd.DataFrame) -> tuple[dict[str, dict], pd.DataFrame]:
    """The re-runs of each pick with seeds 1..tune.seeds, each keeping its epoch by the same rule."""
    runs, plan = {}, []
    for p in chosen.itertuples(index=False):
        trial_cfg = tp.trials[p.run]
        for seed in final_seeds(tp.tune):
            run_id = f"{p.method}-{p.setting}-{p.rule}-seed{seed}"
            sections = {k: trial_cfg[k] for k in ("model", "method", "train")}
            runs[run_id] = run_config(sections, tp.data, p.setting, seed, p.rule == "oracle", f"runs/{run_id}",
                                      last=p.rule == "lodo")
            split = "test_sub" if p.setting == "sub" else f"test_domain:{p.setting.removeprefix('heldout-')}"
            plan.append({"run": run_id, "method": p.method, "setting": p.setting, "split": split, "seed": seed,
                         "rule": p.rule, "trial": p.trial})
    return runs, pd.DataFrame(plan, columns=["run", "method", "setting", "split", "seed", "rule", "trial"])


# ---------------------------------------------------------------- curves and cost
def tuning_curves(values: pd.DataFrame, replicates: int = 200, seed: int = 0, mode: str = "max") -> pd.DataFrame:
    """Best value found against the number of trials, per method and setting: the value in trial order,
    and a 95% interval over random trial orders (the trials are exchangeable draws). ``mode`` 'min': the
    best is the lowest (an ECE, Brier, NLL or AURC)."""
    rows = []
    rng = np.random.default_rng(seed)
    best_so_far = np.maximum if mode == "max" else np.minimum
    for (method, setting), r in values.groupby(["method", "setting"], sort=False):
        v = r.sort_values("trial")["value"].to_numpy(float)
        orders = np.argsort(rng.random((replicates, len(v))), axis=1)
        running = best_so_far.accumulate(v[orders], axis=1)
        in_order = best_so_far.accumulate(v)
        low, high = np.percentile(running, [2.5, 97.5], axis=0)
        rows += [{"method": method, "setting": setting, "trials": n + 1, "best": in_order[n],
                  "low": low[n], "high": high[n]} for n in range(len(v))]
    return pd.DataFrame(rows, columns=["method", "setting", "trials", "best", "low", "high"])


def cost(exp_dir: Path, tp: TunePlan, final_plan: pd.DataFrame) -> pd.DataFrame:
    """Per method: trials run, lodo runs, re-runs, training wall time (the epochs' seconds) and CPU / GPU
    hours (wall time x the CPUs / GPUs each run holds)."""
    res = tp.resources
    cpus, gpus = res["workers"] * res["cpus_per_worker"], res["workers"] * res["gpus_per_worker"]
    rows = []
    for method in tp.methods:
        trial_runs = [Path(exp_dir) / TUNE_DIR / r for r in tp.plan.loc[tp.plan["method"] == method, "run"]]
        lodo_runs = [Path(exp_dir) / TUNE_DIR / r for r in tp.lodo_plan.loc[tp.lodo_plan["method"] == method, "run"]]
        finals = [Path(exp_dir) / "runs" / r for r in final_plan.loc[final_plan["method"] == method, "run"]]
        done = [d for d in trial_runs if (results.read_json(d / "status.json") or {}).get("status") == "done"]
        lodo_done = [d for d in lodo_runs if (results.read_json(d / "status.json") or {}).get("status") == "done"]
        seconds = sum(float(e.get("seconds") or 0.0) for d in trial_runs + lodo_runs + finals
                      for e in results.read_jsonl(d / "epochs.jsonl"))
        rows.append({"method": method, "trials": len(done), "lodo_runs": len(lodo_done), "reruns": len(finals),
                     "wall_h": seconds / 3600, "cpu_h": seconds * cpus / 3600, "gpu_h": seconds * gpus / 3600})
    return pd.DataFrame(rows, columns=["method", "trials", "lodo_runs", "reruns", "wall_h", "cpu_h", "gpu_h"])


def tuning_markdown(curves: pd.DataFrame, chosen: pd.DataFrame, costs: pd.DataFrame, tune: dict,
                    metric: str = "pair_acc_mean") -> str:
    """The tuning report: the equal budget, what each rule picked, curves, cost. Accuracy-like selection
    values read in %, a lower-is-better one (ECE, Brier, NLL, AURC) as it is."""
    lower = mode_of(metric) == "min"

    def fmt(v: float) -> str:
        return f"{v:.4f}" if lower else f"{100 * v:.1f}"

    unit = f"{metric}, lower is better" if lower else f"{metric}, %"
    lines = [f"## Tuning: {budget_text(tune)}", "",
             *[f"- {RULES[r]}: {RULE_NOTES[r]}." for r in tune["rules"]], "",
             f"| method | setting | rule | picked trial | its selection value ({unit}) | epoch |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {p.method} | {p.setting} | {RULES[p.rule]} | t{p.trial} | {fmt(p.value)} | {p.epoch} |"
              for p in chosen.itertuples(index=False)]
    lines += ["", f"best training-domain validation value after n trials ({unit}; 95% interval over trial orders; "
              "a value alone where every order gives the same: the validation set's own noise is not in these)", "",
              "| method | setting | " + " | ".join(f"n={n}" for n in range(1, tune["trials"] + 1)) + " |",
              "|---|---|" + "---|" * tune["trials"]]
    for (method, setting), r in curves.groupby(["method", "setting"], sort=False):
        # where every order agrees (all trials seen, or one value dominates) there is no spread to show:
        # the value alone, never a zero-width interval (it would read as a claim of no uncertainty)
        cells = [fmt(b) if abs(hi - lo) < 5e-6 else f"{fmt(b)} [{fmt(lo)}, {fmt(hi)}]"
                 for b, lo, hi in zip(r["best"], r["low"], r["high"], strict=True)]
        lines.append(f"| {method} | {setting} | " + " | ".join(cells) + " |")
    lines += ["", "| method | trials run | lodo runs | re-runs | wall h | CPU h | GPU h |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {c.method} | {c.trials} | {c.lodo_runs} | {c.reruns} | {c.wall_h:.3f} | {c.cpu_h:.3f} | {c.gpu_h:.3f} |"
              for c in costs.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def dry_run_lines(tp: TunePlan) -> list[str]:
    """Runs per method and rule, and a compute estimate in training steps and images (upper bounds)."""
    tune = tp.tune
    lines = ["  tune: " + budget_text(tune)]
    total_steps = total_images = 0
    for label, (cfg, space) in tp.methods.items():
        trials = tune["trials"] * len(tp.settings)
        lodo = int((tp.lodo_plan["method"] == label).sum())  # k per trial of a setting with k training domains
        per_rule = {r: tune["seeds"] * sum(r in rules_for(s, tune["rules"]) for s in tp.settings) for r in tune["rules"]}
        spec = {"space": space, "base": cfg}
        batch_max = space_mod.upper_bound(spec, "train.batch_size")
        param = space.get("train.batch_size")
        batch_min = cfg["train"]["batch_size"] if param is None else (
            min(c for c in param["choices"] if c is not None) if param["type"] == "categorical" else param["low"])
        t = cfg["train"]
        main_steps = (t["epochs"] - t["warmup_epochs"]) * t["steps_per_epoch"]
        steps = t["warmup_epochs"] * math.ceil(tp.n_train / batch_min) + main_steps
        n_runs = trials + lodo + sum(per_rule.values())
        # a warm-up epoch is one pass over the training set; TALLY's main phase draws two batches a step
        images = n_runs * (t["warmup_epochs"] * tp.n_train
                           + main_steps * batch_max * (2 if cfg["method"]["name"] == "tally" else 1))
        total_steps, total_images = total_steps + n_runs * steps, total_images + images
        extra = f"{lodo} lodo runs + " if "lodo" in tune["rules"] else ""
        lines.append(f"  {label}: {trials} trial runs + {extra}" + " + ".join(f"{n} {r} re-runs" for r, n in per_rule.items())
                     + f" = {n_runs} runs; <= {n_runs * steps:,} training steps, <= {images:,} training images")
    if "lodo" in tune["rules"]:
        lines.append(f"  lodo: each trial run again once per training domain, that domain held out as well: "
                     f"{len(tp.lodo_plan):,} extra runs in all ({len(tp.lodo_plan) / max(len(tp.plan), 1):g} per trial run)")
    lines.append(f"  compute: <= {total_steps:,} training steps, <= {total_images:,} training images in all "
                 f"(upper bounds over the batch sizes in the space)")
    return lines
