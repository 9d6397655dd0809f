"""Deployable bundles (ARCHITECTURE.md contract 5), exported programs, and predictions from bundles.

A bundle is a folder a serving team can use without this package:

- model.pt2: a torch.export program, uint8 RGB images (N, 3, H, W) -> calibrated logits (N, C), with
  the resize to the training size, the normalisation and the temperature (logits / T, T fitted on
  validation; evaluation/calibration.py) inside the graph (see ``ProgramInput``): its softmax is the
  calibrated probabilities `tally predict` and `tally serve` return;
- model.onnx (optional, ``--onnx``): the same program for onnxruntime;
- model.pt: the network's weights (torch.load(weights_only=True)), for this package's own loader;
- config.yaml: the complete run config (`tally train config.yaml` retrains it); labels.json;
  preprocessing.json (what the program does, exactly); metrics.json, eval.parquet, MODEL_CARD.md;
- provenance.json: the source checkpoint's hash, the code version, the seeds and the data split
  fingerprints, so the model can be rebuilt;
- manifest.json: the sha256 of every other file, checked whenever the bundle is loaded.

Files are 0644 and the folder 0755 whatever the umask, so a service user can read them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import math
import os
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from tally import evaluation, files, results
from tally.data.augment import IMAGENET_MEAN, IMAGENET_STD, to_float_normalized
from tally.errors import TallyError
from tally.evaluation import calibration

BUNDLE_FORMAT = "tally-bundle-v2"
MANIFEST = "manifest.json"
PROVENANCE = "provenance.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# the exported programs accept any batch and any image side in this range (one size per batch)
MAX_SIDE = 16384


# ---------------------------------------------------------------- the exported program
class ProgramInput(nn.Module):
    """uint8 RGB (N, 3, H, W) -> logits / T: resize to S x S, scale to [0, 1], normalise, the network,
    the temperature (1 leaves the logits as they are; T > 0 never changes the argmax).

    The resize is the very op the training decoder applies (torchvision's resize of a uint8 image on
    the CPU is F.interpolate(bilinear, antialias) on uint8), so on the CPU the program's logits equal
    the eager pipeline's (tests/deploy/test_export.py); an image already S x S passes through unchanged.
    """

    def __init__(self, net: nn.Module, image_size: int, mean, std, temperature: float = 1.0):
        super().__init__()
        self.net, self.image_size = net, int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        x = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return self.net((x.to(torch.float32) / 255.0 - self.mean) / self.std) / self.temperature


def _program_example(image_size: int) -> tuple[tuple[torch.Tensor], tuple[dict]]:
    # sizes that differ from each other and from S, so tracing does not specialise on them
    example = torch.zeros((2, 3, image_size + 5, image_size + 7), dtype=torch.uint8)
    dims = {0: torch.export.Dim("batch", min=1, max=65536),
            2: torch.export.Dim("height", min=2, max=MAX_SIDE),
            3: torch.export.Dim("width", min=2, max=MAX_SIDE)}
    return (example,), (dims,)


def export_program(net: nn.Module, pre: dict, path: Path) -> None:
    """Write model.pt2 (torch.export, CPU, eval mode)."""
    module = ProgramInput(net, pre["image_size"], pre["mean"], pre["std"], pre.get("temperature", 1.0)).eval()
    args, dynamic = _program_example(pre["image_size"])
    program = torch.export.export(module, args, dynamic_shapes=dynamic)
    torch.export.save(program, path)


def export_onnx(net: nn.Module, pre: dict, path: Path) -> None:
    """Write model.onnx through torch.onnx's dynamo exporter (needs the onnx extra)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise TallyError("--onnx needs the onnx extra: pip install 'tally-platform[onnx]'") from None
    module = ProgramInput(net, pre["image_size"], pre["mean"], pre["std"], pre.get("temperature", 1.0)).eval()
    args, dynamic = _program_example(pre["image_size"])
    program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, input_names=["images"],
                                output_names=["logits"], verbose=False)
    program.save(str(path))


# ---------------------------------------------------------------- writing a bundle
def _names(table: pd.DataFrame, idx_col: str, name_col: str) -> list[str]:
    pairs = table[[idx_col, name_col]].drop_duplicates().sort_values(idx_col)
    return pairs[name_col].astype(str).tolist()


