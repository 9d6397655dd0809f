"""Feature statistics, mixing coefficients and the TALLY mixing formula (METHOD.md, "The network split").

Naming is fixed everywhere in this package to avoid the reference code's mean/std swap (its defect 1):
`mu` is always a mean, `sigma` always a standard deviation, and every signature lists mu before sigma.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def moments(z: torch.Tensor, eps: float = EPS, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example, per-channel (mu, sigma) over H, W, each (B, C, 1, 1).

    sigma = sqrt(population variance (unbiased=False, divide by H*W) + eps). The reference code uses
    the unbiased variance (tally.py:9, `x.var`); we use the population one so that sigma * zhat + mu
    reproduces z exactly and zhat has unit variance per channel. The difference is a factor
    sqrt(HW/(HW-1)) (< 0.1% at 28x28); `unbiased=True` (TALLY's `unbiased_std`, protocol reference) is the
    reference's.
    """
    var, mu = torch.var_mean(z, dim=(2, 3), keepdim=True, correction=1 if unbiased else 0)
    return mu, (var + eps).sqrt()


def feature_stats(z: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(zhat, mu, sigma) of a (B, C, H, W) map: zhat = (z - mu) / sigma, see `moments`."""
    mu, sigma = moments(z, eps)
    return (z - mu) / sigma, mu, sigma


def sample_lambdas(
    n: int,
    alpha: float,
    fold: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n draws of Beta(alpha, alpha), folded to max(l, 1 - l) when `fold`, as float32 on `device`.

    Drawn on the CPU from `generator` (a seeded CPU torch.Generator whose state the caller can
    checkpoint) through torch's Dirichlet sampler (the one torch.distributions.Beta uses; it accepts a
    generator and is robust for small alpha), then moved with `to_device` (n is tiny).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    conc = torch.full((n, 2), float(alpha), dtype=torch.float64)
    lam = torch._sample_dirichlet(conc, generator=generator)[:, 0]
    if fold:
        lam = torch.maximum(lam, 1.0 - lam)
    return to_device(lam.float(), device)


def to_device(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """Move a small CPU tensor without stalling the host: a pageable host-to-GPU copy synchronises the
    stream (the CPU would wait for the queued step), a pinned one with non_blocking does not."""
    if device is None:
        return t
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _per_example(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) and (B, C) -> (B, C, 1, 1), so it broadcasts over a (B, C, H, W) map."""
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim())).to(like.dtype)


def mix(
    zhat_a: torch.Tensor,
    proto: torch.Tensor,
    mu_n: torch.Tensor,
    sig_n: torch.Tensor,
    mem_mu: torch.Tensor,
    mem_sig: torch.Tensor,
    lam1: torch.Tensor,
    lam2: torch.Tensor,
) -> torch.Tensor:
    """z' = sig_mix * zhat_mix + mu_mix with, per example i,

    zhat_mix = lam1 * zhat_a + (1 - lam1) * proto       (proto = P[y_A], (B, C, H, W))
    mu_mix   = lam2 * mu_n   + (1 - lam2) * mem_mu      (mem_mu = M[d_N], (B, C) or (B, C, 1, 1))
    sig_mix  = lam2 * sig_n  + (1 - lam2) * mem_sig     (mem_sig = S[d_N])

    lam1, lam2: (B,). Uses torch.lerp (one kernel; with weight 1 it returns the first input exactly).
    """
    l1 = _per_example(lam1, zhat_a)
    l2 = _per_example(lam2, mu_n)
    zhat_mix = torch.lerp(proto.to(zhat_a.dtype), zhat_a, l1)
    mu_mix = torch.lerp(mem_mu.reshape(mu_n.shape).to(mu_n.dtype), mu_n, l2)
    sig_mix = torch.lerp(mem_sig.reshape(sig_n.shape).to(sig_n.dtype), sig_n, l2)
    return torch.addcmul(mu_mix, sig_mix, zhat_mix)
