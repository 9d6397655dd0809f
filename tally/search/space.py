"""A spec's search space: run-config paths -> distributions and conditions.

Checked when the spec loads (each bound and choice must make a valid run config on its own), and
sampled define-by-run by Optuna (`DefineByRun`). Kept in an importable module because Ray pickles the
searcher state with the space function by reference (one defined in __main__ would not unpickle on
restore).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

from tally import config as config_mod
from tally.errors import TallyError

if TYPE_CHECKING:  # Optuna is imported by the searcher, not by loading a spec
    import optuna
from tally.config import set_path
from tally.schema import SCHEMA, SECTIONS, check_int, check_number

DISTRIBUTIONS = {  # type -> (required keys, optional keys)
    "uniform": (("low", "high"), ()),
    "loguniform": (("low", "high"), ()),
    "int": (("low", "high"), ("step",)),
    "categorical": (("choices",), ()),
}

NOT_SEARCHED_FINAL = ("a search selects on validation; a final retrain on train + validation is "
                      "`tally train --final` after the search")


def check_space(raw, raw_base: dict, base: dict) -> dict:
    if not isinstance(raw, dict) or not raw:
        raise TallyError(f"space: expected a mapping of run-config paths to distributions "
                         f"(at least one), got {raw!r}")
    space: dict[str, dict] = {}
    for path, entry in raw.items():
        _check_path(path, base)
        space[path] = _check_param(path, entry, space)
        for key, value in _bounds(space[path]):
            _check_substituted(path, key, value, raw_base)
    return space


def _check_path(path, base: dict) -> None:
    where = f"space.{path}"
    if not isinstance(path, str) or path.count(".") != 1:
        raise TallyError(f"{where}: expected a SECTION.FIELD run-config path (e.g. train.lr)")
    section, field = path.split(".")
    if section in SCHEMA:
        if field not in SCHEMA[section]:
            raise TallyError(f"{where}: {field!r} is not a field of {section} (expected one of "
                             f"{', '.join(SCHEMA[section])})")
        if path == "train.final":
            raise TallyError(f"{where}: {NOT_SEARCHED_FINAL}")
    elif section == "method":
        method = base["method"]
        if field == "name":
            raise TallyError(f"{where}: the method itself is not searchable; write one spec per method")
        if field not in method:
            params = ", ".join(k for k in method if k != "name")
            raise TallyError(f"{where}: not a parameter of method {method['name']!r} (expected one of {params})")
    else:
        raise TallyError(f"{where}: unknown section {section!r} (expected one of {', '.join(SECTIONS)})")


def _check_param(path: str, entry, earlier: dict) -> dict:
    where = f"space.{path}"
    if not isinstance(entry, dict):
        raise TallyError(f"{where}: expected a mapping with a type ({', '.join(DISTRIBUTIONS)}), got {entry!r}")
    kind = entry.get("type")
    if kind not in DISTRIBUTIONS:
        raise TallyError(f"{where}.type: expected one of {', '.join(DISTRIBUTIONS)}, got {kind!r}")
    required, optional = DISTRIBUTIONS[kind]
    allowed = ("type", *required, *optional, "when")
    for key in entry:
        if key not in allowed:
            raise TallyError(f"{where}.{key}: unknown key for a {kind} distribution "
                             f"(expected {', '.join(allowed)})")
    for key in required:
        if key not in entry:
            raise TallyError(f"{where}.{key}: missing (a {kind} distribution needs {' and '.join(required)})")
    out: dict = {"type": kind}
    if kind == "categorical":
        out["choices"] = _check_choices(where, entry["choices"])
    elif kind == "int":
        out["low"] = check_int(f"{where}.low", entry["low"], None, f"an integer for an {kind} distribution")
        out["high"] = check_int(f"{where}.high", entry["high"], None, f"an integer for an {kind} distribution")
        out["step"] = check_int(f"{where}.step", entry.get("step", 1), 1)
        if out["low"] >= out["high"]:
            raise TallyError(f"{where}.high: expected > low ({out['low']}), got {out['high']}")
        if (out["high"] - out["low"]) % out["step"]:
            raise TallyError(f"{where}.high: expected low + a multiple of step ({out['step']}), got {out['high']}")
    else:
        out["low"] = check_number(f"{where}.low", entry["low"], "a number")
        out["high"] = check_number(f"{where}.high", entry["high"], "a number")
        if kind == "loguniform" and out["low"] <= 0:
            raise TallyError(f"{where}.low: expected a number > 0 for a loguniform, got {entry['low']!r}")
        if out["low"] >= out["high"]:
            raise TallyError(f"{where}.high: expected > low ({out['low']}), got {entry['high']!r}")
        out["low"], out["high"] = float(out["low"]), float(out["high"])
    if entry.get("when") is not None:
        out["when"] = _check_when(where, entry["when"], earlier)
    return out


def _check_choices(where: str, choices) -> list:
    if not isinstance(choices, list) or not choices:
        raise TallyError(f"{where}.choices: expected a non-empty list, got {choices!r}")
    seen = set()
    for i, c in enumerate(choices):
        if c is not None and not isinstance(c, bool | int | float | str):
            raise TallyError(f"{where}.choices[{i}]: expected null, true/false, a number or a string, got {c!r}")
        if isinstance(c, float) and not math.isfinite(c):
            raise TallyError(f"{where}.choices[{i}]: expected a finite number, got {c!r}")
        key = (type(c).__name__, c)
        if key in seen:
            raise TallyError(f"{where}.choices[{i}]: {c!r} is listed twice")
        seen.add(key)
    return list(choices)


def _check_when(where: str, when, earlier: dict) -> dict:
    if not isinstance(when, dict) or not when:
        raise TallyError(f"{where}.when: expected a mapping {{earlier categorical param: value}}, got {when!r}")
    for ref, value in when.items():
        parent = earlier.get(ref)
        if parent is None:
            raise TallyError(f"{where}.when: {ref!r} is not an earlier parameter of the space "
                             "(a condition refers to a categorical listed above it)")
        if parent["type"] != "categorical":
            raise TallyError(f"{where}.when: {ref!r} is a {parent['type']} parameter; conditions need a categorical")
        if not any(type(value) is type(c) and value == c for c in parent["choices"]):
            raise TallyError(f"{where}.when.{ref}: expected one of {ref}'s choices {parent['choices']!r}, "
                             f"got {value!r}")
    return dict(when)


def _bounds(param: dict):
    """(key, value) pairs to try in base: both ends of a range, or each choice."""
    if param["type"] == "categorical":
        return [(f"choices[{i}]", c) for i, c in enumerate(param["choices"])]
    return [("low", param["low"]), ("high", param["high"])]


def _check_substituted(path: str, key: str, value, raw_base: dict) -> None:
    """A bound or choice must make a valid run config on its own (e.g. warmup_epochs <= epochs)."""
    where = f"space.{path}.{key}"
    trial = copy.deepcopy(raw_base)
    set_path(trial, path, value)
    try:
        config_mod.validate(trial, source="base")
    except TallyError as e:
        raise TallyError(f"{where}: {value!r} gives an invalid run config ({e})") from None


def upper_bound(spec: dict, path: str):
    """The largest value a run-config field can take in this search (the base value if not searched)."""
    param = spec["space"].get(path)
    section, field = path.split(".")
    if param is None:
        return spec["base"][section][field]
    if param["type"] == "categorical":
        return max(c for c in param["choices"] if c is not None)
    return param["high"]


# ---------------------------------------------------------------- sampling
class DefineByRun:
    """Suggest each param of a resolved spec space, in order; skip a param whose `when` is not met.

    Param names are the dotted run-config paths; a skipped param keeps the base config's value.
    """

    def __init__(self, space: dict):
        self.space = dict(space)

    def __call__(self, trial: optuna.Trial) -> None:
        chosen: dict = {}
        for name, p in self.space.items():
            if not _met(p.get("when"), chosen):
                continue
            kind = p["type"]
            if kind == "categorical":
                value = trial.suggest_categorical(name, p["choices"])
            elif kind == "int":
                value = trial.suggest_int(name, p["low"], p["high"], step=p.get("step", 1))
            else:
                value = trial.suggest_float(name, p["low"], p["high"], log=kind == "loguniform")
            chosen[name] = value
        return None


def _met(when: dict | None, chosen: dict) -> bool:
    """Every referenced param was suggested (its own condition held) and took exactly that value."""
    return not when or all(
        ref in chosen and type(chosen[ref]) is type(v) and chosen[ref] == v for ref, v in when.items()
    )
