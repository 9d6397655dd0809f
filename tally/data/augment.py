"""Batch augmentation and normalisation on the training device, vectorised over the batch.

Random horizontal flip and random crop after reflect padding are one gather with per-sample index
grids: no per-sample Python, no padded copy, works on uint8 before the float conversion.
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float_normalized(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.to(torch.float32) / 255.0 - mean_t) / std_t


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect-padding index map ('reflect' mode: edge not repeated) for indices in [-(n-1), 2n-2]."""
    idx = idx.abs()
    return torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)


def augment(x: torch.Tensor, generator: torch.Generator | None = None, flip: bool = True,
            crop_padding: int = 0, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Random h-flip (p = 0.5) and random crop after reflect padding, then normalise to float.

    ``generator`` must live on x's device; the same generator state gives the same output.
    """
    b, _, h, w = x.shape
    if b == 0 or (not flip and crop_padding <= 0):
        return to_float_normalized(x, mean, std)
    p = int(crop_padding)
    if p > min(h, w) - 1:
        raise ValueError(f"crop_padding {p} must be smaller than the image side {min(h, w)}")
    dev = x.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if p > 0:
        off = torch.randint(0, 2 * p + 1, (b, 2), generator=generator, device=dev) - p
        rows = _reflect(rows + off[:, :1], h)
        cols = _reflect(cols + off[:, 1:], w)
    if flip:
        flipped = torch.rand(b, generator=generator, device=dev) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=dev)[:, None, None]
    out = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return to_float_normalized(out.permute(0, 3, 1, 2), mean, std)
