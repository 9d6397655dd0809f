"""Long-tail losses: effective-number class weights, focal loss, balanced softmax."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from tally.method.memory import MemorySync


def effective_number_weights(class_counts: torch.Tensor, beta: float = 0.999) -> torch.Tensor:
    """w_c proportional to (1 - beta) / (1 - beta^n_c) (Cui et al. 2019) for classes with n_c > 0,
    normalised to sum to the number of such classes; absent classes get weight 0. float32 (K,).

    beta = 0 gives uniform weights, beta -> 1 inverse-frequency weights (beta = 1 is taken as that limit).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    n = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    present = n > 0
    if not bool(present.any()):
        raise ValueError("effective_number_weights: no class has a training example")
    safe = n.clamp_min(1)
    w = 1.0 / safe if beta == 1.0 else (1.0 - beta) / (1.0 - torch.pow(beta, safe))
    w = torch.where(present, w, 0.0)
    return (w * present.sum() / w.sum()).float()


def weighted_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, sync: MemorySync | None = None
) -> torch.Tensor:
    """F.cross_entropy(weight=...): sum_i w_{y_i} l_i / sum_i w_{y_i}, over the GLOBAL batch under DDP.

    Each worker only sees its own rows, and DDP averages the workers' gradients. So a worker returns
    world_size * (its sum of w l) / (all workers' sum of w): the average of those over the workers is
    exactly the one-process loss of the concatenated batch, and so are the averaged gradients.
    Normalising by the local sum instead would weight the examples of a worker whose batch happened to
    hold light (head) classes more than the same examples in one big batch.
    """
    if weight is None and sync is None:
        return F.cross_entropy(logits, y)
    if sync is None:
        return F.cross_entropy(logits, y, weight=weight)
    per_example = F.cross_entropy(logits.float(), y, reduction="none")
    w = weight[y] if weight is not None else torch.ones_like(per_example)
    total = w.detach().sum().reshape(1).clone()
    sync.all_reduce_sum([total])
    return (per_example * w).sum() * sync.world_size / total[0]


def focal_loss(
    logits: torch.Tensor, y: torch.Tensor, gamma: float = 2.0, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """mean_i [ -w_{y_i} (1 - p_i)^gamma log p_i ] (Lin et al. 2017); gamma = 0 is (weighted) CE.

    Averaged over the batch (not divided by the sum of weights, unlike F.cross_entropy(weight=...)).
    """
    logp = F.log_softmax(logits.float(), dim=1).gather(1, y.reshape(-1, 1)).reshape(-1)
    loss = -(1.0 - logp.exp()).clamp_min(0).pow(gamma) * logp
    if weight is not None:
        loss = loss * weight.to(loss.dtype)[y]
    return loss.mean()


def log_prior(class_counts: torch.Tensor) -> torch.Tensor:
    """log n_c, and -inf for classes absent from training (exp(-inf) = 0 in the softmax)."""
    n = torch.as_tensor(class_counts, dtype=torch.float32).reshape(-1)
    return torch.where(n > 0, n.clamp_min(1).log(), float("-inf"))


def balanced_softmax_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    class_counts: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE on logits + log n_c (Ren et al. 2020). Absent classes get a -inf logit, so they take no
    probability mass and no gradient; log_softmax is -inf safe, and a label is never an absent class.
    Pass a precomputed `prior` (log_prior(counts) on the right device) to skip recomputing it.
    """
    if prior is None:
        prior = log_prior(class_counts)
    return F.cross_entropy(logits.float() + prior.to(logits.device), y)
