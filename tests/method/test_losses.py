"""Effective-number weights, focal loss, balanced softmax, the globally normalised weighted CE."""

import math

import torch
import torch.nn.functional as F

from tally.method.losses import (
    balanced_softmax_loss,
    effective_number_weights,
    focal_loss,
    log_prior,
    weighted_cross_entropy,
)


def test_effective_number_weights_hand_example():
    beta = 0.9
    w = effective_number_weights(torch.tensor([1, 2, 0]), beta)
    # raw: (1-b)/(1-b^1) = 1, (1-b)/(1-b^2) = 0.1/0.19; normalised to sum to 2 (present classes)
    raw = torch.tensor([1.0, 0.1 / 0.19])
    expected = torch.cat([raw * 2 / raw.sum(), torch.zeros(1)])
    torch.testing.assert_close(w, expected)
    assert w.dtype == torch.float32 and math.isclose(w.sum().item(), 2.0, rel_tol=1e-6)


def test_effective_number_weights_limits():
    counts = torch.tensor([100, 10, 1, 0])
    torch.testing.assert_close(effective_number_weights(counts, 0.0), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    inv = torch.tensor([0.01, 0.1, 1.0])
    torch.testing.assert_close(effective_number_weights(counts, 1.0)[:3], inv * 3 / inv.sum())
    w = effective_number_weights(counts, 0.999)
    assert w[0] < w[1] < w[2] and w[3] == 0


def test_focal_reduces_to_ce_and_downweights_easy_examples():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 4, generator=g), torch.randint(4, (6,), generator=g)
    torch.testing.assert_close(focal_loss(logits, y, 0.0), F.cross_entropy(logits, y))
    assert focal_loss(logits, y, 2.0) < F.cross_entropy(logits, y)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    manual = (F.cross_entropy(logits, y, reduction="none") * w[y]).mean()
    torch.testing.assert_close(focal_loss(logits, y, 0.0, weight=w), manual)


def test_balanced_softmax_adds_log_prior_and_handles_absent_classes():
    counts = torch.tensor([50, 5, 0])
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0])
    loss = balanced_softmax_loss(logits, y, counts)
    shifted = logits.detach()[:, :2] + torch.tensor([50.0, 5.0]).log()
    torch.testing.assert_close(loss, F.cross_entropy(shifted, y))
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[:, 2] == 0)
    assert log_prior(counts)[2] == float("-inf")


class _TwoRankSync:
    """A stand-in for all-reduce in a 2-worker world: adds the other worker's (known) weight sum."""

    gather_classes, world_size = False, 2

    def __init__(self, other_sum):
        self.other_sum = other_sum

    def all_reduce_sum(self, tensors):
        tensors[0] += self.other_sum


def test_weighted_ce_is_normalised_by_the_global_weight_sum():
    """Two workers' losses (and so DDP's averaged gradients) equal the loss of their concatenated batch,
    although one worker holds only heavy (tail) classes and the other only light ones."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=g, requires_grad=True)
    y = torch.tensor([0, 0, 1, 0, 3, 3, 2, 3])
    w = effective_number_weights(torch.tensor([500, 400, 3, 2]))
    halves = [slice(0, 4), slice(4, 8)]
    sums = [w[y[h]].sum() for h in halves]
    per_worker = [weighted_cross_entropy(logits[h], y[h], w, _TwoRankSync(sums[1 - i]))
                  for i, h in enumerate(halves)]
    global_loss = F.cross_entropy(logits, y, weight=w)
    mean = (per_worker[0] + per_worker[1]) / 2  # what DDP's gradient averaging optimises
    torch.testing.assert_close(mean, global_loss)
    (grad_workers,) = torch.autograd.grad(mean, logits)
    (grad_global,) = torch.autograd.grad(global_loss, logits)
    torch.testing.assert_close(grad_workers, grad_global)
    # a per-worker normalisation would not: the tail-class worker's rows would count for less
    local = (F.cross_entropy(logits[:4], y[:4], weight=w) + F.cross_entropy(logits[4:], y[4:], weight=w)) / 2
    assert not torch.allclose(local, global_loss)
