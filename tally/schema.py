"""The run config's schema: every field's type, default and admissible range, written once.

tally.config validates a run config against it, tally.data a data section read alone (a benchmark,
`tally splits`) against its data part; search and benchmark specs use the shared checks below. A module
of its own so that tally.config and tally.data both import it and not each other.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

from tally.errors import TallyError

# Validation metrics a search, a benchmark or a run's kept epoch may be selected on; this block is the one
# place their directions are defined (selection, Optuna's directions, ASHA and the dashboard read mode_of).
# Accuracy-like metrics come from the per-(domain, class) table (evaluation/metrics.py): higher is better.
METRICS = ("acc", "macro_recall", "macro_f1", "pair_acc_mean", "pair_acc_worst", "class_acc_mean",
           "class_acc_worst", "domain_acc_mean", "domain_acc_worst")
# Calibration and selective prediction (evaluation/calibration.py), from the validation logits BEFORE
# temperature scaling: T is fitted on those same validation images, so a `ts_` value there would be
# in-sample (optimistic), and no selection may use one. Lower is better for every ECE, Brier, NLL and
# AURC; higher for the accuracies at a coverage.
CALIBRATION_METRICS = ("ece", "ece_worst_domain", "ece_worst_class", "brier", "nll", "aurc", "acc_at_cov90",
                       "acc_at_cov80", "ece_shot_many", "ece_shot_medium", "ece_shot_few", "ece_shot_zero")
HIGHER_IS_BETTER_CALIBRATION = ("acc_at_cov90", "acc_at_cov80")
SELECTION_METRICS = METRICS + CALIBRATION_METRICS
TEMPERATURE_PREFIX = "ts_"  # a metric after temperature scaling (calibration.TS_PREFIX)


def mode_of(metric: str) -> str:
    """'max' or 'min': which way a metric is better. Takes a name ('ece'), a column ('val/ece') or a
    temperature-scaled or per-group calibration name ('ts_ece', 'ece_domain:photo'); every name outside
    the calibration metrics (accuracies, F1, recall, shot-bucket accuracies) is higher-is-better."""
    name = metric.rsplit("/", 1)[-1].removeprefix(TEMPERATURE_PREFIX)
    if name in HIGHER_IS_BETTER_CALIBRATION:
        return "max"
    lower = name in CALIBRATION_METRICS or name.startswith("ece")
    return "min" if lower else "max"


# One rule for every integer field: it fits a 64-bit integer (numpy and torch index, count and seed with
# int64; a larger one ends deep inside them). Seeds are narrower: Optuna's samplers and numpy's legacy
# RandomState take seeds below 2**32 (torch.manual_seed takes < 2**64, numpy's SeedSequence any size),
# and one bound for every seed keeps a seed valid in one place valid in all (a benchmark's seed becomes
# a run's train.seed, a run's train.seed a search's base).
INT_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1
# a batch beyond this is no device's: refused here rather than as an allocation error mid-run
BATCH_MAX = 2**20


@dataclass(frozen=True)
class Field:
    """One config value: its type, default and admissible range or choices (an int's high is at most INT_MAX)."""

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
        if ok and self._high() is not None and value > self._high():
            ok = False
        if not ok:
            raise TallyError(f"{path}: expected {self._expected(value)}, got {value!r}")
        return list(value) if self.kind is list else value

    def _high(self):
        return min(self.high, INT_MAX) if self.kind is int and self.high is not None else (
            INT_MAX if self.kind is int else self.high)

    def _expected(self, value=None) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                 list: "a list"}
        text = names.get(self.kind, self.kind.__name__)
        # the implicit 64-bit bound is named only to a value beyond it: "an integer >= 1" reads better
        too_big = isinstance(value, int) and self._high() is not None and value > self._high()
        high = self._high() if self.high is not None or too_big else None
        if self.low is not None and high is not None:
            text += f" in [{self.low}, {high}]"
        elif self.low is not None:
            text += f" >= {self.low}"
        elif high is not None:
            text += f" <= {high}"
        return text + (" or null" if self.nullable else "")


