"""Reader for the MDLT benchmark's published split CSVs (Yang et al. 2022, BoDA).

Source: github YyzHarry/multi-domain-imbalance, mdlt/dataset/split/<Name>.csv, with columns
env, label, path, split (train | val | test). ``path`` is relative to the dataset's folder in
DomainBed's download layout (e.g. ``Art/Alarm_Clock/00044.jpg`` under ``office_home``), where the
benchmark also keeps the CSV (ROOT/office_home/OfficeHome.csv). Reading the same rows lets results
stand beside that benchmark's: its val / test are balanced per (domain, class) pair and train keeps
the dataset's natural imbalance (``imbalance: natural`` generates splits the same way).

Domains are the sorted env names and label i is the i-th sorted class folder, as the benchmark
builds them. With ``setting: domain`` the held-out domains are tested on all their rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from tally.data.dataset import MultiDomainDataset, make_samples
from tally.data.reference import MAX_LABEL, leaves_root
from tally.errors import TallyError

# benchmark name -> its folder under ROOT (DomainBed's names); the CSV is ROOT/<folder>/<name>.csv
FOLDERS = {"VLCS": "VLCS", "PACS": "PACS", "OfficeHome": "office_home", "TerraIncognita": "terra_incognita",
           "DomainNet": "domain_net"}
COLUMNS = ("env", "label", "path", "split")
SPLITS = {"train": "train", "val": "val", "test": "test_sub"}


def csv_location(root: str | Path, dataset: str | None) -> tuple[Path, Path]:
    """(CSV file, image folder) for a benchmark name, or for a .csv path (relative to root) beside its images."""
    root = Path(root).expanduser().resolve()
    if dataset and str(dataset).endswith(".csv"):
        if leaves_root(str(dataset)):
            raise TallyError(f"data.dataset: {dataset!r} leaves data.root (expected a .csv path relative to it, "
                             "without '..')")
        csv = (root / dataset).resolve()
        return csv, csv.parent
    if dataset not in FOLDERS:
        raise TallyError(f"data.dataset: expected one of {', '.join(FOLDERS)} or a .csv path for data.source "
                         f"'csv', got {dataset!r}")
    image_dir = root / FOLDERS[dataset]
    return image_dir / f"{dataset}.csv", image_dir


def read_table(csv: Path) -> pd.DataFrame:
    """The CSV's rows, checked: the four columns, integer labels >= 0, split in train / val / test."""
    try:
        df = pd.read_csv(csv, dtype={"env": str, "path": str, "split": str}, keep_default_na=False)
    except FileNotFoundError:
        raise TallyError(f"split CSV not found: {csv}") from None
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise TallyError(f"cannot read {csv}: {e}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise TallyError(f"{csv}: missing column {missing[0]!r} (expected columns {', '.join(COLUMNS)})")
    if not len(df):
        raise TallyError(f"{csv}: no rows")
    labels = pd.to_numeric(df["label"], errors="coerce")
    bad = labels.isna() | (labels < 0) | (labels != labels.round()) | (labels > MAX_LABEL)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise TallyError(f"{csv}: row {row + 2}: label {str(df['label'].iat[row])!r} is not a class index "
                         f"(an integer in [0, {MAX_LABEL}])")
    paths = df["path"].str.replace("\\", "/", regex=False)
    outside = (paths.eq("") | paths.str.startswith("/") | paths.str.match(r"^[A-Za-z]:")
               | ("/" + paths + "/").str.contains("/../", regex=False))
    if outside.any():  # the same rule as the reference lists' (reference.leaves_root), vectorised
        row = int(np.flatnonzero(outside.to_numpy())[0])
        raise TallyError(f"{csv}: row {row + 2}: path {df['path'].iat[row]!r} leaves the image folder "
                         "(expected a relative path without '..')")
    bad_split = ~df["split"].isin(list(SPLITS))
    if bad_split.any():
        row = int(np.flatnonzero(bad_split.to_numpy())[0])
        raise TallyError(f"{csv}: row {row + 2}: split {df['split'].iat[row]!r} is not one of "
                         f"{', '.join(SPLITS)}")
    return df.assign(label=labels.astype(np.int64))


def read_csv_splits(root: str | Path, dataset: str | None, setting: str = "sub",
                    held_out: list[str] | None = None) -> dict[str, MultiDomainDataset]:
    """{"train", "val", "test_sub"} (+ "test_domain:<d>" per held-out domain) from one split CSV."""
    from tally.data.reference import _class_names

    csv, image_dir = csv_location(root, dataset)
    df = read_table(csv)
    held_out = list(held_out or [])
    domains = sorted(df["env"].unique().tolist())
    unknown = [d for d in held_out if d not in domains]
    if unknown:
        raise TallyError(f"data.held_out: unknown domain {unknown[0]!r}; domains in {csv.name}: "
                         f"{', '.join(domains)}")
    if setting not in ("sub", "domain"):
        raise TallyError(f"data.setting: expected 'sub' or 'domain' for data.source 'csv', got {setting!r}")
    n_classes = int(df["label"].max()) + 1
    folders: dict[int, set[str]] = {}
    for label, path in zip(df["label"].tolist(), df["path"].tolist(), strict=True):
        parts = path.replace("\\", "/").split("/")
        folders.setdefault(label, set()).add(parts[-2] if len(parts) >= 2 else "")
    class_names = _class_names(folders, n_classes)
    domain = df["env"].map({d: i for i, d in enumerate(domains)}).to_numpy(dtype=np.int64)
    paths = (str(image_dir) + os.sep + df["path"]).tolist()
    full = MultiDomainDataset(make_samples(paths, df["label"].to_numpy(), domain), class_names, domains)
    full.notes.append(f"MDLT split CSV {csv}")

    held = df["env"].isin(held_out).to_numpy()
    split = df["split"].to_numpy()
    out = {name: full.subset((split == value) & ~held) for value, name in SPLITS.items()}
    for d in held_out:
        test = full.subset(df["env"].to_numpy() == d)  # every row of the held-out domain
        test.notes.append(f"held-out domain {d}: all {len(test)} of its rows (train, val and test)")
        out[f"test_domain:{d}"] = test
    return out
