"""`tally data prepare`: lay a downloaded dataset out the way the reference's split lists expect.

The lists (github huaxiuyao/TALLY, data/<folder>/<domain>_<train|val|test>_<suffix>.txt) name
images as <domain>/<class>/<file> relative to ROOT/<folder>. Downloads differ from that only in
names: DomainBed's script writes office_home/"Real World"/Bed/00059.jpg where the lists say
officehome/real/bed/00059.png, and PACS / VLCS / domain_net / terra_incognita under their own folder
names. So each listed path is matched against the download by folder names compared without case
(and the domain aliases below) and by file stem, and linked: ROOT/<folder>/<listed path> -> the
downloaded file. Symlinks, not copies (DomainNet is 600k images); decoders read the file's content,
not its extension. Nothing is written outside ROOT, and the download itself is never modified.

TerraIncognita: DomainBed's script keeps only 4 of the 20 locations the reference's OOD split uses,
so its images are also found in the raw Caltech Camera Traps archive (eccv_18_all_images_sm/<file>,
one flat folder; the lists' file names are the archive's).
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tally import files as atomic_files
from tally.errors import TallyError

LIST_NAME = re.compile(r"^(?P<domain>.+?)_(?P<split>train|val|test)_(?P<suffix>.+)\.txt$")


@dataclass(frozen=True)
class Layout:
    folder: str  # the reference's folder name: ROOT/<folder> holds the lists and the images
    download_names: tuple[str, ...]  # what the dataset's folder is called in the usual downloads
    domain_aliases: dict = field(default_factory=dict)  # list domain -> download folder names
    flat_folders: tuple[str, ...] = ()  # raw archives with every image in one folder, found by file name


LAYOUTS = {
    "VLCS": Layout("VLCS", ("VLCS",)),
    "PACS": Layout("PACS", ("PACS", "kfold")),  # kfold: the original archive, renamed PACS by DomainBed
    "officehome": Layout("officehome", ("office_home", "OfficeHome", "officehome", "OfficeHomeDataset_10072016"),
                         {"real": ("Real World", "Real_World", "RealWorld")}),
    "domainnet": Layout("domainnet", ("domain_net", "domainnet", "DomainNet")),
    "terra_incognita": Layout("terra_incognita", ("terra_incognita", "TerraIncognita", "terraincognita"),
                              flat_folders=("eccv_18_all_images_sm",)),
}


def _key(name: str) -> str:
    return name.lower().replace(" ", "_")


def layout_of(dataset: str) -> Layout:
    """The layout for a dataset name in any usual spelling (officehome, OfficeHome, office_home...)."""
    wanted = _key(dataset).replace("_", "")
    for layout in LAYOUTS.values():
        if wanted in {_key(n).replace("_", "") for n in (layout.folder, *layout.download_names)}:
            return layout
    raise TallyError(f"DATASET: expected one of {', '.join(LAYOUTS)}, got {dataset!r}")


def list_files(folder: Path) -> list[Path]:
    """The split lists directly in ``folder`` (<domain>_<train|val|test>_<suffix>.txt), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and LIST_NAME.match(p.name))


def find_lists(lists: Path, layout: Layout) -> Path:
    """The folder with the lists: ``lists`` itself, lists/<folder> or lists/data/<folder> (a TALLY checkout)."""
    for cand in (lists, lists / layout.folder, lists / "data" / layout.folder):
        if list_files(cand):
            return cand
    raise TallyError(f"--lists: no split lists (<domain>_<train|val|test>_<suffix>.txt) in {lists}, "
                     f"{lists / layout.folder} or {lists / 'data' / layout.folder}")


def copy_lists(src: Path, dst: Path) -> int:
    """Copy the list files into dst, each replaced atomically (a temporary file renamed onto it)."""
    files = list_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        with open(f, "rb") as src:  # never through a link at the target; the umask's mode
            atomic_files.write_atomic(dst / f.name, lambda out, src=src: shutil.copyfileobj(src, out))
    return len(files)


def read_listed(folder: Path) -> tuple[dict[str, tuple[str, int]], dict[str, Counter]]:
    """Every listed image once: rel path -> (domain, label); and per suffix, image count per split kind."""
    from tally.data.reference import parse_list

    listed: dict[str, tuple[str, int]] = {}
    totals: dict[str, Counter] = {}
    for f in list_files(folder):
        m = LIST_NAME.match(f.name)
        rel, labels = parse_list(f)
        totals.setdefault(m["suffix"], Counter())[m["split"]] += len(rel)
        for r, lab in zip(rel, labels, strict=True):
            listed.setdefault(r, (m["domain"], lab))
    return listed, totals


class SourceTree:
    """Finds a listed <domain>/<class>/<file> in a download: names compared without case, files by stem."""

    def __init__(self, root: Path, aliases: dict, flat: Path | None = None):
        self.root = root
        self.flat = flat
        self.aliases = {_key(d): {_key(a) for a in names} for d, names in aliases.items()}
        self._dirs: dict[Path, dict[str, str]] = {}
        self._files: dict[Path, tuple[dict[str, str], dict[str, str | None]]] = {}

    def _subdirs(self, path: Path) -> dict[str, str]:
        if path not in self._dirs:
            try:
                with os.scandir(path) as it:
                    self._dirs[path] = {_key(e.name): e.name for e in it if e.is_dir()}
            except OSError:
                self._dirs[path] = {}
        return self._dirs[path]

    def _files_in(self, path: Path) -> tuple[dict[str, str], dict[str, str | None]]:
        if path not in self._files:
            names, stems = {}, {}
            try:
                with os.scandir(path) as it:
                    for e in it:
                        if e.is_file():
                            names[e.name] = e.name
                            stem = os.path.splitext(e.name)[0]
                            stems[stem] = None if stem in stems else e.name  # None: ambiguous stem
            except OSError:
                pass
            self._files[path] = (names, stems)
        return self._files[path]

    def domain_dir(self, domain: str) -> Path | None:
        subdirs = self._subdirs(self.root)
        for key in (_key(domain), *sorted(self.aliases.get(_key(domain), ()))):
            if key in subdirs:
                return self.root / subdirs[key]
        return None

    def find(self, rel: str) -> Path | None:
        parts = rel.split("/")
        path = self.domain_dir(parts[0])
        for part in parts[1:-1]:
            if path is None:
                break
            name = self._subdirs(path).get(_key(part))
            path = path / name if name else None
        found = self._file(path, parts[-1]) if path is not None else None
        if found is None and self.flat is not None:
            found = self._file(self.flat, parts[-1])
        return found

    def _file(self, folder: Path, name: str) -> Path | None:
        names, stems = self._files_in(folder)
        hit = names.get(name) or stems.get(os.path.splitext(name)[0])
        return folder / hit if hit else None


