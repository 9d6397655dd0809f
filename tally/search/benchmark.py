"""`tally benchmark SPEC`: methods x seeds x settings on Ray, and the MDLT benchmark's table.

A benchmark spec names the data, the settings (the subpopulation split and each held-out domain), the
seeds, and the methods: each at a given config, or at the config a finished search selected
(``from_search``: its experiment folder; the pick is tally.results.select_trial, the one rule).
Every (method, setting, seed) is one fixed Tune trial (tally.search.run.run_fixed) under
``<storage>/<name>/runs/<method>-<setting>-seed<k>``. The store is the truth: a rerun skips the runs
that are done, resumes the others from their last checkpoint, and refuses a done run whose config
differs from the one the spec now asks for.

The table: for each setting, one row per method with the accuracy of each domain, the average pair
accuracy, worst domain / class / pair, many / medium / few / zero-shot and macro F1, as mean ± standard
error over seeds (and each seed's value), read from each run's own metrics.json (per-domain
accuracies from its eval.parquet, the same long table). Written as markdown, LaTeX and CSV.

Paired differences against the baseline (or each of several): for each seed, a method's run and the
baseline's run with that seed are compared on the same test images (tally.evaluation.intervals.compare_runs: a paired bootstrap
within (domain, class) pairs, 95% percentile interval). Across seeds: the mean difference ± standard
error, and a verdict by one stated rule (VERDICT_RULE): "better" only when the interval lies above zero
for EVERY seed, "worse" when below zero for every seed, else "no clear difference". The rule asks each
seed to show the difference on its own, so neither one lucky seed nor test-set noise makes a win.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tally import config as config_mod
from tally import results
from tally.errors import TallyError
from tally.evaluation.benchmark_tables import (  # noqa: F401 - the tables part, re-exported for callers
    DIFFERENCE_METRICS,
    RUNS_DIR,
    SUMMARY,
    VERDICT_RULE,
    difference_summary,
    latex,
    load_benchmark,
    markdown,
    paired_differences,
    run_values,
    seed_table,
    tables,
    test_split,
    verdict_line,
    wide_table,
    write_tables,
)
from tally.schema import SEED_MAX, check_int, check_section
from tally.search import tuning
from tally.search.spec import check_metric, check_resources, expand_roots

TOP_KEYS = ("name", "data", "base", "methods", "baseline", "settings", "seeds", "selection_metric",
            "concurrency", "resources", "report", "tune")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
METHOD_RE = re.compile(r"[A-Za-z0-9_.]+")  # no '-': it separates the parts of a run id
# data fields a searched config may differ in from the benchmark's data (they do not change the images)
FREE_DATA_FIELDS = frozenset({"setting", "held_out", "shot_many_above", "shot_few_at_most", "decode_workers"})
DEFAULT_REPORT = {"replicates": 1000, "bootstrap_seed": 0, "adjust": "none"}
ADJUST = ("none", "holm")
# ---------------------------------------------------------------- the spec
@dataclass
class BenchmarkSpec:
    """A validated benchmark spec: ``resolved`` (defaults filled) and the planned runs, id -> config."""

    name: str
    resolved: dict
    runs: dict[str, dict]       # run id -> complete run config
    plan: pd.DataFrame          # run, method, setting, split, seed
    domain_names: list[str]
    source: str = "benchmark spec"
    tuning: tuning.TunePlan | None = None  # a `tune:` benchmark: its trials (runs and plan come after them)


def load_benchmark_spec(path: str | Path, name_override: str | None = None) -> BenchmarkSpec:
    raw = config_mod.read_yaml_file(path, what="benchmark spec")
    return benchmark_spec_from_raw(raw, str(path), name_override)


def benchmark_spec_from_raw(raw, source: str = "benchmark spec", name: str | None = None) -> BenchmarkSpec:
    """Check every field, read the data's domain names and every ``from_search`` experiment, and build
    each run's complete config: all before Ray starts. Errors name the field."""
    if not isinstance(raw, dict):
        raise TallyError(f"{source}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS), key=str)
    if unknown:
        raise TallyError(f"{unknown[0]}: unknown top-level key (expected one of {', '.join(TOP_KEYS)})")
    out = {"name": _check_name(name if name is not None else raw.get("name", Path(source).stem),
                               "name" if name is None else "--name")}
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise TallyError(f"data: expected a mapping (the data section of a run config), got {data!r}")
    for key in ("setting", "held_out"):
        if key in data:
            raise TallyError(f"data.{key}: set by `settings`, not in data")
    base = raw.get("base") or {}
    if not isinstance(base, dict) or set(base) - {"model", "train"}:
        bad = sorted(set(base) - {"model", "train"}) if isinstance(base, dict) else [base]
        raise TallyError(f"base.{bad[0]}: expected only model and train sections (each method names its own "
                         "method section; data is top-level)")
    data = expand_roots(data)  # ${VAR} in data.root / image_root, as in search specs (e.g. ${TALLY_DATA})
    out["data"] = _validated(lambda: config_mod.validate({"data": data}), "")["data"]
    out["base"] = copy.deepcopy(base)
    out["selection_metric"] = raw.get("selection_metric") or (base.get("train") or {}).get(
        "selection_metric") or results.DEFAULT_SELECTION["metric"]
    try:  # any validation metric, in its own direction (tally.schema.mode_of); never a ts_ one
        check_metric("selection_metric", out["selection_metric"])
    except TallyError as e:
        raise TallyError(f"{source}: {e}") from None
    tune = raw.get("tune")
    if tune is not None:
        out["tune"] = tuning.check_tune(tune)
        if "seeds" in raw:
            raise TallyError("seeds: with tune, tune.seeds sets how many seeds re-run each rule's pick")
    out["seeds"] = _check_seeds(raw.get("seeds", 3))
    out["concurrency"] = check_int("concurrency", raw.get("concurrency", 1), 1)
    out["resources"] = check_resources(raw.get("resources"))
    rep = check_section("report", raw.get("report"), DEFAULT_REPORT)
    if rep["adjust"] not in ADJUST:
        raise TallyError(f"report.adjust: expected one of {', '.join(ADJUST)}, got {rep['adjust']!r}")
    # a bootstrap holds replicates x runs values: 10**6 replicates is already far past what intervals need
    out["report"] = {"replicates": check_int("report.replicates", rep["replicates"], 1, high=10**6),
                     "bootstrap_seed": check_int("report.bootstrap_seed", rep["bootstrap_seed"], 0,
                                                 high=SEED_MAX),
                     "adjust": rep["adjust"]}

    from tally.data import load_splits

    try:
        train_ds = load_splits(out["data"])["train"]
        domain_names = train_ds.domain_names
    except TallyError as e:
        raise TallyError(f"data: {e}") from None
    out["settings"] = _check_settings(raw.get("settings", ["sub"]), domain_names, out["data"])

    methods = raw.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise TallyError("methods: expected a mapping of method labels to a config "
                         "({method: {name: erm}}) or {from_search: EXPERIMENT_FOLDER}")
    out["methods"], own_spaces = {}, {}
    for label, entry in methods.items():
        if not isinstance(label, str) or not METHOD_RE.fullmatch(label):
            raise TallyError(f"methods.{label}: expected a label of letters, digits, '_' or '.'")
        if "tune" in out:
            entry, own_spaces[label] = _tuned_entry(label, entry)
        out["methods"][label] = _resolve_method(label, entry, out)
    baselines = raw.get("baseline", next(iter(methods)))
    baselines = [baselines] if isinstance(baselines, str) else baselines
    if (not isinstance(baselines, list) or not baselines or len(set(baselines)) < len(baselines)
            or any(b not in out["methods"] for b in baselines) or len(baselines) == len(out["methods"])):
        raise TallyError(f"baseline: expected one or more of the methods ({', '.join(out['methods'])}), "
                         f"leaving at least one to compare, got {raw.get('baseline')!r}")
    out["baseline"] = baselines
    if "tune" in out:  # the runs to report are the rules' picks, known once the trials are done
        tp = tuning.plan_trials(out["tune"], out["methods"], own_spaces, out["data"], out["settings"],
                                out["resources"], len(train_ds), domain_names)
        tuning.check_lodo_data(tp)  # a lodo run holds out two domains: refuse data that cannot, now
        return BenchmarkSpec(out["name"], out, {}, pd.DataFrame(columns=["run", "method", "setting", "split", "seed"]),
                             domain_names, source, tp)

    runs, plan = {}, []
    for label, cfg in out["methods"].items():
        for setting in out["settings"]:
            for seed in out["seeds"]:
                run_id = f"{label}-{setting}-seed{seed}"
                runs[run_id] = _run_config(cfg, out["data"], setting, seed, f"methods.{label}")
                plan.append({"run": run_id, "method": label, "setting": setting, "split": test_split(setting),
                             "seed": seed})
    return BenchmarkSpec(out["name"], out, runs, pd.DataFrame(plan), domain_names, source)


def _validated(build, path: str):
    try:
        return build()
    except TallyError as e:
        raise TallyError(f"{path}{e}") from None


def _check_name(value, path: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise TallyError(f"{path}: expected a name of letters, digits, '_', '.', '-' (it names a folder), "
                         f"got {value!r}")
    return value


def _check_seeds(raw) -> list[int]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        # seeds 0 .. count - 1; a count is bounded so that a typo (10**9) is not a billion-run plan
        return list(range(check_int("seeds", raw, 1, high=10_000)))
    if (not isinstance(raw, list) or not raw or len(set(map(str, raw))) != len(raw)
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= SEED_MAX for s in raw)):
        raise TallyError(f"seeds: expected a count >= 1 or a list of distinct integers in [0, {SEED_MAX}], "
                         f"got {raw!r}")
    return list(raw)


def _check_settings(raw, domain_names: list[str], data: dict) -> list[str]:
    """'sub', 'each_domain' or 'domain:<name>' -> setting labels 'sub' / 'heldout-<name>'."""
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list) or not raw:
        raise TallyError(f"settings: expected a list of sub, each_domain, domain:<name>, got {raw!r}")
    out = []
    for i, s in enumerate(raw):
        if s == "sub":
            labels = ["sub"]
        elif s == "each_domain" or (isinstance(s, str) and s.startswith("domain:")):
            if data["source"] == "wilds":
                raise TallyError(f"settings[{i}]: held-out domains are not available for data.source 'wilds'")
            names = domain_names if s == "each_domain" else [s.split(":", 1)[1]]
            if names[0] not in domain_names:
                raise TallyError(f"settings[{i}]: unknown domain {names[0]!r} (the data's domains: "
                                 f"{', '.join(domain_names)})")
            labels = [f"heldout-{d}" for d in names]
        else:
            raise TallyError(f"settings[{i}]: expected sub, each_domain or domain:<name>, got {s!r}")
        for label in labels:
            if label in out:
                raise TallyError(f"settings[{i}]: {label} is listed twice")
            out.append(label)
    return out


