"""`tally data cache` writes a pre-resized uint8 cache that training then finds by itself."""

from __future__ import annotations

import torch
import yaml

from tally.cli import main
from tally.data import load_splits
from tally.data.bank import bank_for_training, build_bank, find_cached_bank
from tally.data.synthetic import make_folder_dataset


def test_cache_command_then_training_uses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TALLY_CACHE", str(tmp_path / "cache"))
    root = make_folder_dataset(tmp_path / "data", per_pair=12, size=20)
    config = {"data": {"source": "folder", "root": str(root), "n_val": 2, "n_test": 2, "image_size": 16}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    splits = load_splits({k: v for k, v in config["data"].items() if k != "image_size"})
    assert find_cached_bank(splits["train"], 16) is None

    assert main(["data", "cache", str(path), "--workers", "0"]) == 0
    cached = find_cached_bank(splits["train"], 16)
    assert cached is not None
    fresh = build_bank(splits["train"], 16)
    assert torch.equal(cached.images, fresh.images) and torch.equal(cached.labels, fresh.labels)
    assert torch.equal(bank_for_training(splits["train"], 16).images, fresh.images)
    # another image size is another cache entry, not a stale hit
    assert find_cached_bank(splits["train"], 24) is None


def test_training_reads_the_cache_not_the_images(tmp_path, monkeypatch):
    """A cache hit is observable: once cached, the image files can be unreadable and training still runs
    (a decode would fail on the first image)."""
    from tally.config import validate
    from tally.training import train_run

    monkeypatch.setenv("TALLY_CACHE", str(tmp_path / "cache"))
    root = make_folder_dataset(tmp_path / "data", per_pair=12, size=20)
    config = {"data": {"source": "folder", "root": str(root), "n_val": 2, "n_test": 2, "image_size": 16},
              "model": {"arch": "resnet10", "cut": "layer1"}, "method": {"name": "erm"},
              "train": {"epochs": 2, "warmup_epochs": 1, "steps_per_epoch": 1, "batch_size": 4, "device": "cpu"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["data", "cache", str(path), "--workers", "0"]) == 0
    for image in root.rglob("*.png"):
        image.write_bytes(b"not an image any more")
    metrics = train_run(validate(config), tmp_path / "run")
    assert set(metrics) == {"val", "test_sub"}
