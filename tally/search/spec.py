"""The search spec: what to search, around which fixed run config, with how much budget and hardware.

Validated completely before Ray starts (ARCHITECTURE.md contract 1), so a typo fails in a second with
the field path and what was expected, not inside trial 17. `base` is a run config (tally.config);
`space` names run-config fields by dotted path; every bound and choice is checked against the run-config
schema by substituting it into `base`.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from tally import config as config_mod
from tally.config import set_path
from tally.errors import TallyError
from tally.results import DEFAULT_SELECTION
from tally.schema import (
    CALIBRATION_METRICS,
    SECTIONS,
    SEED_MAX,
    SELECTION_METRICS,
    TEMPERATURE_PREFIX,
    check_int,
    check_number,
    check_section,
    mode_of,
)
from tally.search.space import NOT_SEARCHED_FINAL, check_space, upper_bound

TOP_KEYS = ("name", "base", "space", "start_with", "selection", "budget", "resources", "seed", "robustness")
ROBUSTNESS_SETTINGS = ("sub", "each_domain")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
EXPANDED_VARS = ("HOME",)  # and every TALLY_* (expand_root)
DEFAULT_EARLY_STOPPING = {"enabled": False, "grace_epochs": 1, "reduction_factor": 2}
DEFAULT_RESOURCES = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
MULTI_OBJECTIVE = {"objectives": None, "tolerance": 0.01, "sampler": "tpe"}  # selection keys of a Pareto search
MULTI_SAMPLERS = ("tpe", "nsga2")


@dataclass
class Spec:
    """A validated search spec: `resolved` holds every section with defaults filled.

    Its base is a complete run config except for defaults that derive from another field: method.seed
    stays null ("follow train.seed") unless the spec sets it, so a searched or re-drawn train.seed carries
    it along. `trial_config` fills it, like every trial config, through tally.config.validate.
    """

    name: str
    resolved: dict
    source: str = "spec"

    @classmethod
    def from_resolved(cls, resolved: dict, source: str = "spec") -> Spec:
        """Rebuild from `resolved` (e.g. inside a Ray trial, or from an experiment's spec.yaml)."""
        return cls(name=resolved["name"], resolved=resolved, source=source)

    @property
    def base(self) -> dict:
        return self.resolved["base"]

    @property
    def space(self) -> dict:
        return self.resolved["space"]

    @property
    def metric(self) -> str:
        return self.resolved["selection"]["metric"]

    @property
    def mode(self) -> str:
        return self.resolved["selection"]["mode"]

    def trial_config(self, params: dict) -> dict:
        """A trial's complete run config: base with the dotted params set, validated."""
        raw = copy.deepcopy(self.base)
        for dotted, value in params.items():
            if "." not in dotted or dotted.split(".", 1)[0] not in SECTIONS:
                raise TallyError(f"trial params: {dotted!r} is not a SECTION.FIELD run-config path")
            set_path(raw, dotted, value)
        try:
            return config_mod.validate(raw, source="trial config")
        except TallyError as e:
            raise TallyError(f"trial config: {e}") from None

    def robustness_configs(self, params: dict, domain_names: list[str]) -> list[tuple[str, dict]]:
        """The re-scoring runs of a chosen trial (its params): (label, complete config) per setting and seed.

        "sub" trains on all domains; "each_domain" holds out each domain in turn (domain_names come from
        the data, which the spec never loads). Seeds are the trial's train.seed + 0 .. seeds-1.
        """
        rob = self.resolved["robustness"]
        seed0 = self.trial_config(params)["train"]["seed"]
        runs = []
        for setting in rob["settings"]:
            variants = [("sub", "sub", [])] if setting == "sub" else [
                (f"heldout-{d}", "domain", [d]) for d in domain_names]
            for label, data_setting, held in variants:
                for k in range(rob["seeds"]):
                    extra = {"data.setting": data_setting, "data.held_out": held, "train.seed": seed0 + k}
                    runs.append((f"{label}-seed{seed0 + k}", self.trial_config({**params, **extra})))
        return runs

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved, sort_keys=False)


def load_spec(path: str | Path, name_override: str | None = None) -> Spec:
    """Read and validate a spec file; the experiment name is --name, else `name:`, else the file stem."""
    raw = config_mod.read_yaml_file(path, what="search spec")
    return spec_from_raw(raw, str(path), name_override)