def _tuned_entry(label: str, entry) -> tuple[dict, dict]:
    """With tune, a method names its method section and may override its space; model and training
    budget are the base's for every method (searched knobs come from the space)."""
    if not isinstance(entry, dict):
        raise TallyError(f"methods.{label}: expected a mapping ({{method: {{name: ...}}, space: ...}}), got {entry!r}")
    extra = sorted(set(entry) - {"method", "space"})
    if extra:
        raise TallyError(f"methods.{label}.{extra[0]}: not allowed with tune (every method gets the base's model "
                         "and training budget; give a method section and optionally a space)")
    space = entry.get("space") or {}
    if not isinstance(space, dict):
        raise TallyError(f"methods.{label}.space: expected a mapping of run-config paths to distributions, got {space!r}")
    return {"method": entry.get("method")}, space


def _resolve_method(label: str, entry, spec: dict) -> dict:
    """A method's config before data, setting and seed: base + its sections, or a search's selected trial."""
    path = f"methods.{label}"
    if not isinstance(entry, dict):
        raise TallyError(f"{path}: expected a mapping ({{method: {{name: ...}}}} or {{from_search: FOLDER}}), "
                         f"got {entry!r}")
    if "from_search" in entry:
        extra = sorted(set(entry) - {"from_search", "trial"})
        if extra:
            raise TallyError(f"{path}.{extra[0]}: not allowed with from_search (only trial)")
        cfg = _from_search(path, entry["from_search"], entry.get("trial"), spec["data"], spec["settings"])
        cfg["train"]["selection_metric"] = spec["selection_metric"]  # every method keeps epochs alike
        return cfg
    extra = sorted(set(entry) - {"method", "model", "train"})
    if extra:
        raise TallyError(f"{path}.{extra[0]}: unknown key (expected method, model, train or from_search)")
    if not isinstance(entry.get("method"), dict) or "name" not in entry["method"]:
        raise TallyError(f"{path}.method: expected a mapping with the method's name, e.g. {{name: erm}}")
    cfg = {"method": copy.deepcopy(entry["method"])}
    for section in ("model", "train"):
        given = entry.get(section) or {}
        if not isinstance(given, dict):
            raise TallyError(f"{path}.{section}: expected a mapping, got {given!r}")
        cfg[section] = {**copy.deepcopy(spec["base"].get(section) or {}), **given}
    cfg["train"]["selection_metric"] = spec["selection_metric"]
    _validated(lambda: config_mod.validate({**cfg, "data": spec["data"]}), f"{path}: ")
    return cfg


