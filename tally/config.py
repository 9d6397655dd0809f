"""The run config: one YAML that alone reproduces a run (ARCHITECTURE.md contract 2).

Validation fills defaults and checks every field before anything runs, so a typo costs a second,
not an hour of training. Errors name the field path and what was expected.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tally.errors import TallyError

METRICS = ("acc", "macro_recall", "macro_f1", "pair_acc_mean", "pair_acc_worst", "class_acc_mean",
           "class_acc_worst", "domain_acc_mean", "domain_acc_worst")


@dataclass(frozen=True)
class Field:
    """One config value: its type, default and admissible range or choices."""

    kind: type
    default: object
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    nullable: bool = False

    def check(self, path: str, value):
        if value is None:
            if self.nullable:
                return None
            raise TallyError(f"{path}: expected {self._expected()}, got null")
        if self.kind is float:
            value = as_number(value)
            if isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
        ok = isinstance(value, self.kind) and not (self.kind is not bool and isinstance(value, bool))
        if ok and self.kind is float and not math.isfinite(value):
            ok = False
        if ok and self.choices and value not in self.choices:
            ok = False
        if ok and self.low is not None and value < self.low:
            ok = False
        if ok and self.high is not None and value > self.high:
            ok = False
        if not ok:
            raise TallyError(f"{path}: expected {self._expected()}, got {value!r}")
        return list(value) if self.kind is list else value

    def _expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                 list: "a list"}
        text = names.get(self.kind, self.kind.__name__)
        if self.low is not None and self.high is not None:
            text += f" in [{self.low}, {self.high}]"
        elif self.low is not None:
            text += f" >= {self.low}"
        return text + (" or null" if self.nullable else "")


SCHEMA: dict[str, dict[str, Field]] = {
    "data": {
        "source": Field(str, "embedded", choices=("embedded", "folder", "reference", "wilds", "csv")),
        "root": Field(str, None, nullable=True),
        "dataset": Field(str, None, nullable=True),
        # sub: subpopulation shift; domain: hold out data.held_out; ood: the reference lists' fixed
        # out-of-domain split (TerraIncognita: train, val and test locations all disjoint)
        "setting": Field(str, "sub", choices=("sub", "domain", "ood")),
        "held_out": Field(list, []),
        "split_seed": Field(int, 0, low=0),
        "imbalance": Field(str, None, choices=("exp", "step", "natural"), nullable=True),
        "imbalance_factor": Field(float, None, low=1.0, nullable=True),
        "max_per_class": Field(int, None, low=1, nullable=True),
        "n_val": Field(int, None, low=1, nullable=True),
        "n_test": Field(int, None, low=1, nullable=True),
        "image_size": Field(int, 32, low=8, high=1024),
        "flip": Field(bool, False),
        "crop_padding": Field(int, 2, low=0, high=64),
        "decode_workers": Field(int, 0, low=0),
        "oracle_selection": Field(bool, False),
        # domain setting: validation carved from the training domains (true), or (false, the reference's
        # protocol) every training-domain image trains and validation is the held-out domain (oracle)
        "carve_validation": Field(bool, True),
        # iWildCam: select on WILDS' in-distribution validation (id) or its out-of-distribution one (ood)
        "wilds_validation": Field(str, "id", choices=("id", "ood")),
        # shot buckets: many > shot_many_above, few <= shot_few_at_most training images per pair;
        # null = the dataset's thresholds (evaluation.shot_thresholds: OfficeHome, TerraIncognita differ)
        "shot_many_above": Field(int, None, low=1, nullable=True),
        "shot_few_at_most": Field(int, None, low=1, nullable=True),
    },
    "model": {
        "arch": Field(str, "resnet18", choices=("resnet10", "resnet18", "resnet34", "resnet50")),
        "cut": Field(str, "layer2", choices=("layer1", "layer2", "layer3")),
        "pretrained": Field(str, None, nullable=True),
        # which torchvision ImageNet weights 'imagenet' loads: DEFAULT (V2 for ResNet-50) or IMAGENET1K_V1
        "imagenet_weights": Field(str, "default", choices=("default", "v1")),
    },
    "train": {
        # paper: our protocol; reference: what the published code ran (PROTOCOL below, docs/PROTOCOL.md)
        "protocol": Field(str, "paper", choices=("paper", "reference")),
        "epochs": Field(int, 15, low=1),
        "warmup_epochs": Field(int, 7, low=0),
        "steps_per_epoch": Field(int, 500, low=1),
        "batch_size": Field(int, 18, low=1),
        "eval_batch_size": Field(int, 256, low=1),
        "optimizer": Field(str, "adam", choices=("adam", "adamw", "sgd")),
        "lr": Field(float, 1e-5, low=0.0),
        "weight_decay": Field(float, 1e-6, low=0.0),
        "amsgrad": Field(bool, True),
        "sgd_momentum": Field(float, 0.9, low=0.0, high=1.0),
        "seed": Field(int, 0, low=0),
        "selection_metric": Field(str, "pair_acc_mean", choices=METRICS),
        # which epochs may be kept as the best: 'main' = only after the warm-up (the reference's protocol)
        "select_from": Field(str, "main", choices=("main", "all")),
        # equal selection values: keep the earliest such epoch (ties then go to the better mean pair
        # accuracy), or the latest (the reference's `>=`, utils.py:41)
        "tie_rule": Field(str, "earliest", choices=("earliest", "latest")),
        # a final retrain (tally train --final): train on train + validation and keep the last epoch;
        # no selection, so train.epochs should be the epochs a search's trial chose
        "final": Field(bool, False),
        "device": Field(str, "auto", choices=("auto", "cpu", "cuda")),
        "bf16": Field(bool, True),
        # data-parallel runs: BatchNorm over the global batch (SyncBatchNorm, CUDA only); off = per worker
        "sync_bn": Field(bool, False),
        # the training step through torch.compile (inductor); compile_mode 'reduce-overhead' adds CUDA graphs
        "compile": Field(bool, False),
        "compile_mode": Field(str, "default", choices=("default", "reduce-overhead")),
        # CUDA: cuDNN's deterministic algorithms and no autotuning (cudnn.benchmark), slower
        "deterministic": Field(bool, False),
    },
}
SECTIONS = (*SCHEMA, "method")

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
            out[key] = Field(int, None, low=0, nullable=key == "seed").check(path, value)
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
    """YAML 1.1 reads 1e-5 (no dot) as a string; configs and specs are full of learning rates."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def parse_yaml(text: str):
    """The one YAML reader of run configs, specs and --set values: safe, and 1e-5 is a float."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no tags, no objects


def read_yaml_file(path: str | Path, what: str = "config") -> dict:
    """A YAML mapping from a file, or a one-line error naming the file."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_bytes().decode("utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise TallyError(f"{path}: {what} file not found") from None
    except UnicodeDecodeError as e:
        raise TallyError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise TallyError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise TallyError(f"{path}: expected a YAML mapping, got {type(raw).__name__}")
    return raw


