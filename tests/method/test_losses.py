"""Effective-number weights, focal loss, balanced softmax."""

import math

import torch
import torch.nn.functional as F

from tally.method.losses import balanced_softmax_loss, effective_number_weights, focal_loss, log_prior


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