def _from_search(path: str, folder, trial, data: dict, settings: list[str]) -> dict:
    """The selected (or named) trial's model, method and train sections; its data must be the benchmark's,
    and for a held-out-domain setting the search must have held out that same domain: any other search
    selected on validation images of that domain, which belong to its held-out test split here."""
    if not isinstance(folder, str) or not folder:
        raise TallyError(f"{path}.from_search: expected an experiment folder, got {folder!r}")
    exp_dir = Path(folder).expanduser()
    if not (exp_dir / results.TRIALS_DIR).is_dir():
        raise TallyError(f"{path}.from_search: {exp_dir} is not an experiment folder (no {results.TRIALS_DIR}/)")
    if trial is None:
        best, selection = results.best_of_experiment(exp_dir)
        if best is None:
            raise TallyError(f"{path}.from_search: no finished trial in {exp_dir} to select "
                             f"({selection.source})")
        trial = best["trial_id"]
    cfg = results.read_yaml(exp_dir / results.TRIALS_DIR / str(trial) / "config.yaml")
    if cfg is None:
        raise TallyError(f"{path}.trial: no config.yaml for trial {trial!r} in {exp_dir}")
    theirs = cfg.get("data") or {}
    for key in sorted(set(theirs) | set(data)):
        if key not in FREE_DATA_FIELDS and theirs.get(key) != data.get(key):
            raise TallyError(f"{path}.from_search: the search ran on other data (data.{key}: "
                             f"{theirs.get(key)!r} there, {data.get(key)!r} here)")
    for setting in settings:
        held = setting.removeprefix("heldout-")
        if setting != "sub" and (theirs.get("setting") != "domain" or list(theirs.get("held_out") or []) != [held]):
            raise TallyError(f"{path}.from_search: the search did not hold out domain {held!r} (data.setting "
                             f"{theirs.get('setting')!r}, held_out {theirs.get('held_out')!r}): it selected on "
                             f"validation images of {held!r}, which are part of setting {setting}'s test split; "
                             "use a search that held out that domain, or a separate benchmark per setting")
    return {"method": cfg["method"], "model": cfg["model"], "train": cfg["train"], "from": f"{exp_dir}:{trial}"}