SCHEMA: dict[str, dict[str, Field]] = {
    "data": {
        "source": Field(str, "embedded", choices=("embedded", "folder", "reference", "wilds", "csv")),
        "root": Field(str, None, nullable=True),
        # reference lists: the folder their paths are relative to, the user's own choice; a lists
        # manifest may only name a folder inside the lists folder (tally.data.reference.resolve_image_root)
        "image_root": Field(str, None, nullable=True),
        "dataset": Field(str, None, nullable=True),
        # sub: subpopulation shift; domain: hold out data.held_out; ood: the reference lists' fixed
        # out-of-domain split (TerraIncognita: train, val and test locations all disjoint)
        "setting": Field(str, "sub", choices=("sub", "domain", "ood")),
        "held_out": Field(list, []),
        "split_seed": Field(int, 0, low=0, high=SEED_MAX),
        "imbalance": Field(str, None, choices=("exp", "step", "natural"), nullable=True),
        "imbalance_factor": Field(float, None, low=1.0, nullable=True),
        "max_per_class": Field(int, None, low=1, nullable=True),
        "n_val": Field(int, None, low=1, nullable=True),
        "n_test": Field(int, None, low=1, nullable=True),
        "image_size": Field(int, 32, low=8, high=1024),
        "flip": Field(bool, False),
        "crop_padding": Field(int, 2, low=0, high=64),
        "decode_workers": Field(int, 0, low=0, high=1024),
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
        # paper: our protocol; reference: what the published code ran (config.REFERENCE_PROTOCOL, docs/PROTOCOL.md)
        "protocol": Field(str, "paper", choices=("paper", "reference")),
        "epochs": Field(int, 15, low=1),
        "warmup_epochs": Field(int, 7, low=0),
        "steps_per_epoch": Field(int, 500, low=1),
        "batch_size": Field(int, 18, low=1, high=BATCH_MAX),
        "eval_batch_size": Field(int, 256, low=1, high=BATCH_MAX),
        "optimizer": Field(str, "adam", choices=("adam", "adamw", "sgd")),
        "lr": Field(float, 1e-5, low=0.0),
        "weight_decay": Field(float, 1e-6, low=0.0),
        "amsgrad": Field(bool, True),
        "sgd_momentum": Field(float, 0.9, low=0.0, high=1.0),
        "seed": Field(int, 0, low=0, high=SEED_MAX),
        "selection_metric": Field(str, "pair_acc_mean", choices=SELECTION_METRICS),
        # which epochs may be kept as the best: 'main' = only after the warm-up (the reference's protocol);
        # 'last' = no early stopping, the last epoch is kept (a tuned benchmark's leave-one-domain-out rule)
        "select_from": Field(str, "main", choices=("main", "all", "last")),
        # equal selection values: keep the earliest such epoch (ties then go to the better mean pair
        # accuracy), or the latest (the reference's `>=`, utils.py:41)
        "tie_rule": Field(str, "earliest", choices=("earliest", "latest")),
        # a final retrain (tally train --final): train on train + validation and keep the last epoch;
        # no selection, so train.epochs should be the epochs a search's trial chose
        "final": Field(bool, False),
        "device": Field(str, "auto", choices=("auto", "cpu", "cuda")),
        "bf16": Field(bool, True),
        # data-parallel runs: BatchNorm over the global batch (SyncBatchNorm, CUDA only); false = per worker;
        # null = on with CUDA, off with a warning on CPU (tally.training.distributed.use_sync_batchnorm)
        "sync_bn": Field(bool, None, nullable=True),
        # the training step through torch.compile (inductor); compile_mode 'reduce-overhead' adds CUDA graphs
        "compile": Field(bool, False),
        "compile_mode": Field(str, "default", choices=("default", "reduce-overhead")),
        # CUDA: cuDNN's deterministic algorithms and no autotuning (cudnn.benchmark), slower
        "deterministic": Field(bool, False),
    },
}
SECTIONS = (*SCHEMA, "method")


# ---------------------------------------------------------------- checks shared with search and benchmark specs
def as_number(value):
    """A number given as a string (a 1e-5 that reached us through JSON or a dict) becomes a float."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def check_int(path: str, value, low: int | None, expected: str | None = None, high: int = INT_MAX) -> int:
    """An integer in [low, high] (high at most INT_MAX: numpy and torch take no larger), or a one-line error."""
    high = min(high, INT_MAX)
    if (not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low)
            or value > high):
        if expected is None:
            bound = f" in [{low}, {high}]" if low is not None else f" <= {high}"
            named = high != INT_MAX or (isinstance(value, int) and value > high)
            expected = "an integer" + (bound if named else f" >= {low}" if low is not None else "")
        elif isinstance(value, int) and not isinstance(value, bool) and value > high:
            expected += f" <= {high}"
        raise TallyError(f"{path}: expected {expected}, got {value!r}")
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
