"""Methods: each trains, TALLY keeps means as means and stds as stds, configs, state, no Ray."""

import ast
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tally.method import METHODS, SplitResNet, TrainInfo, build_method, method_defaults
from tally.method.stats import feature_stats, mix, sample_lambdas

pytestmark = pytest.mark.usefixtures("one_thread")


INFO = TrainInfo(num_classes=3, num_domains=2, class_counts=torch.tensor([20, 6, 2]), image_size=32)


def _batch(seed, b=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 32, 32, generator=g)
    y = torch.arange(b) % 3
    x = x + y.view(-1, 1, 1, 1).float()  # learnable signal
    return x, y, torch.arange(b) % 2


def _net(seed=0):
    torch.manual_seed(seed)
    return SplitResNet("resnet10", "layer2", 3)


def _batches(method, phase, seed):
    return tuple(_batch(seed + i) for i in range(len(method.batch_kinds(phase))))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_and_its_loss_decreases(name):
    m = build_method(name, _net(), INFO, {"seed": 0})
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = {}
    for phase, steps in (("warmup", 2), ("main", 4)):
        batches = _batches(m, phase, 1)  # a fixed batch per phase: the loss must go down on it
        for _ in range(steps):
            loss = m(batches, phase)
            assert loss.dim() == 0 and torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.setdefault(phase, []).append(loss.item())
    assert losses["main"][-1] < losses["main"][0]
    m.eval()
    with torch.no_grad():
        assert m.predict(_batch(0)[0]).shape == (6, 3)


def test_batch_kinds():
    t = build_method("tally", _net(), INFO, {})
    assert t.batch_kinds("warmup") == ("uniform",)
    assert t.batch_kinds("main") == ("class_balanced", "domain_balanced")
    t2 = build_method("tally", _net(), INFO, {"class_balanced": False, "domain_balanced": False})
    assert t2.batch_kinds("main") == ("uniform", "uniform")
    for name in ("erm", "reweight", "balanced_softmax", "focal", "mixstyle"):
        assert build_method(name, _net(), INFO).batch_kinds("main") == ("uniform",)
    with pytest.raises(ValueError, match="phase"):
        t.batch_kinds("eval")


def test_config_defaults_and_unknown_keys():
    d = method_defaults("tally")
    assert d["alpha"] == 0.5 and d["fold"] is True and d["momentum"] == 0.8 and d["loss_beta"] == 0.999
    with pytest.raises(ValueError, match="alpah"):
        build_method("tally", _net(), INFO, {"alpah": 0.2})
    with pytest.raises(ValueError, match="unknown method"):
        build_method("nope", _net(), INFO)
    assert build_method("focal", _net(), INFO, {"name": "focal", "gamma": 1.0}).cfg["gamma"] == 1.0


class _StyleNet(nn.Module):
    """Identity stem, so the stem features are exactly the inputs and their statistics are known."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Identity()
        self.head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.stem(x))


STYLE = {0: (5.0, 0.1), 1: (-2.0, 3.0)}  # domain -> (mean, std) of its feature maps


def _style_batch(g, b=8):
    d = torch.randint(2, (b,), generator=g)
    y = torch.randint(3, (b,), generator=g)
    x = torch.randn(b, 3, 8, 8, generator=g)
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), unbiased=False, keepdim=True)
    mean = torch.tensor([STYLE[int(k)][0] for k in d]).view(-1, 1, 1, 1)
    std = torch.tensor([STYLE[int(k)][1] for k in d]).view(-1, 1, 1, 1)
    return x * std + mean, y, d


def test_means_stay_means_and_stds_stay_stds():
    """Regression test for the reference's mean/std swap (defect 1), through warm-up and TALLY steps."""
    m = build_method("tally", _StyleNet(), TrainInfo(3, 2, torch.tensor([5, 5, 5]), 8), {"seed": 0})
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    mem = m.memory
    for phase, steps in (("warmup", 3), ("main", 5)):
        for _ in range(steps):
            loss = m(tuple(_style_batch(g) for _ in m.batch_kinds(phase)), phase)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert mem.domain_seen.all()
            for k, (mean, std) in STYLE.items():
                torch.testing.assert_close(mem.domain_mean[k], torch.full((3,), mean), atol=1e-3, rtol=1e-3)
                torch.testing.assert_close(mem.domain_std[k], torch.full((3,), std), atol=1e-3, rtol=1e-3)
    # prototypes are means of standardised maps: zero mean, unit std per channel
    torch.testing.assert_close(mem.prototypes.mean((2, 3)), torch.zeros(3, 3), atol=1e-4, rtol=0)