def _run_config(cfg: dict, data: dict, setting: str, seed: int, path: str) -> dict:
    """One run's complete config: the method's sections, the benchmark's data in this setting, the seed
    (train and method: the mixing draws repeat with the run). Selection stays on training-domain
    validation: a held-out domain is never looked at before the test."""
    held = [] if setting == "sub" else [setting.removeprefix("heldout-")]
    raw = {"data": {**data, "setting": "sub" if setting == "sub" else "domain", "held_out": held},
           "model": copy.deepcopy(cfg["model"]), "method": copy.deepcopy(cfg["method"]),
           "train": {**copy.deepcopy(cfg["train"]), "seed": seed}}
    raw["method"]["seed"] = seed
    raw["data"]["oracle_selection"] = False
    return _validated(lambda: config_mod.validate(raw, source=path), f"{path}: ")


# ---------------------------------------------------------------- running
def run_benchmark(spec: BenchmarkSpec, storage: str | Path, address: str | None = None,
                  quiet: bool = True) -> dict[str, pd.DataFrame]:
    """Run what is not done yet, then build and write the tables; returns them (see ``tables``)."""
    exp_dir = results.experiment_dir(storage, spec.name)
    if spec.tuning is not None:
        return run_tuned(spec, exp_dir, address, quiet)
    with results.exclusive(exp_dir, "benchmark"):
        todo = pending_runs(spec, exp_dir)
        results.write_yaml(exp_dir / "spec.yaml", {**spec.resolved, "domain_names": spec.domain_names})
        results.write_parquet(exp_dir / "plan.parquet", spec.plan)
    if todo:
        from tally.search.run import connect, run_fixed

        connect(address, spec.resolved["concurrency"], quiet=quiet)
        print(f"benchmark {spec.name}: {len(todo)} of {len(spec.runs)} runs to do "
              f"({spec.resolved['concurrency']} at a time)", flush=True)
        run_fixed(exp_dir, RUNS_DIR, todo, spec.resolved["resources"], spec.resolved["concurrency"])
    else:
        print(f"benchmark {spec.name}: all {len(spec.runs)} runs done; tables from the store", flush=True)
    with results.exclusive(exp_dir, "benchmark"):
        out = tables(exp_dir, spec.plan, spec.resolved["baseline"], **spec.resolved["report"])
        write_tables(exp_dir, out)
    return out


