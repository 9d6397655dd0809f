"""Re-evaluate a finished (or running) run's kept checkpoint on one split, from its folder alone."""

from __future__ import annotations

from pathlib import Path

import torch

from tally import evaluation
from tally.config import load
from tally.data import load_splits
from tally.data.bank import bank_for_training
from tally.errors import TallyError
from tally.method.backbone import SplitResNet
from tally.method.methods import TrainInfo, build_method
from tally.training import evaluate_split, load_checkpoint, resolve_device


def load_trained_method(run_dir: Path, cfg: dict, splits: dict, checkpoint: str = "best.pt"):
    """Rebuild the method of a run and load its kept weights (weights_only loading)."""
    train_counts = splits["train"].counts()
    info = TrainInfo(num_classes=len(splits["train"].class_names),
                     num_domains=len(splits["train"].domain_names),
                     class_counts=torch.as_tensor(train_counts.sum(0)), image_size=cfg["data"]["image_size"])
    net = SplitResNet(cfg["model"]["arch"], cfg["model"]["cut"], info.num_classes, pretrained=None)
    method = build_method(cfg["method"]["name"], net, info,
                          {k: v for k, v in cfg["method"].items() if k != "name"})
    method.load_state_dict(load_checkpoint(run_dir / "checkpoints" / checkpoint)["model"])
    return method, train_counts


def evaluate_run_split(run_dir: Path, split: str):
    """(long table, metrics) of the run's best checkpoint on ``split``."""
    if not (run_dir / "config.yaml").is_file():
        raise TallyError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load(run_dir / "config.yaml")
    splits = load_splits(cfg["data"])
    if split not in splits:
        raise TallyError(f"--split: unknown split {split!r} (this run has {', '.join(splits)})")
    device = resolve_device(cfg["train"]["device"])
    method, train_counts = load_trained_method(run_dir, cfg, splits)
    method.to(device)
    bank = bank_for_training(splits[split], cfg["data"]["image_size"], workers=cfg["data"]["decode_workers"])
    table = evaluate_split(method.net, split, bank, splits[split], train_counts, cfg, device)
    return table, evaluation.split_metrics(table)