def test_main_step_mixes_with_memories_from_before_the_step():
    m = build_method("tally", _StyleNet(), TrainInfo(3, 2, torch.tensor([5, 5, 5]), 8), {"seed": 0})
    g = torch.Generator().manual_seed(1)
    m((_style_batch(g),), "warmup")
    mem = {k: v.clone() for k, v in m.memory.state_dict().items()}
    gen = torch.Generator()
    gen.set_state(m.generator.get_state())
    a, n = _style_batch(g), _style_batch(g)
    loss = m((a, n), "main")
    assert not torch.equal(m.memory.prototypes, mem["prototypes"])  # the step updated the memories
    # the same step by hand, with the memories and generator from before it
    lam = sample_lambdas(16, 0.5, True, gen)
    lam1 = torch.where(mem["class_seen"][a[1]], lam[:8], 1.0)
    lam2 = torch.where(mem["domain_seen"][n[2]], lam[8:], 1.0)
    zhat_a, _, _ = feature_stats(a[0])
    _, mu_n, sig_n = feature_stats(n[0])
    z = mix(
        zhat_a,
        mem["prototypes"][a[1]],
        mu_n,
        sig_n,
        mem["domain_mean"][n[2]],
        mem["domain_std"][n[2]],
        lam1,
        lam2,
    )
    expected = nn.functional.cross_entropy(m.net.head(z), a[1], weight=m.class_weight)
    torch.testing.assert_close(loss, expected)


def test_ablations_without_memories_give_plain_forward_loss():
    m = build_method(
        "tally", _net(), INFO, {"use_prototype": False, "use_domain_memory": False, "loss_beta": None}
    )
    m.eval()  # BatchNorm in eval: the stem output of A does not depend on N
    a = _batch(3)
    m((a,), "warmup")
    loss = m((a, _batch(4)), "main")
    # with lam = 1 everywhere the A map simply takes N's statistics
    zhat_a, _, _ = feature_stats(m.net.stem(a[0]))
    _, mu_n, sig_n = feature_stats(m.net.stem(_batch(4)[0]))
    expected = nn.functional.cross_entropy(m.net.head(sig_n * zhat_a + mu_n), a[1])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_state_dict_resumes_exactly():
    a = build_method("tally", _net(0), INFO, {"seed": 3})
    for s in range(2):
        a((_batch(s),), "warmup")
    a((_batch(5), _batch(6)), "main")
    b = build_method("tally", _net(1), INFO, {"seed": 99})
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.memory.prototypes, a.memory.prototypes) and b.memory.class_seen.all()
    batches = (_batch(7), _batch(8))
    torch.testing.assert_close(a(batches, "main"), b(batches, "main"), atol=0, rtol=0)
    torch.testing.assert_close(a.memory.prototypes, b.memory.prototypes, atol=0, rtol=0)


def test_memories_are_buffers_on_the_model():
    m = build_method("tally", _net(), INFO)
    names = set(m.state_dict())
    assert {"memory.prototypes", "memory.domain_mean", "memory.domain_std"} <= names
    assert all(not n.startswith("memory.") for n, _ in m.named_parameters())
    assert m.memory.prototypes.shape == (3, 128, 4, 4)


