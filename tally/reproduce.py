"""`tally reproduce DATASET`: the paper's fixed configuration for one dataset (no search), per setting and
seed, trained as `tally train` trains (tally.training.train_run), and the table in the paper's layout.

The fixed values are the reference's config.py (github huaxiuyao/TALLY at 5007cf0): Adam(amsgrad), 15
epochs (config.py:3, :22, ...), 7 warm-up epochs (main.py:37, never overridden), batch 18 (iWildCam 16),
and per dataset lr, weight decay, TALLY steps per epoch (iter_num), mixing alpha and the selection
metric (config.py:2-115). ResNet-50 with ImageNet weights cut after layer2 (tally.py:62, :92), 224 px
(iWildCam 448, initialize.py:16). `--protocol reference` adds what the published code also did
(tally.config.REFERENCE_PROTOCOL, docs/PROTOCOL.md), oracle selection included where it applies.

The paper's own numbers are not in this table: we did not read them in the paper itself, and a column
from memory would be worse than none (docs/PROTOCOL.md).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tally import config as config_mod
from tally import results
from tally.errors import TallyError


@dataclass(frozen=True)
class Paper:
    """One dataset's fixed configuration, and where its data and selection live."""

    name: str
    source: str
    folder: str | None  # data.dataset: the reference's list folder (data/<folder>)
    domains: tuple[str, ...]  # held-out domains of the domain setting (empty: no such setting)
    train: dict
    alpha: float
    image_size: int = 224
    f1: bool = False  # the paper reports macro F1 too (TerraIncognita, iWildCam)
    settings: tuple[str, ...] = ("sub", "domain")
    model: dict = field(default_factory=lambda: {"arch": "resnet50", "cut": "layer2", "pretrained": "imagenet"})


def _train(lr: float, wd: float, steps: int, metric: str = "pair_acc_mean", batch: int = 18) -> dict:
    return {"epochs": 15, "warmup_epochs": 7, "steps_per_epoch": steps, "batch_size": batch, "optimizer": "adam",
            "amsgrad": True, "lr": lr, "weight_decay": wd, "selection_metric": metric}


PAPERS = {p.name.lower(): p for p in (
    Paper("VLCS", "reference", "VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007"),
          _train(1e-5, 1e-6, 200), 0.2),  # config.py:78-96
    Paper("PACS", "reference", "PACS", ("art_painting", "cartoon", "photo", "sketch"),
          _train(1e-5, 1e-6, 500), 0.5),  # config.py:59-77
    Paper("OfficeHome", "reference", "officehome", ("art", "clipart", "product", "real"),
          _train(3e-5, 1e-6, 500), 0.5),  # config.py:40-58
    Paper("DomainNet", "reference", "domainnet", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
          _train(3e-5, 1e-6, 1000), 0.5),  # config.py:21-39
    Paper("TerraIncognita", "reference", "terra_incognita", (), _train(3e-5, 0.0, 1000, "macro_f1"), 0.5,
          f1=True, settings=("ood",)),  # config.py:97-115; its lists: one fixed split, suffix ood
    Paper("iWildCam", "wilds", "iwildcam", (), _train(3e-5, 0.0, 1000, "macro_f1", batch=16), 0.5,
          image_size=448, f1=True, settings=("sub",)),  # config.py:2-20
    # not the paper's: a small fixed configuration on the embedded data, minutes on a CPU (tests, docs)
    Paper("embedded", "embedded", None, ("ink", "inverted", "noisy"),
          {"epochs": 3, "warmup_epochs": 1, "steps_per_epoch": 6, "batch_size": 32, "lr": 2e-3,
           "weight_decay": 0.0, "selection_metric": "pair_acc_mean"}, 0.5, image_size=32,
          model={"arch": "resnet10", "cut": "layer2", "pretrained": None}),
)}


def paper_of(dataset: str) -> Paper:
    key = dataset.lower().replace("_", "").replace("-", "")
    aliases = {"terraincognita": "terraincognita", "officehome": "officehome", "wilds": "iwildcam"}
    found = PAPERS.get(aliases.get(key, key))
    if found is None:
        raise TallyError(f"DATASET: expected one of {', '.join(p.name for p in PAPERS.values())}, got {dataset!r}")
    return found


