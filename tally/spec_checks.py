"""Small checks shared by the spec validators: each error names the field path and what was expected."""

from __future__ import annotations

import contextlib
import copy
import math

from tally import config as config_mod
from tally.errors import TallyError


def section(path: str, raw, defaults: dict) -> dict:
    if raw is None:
        return copy.deepcopy(defaults)
    if not isinstance(raw, dict):
        raise TallyError(f"{path}: expected a mapping with keys {', '.join(defaults)}, got {raw!r}")
    for key in raw:
        if key not in defaults:
            raise TallyError(f"{path}.{key}: unknown key (expected one of {', '.join(defaults)})")
    return {**copy.deepcopy(defaults), **raw}


def set_dotted(config: dict, dotted: str, value) -> None:
    head = dotted.partition(".")[0]
    if config.get(head) is None:  # `method:` left empty in YAML
        config[head] = {}
    config_mod.set_path(config, dotted, value)


def check_int(path: str, value, low: int | None, expected: str | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        text = expected or (f"an integer >= {low}" if low is not None else "an integer")
        raise TallyError(f"{path}: expected {text}, got {value!r}")
    return value


def check_number(path: str, value, expected: str) -> float | int:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # a 1e-5 that reached us as a string
            value = float(value)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise TallyError(f"{path}: expected {expected}, got {value!r}")
    return value
