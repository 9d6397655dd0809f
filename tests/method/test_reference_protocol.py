"""`protocol: reference` trains what the published code trains: a TALLY step equals the transcription of its
step (tests/method/reference_transcription.py) on fixed inputs, through a warm-up epoch, the warm-up ->
TALLY boundary and a TALLY epoch boundary, and the kept epoch follows its tie rule. Each reference
behaviour switched off alone breaks the equality."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tally.config import validate
from tally.method import methods
from tally.method.backbone import SplitResNet
from tally.method.memory import FeatureMemory
from tally.method.methods import TrainInfo, build_method
from tally.training.run import TrainStep, _LossModule, improves
from tests.method import reference_transcription as ref

K, D, B, SIZE, SEED = 3, 2, 6, 32, 1
COUNTS = [50, 10, 3]
SCHEDULE = [("warmup", 2), ("main", 2), ("main", 2)]  # epochs: warm-up, first TALLY, second TALLY
TOL = 1e-5
LR = 1e-5  # the reference's PACS and VLCS learning rate (config.py:67, :86)
# validation values of the TALLY epochs and their tie-breaks (mean pair accuracy): epochs 1 and 2 tie
VAL_STATS, TIEBREAKS = [0.4, 0.6, 0.6, 0.5], [0.3, 0.5, 0.4, 0.2]


def _epochs():
    """(phase, [batches of each step]) per epoch, fixed."""
    g = torch.Generator().manual_seed(123)

    def batch():
        return (torch.randn(B, 3, SIZE, SIZE, generator=g), torch.randint(K, (B,), generator=g),
                torch.randint(D, (B,), generator=g))

    return [(phase, [[batch() for _ in range(1 if phase == "warmup" else 2)] for _ in range(steps)])
            for phase, steps in SCHEDULE]


def _lambdas(n_steps: int) -> torch.Tensor:
    """(steps, 2, B): per TALLY step the semantic and the style coefficients, folded (tally.py:41, :49)."""
    lam = torch.rand(n_steps, 2, B, generator=torch.Generator().manual_seed(7))
    return torch.maximum(lam, 1 - lam)


def _kept_epoch(tie_rule: str) -> int:
    best = {"value": -math.inf, "epoch": None}
    for i, (v, t) in enumerate(zip(VAL_STATS, TIEBREAKS, strict=True)):
        if improves((v, t), best, tie_rule):
            best = {"value": v, "tiebreak": t, "epoch": i}
    return best["epoch"]


def _max_diff(pairs) -> float:
    """Largest difference, relative to the reference's magnitude where it exceeds 1 (float32 rounding of
    gradients of size ~10 is itself ~1e-6)."""
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() for a, b in pairs)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster than several competing for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def discrepancy(monkeypatch, **overrides) -> dict[str, float]:
    """Largest differences (absolute, relative above 1) of loss, gradients and memories between our TALLY under
    `protocol: reference` (with `overrides` of its method switches) and the transcription, over SCHEDULE."""
    torch.manual_seed(0)
    net = SplitResNet("resnet10", "layer2", K)
    ref_net = copy.deepcopy(net)
    cfg = validate({"train": {"protocol": "reference"}, "method": {"seed": SEED, **overrides}})["method"]
    method = build_method("tally", net, TrainInfo(K, D, torch.tensor(COUNTS), SIZE),
                          {k: v for k, v in cfg.items() if k != "name"})
    # the fixed inputs: the reference's start (dataset.py:205-207), the noise ours draws under memory_init noise
    noise = FeatureMemory(K, D, method.memory.prototypes.shape[1:])
    noise.fill_noise(torch.Generator().manual_seed(SEED))
    c = noise.domain_mean.shape[1]
    memories = ref.Memories(noise.prototypes, noise.domain_std.reshape(D, c, 1, 1),
                            noise.domain_mean.reshape(D, c, 1, 1))
    ref_opt = torch.optim.Adam(ref_net.parameters(), lr=LR, weight_decay=1e-6, amsgrad=True)
    reference = ref.Reference(ref_net, memories, ref_opt, COUNTS)
    opt = torch.optim.Adam(method.parameters(), lr=LR, weight_decay=1e-6, amsgrad=True)
    step = TrainStep(_LossModule(method), opt, torch.device("cpu"))  # the training loop's own step

    lams = iter(_lambdas(sum(s for p, s in SCHEDULE if p == "main")))
    drawn: list[torch.Tensor] = []

    def fixed_lambdas(n, alpha, fold=True, generator=None, device=None):  # what np.random.beta drew there
        drawn.append(next(lams))
        return drawn[-1].reshape(-1).clone()

    monkeypatch.setattr(methods, "sample_lambdas", fixed_lambdas)
    worst = {"loss": 0.0, "grad": 0.0, "memory": 0.0}
    for phase, steps in _epochs():
        method.start_epoch(phase)  # as tally.training.run's loop does before each epoch
        reference.start_epoch()
        for batches in steps:
            loss = step(batches, phase)
            if phase == "warmup":
                ref_loss, ref_grads = reference.warmup_step(*batches[0])
            else:
                (xa, ya, _), (xn, _, dn) = batches
                ref_loss, ref_grads = reference.tally_step(xa, ya, xn, dn, *drawn[-1])
            worst["loss"] = max(worst["loss"], abs(loss.item() - ref_loss.item()))
            worst["grad"] = max(worst["grad"], _max_diff(zip([p.grad for p in net.parameters()], ref_grads,
                                                             strict=True)))
            m = method.memory
            worst["memory"] = max(worst["memory"], _max_diff([
                (m.prototypes, memories.classes_norm), (m.domain_mean, memories.domains_mean.reshape(D, c)),
                (m.domain_std, memories.domains_sigma.reshape(D, c))]))
    return worst


def test_reference_protocol_equals_the_published_step(monkeypatch):
    worst = discrepancy(monkeypatch)
    assert all(v <= TOL for v in worst.values()), worst
    assert _kept_epoch("latest") == ref.keeps(VAL_STATS) == 2


@pytest.mark.parametrize("switch", [
    {"memory_init": "first"}, {"warmup_swap": False}, {"mixing_swap": False}, {"memory_snapshot": False},
    {"unbiased_std": False},
])
def test_each_reference_behaviour_matters(monkeypatch, switch):
    worst = discrepancy(monkeypatch, **switch)
    assert max(worst.values()) > 100 * TOL, worst


def test_the_tie_rule_matters():
    assert _kept_epoch("earliest") != ref.keeps(VAL_STATS)


def test_reference_protocol_resolves_every_switch_and_explicit_values_win():
    cfg = validate({"train": {"protocol": "reference"}, "data": {"setting": "domain", "held_out": ["a"]}})
    assert (cfg["model"]["imagenet_weights"], cfg["data"]["crop_padding"], cfg["train"]["bf16"]) == ("v1", 0, False)
    assert (cfg["data"]["carve_validation"], cfg["data"]["oracle_selection"], cfg["train"]["tie_rule"]) == (
        False, True, "latest")
    assert validate({"train": {"protocol": "reference"}, "data": {"source": "wilds", "root": "/x"}})["data"][
        "wilds_validation"] == "ood"
    sub = validate({"train": {"protocol": "reference"}})["data"]  # where they do not apply: the defaults
    assert (sub["carve_validation"], sub["wilds_validation"], sub["oracle_selection"]) == (True, "id", False)
    paper = validate({})
    assert (paper["model"]["imagenet_weights"], paper["data"]["crop_padding"], paper["train"]["bf16"],
            paper["data"]["carve_validation"], paper["data"]["oracle_selection"], paper["train"]["tie_rule"],
            paper["method"]["memory_init"], paper["method"]["warmup_swap"]) == (
        "default", 2, True, True, False, "earliest", "first", False)
    mine = validate({"train": {"protocol": "reference", "bf16": True}, "data": {"crop_padding": 2},
                     "method": {"memory_snapshot": False}})
    assert (mine["train"]["bf16"], mine["data"]["crop_padding"], mine["method"]["memory_snapshot"]) == (True, 2, False)
    assert mine["method"]["mixing_swap"] is True
    assert validate(mine) == mine  # a stored config re-validates to itself
