"""The run config: defaults, one-line errors naming the field, the one YAML reader, property tests."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally import config
from tally.errors import TallyError


def test_defaults_fill_every_section_and_validation_is_idempotent():
    cfg = config.validate({})
    assert set(cfg) == {"data", "model", "method", "train"}
    assert cfg["train"]["epochs"] == 15 and cfg["train"]["warmup_epochs"] == 7  # the reference's schedule
    assert cfg["method"]["name"] == "tally" and cfg["method"]["seed"] == cfg["train"]["seed"]
    assert config.validate(cfg) == cfg


@pytest.mark.parametrize(("raw", "message"), [
    ({"trian": {}}, "trian: unknown section"),
    ({"train": {"epoch": 3}}, "train.epoch: unknown field"),
    ({"train": {"epochs": 0}}, "train.epochs: expected an integer >= 1, got 0"),
    ({"train": {"seed": 1e23}}, "train.seed: expected an integer"),
    ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
    ({"train": {"lr": float("nan")}}, "train.lr: expected a number"),
    ({"train": {"bf16": "yes"}}, "train.bf16: expected true or false"),
    ({"train": {"epochs": 3, "warmup_epochs": 4}}, "train.warmup_epochs: expected <= train.epochs"),
    ({"model": {"arch": "vit"}}, "model.arch: expected one of"),
    ({"model": {"pretrained": "/no/such/weights.pt"}}, "model.pretrained: no weights file at"),
    ({"model": {"arch": "resnet10", "pretrained": "imagenet"}}, "model.pretrained: 'imagenet' weights"),
    ({"method": {"name": ["tally"]}}, "method.name: expected one of"),
    ({"method": {"name": "tally", "alpah": 1}}, "method.alpah: unknown field for method 'tally'"),
    ({"data": {"source": "ftp"}}, "data.source"),
    ({"data": {"source": "folder"}}, "data.root: expected a path"),
    ({"data": {"setting": "domain"}}, "data.held_out: expected at least one domain"),
    ([1, 2], "config: expected a mapping"),
])
def test_errors_name_the_field(raw, message):
    with pytest.raises(TallyError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config.validate(raw)


def test_numbers_written_as_strings_are_numbers():
    cfg = config.validate({"train": {"lr": "3e-4", "weight_decay": 0}})
    assert cfg["train"]["lr"] == 3e-4 and isinstance(cfg["train"]["weight_decay"], float)


def test_one_yaml_reader_reads_1e_5_as_a_float_and_refuses_tags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 1e-5, epochs: 3, warmup_epochs: 1}\n")
    assert config.load(path)["train"]["lr"] == 1e-5
    assert config.parse_yaml("1e-5") == 1e-5 and config.parse_yaml("'1e-5'") == "1e-5"
    path.write_text("train: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(TallyError, match="not valid YAML"):
        config.read_yaml_file(path)
    path.write_bytes(b"train: {lr: \xff}\n")
    with pytest.raises(TallyError, match="c.yaml: not UTF-8 text"):
        config.read_yaml_file(path)
    path.write_text("- a\n")
    with pytest.raises(TallyError, match="c.yaml: expected a YAML mapping, got list"):
        config.read_yaml_file(path)
    with pytest.raises(TallyError, match="missing.yaml: config file not found"):
        config.read_yaml_file(tmp_path / "missing.yaml")


def test_set_path_fills_an_empty_section():
    raw = {"method": None}
    config.set_path(raw, "method.alpha", 0.3)
    config.set_path(raw, "train.epochs", 2)
    assert raw == {"method": {"alpha": 0.3}, "train": {"epochs": 2}}


# Any value in any field: validation returns a complete config that validates to itself, or raises
# TallyError naming that field; never another exception (a traceback instead of one line).
# Integers reach far past 64 bits (and cluster at the bounds numpy, torch and Optuna take): a value
# validation lets through must be one the run can use.
EDGES = [2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64, 10**30]
INTEGERS = st.one_of(st.integers(-10**30, 10**30), st.integers(-(2**300), 2**300),
                     st.sampled_from(EDGES).flatmap(lambda e: st.sampled_from([e - 1, e, e + 1, -e])))
VALUES = st.one_of(st.none(), st.booleans(), INTEGERS, st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(0, 3), max_size=3),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
FIELDS = [(section, name) for section, fields in config.SCHEMA.items() for name in fields] + [
    ("method", "alpha"), ("method", "momentum"), ("method", "loss_beta"), ("method", "fold"), ("method", "name")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_any_value_in_any_field_validates_or_names_the_field(field, value):
    section, name = field
    try:
        cfg = config.validate({section: {name: value}})
    except TallyError as e:
        assert str(e).startswith(f"{section}.") and "\n" not in str(e)
    else:
        assert config.validate(cfg) == cfg
        _usable(cfg)


def _usable(cfg: dict) -> None:
    """Every integer a validated config holds fits numpy's int64, and every seed seeds what it feeds."""
    import numpy as np
    import optuna
    import torch

    from tally.training.distributed import stream_seed

    for section in ("data", "train", "method"):
        for value in cfg[section].values():
            if isinstance(value, int) and not isinstance(value, bool):
                np.array([value], dtype=np.int64)  # OverflowError beyond 64 bits
    for seed in (cfg["train"]["seed"], cfg["method"]["seed"], cfg["data"]["split_seed"]):
        torch.manual_seed(seed)
        torch.Generator().manual_seed(stream_seed(seed, 0, "augment"))
        np.random.default_rng(seed)
        optuna.samplers.TPESampler(seed=seed)  # a run's seed may seed a search


@pytest.mark.parametrize("data", [
    {"source": "nope"}, {"setting": "ood"}, {"split_seed": -1}, {"setting": "domain", "held_out": [""]},
    {"source": "folder"}, {"imbalance_factor": 0.5}, {"held_out": "photo"}, {"root": 3, "source": "folder"},
    {"n_val": 0}, {"colour": True}, {"setting": "domain", "held_out": "photo"},
], ids=str)
def test_a_data_section_meets_the_same_rules_alone_and_in_a_run_config(data):
    """The data layer (a benchmark's or `tally splits`' data section) and the run config check the data
    fields once, with one message: the types in config.SCHEMA, the rules between fields in tally.data."""
    from tally.data import resolve_data_cfg

    with pytest.raises(TallyError) as alone:
        resolve_data_cfg(data)
    with pytest.raises(TallyError) as in_config:
        config.validate({"data": data})
    assert str(alone.value) == str(in_config.value) and str(alone.value).startswith("data.")


INT_FIELDS = [(section, name) for section, fields in config.SCHEMA.items() for name, f in fields.items()
              if f.kind is int] + [("method", "seed")]


@pytest.mark.parametrize("field", INT_FIELDS, ids=".".join)
@pytest.mark.parametrize("value", [2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64, 10**30])
def test_every_integer_field_refuses_what_numpy_torch_or_optuna_cannot_take(field, value):
    """The bounds, hit deterministically (the property test above finds them only by chance)."""
    section, name = field
    try:
        cfg = config.validate({section: {name: value}})
    except TallyError as e:
        assert str(e).startswith(f"{section}.{name}: ") and "\n" not in str(e)
    else:
        _usable(cfg)
