"""Deployable bundles (ARCHITECTURE.md contract 5) and predictions from them.

A bundle is a folder: config.yaml (re-trainable with `tally train`), model.pt (the network's
weights, loadable with torch.load(weights_only=True)), labels.json, preprocessing.json,
metrics.json, eval.parquet, MODEL_CARD.md and a manifest of file hashes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
import torch

from tally import results
from tally.data.augment import IMAGENET_MEAN, IMAGENET_STD, to_float_normalized
from tally.errors import TallyError

BUNDLE_FORMAT = "tally-bundle-v1"


def _names(table: pd.DataFrame, idx_col: str, name_col: str) -> list[str]:
    pairs = table[[idx_col, name_col]].drop_duplicates().sort_values(idx_col)
    return pairs[name_col].astype(str).tolist()


def _model_card(config: dict, metrics: dict, trial: str, labels: dict) -> str:
    lines = [f"# Model card: {trial}", "",
             f"- method: {config['method']['name']}; backbone {config['model']['arch']} "
             f"cut after {config['model']['cut']}; input {config['data']['image_size']} px",
             f"- data: {config['data']['source']} ({config['data']['setting']} setting"
             + (f", held out {', '.join(config['data']['held_out'])}" if config["data"]["held_out"] else "") + ")",
             f"- classes ({len(labels['classes'])}): {', '.join(labels['classes'])}",
             f"- domains ({len(labels['domains'])}): {', '.join(labels['domains'])}",
             f"- kept checkpoint selected on validation by {config['train']['selection_metric']}"
             + (" (ORACLE: test-domain selection)" if config["data"]["oracle_selection"] else ""), "",
             "| split | acc | pair mean | pair worst | class worst | domain worst | macro F1 |",
             "|---|---|---|---|---|---|---|"]
    for split, m in metrics.items():
        lines.append(f"| {split} | {m['acc']:.3f} | {m['pair_acc_mean']:.3f} | {m['pair_acc_worst']:.3f} | "
                     f"{m['class_acc_worst']:.3f} | {m['domain_acc_worst']:.3f} | {m['macro_f1']:.3f} |")
    lines += ["", "Limitations: accuracies come from balanced per-(domain, class) test sets; pairs absent "
              "from a test set are not scored. Check the eval table for the pairs you care about.", ""]
    return "\n".join(lines)


def _write_bundle(run_dir: Path, out: Path) -> None:
    config = results.read_yaml(run_dir / "config.yaml")
    table = results.read_parquet(run_dir / "eval.parquet")
    metrics = results.read_json(run_dir / "metrics.json")
    if config is None or table is None or metrics is None:
        raise TallyError(f"{run_dir}: trial has no finished evaluation (needs config.yaml, eval.parquet, "
                         "metrics.json); pick a trial with status done")
    state = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["model"]
    net_state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    labels = {"classes": _names(table, "class_idx", "class"), "domains": _names(table, "domain_idx", "domain")}
    out.mkdir(parents=True)
    results.write_yaml(out / "config.yaml", config)
    torch.save(net_state, out / "model.pt")
    results.write_json(out / "labels.json", labels)
    results.write_json(out / "preprocessing.json", {
        "image_size": config["data"]["image_size"], "resize": "square, antialiased", "channels": "RGB",
        "scale": "divide by 255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    results.write_json(out / "metrics.json", metrics)
    table.to_parquet(out / "eval.parquet", index=False)
    (out / "MODEL_CARD.md").write_text(_model_card(config, metrics, run_dir.name, labels))
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
    results.write_json(out / "manifest.json", {"format": BUNDLE_FORMAT, "trial": run_dir.name, "sha256": files})


def export_bundle(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the bundle of one run folder into ``out_dir`` (must not exist or be empty); atomic."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TallyError(f"--out: {out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staged = Path(tmp) / "bundle"
        _write_bundle(run_dir, staged)
        if out_dir.exists():
            out_dir.rmdir()
        staged.rename(out_dir)
    return out_dir


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
        run_dir = exp_dir / results.TRIALS_DIR / trial
        if not run_dir.is_dir():
            raise TallyError(f"--trial: no trial {trial!r} in {exp_dir}")
        return run_dir
    best, _ = results.best_of_experiment(exp_dir)
    if best is None:
        raise TallyError(f"{exp_dir}: no finished trial to export")
    return exp_dir / results.TRIALS_DIR / best["trial_id"]


class Predictor:
    """Loads a bundle once; classifies image files."""

    def __init__(self, bundle: str | Path, device: str = "cpu"):
        from tally.method.backbone import SplitResNet

        bundle = Path(bundle)
        manifest = results.read_json(bundle / "manifest.json")
        if not manifest or manifest.get("format") != BUNDLE_FORMAT:
            raise TallyError(f"{bundle}: not a tally bundle (no manifest.json of format {BUNDLE_FORMAT})")
        config = results.read_yaml(bundle / "config.yaml")
        self.labels = json.loads((bundle / "labels.json").read_text())
        self.pre = json.loads((bundle / "preprocessing.json").read_text())
        self.net = SplitResNet(config["model"]["arch"], config["model"]["cut"], len(self.labels["classes"]))
        self.net.load_state_dict(torch.load(bundle / "model.pt", map_location="cpu", weights_only=True))
        self.device = torch.device(device)
        self.net.to(self.device).eval()

    @torch.inference_mode()
    def predict(self, paths: list[str | Path]) -> list[tuple[str, str, float]]:
        from tally.data.bank import resize_square
        from tally.data.dataset import read_image

        images = torch.stack([resize_square(read_image(str(p)), self.pre["image_size"]) for p in paths])
        x = to_float_normalized(images.to(self.device), self.pre["mean"], self.pre["std"])
        probs = self.net(x).softmax(1)
        conf, idx = probs.max(1)
        return [(str(p), self.labels["classes"][i], float(c)) for p, i, c in zip(paths, idx.tolist(), conf.tolist(), strict=True)]
