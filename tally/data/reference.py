"""Reader for the reference code's split lists: LIST_DIR/<domain>_<train|val|test>_<suffix>.txt.

Each line is "<relative/path.jpg> <label>", relative to the image root (in the reference layout
ROOT/<DATASET> holds both the lists and the domain folders). The suffix is "sub" for subpopulation
shift or the held-out domain's name for domain shift. Empty files are normal (the reference writes
them for unused (domain, split) combinations); missing files count as empty.

The published lists (github huaxiuyao/TALLY, data/): folders VLCS, PACS, officehome, domainnet and
terra_incognita. TerraIncognita has one fixed split, suffix "ood" (setting ``ood``): each location is
in exactly one of train (10 locations), val (5) and test (5), so its validation is itself out of
domain; the test locations are pooled in one split, ``test_domain:ood``, as the paper reports them.

Reference defect 4: in its domain-shift lists validation is the held-out domain's data (oracle
selection). We take validation from the training domains' val lists when they are non-empty and
otherwise carve a seeded, per-pair balanced validation set out of the training domains' train lists.
Test-domain (oracle) selection stays available through the ``test_domain:<name>`` split only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tally.data.dataset import MultiDomainDataset, make_samples
from tally.errors import TallyError

SPLIT_NAMES = ("train", "val", "test")
MANIFEST = "manifest.json"
OOD_SUFFIX = "ood"
# the folder names the reference publishes its lists under (data/<folder>)
PUBLISHED = ("VLCS", "PACS", "officehome", "domainnet", "terra_incognita")


MAX_LABEL = 999_999  # a class index; a larger one would size every per-class array of a run


def leaves_root(rel: str) -> bool:
    """True when a path read from a list or CSV leaves the folder it is relative to: absolute, a drive,
    or a '..' part. The lists name images relative to the image root; one that leaves it could read any
    file the process can (a list is data, often downloaded, never trusted)."""
    where = rel.replace("\\", "/")
    return not where or where.startswith("/") or ".." in where.split("/") or (len(where) > 1 and where[1] == ":")


def parse_list(path: str | Path) -> tuple[list[str], list[int]]:
    """(relative paths, labels) of one list file; blank lines are skipped, anything else malformed fails."""
    rel, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(None, 1)
            label = parts[1] if len(parts) == 2 else ""
            if not label.isdigit():
                raise TallyError(f"{path}:{lineno}: malformed line {text!r} "
                                 "(expected '<relative/path> <non-negative integer label>')")
            if leaves_root(parts[0]):
                raise TallyError(f"{path}:{lineno}: path {parts[0]!r} leaves the image root "
                                 "(expected a relative path without '..')")
            if len(label) > len(str(MAX_LABEL)):
                raise TallyError(f"{path}:{lineno}: label {label} is not a class index (at most {MAX_LABEL})")
            rel.append(parts[0])
            labels.append(int(label))
    return rel, labels


def find_domains(list_dir: Path, suffix: str) -> list[str]:
    """Domains that have any <domain>_<split>_<suffix>.txt in list_dir, sorted."""
    found = set()
    with os.scandir(list_dir) as it:
        for e in it:
            for split in SPLIT_NAMES:
                tail = f"_{split}_{suffix}.txt"
                if e.is_file() and e.name.endswith(tail) and len(e.name) > len(tail):
                    found.add(e.name[: -len(tail)])
    return sorted(found)


def _class_names(rel_by_label: dict[int, set[str]], n_classes: int) -> list[str]:
    """Names from the class folder in the paths (<domain>/<class>/<file>) when unambiguous."""
    names = []
    for c in range(n_classes):
        folders = rel_by_label.get(c, set())
        names.append(next(iter(folders)) if len(folders) == 1 else f"class_{c}")
    return names if len(set(names)) == len(names) else [f"class_{c}" for c in range(n_classes)]


def resolve_image_root(image_root: str | Path | None, manifest: dict, list_dir: Path) -> Path:
    """The folder the lists' paths are relative to.

    The user's own data.image_root wins. Otherwise the lists decide only within their own folder: a
    manifest's image_root is honoured when it resolves inside list_dir (relative, or absolute under it),
    and without one the images sit beside the lists (reference layout). Lists are data, often someone
    else's: one naming any absolute folder would undo the refusal of '..' in their paths.
    """
    if image_root is not None:
        return Path(image_root).expanduser().resolve()
    named = manifest.get("image_root")
    if named is None:
        return list_dir
    where = (list_dir / named).resolve() if isinstance(named, str) else None  # an absolute one replaces list_dir
    if where is None or (where != list_dir and list_dir not in where.parents):
        raise TallyError(f"{list_dir / MANIFEST}: image_root {named!r} is outside the lists folder {list_dir} "
                         f"(lists may not choose where images are read from); set data.image_root: {named} "
                         "in your config if you made these lists")
    return where


def read_reference(root: str | Path, dataset: str | None, setting: str = "sub",
                   held_out: list[str] | None = None, seed: int = 0, n_val: int = 5,
                   image_root: str | Path | None = None, carve: bool = True) -> dict[str, MultiDomainDataset]:
    """Splits from reference-format lists in ROOT/<DATASET> (or ROOT itself when dataset is None).

    carve False (the reference's protocol, domain setting): train on the full train lists and validate
    on the held-out domain's lists, as the reference does (oracle selection).

    The image root: ``image_root`` (data.image_root) when given, else resolve_image_root's rule.
    """
    list_dir = Path(root).expanduser().resolve()
    if dataset:
        list_dir = list_dir / dataset
    if not list_dir.is_dir():
        hint = ""
        def key(name: str) -> str:
            return name.lower().replace("_", "")

        close = [f for f in PUBLISHED if dataset and key(f) == key(str(dataset)) and f != dataset]
        if close:
            hint = f" (the reference publishes its lists as data/{close[0]}: data.dataset {close[0]!r}?)"
        raise TallyError(f"split list folder not found: {list_dir}{hint}")
    manifest = _read_manifest(list_dir)
    image_root = resolve_image_root(image_root, manifest, list_dir)  # before anything is read through it
    held_out = list(held_out or [])
    if setting == "sub":
        suffix = "sub"
    elif setting == "ood":
        if held_out:
            raise TallyError("data.held_out: the 'ood' lists fix the train / val / test domains; leave it empty")
        suffix = OOD_SUFFIX
    elif setting == "domain":
        if not held_out:
            raise TallyError("data.held_out: expected at least one held-out domain for setting 'domain'")
        suffix = "+".join(held_out)
    else:
        raise TallyError(f"data.setting: expected 'sub', 'domain' or 'ood', got {setting!r}")

    domains = list(manifest.get("domain_names") or find_domains(list_dir, suffix))
    for d in held_out:
        if d not in domains:
            domains.append(d)
    if not find_domains(list_dir, suffix):
        hint = ""
        if manifest:
            hint = (f" (its {MANIFEST} is for setting {manifest.get('setting')!r}, "
                    f"held_out {manifest.get('held_out')})")
        raise TallyError(f"no split lists *_<train|val|test>_{suffix}.txt in {list_dir}{hint}")
    tables = {}  # (domain, split) -> (rel paths, labels)
    for d in domains:
        for split in SPLIT_NAMES:
            f = list_dir / f"{d}_{split}_{suffix}.txt"
            tables[d, split] = parse_list(f) if f.is_file() else ([], [])

    all_labels = [lab for rel, labs in tables.values() for lab in labs]
    n_classes = max(all_labels) + 1 if all_labels else 0
    absent = sorted(set(range(n_classes)) - set(all_labels))
    if absent and not manifest.get("class_names"):
        # labels index the classes; one no list uses would be a phantom class in every metric
        raise TallyError(f"{list_dir}: labels run to {n_classes - 1} but {len(absent)} of them are in no list "
                         f"(first: {absent[:3]}); labels must be 0..K-1 for K classes")
    if manifest.get("class_names"):
        class_names = list(manifest["class_names"])
        if n_classes > len(class_names):
            raise TallyError(f"{list_dir}: label {n_classes - 1} exceeds the {len(class_names)} classes "
                             f"named in {MANIFEST}")
    else:
        folders: dict[int, set[str]] = {}
        for rel, labs in tables.values():
            for r, lab in zip(rel, labs, strict=True):
                parts = r.replace("\\", "/").split("/")
                folders.setdefault(lab, set()).add(parts[-2] if len(parts) >= 2 else "")
        class_names = _class_names(folders, n_classes)
    d_index = {d: i for i, d in enumerate(domains)}

    def gather(pairs) -> MultiDomainDataset:
        paths, labels, doms = [], [], []
        for d, split in pairs:
            rel, labs = tables[d, split]
            paths.extend(str(image_root / r) for r in rel)
            labels.extend(labs)
            doms.extend([d_index[d]] * len(labs))
        return MultiDomainDataset(make_samples(paths, labels, doms), class_names, domains)

    if setting == "ood":
        return _ood_splits(tables, domains, gather, list_dir)
    if setting == "sub":
        return {"train": gather((d, "train") for d in domains),
                "val": gather((d, "val") for d in domains),
                "test_sub": gather((d, "test") for d in domains)}

    train_domains = [d for d in domains if d not in held_out]
    train = gather((d, "train") for d in train_domains)
    val = gather((d, "val") for d in train_domains)
    if not carve:
        # the reference reads every domain's val list (dataset.py, split="val"): in its domain-shift
        # lists only the held-out domain's is non-empty, so it validates on the held-out domain
        val = gather((d, "val") for d in domains)
        if not len(val):
            val = gather((d, "test") for d in held_out)
        val.out_of_domain = True
        val.notes.append("validation: ORACLE, every domain's val list as the reference reads it (the held-out "
                         "domain's images; carve_validation false)")
    elif len(val):
        val.notes.append("validation: the training domains' val lists (not the held-out domain)")
    else:
        train, val = carve_validation(train, n_val, seed)
        val.notes.append(f"validation: carved from the training domains' train lists, up to {n_val} per "
                         f"(domain, class) pair, seed {seed} (the reference would validate on the "
                         "held-out domain)")
    out = {"train": train, "val": val}
    test_sub = gather((d, "test") for d in train_domains)
    if len(test_sub):
        out["test_sub"] = test_sub
    for d in held_out:
        test = gather([(d, "test")])
        if not len(test):  # the reference generator puts the held-out domain's images in its val list
            test = gather([(d, "val")])
        if not len(test):
            raise TallyError(f"no test images for held-out domain {d!r}: {d}_test_{suffix}.txt and "
                             f"{d}_val_{suffix}.txt in {list_dir} are empty or missing")
        out[f"test_domain:{d}"] = test
    return out


def _ood_splits(tables: dict, domains: list[str], gather, list_dir: Path) -> dict[str, MultiDomainDataset]:
    """The fixed out-of-domain split: every domain's images in one split only (train, val or test)."""
    role: dict[str, str] = {}
    for d in domains:
        used = [split for split in SPLIT_NAMES if tables[d, split][0]]
        if len(used) > 1:
            raise TallyError(f"{list_dir}: {d} has images in both {d}_{used[0]}_{OOD_SUFFIX}.txt and "
                             f"{d}_{used[1]}_{OOD_SUFFIX}.txt; an out-of-domain split keeps each domain in one")
        if used:
            role[d] = used[0]
    by_role = {split: [d for d in domains if role.get(d) == split] for split in SPLIT_NAMES}
    for split in SPLIT_NAMES:
        if not by_role[split]:
            raise TallyError(f"{list_dir}: every *_{split}_{OOD_SUFFIX}.txt is empty or missing")
    out = {"train": gather((d, "train") for d in by_role["train"]),
           "val": gather((d, "val") for d in by_role["val"]),
           "test_domain:ood": gather((d, "test") for d in by_role["test"])}
    def named(role: str) -> str:
        return f"{len(by_role[role])} domain(s): {', '.join(by_role[role])}"

    out["train"].notes.append(f"train: {named('train')}")
    out["val"].out_of_domain = True
    out["val"].notes.append(f"validation: OUT OF DOMAIN, {named('val')}, neither trained nor tested on "
                            "(the lists' fixed split)")
    out["test_domain:ood"].notes.append(f"test: held-out {named('test')}, pooled")
    return out


def carve_validation(train: MultiDomainDataset, n_val: int, seed: int):
    """Move up to n_val images of each (domain, class) pair to validation, keeping >= half in train."""
    from tally.data.splits import rank_within_pairs

    rng = np.random.Generator(np.random.PCG64(seed))
    rank, count = rank_within_pairs(train, rng)
    take = np.minimum(n_val, count // 2)
    is_val = rank < take
    return train.subset(~is_val), train.subset(is_val)


def _read_manifest(list_dir: Path) -> dict:
    path = list_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TallyError(f"cannot read {path}: {e}") from None
