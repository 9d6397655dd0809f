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
    mu, _, sigma = _centred(z, eps, 1 if unbiased else 0)
    return mu, sigma


def _dot_hw(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over H, W of a * b, (B, C, H, W) x2 -> (B, C, 1, 1), without a product map (vecdot reads each once)."""
    return torch.linalg.vecdot(a.flatten(2), b.flatten(2)).unsqueeze(-1).unsqueeze(-1)


def _centred(z: torch.Tensor, eps: float, correction: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu, z - mu, sigma), sigma from the two-pass variance sum((z - mu)^2) / (HW - correction).

    Not torch.var_mean: on the CPU its Welford loop takes 21 ms on an 18 x 512 x 28 x 28 map (ResNet-50's
    layer2 at 224 px), mean + centring + vecdot 5 ms; the two-pass sum is as accurate.
    """
    n = z.shape[2] * z.shape[3]
    mu = z.mean((2, 3), keepdim=True)
    centred = z - mu
    return mu, centred, (_dot_hw(centred, centred) / (n - correction) + eps).sqrt()


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


def tally_mix(
    z_a: torch.Tensor,
    z_n: torch.Tensor,
    proto: torch.Tensor | None,
    mem_mu: torch.Tensor,
    mem_sig: torch.Tensor,
    lam1: torch.Tensor,
    lam2: torch.Tensor,
    eps: float = EPS,
    unbiased: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TALLY's main-step statistics and mix in one autograd node: (z', zhat_A, mu_N, sigma_N).

    z' = mix(zhat(z_A), proto, mu(z_N), sigma(z_N), mem_mu, mem_sig, lam1, lam2) (proto None: no
    prototype, zhat_mix = zhat_A), differentiable in z_A and z_N only (memories and lambdas never receive
    gradients); zhat_A, mu_N, sigma_N are returned for the memory update, without gradients. Same values
    as the composition of `moments` and `mix`, but its backward is written out: the normalisation's
    gradient collapses to two passes over the map per batch instead of autograd's dozen of ops with their
    temporaries and gradient accumulations (ResNet-50 at 224 px on the CPU: 140 -> ~40 ms per step).
    zhat_A and z' keep z_A's memory layout, so the head gets the layout a plain forward would give it
    (on the CPU oneDNN returns channels_last maps from a contiguous ResNet); each gradient keeps its
    input's layout.
    """
    return _TallyMix.apply(z_a, z_n, proto, mem_mu, mem_sig, lam1, lam2, eps, 1 if unbiased else 0)


class _TallyMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_a, z_n, proto, mem_mu, mem_sig, lam1, lam2, eps, correction):
        mu_a, centred_a, sig_a = _centred(z_a, eps, correction)
        r_a = sig_a.reciprocal()
        zhat_a = centred_a.mul_(r_a)
        mu_n, _, sig_n = _centred(z_n, eps, correction)
        l1 = _per_example(lam1 if proto is not None else torch.ones_like(lam1), z_a)
        l2 = _per_example(lam2, mu_n)
        mu_mix = torch.lerp(mem_mu.reshape(mu_n.shape).to(mu_n.dtype), mu_n, l2)
        sig_mix = torch.lerp(mem_sig.reshape(sig_n.shape).to(sig_n.dtype), sig_n, l2)
        k1 = sig_mix * l1  # z' = k1 * zhat_A + (sig_mix - k1) * proto + mu_mix
        z = torch.addcmul(mu_mix, zhat_a, k1)
        if proto is not None:
            z.addcmul_(proto.to(z.dtype), sig_mix - k1)
        ctx.save_for_backward(zhat_a, z_n, proto, r_a, mu_n, sig_n, sig_mix, l1, l2)
        ctx.correction = correction
        ctx.mark_non_differentiable(zhat_a, mu_n, sig_n)
        ctx.set_materialize_grads(False)
        return z, zhat_a, mu_n, sig_n

    @staticmethod
    def backward(ctx, g, *_):
        none = (None,) * 7
        if g is None:
            return (None, None, *none)
        zhat_a, z_n, proto, r_a, mu_n, sig_n, sig_mix, l1, l2 = ctx.saved_tensors
        hw, corr = zhat_a.shape[2] * zhat_a.shape[3], ctx.correction
        s_g = g.sum((2, 3), keepdim=True)  # d loss / d mu_mix
        s_ga = _dot_hw(g, zhat_a)
        d_a = d_n = None
        if ctx.needs_input_grad[0]:
            # dzhat = rk/r * g; dz = r * (dzhat - mean(dzhat)) - r * zhat * sum(dzhat * zhat) / (HW - corr)
            rk = r_a * sig_mix * l1
            d_a = torch.addcmul(-rk * s_g / hw, g, rk, out=torch.empty_like(zhat_a))
            d_a.addcmul_(zhat_a, -rk * s_ga / (hw - corr))
        if ctx.needs_input_grad[1]:
            # dz = d_mu / HW + d_sigma * (z - mu) / ((HW - corr) * sigma), an affine map of z per channel
            d_sig_mix = s_ga if proto is None else torch.lerp(_dot_hw(g, proto.to(g.dtype)), s_ga, l1)
            b = l2 * d_sig_mix / ((hw - corr) * sig_n)
            d_n = torch.addcmul(l2 * s_g / hw - b * mu_n, z_n, b, out=torch.empty_like(z_n))
        return (d_a, d_n, *none)
