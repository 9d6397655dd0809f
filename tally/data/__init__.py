"""Multi-domain datasets: readers, the seeded split generator, the embedded default, image banks.

Sources: embedded (default), folder (generated splits), reference (the TALLY reference's split
lists), csv (the MDLT benchmark's split CSVs), wilds (iWildCam). docs/DATASETS.md says where each
paper dataset comes from and how ``tally data prepare`` lays it out.

``load_splits(data_cfg)`` is the one entry point a training run calls; it returns
{"train", "val", "test_sub", "test_domain:<name>"...} -> MultiDomainDataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tally.data.dataset import MultiDomainDataset
from tally.errors import TallyError
from tally.schema import SCHEMA

__all__ = ["MultiDomainDataset", "load_splits", "run_splits", "final_splits", "describe", "resolve_data_cfg",
           "DATA_KEYS"]

GENERATOR_KEYS = ("imbalance", "imbalance_factor", "max_per_class", "n_val", "n_test")
# generator defaults for real folder data (the embedded data use tally.data.embedded.SPLIT_DEFAULTS)
FOLDER_DEFAULTS = {"imbalance": "exp", "imbalance_factor": 20.0, "max_per_class": None, "n_val": 10,
                   "n_test": 20}
# the data section's keys that decide the splits (the others: image size, augmentation, ... belong to the run)
DATA_KEYS = ("source", "root", "dataset", "setting", "held_out", "split_seed", *GENERATOR_KEYS, "carve_validation",
             "wilds_validation", "image_root")
# imbalance natural, a named dataset: the MDLT benchmark's (n_test, n_val) per (domain, class) pair, from
# its NUM_SAMPLES_PER_CLASS (github YyzHarry/multi-domain-imbalance, mdlt/dataset/create_mdlt_datasets.py,
# lines 18-26); min(n, n_test + n_val) images of a pair are evaluation images, a third of them validation
MDLT_EVAL_SIZES = {"vlcs": (30, 15), "pacs": (50, 25), "officehome": (10, 5), "terraincognita": (20, 10),
                   "domainnet": (40, 20)}


def mdlt_eval_sizes(dataset: str | None) -> tuple[int, int] | None:
    """(n_test, n_val) of the MDLT benchmark for a dataset name in any spelling (OfficeHome, office_home,
    officehome ...), or None for a dataset it does not define."""
    if not dataset:
        return None
    return MDLT_EVAL_SIZES.get(str(dataset).lower().replace("_", "").replace("-", ""))


def resolve_data_cfg(data_cfg: dict) -> dict:
    """The fields a split reader needs, checked, with the source's defaults filled in.

    Each field's type, choices and range are checked against the run config's schema
    (tally.schema.SCHEMA, where they are written once); the rules between fields that only the data
    layer knows are checked here, so a data section read alone (a benchmark, `tally splits`) and a
    run config (tally.config.validate calls this) meet the same rules. Errors name data.<key>.
    """
    if not isinstance(data_cfg, dict):
        raise TallyError(f"data: expected a mapping, got {data_cfg!r}")
    fields = SCHEMA["data"]
    unknown = sorted(set(data_cfg) - set(fields))
    if unknown:
        raise TallyError(f"data.{unknown[0]}: unknown field (expected one of {', '.join(fields)})")
    given = {k: str(v) if isinstance(v, Path) else v for k, v in data_cfg.items()}
    cfg = {k: fields[k].check(f"data.{k}", fields[k].default if given.get(k) is None else given[k])
           for k in DATA_KEYS}
    if not all(isinstance(h, str) and h for h in cfg["held_out"]):
        raise TallyError(f"data.held_out: expected a list of domain names, got {data_cfg['held_out']!r}")
    held = cfg["held_out"]
    if cfg["setting"] == "ood" and cfg["source"] != "reference":
        raise TallyError(f"data.setting: 'ood' reads the reference's fixed *_ood.txt lists; it needs data.source "
                         f"'reference', got {cfg['source']!r}")
    if cfg["setting"] == "domain" and not held and cfg["source"] != "wilds":
        raise TallyError("data.held_out: expected at least one domain name when data.setting is 'domain'")
    if cfg["setting"] != "domain" and held:
        raise TallyError("data.held_out: only used with data.setting 'domain'")
    if cfg["source"] != "embedded" and not cfg["root"]:
        raise TallyError(f"data.root: expected a path for data.source {cfg['source']!r}")
    if cfg["source"] == "wilds" and held:
        raise TallyError("data.held_out: iWildCam uses the WILDS split (its test locations are held out); "
                         "leave it empty")
    if cfg["source"] == "embedded":
        from tally.data.embedded import SPLIT_DEFAULTS as defaults
    else:
        defaults = FOLDER_DEFAULTS
    mdlt = mdlt_eval_sizes(cfg["dataset"]) if cfg["imbalance"] == "natural" else None
    if mdlt is not None:  # the benchmark's own sizes, each where the config does not give it
        cfg["n_test"] = mdlt[0] if cfg["n_test"] is None else cfg["n_test"]
        cfg["n_val"] = mdlt[1] if cfg["n_val"] is None else cfg["n_val"]
    for key in GENERATOR_KEYS:
        if cfg[key] is None:
            cfg[key] = defaults[key]
    from tally.data.splits import check_params

    check_params(*(cfg[k] for k in GENERATOR_KEYS))
    return cfg


def load_splits(data_cfg: dict) -> dict[str, MultiDomainDataset]:
    """The splits a training run uses, from any source; deterministic given data_cfg.

    An empty validation split is refused here, before any training: selection would have nothing
    to look at, and the run would only fail after its warm-up epochs.
    """
    splits = _read_splits(data_cfg)
    if not len(splits["val"]):
        raise TallyError(f"data: the validation split 'val' is empty ({_where(data_cfg)}); "
                         "selection needs validation images")
    return splits


def run_splits(cfg: dict) -> dict[str, MultiDomainDataset]:
    """The splits a complete run config trains and evaluates on (a final retrain's: final_splits)."""
    splits = load_splits(cfg["data"])
    return final_splits(splits) if cfg["train"].get("final") else splits


def final_splits(splits: dict[str, MultiDomainDataset]) -> dict[str, MultiDomainDataset]:
    """The splits of a final retrain (train.final): validation joins the training set and is gone as a
    split (nothing selects on it); the test splits stay as they are, never trained on."""
    train, val = splits["train"], splits["val"]
    samples = pd.concat([train.samples, val.samples], ignore_index=True)
    note = (f"final retrain: training on train ({len(train)}) + validation ({len(val)})"
            + (" (its out-of-domain validation domains become training domains)" if val.out_of_domain else ""))
    merged = MultiDomainDataset(samples, list(train.class_names), list(train.domain_names), [*train.notes, note])
    return {"train": merged, **{name: ds for name, ds in splits.items() if name not in ("train", "val")}}


def _where(data_cfg: dict) -> str:
    keys = ("source", "root", "dataset", "setting", "held_out")
    return ", ".join(f"{k} {data_cfg[k]!r}" for k in keys if data_cfg.get(k) not in (None, [], ""))


def _read_splits(data_cfg: dict) -> dict[str, MultiDomainDataset]:
    cfg = resolve_data_cfg(data_cfg)
    splits = _read_source(cfg)
    if cfg["setting"] == "domain" and not cfg["carve_validation"] and cfg["source"] != "reference":
        splits = uncarved_splits(splits)  # read_reference reads the lists' own uncarved splits
    return splits


def uncarved_splits(splits: dict[str, MultiDomainDataset]) -> dict[str, MultiDomainDataset]:
    """data.carve_validation false (the reference's protocol): the training domains' validation images
    join training, and validation is the held-out domain(s), i.e. the test images (oracle selection)."""
    train, val = splits["train"], splits["val"]
    samples = pd.concat([train.samples, val.samples], ignore_index=True)
    note = f"carve_validation false: the {len(val)} training-domain validation images train too"
    out = dict(splits)
    out["train"] = MultiDomainDataset(samples, list(train.class_names), list(train.domain_names),
                                      [*train.notes, note])
    out["val"] = held_out_validation([ds for name, ds in splits.items() if name.startswith("test_domain:")])
    return out


def held_out_validation(tests: list[MultiDomainDataset]) -> MultiDomainDataset:
    """Validation = the held-out domains' test images (the reference's domain-shift lists): ORACLE."""
    first = tests[0]
    samples = pd.concat([t.samples for t in tests], ignore_index=True)
    val = MultiDomainDataset(samples, list(first.class_names), list(first.domain_names),
                             ["validation: ORACLE, the held-out domain's test images (carve_validation false, "
                              "the reference's protocol)"])
    val.out_of_domain = True
    return val


def _read_source(cfg: dict) -> dict[str, MultiDomainDataset]:
    gen = {k: cfg[k] for k in GENERATOR_KEYS}
    source = cfg["source"]
    if source == "wilds":
        from tally.data.iwildcam import read_iwildcam

        return read_iwildcam(cfg["root"], validation=cfg["wilds_validation"])
    if source == "reference":
        from tally.data.reference import read_reference

        return read_reference(cfg["root"], cfg["dataset"], cfg["setting"], cfg["held_out"],
                              seed=cfg["split_seed"], n_val=cfg["n_val"], carve=cfg["carve_validation"],
                              image_root=cfg["image_root"])
    if source == "csv":
        from tally.data.benchmark_csv import read_csv_splits

        return read_csv_splits(cfg["root"], cfg["dataset"], cfg["setting"], cfg["held_out"])
    if source == "embedded":  # split on scans: all variants of a scan stay together
        from tally.data.embedded import embedded_splits

        return embedded_splits(cfg["root"], setting=cfg["setting"], held_out=cfg["held_out"],
                               seed=cfg["split_seed"], **gen)
    from tally.data.folder import read_folder
    from tally.data.splits import make_splits

    ds = read_folder(cfg["root"])
    return make_splits(ds, setting=cfg["setting"], held_out=cfg["held_out"], seed=cfg["split_seed"], **gen)


def describe(splits: dict[str, MultiDomainDataset], max_classes: int = 20) -> str:
    """Readable per-(domain, class) count tables, one per split (a per-domain summary when C is large)."""
    blocks = []
    for name, ds in splits.items():
        counts = ds.counts()
        present = counts.sum(1) > 0
        label = f"{name} (out of domain)" if ds.out_of_domain else name
        head = (f"{label}: {len(ds)} images, {int(present.sum())} of {len(ds.domain_names)} domains, "
                f"{int((counts.sum(0) > 0).sum())} of {len(ds.class_names)} classes")
        lines = [head, *(f"  note: {n}" for n in ds.notes)]
        if len(ds.class_names) <= max_classes:
            table = pd.DataFrame(counts, index=ds.domain_names, columns=ds.class_names)
            table["total"] = table.sum(axis=1)
            table = table[present]
        else:
            nonzero = np.where(counts > 0, counts, np.iinfo(np.int64).max)
            table = pd.DataFrame({
                "images": counts.sum(1), "classes": (counts > 0).sum(1), "max": counts.max(1),
                "min>0": np.where(present, nonzero.min(1), 0),
                "head class": [ds.class_names[i] for i in counts.argmax(1)],
            }, index=ds.domain_names)[present]
        if len(table):
            lines.extend("  " + row for row in table.to_string().splitlines())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