def _model_card(config: dict, metrics: dict, trial: str, labels: dict, provenance: dict) -> str:
    code = provenance["code"]
    lines = [f"# Model card: {trial}", "",
             f"- method: {config['method']['name']}; backbone {config['model']['arch']} "
             f"cut after {config['model']['cut']}; input {config['data']['image_size']} px",
             f"- data: {config['data']['source']} ({config['data']['setting']} setting"
             + (f", held out {', '.join(config['data']['held_out'])}" if config["data"]["held_out"] else "") + ")",
             f"- classes ({len(labels['classes'])}): {', '.join(labels['classes'])}",
             f"- domains ({len(labels['domains'])}): {', '.join(labels['domains'])}",
             _kept_line(config),
             f"- rebuild: `tally train config.yaml` (seed {provenance['seeds']['train']}, split seed "
             f"{provenance['seeds']['split']}); code {code['package']} {code['version']}"
             + (f", git {code['git_commit']}" + (" (uncommitted changes)" if code.get("git_dirty") else "")
                if code.get("git_commit") else ""), "",
             "| split | acc | pair mean | pair worst | class worst | domain worst | macro F1 |",
             "|---|---|---|---|---|---|---|"]
    for split, m in metrics.items():
        lines.append(f"| {split} | {m['acc']:.3f} | {m['pair_acc_mean']:.3f} | {m['pair_acc_worst']:.3f} | "
                     f"{m['class_acc_worst']:.3f} | {m['domain_acc_worst']:.3f} | {m['macro_f1']:.3f} |")
    lines += ["", "Limitations: accuracies come from balanced per-(domain, class) test sets; pairs absent "
              "from a test set are not scored. Check the eval table for the pairs you care about.", "",
              "Loading: `torch.export.load` can run code from model.pt2 (pickled weights, constants and "
              "objects inside the archive are unpickled without restriction): load it only from a bundle "
              "you made, or whose sha256 you recorded yourself (this bundle's manifest.json came with it "
              "and proves nothing about its author). For a bundle from someone else use `tally predict` / "
              "`tally serve` (model.pt, weights_only=True) or model.onnx with onnxruntime.", ""]
    return "\n".join(lines)


