"""`tally splits make` and `tally data show|cache|prepare`: registered on the main parser by tally/cli.py.

Handlers return an exit code and raise TallyError for user mistakes (the main CLI prints it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _names(values: list[str] | None) -> list[str]:
    """Repeatable, comma-separable name flags (--held-out, --domains)."""
    return [v for item in values or [] for v in item.split(",") if v]


def _generator_args(p: argparse.ArgumentParser, settings=("sub", "domain")) -> None:
    p.add_argument("--setting", choices=settings, default=None,
                   help="sub: subpopulation shift; domain: hold out --held-out domains"
                        + ("; ood: the reference lists' fixed out-of-domain split" if "ood" in settings else ""))
    p.add_argument("--held-out", action="append", metavar="DOMAIN", help="held-out domain (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default 0)")
    p.add_argument("--imbalance", choices=("exp", "step", "natural"), default=None,
                   help="train's long tail; natural: all images not in val/test (MDLT protocol)")
    p.add_argument("--imbalance-factor", type=float, default=None, help="head/tail count ratio (>= 1)")
    p.add_argument("--max-per-class", type=int, default=None, help="train images of a head class")
    p.add_argument("--n-val", type=int, default=None, help="validation images per (domain, class) pair")
    p.add_argument("--n-test", type=int, default=None, help="test images per (domain, class) pair")


def add_commands(subparsers) -> None:
    """Register `splits make` and `data show` on the main CLI's subparsers."""
    splits = subparsers.add_parser("splits", help="generate seeded multi-domain long-tailed splits")
    splits_sub = splits.add_subparsers(dest="splits_command", required=True)
    make = splits_sub.add_parser(
        "make", help="write reference-format split lists + manifest.json for a folder-layout dataset",
        description="Reads ROOT/<domain>/<class>/<image>, draws seeded splits and writes "
                    "<domain>_<train|val|test>_<suffix>.txt (paths relative to ROOT) and manifest.json "
                    "into OUT (atomically). Read them back with data source 'reference', root OUT, image_root "
                    "ROOT (printed as config lines).")
    make.add_argument("root", help="folder-layout dataset ROOT/<domain>/<class>/<image>")
    make.add_argument("--out", required=True, help="folder to write the lists into (replaced if it holds lists)")
    make.add_argument("--domains", action="append", metavar="DOMAIN", help="use only these domains")
    _generator_args(make)
    make.set_defaults(func=_splits_make)

    data = subparsers.add_parser("data", help="inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    show = data_sub.add_parser("show", help="print per-(domain, class) counts of each split")
    show.add_argument("--config", help="a run config YAML: its data section is used (flags override)")
    show.add_argument("--source", choices=("embedded", "folder", "reference", "wilds", "csv"), default=None)
    show.add_argument("--root", default=None)
    show.add_argument("--image-root", default=None,
                      help="reference: the folder the lists' paths are relative to (your choice, not the lists')")
    show.add_argument("--dataset", default=None,
                      help="reference: subfolder of ROOT holding the lists; csv: benchmark name or .csv path")
    _generator_args(show, ("sub", "domain", "ood"))
    show.set_defaults(func=_data_show)

    cache = data_sub.add_parser(
        "cache", help="pre-decode a config's images into a resized uint8 cache that training then uses",
        description="Decodes and resizes every image of every split of a run config (or a search spec's "
                    "base) once, into memory-mapped uint8 arrays under --cache-dir (default "
                    "$TALLY_CACHE/banks). Training finds them by the sample list and image size.")
    cache.add_argument("config", help="a run config or search spec YAML")
    cache.add_argument("--workers", type=int, default=2, help="decoding processes")
    cache.add_argument("--cache-dir", default=None)
    cache.set_defaults(func=_data_cache)

    prep = data_sub.add_parser(
        "prepare", help="link a downloaded dataset into the layout the reference's split lists expect",
        description="Links every image the lists of DATASET (VLCS, PACS, officehome, domainnet, "
                    "terra_incognita) name, from a download (DomainBed's script, or the reference's own "
                    "layout) at --from, into ROOT/<DATASET>/<domain>/<class>/<file> (symbolic links; "
                    "nothing is written outside ROOT). Prints the per-(domain, class) counts of the listed "
                    "images, then fails (exit 2) if any listed image is missing. docs/DATASETS.md has the "
                    "commands for each dataset.")
    prep.add_argument("dataset", metavar="DATASET", help="VLCS, PACS, officehome, domainnet or terra_incognita")
    prep.add_argument("--from", dest="source", required=True, metavar="DIR",
                      help="the download: the dataset's folder or its parent (e.g. DomainBed's data dir)")
    prep.add_argument("--out", required=True, metavar="ROOT", help="data root ($TALLY_DATA): ROOT/<DATASET>")
    prep.add_argument("--lists", default=None, metavar="DIR",
                      help="the reference's lists (a TALLY checkout, its data/ or data/<DATASET>): copied "
                           "into ROOT/<DATASET>; without it they must already be there")
    prep.set_defaults(func=_data_prepare)


def _gen_values(args) -> dict:
    values = {"imbalance": args.imbalance, "imbalance_factor": args.imbalance_factor,
              "max_per_class": args.max_per_class, "n_val": args.n_val, "n_test": args.n_test}
    return {k: v for k, v in values.items() if v is not None}


def _splits_make(args) -> int:
    from tally.data import FOLDER_DEFAULTS, describe
    from tally.data.splits import generate

    params = {**FOLDER_DEFAULTS, **_gen_values(args)}
    setting = args.setting or ("domain" if args.held_out else "sub")
    out, splits = generate(args.root, args.out, setting=setting, held_out=_names(args.held_out),
                           seed=args.seed or 0, domains=_names(args.domains) or None, **params)
    print(describe(splits), end="")
    print(f"wrote {out} (manifest.json records the seed, parameters, counts and sha256 of every list)")
    print(read_back_config(out, args.root, setting, _names(args.held_out)), end="")
    return 0


def read_back_config(out, image_root, setting: str, held_out: list[str]) -> str:
    """The run config's data lines that read written lists back: image_root is given by the user, since
    the manifest's own image_root is honoured only inside the lists folder (tally.data.reference)."""
    def path(p) -> str:
        return json.dumps(str(Path(p).expanduser().resolve()))  # a JSON string is a YAML string

    lines = ["to read them back, in a run config:", "data:", "  source: reference", f"  root: {path(out)}",
             f"  image_root: {path(image_root)}", f"  setting: {setting}"]
    if held_out:
        lines.append(f"  held_out: {json.dumps(held_out)}")
    return "\n".join(lines) + "\n"


def _data_show(args) -> int:
    from tally.data import describe, load_splits

    cfg: dict = {}
    if args.config:
        from tally.config import read_yaml_file  # the one YAML reader

        raw = read_yaml_file(args.config)
        cfg = dict(raw.get("data") or {})
    flags = {"source": args.source, "root": args.root, "image_root": args.image_root, "dataset": args.dataset,
             "split_seed": args.seed, **_gen_values(args)}
    cfg.update({k: v for k, v in flags.items() if v is not None})
    if args.held_out:
        cfg["held_out"] = _names(args.held_out)
        cfg["setting"] = args.setting or "domain"
    elif args.setting:
        cfg["setting"] = args.setting
        if args.setting != "domain":
            cfg["held_out"] = []
    print(describe(load_splits(cfg)), end="")
    return 0


def _data_cache(args) -> int:
    import time

    from tally.config import read_yaml_file, validate
    from tally.data import load_splits
    from tally.data.bank import cached_bank, default_cache_dir

    raw = read_yaml_file(args.config)
    cfg = validate(raw["base"] if "base" in raw and "space" in raw else raw, source=args.config)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    size = cfg["data"]["image_size"]
    for name, ds in load_splits(cfg["data"]).items():
        started = time.perf_counter()
        bank = cached_bank(ds, size, cache_dir, workers=args.workers)
        print(f"{name:>22s}: {len(bank):7d} images at {size}px, {bank.images.numel() / 2**20:8.1f} MiB "
              f"({time.perf_counter() - started:.1f}s)")
    print(f"cache: {cache_dir}")
    return 0


def _data_prepare(args) -> int:
    from tally.data.prepare import pair_table, prepare
    from tally.errors import TallyError

    report = prepare(args.dataset, args.source, args.out, args.lists)
    print(pair_table(report), end="")
    for suffix, counts in sorted(report.totals.items()):
        print(f"lists *_{suffix}.txt: " + ", ".join(f"{k} {counts[k]}" for k in ("train", "val", "test")))
    print(f"{report.folder}: {len(report.listed)} listed images, {report.linked} linked now, "
          f"{report.present} already there, {len(report.missing)} missing (source {report.source})")
    if report.missing:
        first = ", ".join(report.missing[:3])
        raise TallyError(f"{len(report.missing)} of {len(report.listed)} listed images are missing from "
                         f"{report.source} (first: {first}){report.hint}")
    return 0
