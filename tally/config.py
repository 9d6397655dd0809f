"""The run config: one YAML that alone reproduces a run (ARCHITECTURE.md contract 2).

Validation fills defaults and checks every field before anything runs, so a typo costs a second,
not an hour of training. Errors name the field path and what was expected.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from tally import files
from tally.errors import TallyError
from tally.schema import SCHEMA, SECTIONS, SEED_MAX, Field

# What `train.protocol: reference` sets, each field only where the config does not give it (an explicit
# value overrides). `paper` is the schema's defaults. Letters: issue 23 / docs/PROTOCOL.md.
REFERENCE_PROTOCOL = {
    ("model", "imagenet_weights"): "v1",  # a: resnet50(pretrained=True), tally.py:62
    ("data", "crop_padding"): 0,  # b: Resize, ToTensor, Normalize only (initialize.py:41-46)
    ("train", "bf16"): False,  # c: float32
    ("data", "carve_validation"): False,  # d: full training lists (with oracle_selection below)
    ("data", "wilds_validation"): "ood",  # f: WILDS' OOD validation (main.py:168, initialize.py:24-26)
    ("train", "tie_rule"): "latest",  # h: utils.py:41
}
# set only where they apply, so that a paper and a reference run of the same data read the same test images
# (tally compare refuses runs whose data fields differ)
_APPLIES = {("data", "carve_validation"): lambda data: data.get("setting") == "domain",
            ("data", "wilds_validation"): lambda data: data.get("source") == "wilds"}
# g (and the unbiased std of tally.py:9), for method tally
REFERENCE_TALLY = {"memory_init": "noise", "warmup_swap": True, "mixing_swap": True, "memory_snapshot": True,
                   "unbiased_std": True}


def apply_protocol(raw: dict) -> dict:
    """raw with `train.protocol: reference` resolved into concrete switches (a copy; raw is untouched).

    d/e: the reference selects on the held-out domain (its val list is the test list) in the domain
    setting, and on the test locations for TerraIncognita's ood lists (main.py:165-166): oracle selection,
    labelled as such everywhere (`data.oracle_selection`). In the sub setting it selects on validation.
    """
    train = raw.get("train") or {}
    if not isinstance(train, dict) or train.get("protocol", "paper") != "reference":
        return raw
    out = copy.deepcopy(raw)
    for section in ("data", "model", "train"):
        if not isinstance(out.get(section) or {}, dict):
            return raw  # a malformed section: validate names it
        out[section] = out.get(section) or {}
    data = out["data"]
    for (section, key), value in REFERENCE_PROTOCOL.items():
        if _APPLIES.get((section, key), lambda _: True)(data):
            out[section].setdefault(key, value)
    if data.get("setting") in ("domain", "ood") and data.get("source") != "wilds" and not out["train"].get("final"):
        data.setdefault("oracle_selection", True)
    method = out.get("method") or {}
    if isinstance(method, dict) and method.get("name", "tally") == "tally":
        out["method"] = {**REFERENCE_TALLY, **method}
    return out


def validate(raw: dict, source: str = "config") -> dict:
    """Return a complete config (defaults filled) or raise TallyError naming the field."""
    if not isinstance(raw, dict):
        raise TallyError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}")
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise TallyError(f"{sorted(unknown)[0]}: unknown section (expected one of {', '.join(SECTIONS)})")
    raw = apply_protocol(raw)
    out = {}
    for section, fields in SCHEMA.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise TallyError(f"{section}: expected a mapping, got {given!r}")
        extra = set(given) - set(fields)
        if extra:
            name = sorted(extra)[0]
            raise TallyError(f"{section}.{name}: unknown field (expected one of {', '.join(fields)})")
        out[section] = {name: f.check(f"{section}.{name}", given.get(name, copy.deepcopy(f.default)))
                        for name, f in fields.items()}
    out["method"] = _validate_method(raw.get("method") or {}, out["train"]["seed"])
    train = out["train"]
    if train["warmup_epochs"] > train["epochs"]:
        raise TallyError(f"train.warmup_epochs: expected <= train.epochs ({train['epochs']}), "
                         f"got {train['warmup_epochs']}")
    pretrained = out["model"]["pretrained"]
    if pretrained not in (None, "imagenet") and not Path(pretrained).expanduser().is_file():
        raise TallyError(f"model.pretrained: no weights file at {pretrained!r} (or use 'imagenet' or null)")
    if pretrained == "imagenet" and out["model"]["arch"] == "resnet10":
        raise TallyError("model.pretrained: 'imagenet' weights do not exist for resnet10")
    _check_main_phase(train, out["method"]["name"])
    if train["compile"] and train["compile_mode"] == "reduce-overhead" and train["device"] != "cuda":
        raise TallyError(f"train.compile_mode: 'reduce-overhead' replays CUDA graphs; it needs train.device "
                         f"'cuda', got {train['device']!r}")
    data = out["data"]
    if train["select_from"] == "last" and data["oracle_selection"]:
        raise TallyError("data.oracle_selection: train.select_from 'last' keeps the last epoch and selects on "
                         "nothing; set oracle_selection false")
    if train["final"] and data["oracle_selection"]:
        raise TallyError("data.oracle_selection: a final retrain (train.final) keeps its last epoch and "
                         "selects on nothing; set oracle_selection false")
    from tally.data import resolve_data_cfg
    from tally.evaluation import shot_thresholds_of

    resolve_data_cfg(data)  # the rules between data fields (a source's root, held-out domains, ...)

    try:
        shot_thresholds_of(data)
    except ValueError as e:
        raise TallyError(f"data.shot_few_at_most: {e}") from None
    return out


def _check_main_phase(train: dict, method: str) -> None:
    """Refuse, before any training, a run that would end in its warm-up with nothing to keep or test."""
    from tally.method.methods import METHODS

    if train["epochs"] > train["warmup_epochs"]:
        return
    if METHODS[method].needs_main_phase:
        raise TallyError(f"train.warmup_epochs: expected < train.epochs ({train['epochs']}) for method "
                         f"{method!r} (it trains as itself only after the warm-up), got {train['warmup_epochs']}")
    if train["select_from"] == "main" and not train["final"]:  # a final retrain keeps its last epoch
        raise TallyError(f"train.select_from: 'main' keeps only epochs after the warm-up, but train.warmup_epochs "
                         f"({train['warmup_epochs']}) = train.epochs; use 'all' or fewer warm-up epochs")


def _validate_method(given: dict, train_seed: int) -> dict:
    """Check the method name and each parameter against the method's own defaults (their types)."""
    from tally.method.methods import METHODS

    if not isinstance(given, dict):
        raise TallyError(f"method: expected a mapping, got {given!r}")
    name = given.get("name", "tally")
    if not isinstance(name, str) or name not in METHODS:
        raise TallyError(f"method.name: expected one of {', '.join(sorted(METHODS))}, got {name!r}")
    defaults = METHODS[name].resolve_config({})
    out = {"name": name}
    for key, default in defaults.items():
        if key not in given:
            out[key] = default
            continue
        path, value = f"method.{key}", given[key]
        if key == "seed" or isinstance(default, int) and not isinstance(default, bool):
            high = SEED_MAX if key == "seed" else None
            out[key] = Field(int, None, low=0, high=high, nullable=key == "seed").check(path, value)
        elif isinstance(default, bool):
            out[key] = Field(bool, default).check(path, value)
        elif isinstance(default, float):
            # a loss re-weighting beta may be null: re-weighting off
            out[key] = Field(float, default, low=0.0, nullable=key.endswith("beta")).check(path, value)
        else:
            out[key] = value
    unknown = sorted(set(given) - set(defaults) - {"name"})
    if unknown:
        raise TallyError(f"method.{unknown[0]}: unknown field for method {name!r} "
                         f"(expected one of {', '.join(sorted(defaults))})")
    try:
        METHODS[name].check_config(out)
    except ValueError as e:
        raise TallyError(f"method.{e}") from None
    if out.get("seed", 0) is None:
        out["seed"] = train_seed  # the mixing draws repeat with the run
    return out