def run_tuned(spec: BenchmarkSpec, exp_dir: Path, address: str | None, quiet: bool) -> dict:
    """A `tune:` benchmark (tally.search.tuning): every method's trials, then each rule's pick re-run
    with tune.seeds seeds; one set of tables per rule, and the tuning report. Returns {rule: tables}
    plus "tuning" (picks, curves, cost)."""
    tp = spec.tuning
    with results.exclusive(exp_dir, "benchmark"):
        # the lodo runs train with the trials: a trial's lodo score needs all of them
        todo = pending_runs(spec, exp_dir, {**tp.trials, **tp.lodo}, tuning.TUNE_DIR)
        results.write_yaml(exp_dir / "spec.yaml", {**spec.resolved, "domain_names": spec.domain_names})
        results.write_parquet(exp_dir / "trials.parquet", tp.plan.assign(params=tp.plan["params"].map(repr)))
        if tp.lodo:
            results.write_parquet(exp_dir / "lodo_runs.parquet", tp.lodo_plan)
    if todo:
        from tally.search.run import connect, run_fixed

        connect(address, spec.resolved["concurrency"], quiet=quiet)
        lodo = f" (with {len(tp.lodo)} lodo runs)" if tp.lodo else ""
        print(f"benchmark {spec.name}: {len(todo)} of {len(tp.trials) + len(tp.lodo)} trial runs{lodo} to do", flush=True)
        run_fixed(exp_dir, tuning.TUNE_DIR, todo, spec.resolved["resources"], spec.resolved["concurrency"])
    chosen = tuning.picks(exp_dir, tp)
    runs, plan = tuning.final_runs(tp, chosen)
    with results.exclusive(exp_dir, "benchmark"):
        todo = pending_runs(spec, exp_dir, runs)
        results.write_parquet(exp_dir / "plan.parquet", plan)
        results.write_parquet(exp_dir / "picks.parquet", chosen)
    if todo:
        from tally.search.run import connect, run_fixed

        connect(address, spec.resolved["concurrency"], quiet=quiet)
        print(f"benchmark {spec.name}: {len(todo)} of {len(runs)} re-runs of the picks to do", flush=True)
        run_fixed(exp_dir, RUNS_DIR, todo, spec.resolved["resources"], spec.resolved["concurrency"])
    with results.exclusive(exp_dir, "benchmark"):
        out = {rule: tables(exp_dir, plan[plan["rule"] == rule], spec.resolved["baseline"], **spec.resolved["report"])
               for rule in spec.resolved["tune"]["rules"] if (plan["rule"] == rule).any()}
        for rule, rule_out in out.items():
            write_tables(exp_dir / "rules" / rule, rule_out)
        values = tuning.trial_values(exp_dir, tp, "train_val")
        out["tuning"] = {"picks": chosen, "trial_values": values,
                         "curves": tuning.tuning_curves(values, mode=tuning.selection_mode(tp)),
                         "cost": tuning.cost(exp_dir, tp, plan)}
        results.write_text(exp_dir / "table.md", tuned_markdown(out, spec.resolved["tune"],
                                                                spec.resolved["selection_metric"]))
        if tp.lodo:
            out["tuning"]["lodo_folds"] = tuning.lodo_folds(exp_dir, tp)
        for key in ("picks", "curves", "cost", "lodo_folds"):
            if key in out["tuning"]:
                results.write_text(exp_dir / f"{key}.csv", out["tuning"][key].to_csv(index=False))
    return out


