"""Index samplers: target distributions (chi-square, fixed seeds), exact resume, vectorised draws."""

import pytest
import torch
from scipy import stats as sps

from tally.method.samplers import (
    ClassBalancedSampler,
    DomainBalancedSampler,
    UniformSampler,
    build_sampler,
)

# a long-tailed label vector with an absent class (3) and a singleton class (4)
COUNTS = [300, 40, 5, 0, 1]
_ORDER = torch.randperm(sum(COUNTS), generator=torch.Generator().manual_seed(0))
LABELS = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])[_ORDER]
# 3 domains, domain 0 the big one
DOMAINS = torch.where(torch.arange(LABELS.numel()) < 250, 0, torch.arange(LABELS.numel()) % 3)


def _chi2_uniform(counts):
    counts = counts.double()
    return sps.chisquare(counts.numpy()).pvalue


def test_class_balanced_picks_classes_uniformly_then_examples_uniformly():
    s = ClassBalancedSampler(LABELS, seed=1)
    idx = s.draw(8000)
    assert idx.dtype == torch.int64 and idx.shape == (8000,)
    drawn = LABELS[idx]
    per_class = torch.bincount(drawn, minlength=5)
    assert per_class[3] == 0  # absent class is never drawn
    assert _chi2_uniform(per_class[[0, 1, 2, 4]]) > 1e-3
    for c in (0, 1):  # within a class, each example equally likely
        members = torch.nonzero(c == LABELS).reshape(-1)
        hits = torch.bincount(idx[drawn == c], minlength=LABELS.numel())[members]
        assert _chi2_uniform(hits) > 1e-3
    assert torch.all(idx[drawn == 4] == torch.nonzero(LABELS == 4).item())


def test_domain_balanced_picks_domains_uniformly():
    s = DomainBalancedSampler(DOMAINS, seed=2)
    idx = s.draw(6000)
    per_domain = torch.bincount(DOMAINS[idx], minlength=3)
    assert _chi2_uniform(per_domain) > 1e-3
    members = torch.nonzero(DOMAINS == 0).reshape(-1)
    hits = torch.bincount(idx[DOMAINS[idx] == 0], minlength=DOMAINS.numel())[members]
    assert _chi2_uniform(hits) > 1e-3


def test_uniform_is_a_reshuffled_permutation_per_pass():
    n = 10
    s = UniformSampler(n, seed=3)
    draws = torch.cat([s.draw(7) for _ in range(300)])  # 2100 = 210 passes, draws cross passes
    passes = draws.reshape(-1, n)
    assert torch.all(passes.sort(1).values == torch.arange(n))  # every pass is a permutation
    assert len({tuple(p.tolist()) for p in passes}) > 150  # reshuffled each pass
    # the position of example 0 within a pass is uniform
    pos = (passes == 0).nonzero()[:, 1]
    assert _chi2_uniform(torch.bincount(pos, minlength=n)) > 1e-3
    assert s.epoch == 209


@pytest.mark.parametrize("kind", ["uniform", "class_balanced", "domain_balanced"])
def test_state_dict_round_trip_reproduces_draws(kind):
    s = build_sampler(kind, LABELS, DOMAINS, seed=5)
    s.draw(500)
    state = s.state_dict()
    expected = torch.cat([s.draw(200), s.draw(33)])
    t = build_sampler(kind, LABELS, DOMAINS, seed=999)
    t.load_state_dict(state)
    assert torch.equal(torch.cat([t.draw(200), t.draw(33)]), expected)
    # the saved state is not aliased by later draws
    u = build_sampler(kind, LABELS, DOMAINS, seed=0)
    u.load_state_dict(state)
    assert torch.equal(torch.cat([u.draw(200), u.draw(33)]), expected)


def test_same_seed_same_stream_different_seed_different_stream():
    a, b, c = (ClassBalancedSampler(LABELS, seed=s) for s in (4, 4, 5))
    x = a.draw(50)
    assert torch.equal(x, b.draw(50)) and not torch.equal(x, c.draw(50))


def test_build_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown sampler kind"):
        build_sampler("nope", LABELS, DOMAINS, 0)
    with pytest.raises(ValueError, match="differ in length"):
        build_sampler("uniform", LABELS, DOMAINS[:-1], 0)
    with pytest.raises(ValueError, match="sampler state"):
        UniformSampler(5).load_state_dict(UniformSampler(6).state_dict())


def test_uniform_sampler_shards_each_pass_over_the_ranks():
    """Ranks share the permutation and take disjoint blocks: in rank order, the draw of one unsharded
    sampler with the global batch, so each example comes once per pass across all ranks."""
    n, world, batch = 60, 3, 4
    ranks = [UniformSampler(n, seed=5, rank=r, world_size=world) for r in range(world)]
    whole = UniformSampler(n, seed=5)
    for _ in range(12):  # 144 draws: crosses two pass boundaries
        parts = [s.draw(batch) for s in ranks]
        assert torch.equal(torch.cat(parts), whole.draw(world * batch))
    fresh = [UniformSampler(n, seed=6, rank=r, world_size=world) for r in range(world)]
    one_pass = torch.cat([torch.cat([s.draw(batch) for s in fresh]) for _ in range(n // (world * batch))])
    assert sorted(one_pass.tolist()) == list(range(n))