class _YamlLoader(yaml.SafeLoader):
    """The one YAML loader: safe (no tags, no objects); 1e-5 is a float (YAML 1.1 reads it as a string,
    and configs are full of learning rates); no aliases (a 459-byte file of nested aliases expands to
    gigabytes, and no file we write or document uses them); nesting bounded (files.MAX_DEPTH)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed",
                                              self.peek_event().start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > files.MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {files.MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def parse_yaml(text: str):
    """The one YAML reader of run configs, specs, store files and --set values (see _YamlLoader)."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no tags, no objects


def read_yaml_file(path: str | Path, what: str = "config") -> dict:
    """A YAML mapping from a file (at most files.MAX_STORE_FILE bytes), or a one-line error naming the file."""
    path = Path(path)
    try:
        raw = parse_yaml(files.read_bounded(path).decode("utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise TallyError(f"{path}: {what} file not found") from None
    except UnicodeDecodeError as e:
        raise TallyError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise TallyError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(raw, dict):
        raise TallyError(f"{path}: expected a YAML mapping, got {type(raw).__name__}")
    return raw


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what, and where (line:column)."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else what


def load(path: str | Path) -> dict:
    """Read and validate a run config file."""
    return validate(read_yaml_file(path), source=str(path))


def set_path(config: dict, dotted: str, value) -> None:
    """config['a']['b'] = value for dotted 'a.b' (searches and --set); an empty section becomes {}."""
    section, _, key = dotted.partition(".")
    if config.get(section) is None:  # `method:` left empty in YAML
        config[section] = {}
    config[section][key] = value
