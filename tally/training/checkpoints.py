"""Checkpoint files and RNG state: atomic saves, safe loads (weights_only=True), exact resume."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tally import files
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
    """Write to a temporary file of a unique name, then rename: a reader sees the old or the new
    checkpoint, two writers never share a temporary file, and no exit path leaves one behind."""
    files.write_atomic(path, lambda f: torch.save(payload, f))  # umask honoured, never through a link


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TallyError(f"{path}: checkpoint not found") from None
    except Exception as e:  # a truncated or foreign file
        raise TallyError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None