def tuned_markdown(out: dict, tune: dict, selection_metric: str = "pair_acc_mean", metrics=DIFFERENCE_METRICS) -> str:
    """Each rule's tables under its own heading (the oracle's labelled so), then the tuning report."""
    blocks = [f"## Selection rule: {tuning.RULES[rule]}\n\n" + markdown(rule_out, metrics)
              for rule, rule_out in out.items() if rule in tuning.RULES]
    t = out["tuning"]
    blocks.append(tuning.tuning_markdown(t["curves"], t["picks"], t["cost"], tune, selection_metric))
    return "\n".join(blocks)


def pending_runs(spec: BenchmarkSpec, exp_dir: Path, runs: dict | None = None, group: str = RUNS_DIR) -> dict[str, dict]:
    """The runs not done yet. A done run must hold the config the spec asks for: a changed spec under
    the same name would otherwise mix two benchmarks in one table."""
    todo = {}
    for run_id, cfg in (spec.runs if runs is None else runs).items():
        run_dir = exp_dir / group / run_id
        status = (results.read_json(run_dir / "status.json") or {}).get("status")
        stored = results.read_yaml(run_dir / "config.yaml")
        if stored is not None and stored != cfg:
            raise TallyError(f"{run_dir}: holds a run with another config than the spec asks for; "
                             "use --name for a new benchmark")
        if status != "done" or results.read_json(run_dir / "metrics.json") is None:
            todo[run_id] = cfg
    return todo


def dry_run_text(spec: BenchmarkSpec) -> str:
    if spec.tuning is not None:
        tp = spec.tuning
        return "\n".join([f"benchmark {spec.name} (tuned): {len(tp.methods)} methods x {len(tp.settings)} settings; "
                          f"{spec.resolved['concurrency']} at a time; baseline {', '.join(spec.resolved['baseline'])}",
                          *tuning.dry_run_lines(tp),
                          "  settings: " + ", ".join(f"{s} -> {test_split(s)}" for s in tp.settings)])
    lines = [f"benchmark {spec.name}: {len(spec.resolved['methods'])} methods x {len(spec.resolved['settings'])} "
             f"settings x {len(spec.resolved['seeds'])} seeds = {len(spec.runs)} runs, "
             f"{spec.resolved['concurrency']} at a time; baseline {', '.join(spec.resolved['baseline'])}"]
    for label, cfg in spec.resolved["methods"].items():
        where = f" (from {cfg['from']})" if "from" in cfg else ""
        lines.append(f"  {label}: method {cfg['method']['name']}{where}")
    lines.append("  settings: " + ", ".join(f"{s} -> {test_split(s)}" for s in spec.resolved["settings"]))
    return "\n".join(lines)

