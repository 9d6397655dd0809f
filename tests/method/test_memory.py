"""Class prototypes and domain statistics: the update formula, first observation, DDP reduction."""

import torch

from tally.method.memory import FeatureMemory

K, D, SHAPE = 4, 3, (2, 3, 3)


def _batch(b, seed, classes=(0, 1, 3), domains=(0, 2)):
    g = torch.Generator().manual_seed(seed)
    zhat = torch.randn(b, *SHAPE, generator=g)
    y = torch.tensor(classes)[torch.randint(len(classes), (b,), generator=g)]
    mu = torch.randn(b, SHAPE[0], 1, 1, generator=g) + 5
    sigma = torch.rand(b, SHAPE[0], 1, 1, generator=g) * 0.1 + 0.05
    d = torch.tensor(domains)[torch.randint(len(domains), (b,), generator=g)]
    return zhat, y, mu, sigma, d


def _expected(mem_before, zhat, y, mu, sigma, d, m):
    """The METHOD.md formula, one class/domain at a time (the slow, obvious way)."""
    p = mem_before.prototypes.clone()
    dm, ds = mem_before.domain_mean.clone(), mem_before.domain_std.clone()
    for c in range(K):
        sel = y == c
        if sel.any():
            mean = zhat[sel].mean(0)
            p[c] = m * p[c] + (1 - m) * mean if mem_before.class_seen[c] else mean
    for k in range(D):
        sel = d == k
        if sel.any():
            mm, ss = mu[sel].flatten(1).mean(0), sigma[sel].flatten(1).mean(0)
            seen = mem_before.domain_seen[k]
            dm[k] = m * dm[k] + (1 - m) * mm if seen else mm
            ds[k] = m * ds[k] + (1 - m) * ss if seen else ss
    return p, dm, ds


def _copy(mem):
    new = FeatureMemory(K, D, SHAPE, mem.momentum)
    new.load_state_dict(mem.state_dict())
    return new


def _check(mem, p, dm, ds):
    torch.testing.assert_close(mem.prototypes, p)
    torch.testing.assert_close(mem.domain_mean, dm)
    torch.testing.assert_close(mem.domain_std, ds)


def test_initial_state_is_not_noise():
    mem = FeatureMemory(K, D, SHAPE, 0.8)
    assert (
        torch.all(mem.prototypes == 0) and torch.all(mem.domain_mean == 0) and torch.all(mem.domain_std == 1)
    )
    assert not mem.class_seen.any() and not mem.domain_seen.any()
    assert {n for n, _ in mem.named_buffers()} == {
        "prototypes",
        "domain_mean",
        "domain_std",
        "class_seen",
        "domain_seen",
    }
    assert list(mem.parameters()) == []


class OneWorkerSync:
    """A MemorySync for a world of one: the DDP code paths without a process group."""

    def __init__(self, gather_classes: bool):
        self.gather_classes = gather_classes

    def all_reduce_sum(self, tensors):
        pass

    def all_gather(self, tensor):
        return tensor


def test_updates_follow_formula_first_observation_and_absent_untouched():
    # sparse path, dense (DDP) path, gathered (DDP) path
    for sync in (None, OneWorkerSync(gather_classes=False), OneWorkerSync(gather_classes=True)):
        mem = FeatureMemory(K, D, SHAPE, 0.8)
        for step, classes in enumerate([(0, 1), (0, 1, 3), (1,)]):
            batch = _batch(6, step, classes=classes)
            zhat, y, mu, sigma, d = batch
            before = _copy(mem)
            mem.update((zhat, y), (mu, sigma, d), sync)
            _check(mem, *_expected(before, *batch, 0.8))
        # class 2 and domain 1 never observed: untouched and unseen
        assert torch.all(mem.prototypes[2] == 0) and not mem.class_seen[2]
        assert (
            torch.all(mem.domain_mean[1] == 0)
            and torch.all(mem.domain_std[1] == 1)
            and not mem.domain_seen[1]
        )
        assert mem.class_seen[[0, 1, 3]].all() and mem.domain_seen[[0, 2]].all()


