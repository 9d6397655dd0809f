"""Checkpoint files and RNG state: atomic saves, safe loads (weights_only=True), exact resume."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tally.errors import TallyError


def rng_state() -> dict:
    """The global RNGs, device-independent: CPU torch and Python. No per-GPU CUDA state: training draws
    nothing from the global CUDA generators (its streams are CPU generators, tally.training.BatchSource),
    and a list of per-GPU states could not be restored by a resume on fewer GPUs, or on the CPU."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore rng_state(); a "cuda" entry (per-GPU states of older checkpoints) is ignored."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def save_checkpoint(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TallyError(f"{path}: checkpoint not found") from None
    except Exception as e:  # a truncated or foreign file
        raise TallyError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None
