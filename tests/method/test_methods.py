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