def test_one_process_class_paths_follow_the_formula_in_either_memory_layout():
    # K <= B takes the matmul, K > B the sparse path; both must give the formula, also on prototypes kept
    # channels_last (training's layout) fed with batches of the other layout
    for rows in (6, 3):
        for layout in (torch.contiguous_format, torch.channels_last):
            mem = FeatureMemory(K, D, SHAPE, 0.8)
            # junk in unseen entries (a state dict may hold any): a first observation must replace it
            junk = torch.randn(K, *SHAPE, generator=torch.Generator().manual_seed(9))
            mem.prototypes = junk.contiguous(memory_format=layout)
            for step, classes in enumerate([(0, 1), (0, 1, 3), (1,)]):
                batch = _batch(rows, step, classes=classes)
                before = _copy(mem)
                mem.update(batch[:2], batch[2:])
                _check(mem, *_expected(before, *batch, 0.8))
            assert mem.prototypes.is_contiguous(memory_format=layout)  # updated in place, not replaced
            assert mem.class_seen.tolist() == [True, True, False, True]


def test_first_observation_is_the_batch_mean():
    mem = FeatureMemory(K, D, SHAPE, 0.8)
    zhat, y, mu, sigma, d = _batch(8, 1)
    mem.update((zhat, y), (mu, sigma, d))
    for c in y.unique():
        torch.testing.assert_close(mem.prototypes[c], zhat[y == c].mean(0))
    for k in d.unique():
        torch.testing.assert_close(mem.domain_mean[k], mu[d == k].flatten(1).mean(0))
        torch.testing.assert_close(mem.domain_std[k], sigma[d == k].flatten(1).mean(0))
    assert torch.all(mem.domain_std > 0)


def test_class_and_domain_parts_are_independent():
    mem = FeatureMemory(K, D, SHAPE, 0.5)
    zhat, y, mu, sigma, d = _batch(5, 2)
    mem.update(class_part=(zhat, y))
    assert mem.class_seen.any() and not mem.domain_seen.any()
    mem.update(domain_part=(mu, sigma, d))
    assert mem.domain_seen.any()


class AddOtherSync(OneWorkerSync):
    """A fake all-reduce SUM between two workers: adds the other worker's local sums in place."""

    def __init__(self, other_sums):
        super().__init__(gather_classes=False)
        self.other_sums = other_sums

    def all_reduce_sum(self, tensors):
        for t, o in zip(tensors, self.other_sums, strict=True):
            t.add_(o)


def test_two_workers_reduced_equal_one_big_batch():
    m = 0.8
    ref = FeatureMemory(K, D, SHAPE, m)
    workers = [FeatureMemory(K, D, SHAPE, m), FeatureMemory(K, D, SHAPE, m)]
    for step in range(3):
        b1, b2 = _batch(5, 10 + step, classes=(0, 1)), _batch(7, 20 + step, classes=(1, 3))
        big = [torch.cat([u, v]) for u, v in zip(b1, b2, strict=True)]
        ref.update((big[0], big[1]), (big[2], big[3], big[4]))
        local = [w.batch_sums(*b) for w, b in zip(workers, (b1, b2), strict=True)]
        for i, (w, b) in enumerate(zip(workers, (b1, b2), strict=True)):
            w.update((b[0], b[1]), (b[2], b[3], b[4]), AddOtherSync(local[1 - i]))
        for w in workers:
            _check(w, ref.prototypes, ref.domain_mean, ref.domain_std)
            assert torch.equal(w.class_seen, ref.class_seen) and torch.equal(w.domain_seen, ref.domain_seen)
    torch.testing.assert_close(workers[0].prototypes, workers[1].prototypes, atol=0, rtol=0)


def test_batch_sums_shapes_and_counts():
    mem = FeatureMemory(K, D, SHAPE, 0.8)
    zhat, y, mu, sigma, d = _batch(9, 3)
    sums = mem.batch_sums(zhat, y, mu, sigma, d)
    assert [tuple(s.shape) for s in sums] == [(K, *SHAPE), (K,), (D, SHAPE[0]), (D, SHAPE[0]), (D,)]
    assert torch.equal(sums[1], torch.bincount(y, minlength=K).float())
    assert torch.equal(sums[4], torch.bincount(d, minlength=D).float())
    empty = mem.batch_sums()
    assert all(torch.all(s == 0) for s in empty)


def test_inputs_with_grad_are_detached():
    mem = FeatureMemory(K, D, SHAPE, 0.8)
    zhat, y, mu, sigma, d = _batch(4, 4)
    zhat.requires_grad_()
    mu.requires_grad_()
    mem.update((zhat, y), (mu, sigma, d))
    assert not mem.prototypes.requires_grad and not mem.domain_mean.requires_grad