@dataclass(frozen=True)
class PlannedRun:
    name: str  # folder under <out>/runs
    setting: str  # sub, a held-out domain's name, or ood
    seed: int
    config: dict  # validated
    test_split: str  # the split the table reports
    selection: str  # where selection looks, in words


def plan(dataset: str, setting: str = "sub", protocol: str = "paper", seeds: int = 3,
         root: str | None = None) -> list[PlannedRun]:
    """The runs of a reproduction, validated (no data read: a dry run needs no images)."""
    paper = paper_of(dataset)
    if paper.settings == ("ood",) or paper.settings == ("sub",) and paper.source == "wilds":
        setting = paper.settings[0]  # one fixed split: --setting does not apply
    elif setting not in paper.settings:
        raise TallyError(f"--setting: expected one of {', '.join(paper.settings)} for {paper.name}, got {setting!r}")
    if paper.source != "embedded" and not root:
        root = os.environ.get("TALLY_DATA") or "${TALLY_DATA}"  # a dry run still lists the runs
    runs = []
    held = paper.domains if setting == "domain" else (None,)
    for d in held:
        for seed in range(seeds):
            data = {"source": paper.source, "root": root, "dataset": paper.folder, "image_size": paper.image_size,
                    "setting": "domain" if d else setting, "held_out": [d] if d else []}
            if paper.source == "embedded":
                data.update({"root": None, "dataset": None, "shot_many_above": 40})
            raw = {"data": data, "model": copy.deepcopy(paper.model),
                   "method": {"name": "tally", "alpha": paper.alpha, "momentum": 0.8, "fold": True,
                              "loss_beta": 0.999, "seed": seed},
                   "train": {**paper.train, "seed": seed, "protocol": protocol}}
            cfg = config_mod.validate(raw, source=f"reproduce {paper.name}")
            label = d or setting
            test_split = f"test_domain:{d}" if d else ("test_domain:ood" if setting == "ood" or paper.source == "wilds"
                                                        else "test_sub")
            runs.append(PlannedRun(f"{paper.name}-{label}-{protocol}-seed{seed}", label, seed, cfg, test_split,
                                   selection_of(cfg, paper)))
    return runs


def selection_of(cfg: dict, paper: Paper) -> str:
    """Where a run's selection looks, in words (ORACLE when it looks at test images)."""
    data, metric = cfg["data"], cfg["train"]["selection_metric"]
    if data["oracle_selection"]:
        where = ("ORACLE: the test locations (test_domain:ood)" if data["setting"] == "ood" else
                 f"ORACLE: the held-out domain's test images (test_domain:{data['held_out'][0]})")
    elif data["source"] == "wilds":
        where = ("val: WILDS' OOD validation locations (neither trained nor tested on)"
                 if data["wilds_validation"] == "ood" else "val: WILDS' in-distribution validation (id_val)")
    elif data["setting"] == "ood":
        where = "val: the 5 validation locations (out of domain, neither trained nor tested on)"
    elif data["setting"] == "domain":
        where = "val: carved from the training domains"
    else:
        where = ("val: the sub lists' validation sets (training domains)" if data["source"] == "reference"
                 else "val: balanced per (domain, class) pair, training domains")
    return f"{where}, by {metric}"


def describe(runs: list[PlannedRun]) -> str:
    cfg = runs[0].config
    switches = [f"{section}.{key} {cfg[section][key]}" for section, key in config_mod.REFERENCE_PROTOCOL]
    switches += [f"method.{key} {cfg['method'][key]}" for key in config_mod.REFERENCE_TALLY]
    lines = [f"protocol {cfg['train']['protocol']}: " + ", ".join(switches), f"{len(runs)} run(s):"]
    for r in runs:
        t = r.config["train"]
        lines.append(f"  {r.name}: {t['epochs']} epochs ({t['warmup_epochs']} warm-up), {t['steps_per_epoch']} "
                     f"TALLY steps/epoch, batch {t['batch_size']}, lr {t['lr']:g}, wd {t['weight_decay']:g}, "
                     f"alpha {r.config['method']['alpha']:g}; test {r.test_split}; selection: {r.selection}")
    return "\n".join(lines)