def find_source(source: Path, layout: Layout, domains: list[str]) -> SourceTree:
    """The download's dataset folder: ``source`` itself when it holds the domain folders, else a child
    named as in the usual downloads (office_home, domain_net, ...)."""
    source = source.expanduser().absolute()
    if not source.is_dir():
        raise TallyError(f"--from: folder not found: {source}")
    candidates = [source, *(source / n for n in layout.download_names), source / layout.folder]
    flat = next((c / f for c in candidates for f in layout.flat_folders if (c / f).is_dir()), None)
    for cand in candidates:
        tree = SourceTree(cand, layout.domain_aliases, flat)
        if cand.is_dir() and any(tree.domain_dir(d) for d in domains):
            return tree
    if flat is not None:
        return SourceTree(flat, layout.domain_aliases, flat)
    raw = f" or a raw archive folder {', '.join(layout.flat_folders)}" if layout.flat_folders else ""
    raise TallyError(f"--from: no {layout.folder} domain folders ({', '.join(domains[:4])}...){raw} in "
                     f"{source} or in a child named {', '.join(layout.download_names)}")


def _check_relative(rel: str, list_folder: Path) -> None:
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts) or len(parts) < 2:
        raise TallyError(f"{list_folder}: listed path {rel!r} is not a plain <domain>/.../<file> path")


@dataclass
class Prepared:
    folder: Path  # ROOT/<folder>
    source: Path | None
    listed: dict  # rel path -> (domain, label)
    totals: dict  # suffix -> Counter of images per split kind
    linked: int = 0
    present: int = 0
    missing: list = field(default_factory=list)
    hint: str = ""  # what to add when images are missing (said once, in the error)


def prepare(dataset: str, source: str | Path, out: str | Path, lists: str | Path | None = None) -> Prepared:
    """Link the listed images of ``dataset`` from ``source`` into OUT/<folder>; report what is missing.

    ``lists``: where the reference's lists are (a TALLY checkout, its data/ or data/<folder>); they are
    copied into OUT/<folder>. Without it the lists must already be there.
    """
    layout = layout_of(dataset)
    out = Path(out).expanduser().absolute()
    folder = out / layout.folder
    # read and check everything first: a bad list or --from leaves nothing behind in --out
    list_dir = find_lists(Path(lists).expanduser(), layout) if lists is not None else folder
    if not list_files(list_dir):
        raise TallyError(f"no split lists in {folder}: pass --lists <TALLY checkout>/data/{layout.folder}")
    listed, totals = read_listed(list_dir)
    for rel in listed:
        _check_relative(rel, list_dir)
    domains = sorted({d for d, _ in listed.values()})
    tree = find_source(Path(source), layout, domains)
    if lists is not None:
        copy_lists(list_dir, folder)
    report = Prepared(folder, tree.root, listed, totals)
    if layout.flat_folders and tree.flat is None:
        report.hint = (f"; DomainBed's script keeps 4 of {layout.folder}'s locations: put the raw archive's "
                       f"{layout.flat_folders[0]}/ in --from too (docs/DATASETS.md)")
    real_out = os.path.realpath(out)
    made: set[str] = set()
    for rel in listed:
        dst = os.path.join(folder, *rel.split("/"))
        if os.path.exists(dst):
            report.present += 1
            continue
        src = tree.find(rel)
        if src is None:
            report.missing.append(rel)
            continue
        parent = os.path.dirname(dst)
        if parent not in made:
            real = os.path.realpath(parent)
            if real != real_out and not real.startswith(real_out + os.sep):
                raise TallyError(f"refusing to write outside --out: {parent} leads to {real}")
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        if os.path.islink(dst):  # a dangling link from an earlier run: point it at the file found now
            os.unlink(dst)
        os.symlink(src, dst)
        report.linked += 1
    return report


def pair_table(report: Prepared) -> str:
    """Per-(domain, class) counts of the listed images, as ``tally data show`` prints them."""
    from tally.data import describe
    from tally.data.dataset import MultiDomainDataset, make_samples
    from tally.data.reference import _class_names

    rels = list(report.listed)
    domains = sorted({d for d, _ in report.listed.values()})
    d_index = {d: i for i, d in enumerate(domains)}
    labels = [report.listed[r][1] for r in rels]
    folders: dict[int, set[str]] = {}
    for r, lab in zip(rels, labels, strict=True):
        folders.setdefault(lab, set()).add(r.split("/")[-2])
    n_classes = max(labels) + 1 if labels else 0
    ds = MultiDomainDataset(make_samples(rels, labels, [d_index[report.listed[r][0]] for r in rels]),
                            _class_names(folders, n_classes), domains)
    return describe({"listed images": ds})
