"""A tiny finished run on the embedded data, for the export, predict and serve tests (seconds)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CONFIG = {
    "data": {"source": "embedded", "setting": "sub", "image_size": 32},
    "model": {"arch": "resnet10", "cut": "layer2"},
    "method": {"name": "tally"},
    "train": {"epochs": 2, "warmup_epochs": 1, "steps_per_epoch": 3, "batch_size": 32, "lr": 3e-3,
              "device": "cpu"},
}


def tiny_run(run_dir: Path) -> Path:
    """Train TINY_CONFIG into run_dir on one thread (bit-reproducible, and kind to a shared machine)."""
    from tally.training import train_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(TINY_CONFIG, run_dir, ctx=None)
    finally:
        torch.set_num_threads(threads)
    return run_dir