def spec_from_raw(raw, source: str = "spec", name: str | None = None) -> Spec:
    """A Spec from an already-parsed mapping (tests, or a spec.yaml read back on resume)."""
    resolved = validate_spec(raw, source=source, name=name)
    return Spec.from_resolved(resolved, source)


def validate_spec(raw, source: str = "spec", *, name: str | None = None) -> dict:
    """The resolved spec (defaults filled, base validated) or a TallyError naming the field path."""
    if not isinstance(raw, dict):
        raise TallyError(f"{source}: expected a mapping with keys {', '.join(TOP_KEYS)}, got "
                         f"{type(raw).__name__}")
    unknown = sorted(set(raw) - set(TOP_KEYS), key=str)
    if unknown:
        raise TallyError(f"{unknown[0]}: unknown top-level key (expected one of {', '.join(TOP_KEYS)})")
    out = {"name": _check_name(name if name is not None else raw.get("name", Path(source).stem),
                               "name" if name is None else "--name")}
    raw_base = raw.get("base")
    if not isinstance(raw_base, dict):
        raise TallyError(f"base: expected a run config mapping (data, model, method, train), got {raw_base!r}")
    raw_base = _expand_root(raw_base)
    out["base"] = _validate_base(raw_base)
    if out["base"]["train"]["final"]:
        raise TallyError(f"base.train.final: {NOT_SEARCHED_FINAL}")
    if "seed" in out["base"]["method"] and (raw_base.get("method") or {}).get("seed") is None:
        out["base"]["method"]["seed"] = None  # follows train.seed; filled in each trial config
    out["space"] = check_space(raw.get("space"), raw_base, out["base"])
    try:  # the file, the field and the value in one line
        out["selection"] = _check_selection(raw.get("selection"))
    except TallyError as e:
        raise TallyError(f"{source}: {e}") from None
    # a trial's best epoch and the search's best trial are picked by the same validation metric
    given = (raw_base.get("train") or {}).get("selection_metric")
    if given is not None and given != out["selection"]["metric"]:
        raise TallyError(f"{source}: base.train.selection_metric: expected the search's selection.metric "
                         f"{out['selection']['metric']!r} (or leave it out), got {given!r}")
    out["base"]["train"]["selection_metric"] = out["selection"]["metric"]
    out["budget"] = _check_budget(raw.get("budget"), out)
    out["resources"] = check_resources(raw.get("resources"))
    seed = raw.get("seed", 0)
    out["seed"] = None if seed is None else check_int("seed", seed, 0, high=SEED_MAX)  # Optuna: < 2**32
    out["robustness"] = _check_robustness(raw.get("robustness"), out["base"])
    out["start_with"] = _check_start_with(raw.get("start_with"), out["space"], out["budget"]["trials"])
    return out


# --- sections ------------------------------------------------------------------------------------------