def run_all(runs: list[PlannedRun], out: Path) -> None:
    """Train what is not done yet, one run after another, as `tally train` does."""
    from tally.training import train_run

    for r in runs:
        run_dir = out / "runs" / r.name
        if (results.read_json(run_dir / "status.json") or {}).get("status") == "done":
            continue
        print(f"training {r.name} (selection: {r.selection})", flush=True)
        train_run(r.config, run_dir, validated=True, resume=(run_dir / "checkpoints" / "last.pt").exists())


def table(runs: list[PlannedRun], out: Path, f1: bool, replicates: int = 1000) -> pd.DataFrame:
    """Per setting: average (mean pair) and worst pair accuracy (and macro F1): the mean over seeds, its
    standard error, and each seed's 95% interval from tally.evaluation.intervals.run_intervals."""
    from tally.evaluation.intervals import run_intervals

    metrics = ["pair_acc_mean", "pair_acc_worst"] + (["macro_f1"] if f1 else [])
    rows = []
    for r in runs:
        iv = run_intervals(out / "runs" / r.name, splits=[r.test_split], replicates=replicates)
        for m in metrics:
            hit = iv[iv["metric"] == m].iloc[0]
            rows.append({"setting": r.setting, "seed": r.seed, "metric": m, "value": hit["value"],
                         "low": hit["low"], "high": hit["high"], "oracle": r.config["data"]["oracle_selection"]})
    return pd.DataFrame(rows)


def format_table(frame: pd.DataFrame, protocol: str) -> str:
    """The paper's layout: one row per setting (and their average), one column per metric."""
    names = {"pair_acc_mean": "average acc", "pair_acc_worst": "worst acc", "macro_f1": "macro F1"}
    metrics = list(dict.fromkeys(frame["metric"]))
    header = "| setting | " + " | ".join(names[m] for m in metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    settings = list(dict.fromkeys(frame["setting"]))
    for s in [*settings, *(["average"] if len(settings) > 1 else [])]:
        part = frame if s == "average" else frame[frame["setting"] == s]
        cells = []
        for m in metrics:
            rows = part[part["metric"] == m]
            if s == "average":  # per seed the mean over settings, then over seeds
                values = rows.groupby("seed")["value"].mean().tolist()
            else:
                values = rows["value"].tolist()
            mean = sum(values) / len(values)
            se = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
                  if len(values) > 1 else math.nan)
            cell = f"{mean:.3f}" + (f" ± {se:.3f}" if not math.isnan(se) else "")
            if s != "average":
                cell += " (" + ", ".join(f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(rows["low"], rows["high"],
                                                                                   strict=True)) + ")"
            cells.append(cell)
        oracle = " (ORACLE selection)" if s != "average" and part["oracle"].any() else ""
        lines.append(f"| {s}{oracle} | " + " | ".join(cells) + " |")
    return "\n".join([f"protocol {protocol}: mean ± standard error over seeds; in brackets each seed's 95% "
                      "interval (tally.evaluation.intervals)", *lines])


def reproduce(dataset: str, setting: str = "sub", protocol: str = "paper", seeds: int = 3, root: str | None = None,
              out: str | Path | None = None, dry_run: bool = False, replicates: int = 1000) -> str:
    runs = plan(dataset, setting, protocol, seeds, root)
    text = describe(runs)
    if dry_run:
        return text
    paper = paper_of(dataset)
    out = Path(out) if out else Path("results") / "reproduce" / f"{paper.name}-{runs[0].config['data']['setting']}-{protocol}"
    run_all(runs, out)
    frame = table(runs, out, paper.f1, replicates)
    results.write_parquet(out / "table.parquet", frame)
    rendered = format_table(frame, protocol)
    results.write_text(out / "table.md", rendered + "\n")
    return f"{text}\n\n{rendered}\n\nwritten: {out / 'table.md'}, {out / 'table.parquet'}"