def load(path: str | Path) -> dict:
    """Read and validate a run config file."""
    return validate(read_yaml_file(path), source=str(path))


def set_path(config: dict, dotted: str, value) -> None:
    """config['a']['b'] = value for dotted 'a.b' (searches and --set); an empty section becomes {}."""
    section, _, key = dotted.partition(".")
    if config.get(section) is None:  # `method:` left empty in YAML
        config[section] = {}
    config[section][key] = value


# ---------------------------------------------------------------- checks shared with search specs
def as_number(value):
    """A number given as a string (a 1e-5 that reached us through JSON or a dict) becomes a float."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def check_int(path: str, value, low: int | None, expected: str | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        text = expected or (f"an integer >= {low}" if low is not None else "an integer")
        raise TallyError(f"{path}: expected {text}, got {value!r}")
    return value


def check_number(path: str, value, expected: str) -> float | int:
    value = as_number(value)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise TallyError(f"{path}: expected {expected}, got {value!r}")
    return value


def check_section(path: str, raw, defaults: dict) -> dict:
    """A mapping with only known keys, defaults filled (null means all defaults)."""
    if raw is None:
        return copy.deepcopy(defaults)
    if not isinstance(raw, dict):
        raise TallyError(f"{path}: expected a mapping with keys {', '.join(defaults)}, got {raw!r}")
    for key in raw:
        if key not in defaults:
            raise TallyError(f"{path}.{key}: unknown key (expected one of {', '.join(defaults)})")
    return {**copy.deepcopy(defaults), **raw}