def _check_name(value, path: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise TallyError(f"{path}: expected an experiment name of letters, digits, '_', '.', '-' "
                         f"(it names a folder), got {value!r}")
    return value


def expand_root(root: str, field: str) -> str:
    """``root`` with ${VAR} expanded, for data.root of specs and benchmarks (no file-system access).

    Only ${HOME} and ${TALLY_*} expand: the expanded root is written into spec.yaml, every trial's
    config.yaml and every bundle, so a spec (perhaps someone else's) must never be able to copy a secret
    of this environment (${AWS_SECRET_ACCESS_KEY}) into files. An unset or empty variable is an error.
    """
    def lookup(m: re.Match) -> str:
        name = m.group(1)
        if name not in EXPANDED_VARS and not name.startswith("TALLY_"):
            raise TallyError(f"{field}: ${{{name}}} is not expanded (only ${{HOME}} and ${{TALLY_...}}: the "
                             "root is written into configs and bundles); write the path or use ${TALLY_DATA}")
        value = os.environ.get(name)
        if not value:
            raise TallyError(f"{field}: environment variable {name} is not set (the spec's data root is {root!r})")
        return value

    return ENV_RE.sub(lookup, root)


def expand_roots(data, prefix: str = "data"):
    """The data section with ${VAR} expanded (expand_root) in its path fields, root and image_root."""
    if not isinstance(data, dict):
        return data
    return {**data, **{k: expand_root(data[k], f"{prefix}.{k}")
                       for k in ("root", "image_root") if isinstance(data.get(k), str)}}


def _expand_root(base: dict) -> dict:
    if not isinstance(base.get("data"), dict):
        return base
    return {**base, "data": expand_roots(base["data"], "base.data")}


def _validate_base(raw_base: dict) -> dict:
    try:
        return config_mod.validate(raw_base, source="base")
    except TallyError as e:
        raise TallyError(f"base.{e}") from None


def check_metric(field: str, metric) -> str:
    """A validation metric a selection may use (tally.schema.SELECTION_METRICS), or a one-line error
    naming the field: a temperature-scaled metric is refused (T is fitted on validation, so its value
    there is in-sample), and so is any metric not computed on validation."""
    if isinstance(metric, str) and metric.startswith(TEMPERATURE_PREFIX) \
            and metric.removeprefix(TEMPERATURE_PREFIX) in CALIBRATION_METRICS:
        raise TallyError(f"{field}: {metric!r} cannot be selected on: the temperature is fitted on validation, "
                         f"so its value there is in-sample; select on {metric.removeprefix(TEMPERATURE_PREFIX)!r} "
                         "(before temperature scaling)")
    if metric not in SELECTION_METRICS:
        raise TallyError(f"{field}: expected a validation metric, one of {', '.join(SELECTION_METRICS)}, "
                         f"got {metric!r}")
    return metric


def _check_selection(raw) -> dict:
    multi = isinstance(raw, dict) and "objectives" in raw  # keys absent otherwise: old spec.yaml files resume
    sel = check_section("selection", raw, {**DEFAULT_SELECTION, **(MULTI_OBJECTIVE if multi else {})})
    if multi:
        sel = _check_objectives(sel, given_metric="metric" in raw)
    check_metric("selection.metric", sel["metric"])
    # the direction is the metric's (tally.schema.mode_of: lower is better for ECE, Brier, NLL, AURC):
    # `mode` may be left out, and a mode that contradicts it is refused rather than obeyed
    mode = mode_of(sel["metric"])
    if isinstance(raw, dict) and "mode" in raw and raw["mode"] != mode:
        raise TallyError(f"selection.mode: {sel['metric']!r} is {'higher' if mode == 'max' else 'lower'}-is-better: "
                         f"expected {mode!r} (or leave it out), got {raw['mode']!r}")
    return {**sel, "mode": mode}


def _check_objectives(sel: dict, given_metric: bool) -> dict:
    """Multi-objective search: Optuna's study has one direction per objective (tally.schema.mode_of); the
    pick from its Pareto front is results.pick_from_front (best objectives[1] within `tolerance` of the
    best objectives[0])."""
    objectives = sel["objectives"]
    if not isinstance(objectives, list) or len(objectives) != 2 or objectives[0] == objectives[1]:
        raise TallyError(f"selection.objectives: expected two different validation metrics [first, second] of "
                         f"{', '.join(SELECTION_METRICS)}, got {objectives!r}")
    for i, metric in enumerate(objectives):
        check_metric(f"selection.objectives[{i}]", metric)
    tolerance = check_number("selection.tolerance", sel["tolerance"], "a number in [0, 1]")
    if not 0 <= tolerance <= 1:
        raise TallyError(f"selection.tolerance: expected a number in [0, 1], got {tolerance!r}")
    if sel["sampler"] not in MULTI_SAMPLERS:
        raise TallyError(f"selection.sampler: expected one of {', '.join(MULTI_SAMPLERS)}, got {sel['sampler']!r}")
    # a trial keeps its epoch by one metric: the robust objective unless the spec names another
    return {**sel, "metric": sel["metric"] if given_metric else objectives[1], "tolerance": float(tolerance)}


def _check_budget(raw, spec: dict) -> dict:
    if not isinstance(raw, dict):
        raise TallyError(f"budget: expected a mapping with trials (and concurrency, early_stopping), got {raw!r}")
    if "trials" not in raw:
        raise TallyError("budget.trials: missing (how many trials to run, an integer >= 1)")
    budget = check_section("budget", raw, {"trials": None, "concurrency": 1, "early_stopping": None})
    budget["trials"] = check_int("budget.trials", budget["trials"], 1)
    budget["concurrency"] = check_int("budget.concurrency", budget["concurrency"], 1)
    es = budget["early_stopping"]
    if isinstance(es, bool):  # `early_stopping: false` as a shorthand
        es = {"enabled": es}
    es = check_section("budget.early_stopping", es, DEFAULT_EARLY_STOPPING)
    if not isinstance(es["enabled"], bool):
        raise TallyError(f"budget.early_stopping.enabled: expected true or false, got {es['enabled']!r}")
    es["grace_epochs"] = check_int("budget.early_stopping.grace_epochs", es["grace_epochs"], 1)
    es["reduction_factor"] = check_int("budget.early_stopping.reduction_factor", es["reduction_factor"], 2)
    epochs = upper_bound(spec, "train.epochs")
    if es["enabled"] and es["grace_epochs"] >= epochs:
        raise TallyError(f"budget.early_stopping.grace_epochs: expected < train.epochs ({epochs}) when early "
                         f"stopping is enabled (no trial could be stopped), got {es['grace_epochs']}")
    budget["early_stopping"] = es
    return budget


def check_resources(raw, name: Callable[[str], str] = lambda key: f"resources.{key}") -> dict:
    """A run's workers, CPUs and GPUs per worker, checked; ``name`` spells a field in messages (a spec's
    resources.workers, `tally train`'s --workers)."""
    res = check_section("resources", raw, DEFAULT_RESOURCES)
    res["workers"] = check_int(name("workers"), res["workers"], 1)
    cpus = check_number(name("cpus_per_worker"), res["cpus_per_worker"], "a number > 0")
    if cpus <= 0:
        raise TallyError(f"{name('cpus_per_worker')}: expected a number > 0, got {res['cpus_per_worker']!r}")
    gpus = check_number(name("gpus_per_worker"), res["gpus_per_worker"], "a number >= 0")
    if gpus < 0:
        raise TallyError(f"{name('gpus_per_worker')}: expected a number >= 0, got {res['gpus_per_worker']!r}")
    # a worker drives one device: a second GPU would sit idle, and two ranks sharing one GPU break NCCL
    if gpus > 1:
        raise TallyError(f"{name('gpus_per_worker')}: expected at most 1 (a worker uses one GPU; add workers "
                         f"for more), got {res['gpus_per_worker']!r}")
    if 0 < gpus < 1 and res["workers"] > 1:
        raise TallyError(f"{name('gpus_per_worker')}: a fraction ({res['gpus_per_worker']!r}) with "
                         f"{name('workers')} {res['workers']} would put two ranks on one GPU (NCCL refuses); use 1")
    res["cpus_per_worker"], res["gpus_per_worker"] = cpus, gpus
    return res


def _check_start_with(raw, space: dict, trials: int) -> list[dict]:
    """Configs the search evaluates first (e.g. the paper's defaults), before TPE proposes its own."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise TallyError(f"start_with: expected a list of mappings of space parameters, got {raw!r}")
    if len(raw) > trials:
        raise TallyError(f"start_with: {len(raw)} configs but budget.trials is {trials}")
    for i, point in enumerate(raw):
        for path, value in point.items():
            where = f"start_with[{i}].{path}"
            if path not in space:
                raise TallyError(f"{where}: not a parameter of the space (expected one of {', '.join(space)})")
            param = space[path]
            if param["type"] == "categorical":
                if value not in param["choices"]:
                    raise TallyError(f"{where}: expected one of {param['choices']}, got {value!r}")
            elif (isinstance(value, bool) or not isinstance(value, int | float)
                  or not param["low"] <= value <= param["high"]
                  or (param["type"] == "int" and not isinstance(value, int))):
                raise TallyError(f"{where}: expected a {param['type']} in [{param['low']}, {param['high']}], "
                                 f"got {value!r}")
    return [dict(p) for p in raw]


def _check_robustness(raw, base: dict) -> dict:
    rob = check_section("robustness", raw, {"settings": [], "seeds": 1})
    settings = rob["settings"]
    if isinstance(settings, str):
        settings = [settings]
    if not isinstance(settings, list):
        raise TallyError(f"robustness.settings: expected a list of {', '.join(ROBUSTNESS_SETTINGS)}, "
                         f"got {rob['settings']!r}")
    for i, s in enumerate(settings):
        if s not in ROBUSTNESS_SETTINGS:
            raise TallyError(f"robustness.settings[{i}]: expected one of {', '.join(ROBUSTNESS_SETTINGS)}, "
                             f"got {s!r}")
        if s in settings[:i]:
            raise TallyError(f"robustness.settings[{i}]: {s!r} is listed twice")
    if "each_domain" in settings and base["data"]["source"] == "wilds":
        raise TallyError("robustness.settings: each_domain is not available for data.source 'wilds' "
                         "(iWildCam keeps the WILDS split)")
    return {"settings": list(settings), "seeds": check_int("robustness.seeds", rob["seeds"], 1)}