def test_method_core_never_imports_ray():
    """Static allowlist of what tally/method imports: the standard library, torch, torchvision, numpy."""
    allowed = set(sys.stdlib_module_names) | {"torch", "torchvision", "numpy", "tally"}
    root = Path(__file__).resolve().parents[2] / "tally" / "method"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in allowed, f"{path.name} imports {name}"
                assert top != "tally" or name.startswith("tally.method"), f"{path.name} imports {name}"


def _stem_calls(method):
    """Record every output of method.net.stem."""
    calls = []
    method.net.stem.register_forward_hook(lambda mod, args, out: calls.append(out.detach().clone()))
    return calls


def test_a_and_n_go_through_the_stem_in_two_passes_by_default():
    """The reference's protocol: BatchNorm normalises A by A's statistics and N by N's, and updates its
    running statistics once per batch. The joint pass stays available as stem_pass: joint."""
    import copy

    a, n = _batch(1), _batch(2)
    m = build_method("tally", _net(), INFO, {"seed": 0})
    assert m.cfg["stem_pass"] == "separate"
    alone = copy.deepcopy(m.net.stem)  # train mode: BatchNorm uses the batch's own statistics
    bn = m.net.stem.bn1
    before = int(bn.num_batches_tracked)
    calls = _stem_calls(m)
    m((a, n), "main")
    assert [c.shape[0] for c in calls] == [6, 6]
    torch.testing.assert_close(calls[0], alone(a[0]).detach())
    torch.testing.assert_close(calls[1], alone(n[0]).detach())
    assert int(bn.num_batches_tracked) == before + 2

    joint = build_method("tally", _net(), INFO, {"seed": 0, "stem_pass": "joint"})
    calls = _stem_calls(joint)
    before = int(joint.net.stem.bn1.num_batches_tracked)
    joint((a, n), "main")
    assert [c.shape[0] for c in calls] == [12]
    assert int(joint.net.stem.bn1.num_batches_tracked) == before + 1


@pytest.mark.parametrize("name, cfg, field", [
    ("tally", {"alpha": 0.0}, "alpha"),
    ("tally", {"loss_beta": 1.0}, "loss_beta"),
    ("tally", {"momentum": 1.5}, "momentum"),
    ("tally", {"stem_pass": "both"}, "stem_pass"),
    ("mixstyle", {"alpha": 0.0}, "alpha"),
    ("mixstyle", {"p": 1.5}, "p"),
    ("reweight", {"beta": None}, "beta"),
    ("reweight", {"beta": 1.0}, "beta"),
])
def test_settings_that_cannot_work_are_refused_when_the_method_is_built(name, cfg, field):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        build_method(name, _net(), INFO, cfg)


def test_tally_accepts_the_edges_of_its_ranges():
    m = build_method("tally", _net(), INFO, {"momentum": 1.0, "loss_beta": None, "alpha": 1e-3})
    assert m.memory.momentum == 1.0 and m.class_weight is None


class _LocalGatherSync:
    """MemorySync of a one-worker 'world' taking the gathered path (its matmul is what autocast hit)."""

    gather_classes = True
    world_size = 1

    def all_reduce_sum(self, tensors):
        pass

    def all_gather(self, tensor):
        return tensor


def test_memory_updates_stay_float32_under_bf16_autocast():
    """CPU bf16 autocast shows what CUDA bf16 autocast did: the gathered update's matmul ran in bf16."""
    info = TrainInfo(3, 2, torch.tensor([5, 5, 5]), 8)
    methods = [build_method("tally", _StyleNet(), info, {"seed": 0}, sync=_LocalGatherSync()) for _ in range(2)]
    methods[1].load_state_dict(methods[0].state_dict())
    g = torch.Generator().manual_seed(3)
    steps = [("warmup", (_style_batch(g),)), ("main", (_style_batch(g), _style_batch(g)))]
    for phase, batches in steps:
        methods[0](batches, phase)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            methods[1](batches, phase)
    plain, amp = methods[0].memory.state_dict(), methods[1].memory.state_dict()
    for key in plain:
        assert amp[key].dtype == plain[key].dtype
        torch.testing.assert_close(amp[key], plain[key], msg=lambda m, key=key: f"{key}: {m}")