def _kept_line(config: dict) -> str:
    if config["train"].get("final"):
        return (f"- kept checkpoint: the last of {config['train']['epochs']} epochs of a final retrain on "
                "train + validation (no selection; validation is training data here, so tail pairs have more "
                "training images than in the search and the test numbers below are not comparable with it)")
    return (f"- kept checkpoint selected on validation by {config['train']['selection_metric']}"
            + (" (ORACLE: test-domain selection)" if config["data"]["oracle_selection"] else ""))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_version() -> dict:
    """The package version and, when this code is a git checkout, its commit."""
    try:
        version = importlib.metadata.version("tally-platform")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    info = {"package": "tally-platform", "version": version, "git_commit": None, "git_dirty": None}
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            info["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def split_fingerprints(data_cfg: dict) -> dict:
    """sha256 of each split's sample list as the config resolves it now (the data layer's fingerprint).

    Data that cannot be read here (a cluster path, say) is recorded as unavailable, with the reason,
    rather than blocking the export.
    """
    from tally.data import load_splits

    try:
        splits = load_splits(data_cfg)
    except (TallyError, OSError) as e:
        return {"unavailable": str(e).splitlines()[0]}
    return {name: {"sha256": ds.fingerprint(), "images": len(ds)} for name, ds in splits.items()}


def _provenance(run_dir: Path, config: dict, onnx: bool) -> dict:
    """What identifies a bundle: same provenance, same bundle (the .pt2 archive itself is not
    byte-reproducible: torch.export.save writes a random serialization id)."""
    return {"trial": run_dir.name, "checkpoint_sha256": _sha256(run_dir / "checkpoints" / "best.pt"),
            "best_epoch": (results.read_json(run_dir / "status.json") or {}).get("best_epoch"),
            "seeds": {"train": config["train"]["seed"], "split": config["data"]["split_seed"]},
            "data_splits": split_fingerprints(config["data"]), "code": code_version(),
            "programs": ["model.pt2", *(["model.onnx"] if onnx else [])],
            **({"trained_on": ["train", "val"]} if config["train"].get("final") else {})}


def _read_run(run_dir: Path) -> tuple[dict, pd.DataFrame, dict]:
    config = results.read_yaml(run_dir / "config.yaml")
    table = results.read_parquet(run_dir / "eval.parquet")
    metrics = results.read_json(run_dir / "metrics.json")
    if config is None or table is None or metrics is None or not (run_dir / "checkpoints" / "best.pt").is_file():
        raise TallyError(f"{run_dir}: trial has no finished evaluation (needs config.yaml, eval.parquet, "
                         "metrics.json, checkpoints/best.pt); pick a trial with status done")
    return config, table, metrics


def _write_bundle(run_dir: Path, out: Path, config: dict, table: pd.DataFrame, metrics: dict,
                  provenance: dict, onnx: bool) -> None:
    from tally.method.backbone import SplitResNet

    state = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["model"]
    net_state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    labels = {"classes": _names(table, "class_idx", "class"), "domains": _names(table, "domain_idx", "domain")}
    size = config["data"]["image_size"]
    # fitted on validation at the end of training; a run from before calibration.json keeps T = 1
    temperature = calibration.read_temperature(run_dir) or {"temperature": 1.0, "fitted_on": None}
    pre = {"image_size": size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
           "program_input": f"uint8 RGB tensor (N, 3, H, W); N >= 1; 2 <= H, W <= {MAX_SIDE}; "
                            "one size per batch",
           "program_output": "float32 calibrated logits (N, classes): the network's logits / temperature; "
                             "softmax over dim 1 gives the calibrated probabilities",
           "temperature": temperature["temperature"],
           "temperature_fitted_on": temperature.get("fitted_on"),
           "in_program": [f"resize to {size}x{size}: F.interpolate(bilinear, antialias=True, "
                          "align_corners=False) on the uint8 tensor (torchvision's CPU resize)",
                          "float32 / 255", "(x - mean) / std per channel", "the network",
                          "logits / temperature"],
           "outside_program": "decode to RGB uint8 (any decoder; the training data were decoded by "
                              "torchvision.io.decode_image, PIL for other formats)"}
    net = SplitResNet(config["model"]["arch"], config["model"]["cut"], len(labels["classes"]))
    net.load_state_dict(net_state)
    net.eval()
    out.mkdir(parents=True)
    results.write_yaml(out / "config.yaml", config)
    torch.save(net_state, out / "model.pt")
    export_program(net, pre, out / "model.pt2")
    if onnx:
        export_onnx(net, pre, out / "model.onnx")
    results.write_json(out / "labels.json", labels)
    results.write_json(out / "preprocessing.json", pre)
    results.write_json(out / "metrics.json", metrics)
    table.to_parquet(out / "eval.parquet", index=False)
    results.write_json(out / PROVENANCE, provenance)
    (out / "MODEL_CARD.md").write_text(_model_card(config, metrics, run_dir.name, labels, provenance))
    files = {p.name: _sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
    results.write_json(out / MANIFEST, {"format": BUNDLE_FORMAT, "trial": run_dir.name, "sha256": files})
    for path in out.iterdir():
        os.chmod(path, 0o644)
    os.chmod(out, 0o755)


def _replace_folder(staged: Path, out: Path) -> None:
    """Swap staged in for out with renames only: a reader sees the old bundle or the new one."""
    if not out.exists():
        os.rename(staged, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "bundle")
    os.rename(staged, out)
    shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse, in one line saying what the folder is, to replace anything but a tally bundle: a folder
    whose manifest has the bundle format tag and lists exactly the files it holds (a split-lists folder
    also holds a manifest.json; --force must never delete it)."""
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise TallyError(f"--out: {out_dir} exists and is not a folder; refusing to replace it")
    if not (out_dir / MANIFEST).is_file():
        raise TallyError(f"--out: {out_dir} is a non-empty folder without {MANIFEST}, not a tally bundle; "
                         "refusing to replace it (choose another --out)")
    try:
        manifest = read_manifest(out_dir)
    except TallyError as e:
        raise TallyError(f"--out: {out_dir} is not a tally bundle ({str(e).removeprefix(f'{out_dir}: ')}); "
                         "refusing to replace it (choose another --out)") from None
    held = {p.name for p in out_dir.iterdir()}
    listed = {*manifest["sha256"], MANIFEST}
    if held != listed:
        extra = sorted(held - listed) or sorted(listed - held)
        raise TallyError(f"--out: {out_dir} holds files its {MANIFEST} does not list as a tally bundle "
                         f"(first: {extra[0]}); refusing to replace it (choose another --out)")


def export_bundle(run_dir: str | Path, out_dir: str | Path, force: bool = False, onnx: bool = False) -> Path:
    """Write the bundle of one run folder into ``out_dir``; atomic.

    An existing bundle of the same provenance is kept as it is (re-exporting is a no-op); a different
    bundle is replaced only with ``force``; any other non-empty folder is never replaced.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config, table, metrics = _read_run(run_dir)
    provenance = _provenance(run_dir, config, onnx)
    if out_dir.is_symlink() or (out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))):
        _check_replaceable(out_dir)
        existing = results.read_json(out_dir / PROVENANCE)
        if existing == json.loads(json.dumps(provenance)):
            verify_bundle(out_dir)
            return out_dir
        if not force:
            trial = (existing or {}).get("trial", "unknown trial")
            raise TallyError(f"--out: {out_dir} holds a different bundle ({trial}); pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        staged = tmp / "bundle"
        _write_bundle(run_dir, staged, config, table, metrics, provenance, onnx)
        _replace_folder(staged, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_config(run_dir: str | Path, out_path: str | Path, force: bool = False) -> Path:
    """Write only the trial's complete run config (`tally train` reproduces the trial from it)."""
    run_dir, out_path = Path(run_dir), Path(out_path)
    config = results.read_yaml(run_dir / "config.yaml")
    if config is None:
        raise TallyError(f"{run_dir}: no config.yaml")
    if out_path.is_dir():
        out_path = out_path / "config.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    if out_path.exists() and out_path.read_text() != text and not force:
        raise TallyError(f"--out: {out_path} exists with another config; pass --force to replace it")
    results.write_text(out_path, text)
    os.chmod(out_path, 0o644)
    return out_path


@dataclass(frozen=True)
class RetrainSource:
    """What `tally train` rebuilds: a config file, or a trial's (run folder, experiment, bundle) config with
    the epoch it kept (0-based; None when nothing records it)."""

    config: dict
    kept_epoch: int | None
    name: str
    where: str


def retrain_source(location: str, trial: str | None = None) -> RetrainSource:
    """The config behind ``location``: a YAML file; a bundle (its config.yaml and provenance, checked
    against its manifest); a run folder; or an experiment (local or a bucket URI: its best trial on
    validation, or ``trial``)."""
    from tally import config as config_mod
    from tally.results.storage import is_remote, read_mirror

    path = Path(location).expanduser()
    if not is_remote(location) and path.is_file():
        if trial is not None:
            raise TallyError(f"--trial: {location} is a config file, not an experiment")
        return RetrainSource(config_mod.read_yaml_file(path), None, path.stem, str(path))
    if not is_remote(location) and (path / MANIFEST).is_file():
        _, contents = read_bundle(path, keep=("config.yaml", PROVENANCE))  # parsed from the verified bytes
        provenance = _parsed(path, PROVENANCE, contents, json.loads)
        kept = provenance.get("best_epoch")
        # the trial's name names the run folder (results/runs/<trial>-final-...): a bundle from someone
        # else must not choose where we write
        name = files.safe_component(provenance.get("trial", path.name), f"{path}/{PROVENANCE}: trial")
        return RetrainSource(_parsed(path, "config.yaml", contents, config_mod.parse_yaml),
                             kept if isinstance(kept, int) and not isinstance(kept, bool) else None, name,
                             f"bundle {path}")
    if not is_remote(location) and not path.exists():
        raise TallyError(f"{location}: no such config file, run folder, experiment or bundle")
    run_dir = resolve_trial(read_mirror(location), trial)
    config = results.read_yaml(run_dir / "config.yaml")
    if not isinstance(config, dict):
        raise TallyError(f"{run_dir}/config.yaml: missing or not a run config")
    kept = (results.read_json(run_dir / "status.json") or {}).get("best_epoch")
    return RetrainSource(config, kept if isinstance(kept, int) else None, run_dir.name, f"trial {run_dir}")


def bundle_zip_bytes(run_dir: str | Path) -> bytes:
    """The same bundle as a zip, for a download button."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(run_dir, Path(tmp) / "bundle")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(bundle.iterdir()):
                zf.write(path, arcname=f"{Path(run_dir).name}/{path.name}")
        return buffer.getvalue()


def resolve_trial(exp_dir: Path, trial: str | None) -> Path:
    """The run folder of ``trial`` in an experiment, or of its best trial on validation."""
    exp_dir = Path(exp_dir)
    if (exp_dir / "config.yaml").is_file() and trial is None:
        return exp_dir  # a single `tally train` run folder
    if not (exp_dir / results.TRIALS_DIR).is_dir():
        raise TallyError(f"{exp_dir}: not an experiment (no trials/) nor a run folder (no config.yaml)")
    if trial is not None:
        run_dir = exp_dir / results.TRIALS_DIR / files.safe_component(trial, "--trial")
        if not run_dir.is_dir():
            raise TallyError(f"--trial: no trial {trial!r} in {exp_dir}")
        return run_dir
    best, _ = results.best_of_experiment(exp_dir)
    if best is None:
        raise TallyError(f"{exp_dir}: no finished trial to export")
    return exp_dir / results.TRIALS_DIR / files.safe_component(str(best["trial_id"]), f"{exp_dir}: trial id")


# ---------------------------------------------------------------- loading a bundle
# A bundle may come from someone else. Loading it: the manifest is checked field by field (one-line
# errors); every file this package reads must be listed; each listed file is read ONCE, within a size
# cap and never through a symlink, and the bytes that were hashed are the bytes that are parsed (no
# window between the check and the use).
LOADED = ("config.yaml", "labels.json", "preprocessing.json", "model.pt", "eval.parquet", PROVENANCE)
MAX_BUNDLE_FILE = 2 << 30  # model.pt2 of a ResNet-50 is about 100 MB
_HEX = frozenset("0123456789abcdef")


def read_manifest(bundle: Path) -> dict:
    """A bundle's manifest.json, checked: format tag, a {file name: sha256} mapping of plain file names."""
    path = bundle / MANIFEST
    try:
        manifest = json.loads(files.read_bounded(path, 1 << 20, no_symlink=True).decode("utf-8"))
    except FileNotFoundError:
        raise TallyError(f"{bundle}: not a tally bundle of format {BUNDLE_FORMAT} (no {MANIFEST})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TallyError(f"{path}: not valid JSON ({_first_line(e)})") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != BUNDLE_FORMAT:
        raise TallyError(f"{bundle}: not a tally bundle of format {BUNDLE_FORMAT} "
                         + (f"(found {found!r}; re-export it)" if found else f"({MANIFEST} has no format tag)"))
    digests = manifest.get("sha256")
    if not isinstance(digests, dict) or not digests:
        raise TallyError(f"{path}: sha256: expected a mapping of file name to sha256, got {type(digests).__name__}")
    for name, digest in digests.items():
        files.safe_component(name, f"{path}: file name")  # points outside the bundle, or hidden
        if name == MANIFEST or not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
            raise TallyError(f"{path}: sha256 of {name!r}: expected 64 hex digits, got {digest!r}")
    if not isinstance(manifest.get("trial"), str):
        raise TallyError(f"{path}: trial: expected a string, got {manifest.get('trial')!r}")
    missing = [name for name in LOADED if name not in digests]
    if missing:
        raise TallyError(f"{path}: {missing[0]} is not listed; refusing to load a file the manifest does not cover")
    return manifest


def read_bundle(bundle: str | Path, keep: tuple[str, ...] = LOADED) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {name: bytes} of the files in ``keep``) after checking every listed file's sha256 on
    the very bytes returned; a missing, linked, oversized or changed file is refused in one line."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    contents = {}
    for name, digest in sorted(manifest["sha256"].items()):
        path = bundle / name
        try:
            data = files.read_bounded(path, MAX_BUNDLE_FILE, no_symlink=True)
        except FileNotFoundError:
            raise TallyError(f"{path}: missing from the bundle; refusing to load it") from None
        except IsADirectoryError:
            raise TallyError(f"{path}: not a regular file; refusing to load it") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise TallyError(f"{path}: sha256 differs from the manifest (changed after export); refusing to load")
        if name in keep:
            contents[name] = data
    return manifest, contents


def verify_bundle(bundle: str | Path) -> dict:
    """The manifest, after checking every listed file's sha256; a missing or changed file is refused."""
    return read_bundle(bundle, keep=())[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def resolve_device(name: str) -> torch.device:
    """auto: the GPU when there is one."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise TallyError(f"--device: expected auto, cpu or cuda[:N], got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TallyError(f"--device: {name!r} asked for but no CUDA device is available")
    return torch.device(name)


def _checked_contents(bundle: Path, contents: dict[str, bytes]) -> tuple[dict, dict, dict]:
    """(config, labels, preprocessing) of a bundle's verified bytes, each checked; one-line errors name
    file and field."""
    from tally import config as config_mod

    config = config_mod.validate(_parsed(bundle, "config.yaml", contents, config_mod.parse_yaml),
                                 source=f"{bundle}/config.yaml")
    labels = _parsed(bundle, "labels.json", contents, json.loads)
    classes = labels.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise TallyError(f"{bundle}/labels.json: classes: expected a non-empty list of names")
    domains = labels.get("domains", [])
    if not (isinstance(domains, list) and all(isinstance(d, str) for d in domains)):
        raise TallyError(f"{bundle}/labels.json: domains: expected a list of names")
    pre = _parsed(bundle, "preprocessing.json", contents, json.loads)
    size = pre.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 1024 or size != config["data"]["image_size"]:
        raise TallyError(f"{bundle}/preprocessing.json: image_size: expected the config's "
                         f"{config['data']['image_size']} (8..1024), got {size!r}")
    t = pre.get("temperature", 1.0)
    if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        raise TallyError(f"{bundle}/preprocessing.json: temperature: expected a finite number > 0, got {t!r}")
    for key in ("mean", "std"):
        values = pre.get(key)
        if not (isinstance(values, list) and len(values) == 3
                and all(isinstance(v, int | float) and math.isfinite(v) and (key == "mean" or v > 0) for v in values)):
            raise TallyError(f"{bundle}/preprocessing.json: {key}: expected 3 finite numbers, got {values!r}")
    return config, labels, pre


def _parsed(bundle: Path, name: str, contents: dict[str, bytes], parse) -> dict:
    """A verified bundle file's bytes parsed to a mapping, or a one-line error naming the file."""
    try:
        value = files.check_depth(parse(contents[name].decode("utf-8")), f"{bundle}/{name}")
    except (UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as e:
        raise TallyError(f"{bundle}/{name}: cannot be read ({_first_line(e)})") from None
    if not isinstance(value, dict):
        raise TallyError(f"{bundle}/{name}: expected a mapping, got {type(value).__name__}")
    return value


class Predictor:
    """A verified bundle's network on a device: classifies decoded images in bounded batches."""

    def __init__(self, bundle: str | Path, device: str = "cpu"):
        from tally.method.backbone import SplitResNet

        self.bundle = Path(bundle)
        manifest, contents = read_bundle(self.bundle)
        # A manifest proves the files were not changed after export, not who exported them: every
        # value that sizes an allocation or builds the network is checked before it is used.
        config, self.labels, self.pre = _checked_contents(self.bundle, contents)
        self._eval_bytes = contents["eval.parquet"]
        self.classes = np.asarray(self.labels["classes"], dtype=object)
        # the trial and the weights' hash: two bundles with the same id hold the same model
        self.bundle_id = f"{manifest.get('trial')}@{manifest['sha256']['model.pt'][:12]}"
        self.net = SplitResNet(config["model"]["arch"], config["model"]["cut"], len(self.classes))
        try:
            state = torch.load(io.BytesIO(contents["model.pt"]), map_location="cpu", weights_only=True)
            self.net.load_state_dict(state)
        except Exception as e:  # unpickling refused, or weights of another shape
            raise TallyError(f"{self.bundle / 'model.pt'}: cannot load the weights "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        self.device = resolve_device(device)
        self.net.to(self.device).eval()
        # the calibration model.pt2 applies in its graph (a bundle from before it has none: T = 1)
        self.temperature = float(self.pre.get("temperature", 1.0))

    @property
    def image_size(self) -> int:
        return int(self.pre["image_size"])

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> uint8 (3, S, S), as the training decoder resizes."""
        from tally.data.bank import resize_square

        return resize_square(image, self.image_size)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> float32 (N, C) probabilities on the CPU; float32 throughout (no autocast)."""
        x = to_float_normalized(images.to(self.device, non_blocking=True), self.pre["mean"], self.pre["std"])
        return (self.net(x) / self.temperature).softmax(1).float().cpu()

    def predict(self, paths: list[str | Path]) -> list[tuple[str, str, float]]:
        """(path, label, confidence) per image file."""
        table = self.predict_files([str(p) for p in paths], progress=False)
        return list(zip(table["path"], table["label"], table["confidence"].astype(float), strict=True))

    def predict_files(self, paths: list[str], batch_size: int = 64, top_k: int = 1, workers: int = 0,
                      progress: bool = True) -> pd.DataFrame:
        """One row per image: path, label, confidence, pred_idx and top1..topk labels/confidences.

        Images are decoded by the data layer's decoder (the one training used), at most
        ``batch_size`` at a time, so memory stays bounded whatever the number of images.
        """
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        from tally.data.bank import _Resized

        if batch_size < 1:
            raise TallyError(f"--batch-size: expected an integer >= 1, got {batch_size}")
        k = max(1, min(int(top_k), len(self.classes)))
        loader = DataLoader(_Resized(list(paths), self.image_size), batch_size=batch_size, shuffle=False,
                            num_workers=workers, pin_memory=self.device.type == "cuda")
        confidences, indices = [], []
        with tqdm(total=len(paths), unit="img", desc="predict", disable=not progress or None,
                  mininterval=1.0) as bar:
            for images in loader:
                top = self.probabilities(images).topk(k, dim=1)
                confidences.append(top.values)
                indices.append(top.indices)
                bar.update(len(images))
        conf = torch.cat(confidences).numpy() if confidences else np.zeros((0, k), np.float32)
        idx = torch.cat(indices).numpy() if indices else np.zeros((0, k), np.int64)
        columns = {"path": list(paths), "label": self.classes[idx[:, 0]] if len(idx) else [],
                   "confidence": conf[:, 0], "pred_idx": idx[:, 0]}
        if k > 1:
            for j in range(k):
                columns[f"top{j + 1}_label"] = self.classes[idx[:, j]] if len(idx) else []
                columns[f"top{j + 1}_confidence"] = conf[:, j]
        return pd.DataFrame(columns)

    def train_counts(self, domain_names: list[str]) -> np.ndarray:
        """(D, C) training counts of these domains, from the bundle's eval table (0 for new domains)."""
        try:  # the verified bytes read at load time, not the file as it is now
            table = pd.read_parquet(io.BytesIO(self._eval_bytes), columns=["domain", "class_idx", "n_train"])
        except Exception as e:  # noqa: BLE001 - pyarrow's own error types for a foreign file
            raise TallyError(f"{self.bundle}/eval.parquet: cannot be read ({_first_line(e)})") from None
        table = table[table["class_idx"].between(0, len(self.classes) - 1)]
        table = table.drop_duplicates(["domain", "class_idx"])
        counts = np.zeros((len(domain_names), len(self.classes)), dtype=np.int64)
        row = {d: i for i, d in enumerate(domain_names)}
        known = table[table["domain"].isin(row)]
        counts[known["domain"].map(row).to_numpy(), known["class_idx"].to_numpy()] = known["n_train"].to_numpy()
        return counts


# ---------------------------------------------------------------- inputs of `tally predict`
def collect_images(inputs: list[str]) -> list[str]:
    """Image files from files, folders (searched recursively) and list files (.txt / .lst: one path per
    line, optionally followed by a label, relative to the list's folder)."""
    found: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise TallyError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found.extend(str(p) for p in files)
        elif path.suffix.lower() in (".txt", ".lst"):
            found.extend(_read_path_list(path))
        elif path.is_file():
            found.append(str(path))
        else:
            raise TallyError(f"image not found: {path}")
    return found


def _read_path_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TallyError(f"{path}: cannot read list file: {e.strerror}") from None
    out = []
    for line in lines:
        text = line.strip()
        if text:
            parts = text.rsplit(None, 1)
            rel = parts[0] if len(parts) == 2 and parts[1].isdigit() else text
            out.append(str((path.parent / rel).resolve()))
    return out


def read_labelled_list(list_file: str | Path, root: str | Path | None, classes: list[str],
                       domains: list[str]) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """A split list in the reference format ("<domain>/<class>/<file> <label>", relative to ``root``,
    default the list's folder) -> (paths, labels, domain indices, domain names).

    Domains come from the first path component; ones the bundle never saw are appended to its names.
    """
    from tally.data.reference import parse_list

    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise TallyError(f"--labels: list file not found: {list_file}")
    rel, labels = parse_list(list_file)
    if not rel:
        raise TallyError(f"--labels: {list_file} lists no images")
    labels_arr = np.asarray(labels, dtype=np.int64)
    if labels_arr.max() >= len(classes):
        bad = int(np.flatnonzero(labels_arr >= len(classes))[0])
        raise TallyError(f"--labels: {list_file}: label {labels[bad]} of {rel[bad]!r} is outside the bundle's "
                         f"{len(classes)} classes")
    base = Path(root).expanduser() if root else list_file.parent
    first = pd.Series([Path(r).parts[0] if len(Path(r).parts) > 1 else "" for r in rel], dtype=object)
    names = list(domains) + sorted(set(first) - set(domains))
    domain_idx = first.map({d: i for i, d in enumerate(names)}).to_numpy(dtype=np.int64)
    return [str(base / r) for r in rel], labels_arr, domain_idx, names


def score_predictions(predictor: Predictor, split: str, preds: np.ndarray, labels: np.ndarray,
                      domain_idx: np.ndarray, domain_names: list[str]) -> tuple[pd.DataFrame, dict]:
    """The evaluator's per-(domain, class) table of these predictions, and its metrics."""
    table = evaluation.pair_table(split, preds, labels, domain_idx, list(predictor.classes), domain_names,
                                  predictor.train_counts(domain_names))
    return table, evaluation.split_metrics(table)


def run_predict(bundle: str | Path, images: list[str], labels: str | None = None, root: str | None = None,
                out: str | None = None, top_k: int = 1, batch_size: int = 64, device: str = "auto",
                workers: int = 0) -> int:
    """`tally predict`: predictions to a file (or stdout); with a labelled list, the evaluator's table."""
    if bool(images) == bool(labels):
        raise TallyError("predict: give image files/folders/lists, or --labels LIST (not both)")
    if out and Path(out).suffix.lower() not in (".csv", ".parquet"):
        raise TallyError(f"--out: expected a .csv or .parquet file name, got {out}")
    predictor = Predictor(bundle, device=device)
    if labels:
        paths, truth, domain_idx, domain_names = read_labelled_list(labels, root, list(predictor.classes),
                                                                    predictor.labels["domains"])
    else:
        paths = collect_images(images)
    table = predictor.predict_files(paths, batch_size=batch_size, top_k=top_k, workers=workers)
    if labels:
        table["true_label"] = predictor.classes[truth]
        table["domain"] = np.asarray(domain_names, dtype=object)[domain_idx]
    if out:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if out_path.suffix.lower() == ".csv":
            results.write_text(out_path, table.to_csv(index=False, float_format="%.6g"))
        else:
            results.write_parquet(out_path, table)
        os.chmod(out_path, 0o644)
        print(f"{len(table)} predictions written to {out_path} ({predictor.device})")
    elif not labels:
        for row in table.itertuples(index=False):
            print(f"{row.path}\t{row.label}\t{row.confidence:.3f}")
    if labels:
        split = Path(labels).stem
        pairs, metrics = score_predictions(predictor, split, table["pred_idx"].to_numpy(), truth, domain_idx,
                                           domain_names)
        shown = pairs[pairs["n"] > 0].assign(acc=lambda t: t["correct"] / t["n"])
        print(shown[["domain", "class", "n_train", "n", "correct", "acc"]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"\n{split}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v == v))
    return 0
