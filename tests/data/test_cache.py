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