def test_mixstyle_statistics_are_float32_under_bf16_autocast():
    m = build_method("mixstyle", _net(), INFO, {"seed": 0, "p": 1.0})
    seen = []
    m.net.head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    stem_out = []
    m.net.stem.register_forward_hook(lambda mod, args, out: stem_out.append(out))
    gen = torch.Generator()
    gen.set_state(m.generator.get_state())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m((_batch(0),), "main")
    assert seen[0].dtype == torch.float32
    # the same mix by hand, from float32 statistics of the (bf16) stem output
    torch.rand((), generator=gen)
    perm = torch.randperm(6, generator=gen)
    lam = sample_lambdas(6, m.cfg["alpha"], False, gen)
    zhat, mu, sigma = feature_stats(stem_out[0].float())
    expected = mix(zhat, zhat, mu, sigma, mu[perm], sigma[perm], torch.ones(6), lam)
    torch.testing.assert_close(seen[0], expected)


def test_a_batch_of_two_ranks_draws_each_ranks_own_lambdas():
    """A method playing ranks 0 and 1 mixes each half with that rank's stream: what two workers do."""
    info = TrainInfo(3, 2, torch.tensor([5, 5, 5]), 8)
    g = torch.Generator().manual_seed(5)
    warm = _style_batch(g, 8)
    a, n = _style_batch(g, 8), _style_batch(g, 8)
    both = build_method("tally", _StyleNet(), info, seeds=[11, 12])
    halves = [build_method("tally", _StyleNet(), info, seeds=[s]) for s in (11, 12)]
    for m in halves:
        m.load_state_dict({k: v for k, v in both.state_dict().items() if not k.endswith("_extra_state")},
                          strict=False)
        m((warm,), "warmup")
    both((warm,), "warmup")
    captured = []
    both.net.head.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    both((a, n), "main")
    for r, m in enumerate(halves):
        part = []
        m.net.head.register_forward_pre_hook(lambda mod, args, part=part: part.append(args[0]))
        rows = slice(4 * r, 4 * r + 4)
        m(tuple((x[rows], y[rows], d[rows]) for x, y, d in (a, n)), "main")
        torch.testing.assert_close(part[0], captured[0][rows])


def test_a_checkpoint_from_before_per_rank_streams_still_loads():
    """Old runs' best.pt stored one generator as {"generator": state}; `tally evaluate` must load them."""
    m = build_method("tally", _net(), INFO, {"seed": 3})
    state = m.state_dict()
    state["_extra_state"] = {"generator": torch.Generator().manual_seed(9).get_state()}
    m.load_state_dict(state)
    assert torch.equal(m.generator.get_state(), torch.Generator().manual_seed(9).get_state())


def test_the_mix_reads_prototypes_in_the_layout_of_trainings_stem_maps(monkeypatch):
    # training's batches come from augment, gathered as (B, H, W, C): channels_last maps through the stem.
    # The prototypes are kept so too, or every mixing op and the class update would read two layouts
    from tally.data.augment import augment
    from tally.method import methods

    seen, mix_fn, cl = [], methods.tally_mix, torch.channels_last

    def spy(za, zn, proto, *rest, **kw):
        seen.append((za.is_contiguous(memory_format=cl), proto.is_contiguous(memory_format=cl)))
        return mix_fn(za, zn, proto, *rest, **kw)

    monkeypatch.setattr(methods, "tally_mix", spy)
    m = build_method("tally", _net(), INFO, {"seed": 0})
    g = torch.Generator().manual_seed(0)

    def batch(seed):
        x, y, d = _batch(seed)
        images = ((x - x.min()) / (x.max() - x.min()) * 255).to(torch.uint8)
        return augment(images, g, flip=True, crop_padding=4), y, d

    m((batch(0),), "warmup")
    m((batch(1), batch(2)), "main")
    assert seen == [(True, True)]
    assert m.memory.prototypes.is_contiguous(memory_format=torch.channels_last)
