"""Feature statistics, lambdas and the mixing formula."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from tally.method.stats import feature_stats, mix, moments, sample_lambdas, tally_mix


def _maps(b=4, c=3, h=5, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g) * 3 + 2


def test_feature_stats_match_definition():
    z = _maps()
    zhat, mu, sigma = feature_stats(z)
    assert mu.shape == sigma.shape == (4, 3, 1, 1)
    flat = z.flatten(2)
    torch.testing.assert_close(mu.flatten(1), flat.mean(2))
    torch.testing.assert_close(sigma.flatten(1), (flat.var(2, unbiased=False) + 1e-6).sqrt())
    torch.testing.assert_close(zhat, (z - mu) / sigma)
    # zhat: zero mean, (almost) unit population std per channel
    torch.testing.assert_close(zhat.mean((2, 3)), torch.zeros(4, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(zhat.std((2, 3), unbiased=False), torch.ones(4, 3), atol=1e-4, rtol=0)


def test_moments_is_mu_then_sigma():
    z = torch.full((2, 2, 3, 3), 5.0) + 0.1 * torch.tensor([[-1.0, 1.0, 0.0]]).expand(3, 3)
    mu, sigma = moments(z)
    assert torch.allclose(mu, torch.full_like(mu, 5.0))
    assert torch.all(sigma < 0.2) and torch.all(sigma > 0.05)


def test_mix_with_lambda_one_returns_input_map():
    z = _maps()
    zhat, mu, sigma = feature_stats(z)
    b, c = z.shape[:2]
    junk = torch.randn_like(z) * 100
    out = mix(
        zhat, junk, mu, sigma, torch.randn(b, c) * 9, torch.rand(b, c) + 3, torch.ones(b), torch.ones(b)
    )
    torch.testing.assert_close(out, z, atol=1e-5, rtol=1e-5)


def test_mix_formula_hand_values():
    b, c, h, w = 2, 3, 2, 2
    g = torch.Generator().manual_seed(1)
    zhat, proto = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    mu_n, sig_n = torch.randn(b, c, 1, 1, generator=g), torch.rand(b, c, 1, 1, generator=g) + 0.5
    mem_mu, mem_sig = torch.randn(b, c, generator=g), torch.rand(b, c, generator=g) + 0.5
    lam1, lam2 = torch.tensor([0.6, 0.9]), torch.tensor([0.75, 0.5])
    out = mix(zhat, proto, mu_n, sig_n, mem_mu, mem_sig, lam1, lam2)
    l1, l2 = lam1.view(b, 1, 1, 1), lam2.view(b, 1, 1, 1)
    zmix = l1 * zhat + (1 - l1) * proto
    mu_mix = l2 * mu_n + (1 - l2) * mem_mu.view(b, c, 1, 1)
    sig_mix = l2 * sig_n + (1 - l2) * mem_sig.view(b, c, 1, 1)
    torch.testing.assert_close(out, sig_mix * zmix + mu_mix)


def test_mix_gradients_flow_to_inputs_not_memories():
    """The loss trains the network through z; the memories it mixes in (filled from features that
    carry gradients) stay constants: they hold no graph, take no gradient and backward leaves them as
    they were."""
    from tally.method.memory import FeatureMemory

    z = _maps().requires_grad_()
    zhat, mu, sigma = feature_stats(z)
    memory = FeatureMemory(num_classes=2, num_domains=2, stem_shape=z.shape[1:])
    y, d = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 0, 1])
    memory.update((zhat, y), (mu, sigma, d))  # inputs still attached to z's graph
    before = {k: v.clone() for k, v in memory.state_dict().items()}
    proto, mem_mu, mem_sig = memory.prototypes[y], memory.domain_mean[d], memory.domain_std[d]
    assert not any(t.requires_grad for t in (memory.prototypes, memory.domain_mean, memory.domain_std))
    out = mix(zhat, proto, mu, sigma, mem_mu, mem_sig, torch.full((4,), 0.7), torch.full((4,), 0.7))
    out.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert all(t.grad is None for t in (memory.prototypes, memory.domain_mean, memory.domain_std))
    for key, value in memory.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


@pytest.mark.parametrize("fold", [True, False])
def test_lambdas_follow_beta(fold):
    alpha, n = 0.5, 4000
    lam = sample_lambdas(n, alpha, fold, torch.Generator().manual_seed(3), "cpu").double().numpy()
    assert lam.dtype == np.float64 and lam.shape == (n,)
    if fold:
        assert lam.min() >= 0.5 and lam.max() <= 1.0
        cdf = lambda x: np.clip(2 * sps.beta.cdf(x, alpha, alpha) - 1, 0, 1)  # noqa: E731
    else:
        cdf = sps.beta(alpha, alpha).cdf
    assert sps.kstest(lam, cdf).pvalue > 1e-3


def test_lambdas_are_reproducible_and_checkpointable():
    g = torch.Generator().manual_seed(7)
    a = sample_lambdas(10, 0.2, True, g)
    state = g.get_state()
    b = sample_lambdas(10, 0.2, True, g)
    assert not torch.equal(a, b)
    g2 = torch.Generator().manual_seed(123)
    g2.set_state(state)
    assert torch.equal(sample_lambdas(10, 0.2, True, g2), b)
    assert torch.equal(sample_lambdas(10, 0.2, True, torch.Generator().manual_seed(7)), a)


def test_small_alpha_is_finite():
    lam = sample_lambdas(2000, 0.05, False, torch.Generator().manual_seed(0))
    assert torch.isfinite(lam).all() and lam.min() >= 0 and lam.max() <= 1


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("with_prototype", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_tally_mix_equals_moments_then_mix_with_its_gradients(unbiased, with_prototype, layout):
    """The fused main-step op gives the values of the composition and, with its hand-written backward,
    autograd's gradients of it (and gradcheck's numerical ones), for either memory layout."""
    g = torch.Generator().manual_seed(3)
    b, c, h, w = 4, 3, 5, 6

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    za = (rand(b, c, h, w) * 2 + 1).contiguous(memory_format=layout).requires_grad_()
    zn = (rand(b, c, h, w) * 3 - 1).contiguous(memory_format=layout).requires_grad_()
    proto = rand(b, c, h, w) if with_prototype else None
    mem_mu, mem_sig = rand(b, c), rand(b, c).abs() + 0.5
    lam1, lam2 = torch.rand(b, generator=g, dtype=torch.float64), torch.rand(b, generator=g, dtype=torch.float64)
    z, zhat_a, mu_n, sig_n = tally_mix(za, zn, proto, mem_mu, mem_sig, lam1, lam2, unbiased=unbiased)

    mu_a, sig_a = moments(za, unbiased=unbiased)
    expected_zhat = (za - mu_a) / sig_a
    expected_mu, expected_sig = moments(zn, unbiased=unbiased)
    lam1_used = lam1 if with_prototype else torch.ones_like(lam1)
    expected = mix(expected_zhat, expected_zhat if proto is None else proto, expected_mu, expected_sig,
                   mem_mu, mem_sig, lam1_used, lam2)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(zhat_a, expected_zhat.detach())
    torch.testing.assert_close((mu_n, sig_n), (expected_mu.detach(), expected_sig.detach()))
    assert not (zhat_a.requires_grad or mu_n.requires_grad or sig_n.requires_grad)

    weights = rand(b, c, h, w)
    torch.testing.assert_close(torch.autograd.grad((z * weights).sum(), (za, zn)),
                               torch.autograd.grad((expected * weights).sum(), (za, zn)))
    assert torch.autograd.gradcheck(
        lambda a, n: tally_mix(a, n, proto, mem_mu, mem_sig, lam1, lam2, unbiased=unbiased)[0], (za, zn))


def test_tally_mix_leaves_a_map_unchanged_when_it_takes_its_own_statistics():
    z = _maps().double()
    mu, sigma = moments(z)
    out, zhat, _, _ = tally_mix(z, z, torch.randn_like(z) * 100, mu, sigma, torch.ones(4), torch.rand(4))
    torch.testing.assert_close(out, z)
    torch.testing.assert_close(zhat, feature_stats(z)[0])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_tally_mix_keeps_the_stem_layout_for_the_head_and_for_each_gradient(layout):
    # the head gets the layout a plain forward gives it (on the CPU, oneDNN returns channels_last maps from
    # a contiguous ResNet); a gradient in another layout than its activation costs a copy in the stem
    leaves = [_maps(seed=s).contiguous(memory_format=layout).requires_grad_() for s in (1, 2)]
    za, zn = (leaf * 1 for leaf in leaves)  # not leaves: autograd would lay a leaf's .grad out like it
    grads = {}
    za.register_hook(lambda g: grads.setdefault("a", g))
    zn.register_hook(lambda g: grads.setdefault("n", g))
    mu, sigma = moments(za.detach())
    z, zhat, _, _ = tally_mix(za, zn, torch.randn(4, 3, 5, 6), mu, sigma, torch.rand(4), torch.rand(4))
    assert z.is_contiguous(memory_format=layout) and zhat.is_contiguous(memory_format=layout)
    other = torch.channels_last if layout == torch.contiguous_format else torch.contiguous_format
    z.backward(torch.randn(4, 3, 5, 6).contiguous(memory_format=other))  # the head's gradient may differ
    assert grads["a"].is_contiguous(memory_format=layout) and grads["n"].is_contiguous(memory_format=layout)
