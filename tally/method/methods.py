"""Training methods behind one small interface, and a registry by name.

A method is an nn.Module holding `net` (a SplitResNet or anything with `.stem` / `.head`) and, for TALLY,
its `memory`, so one state_dict covers weights, memories and the method's RNG state (extra state).
The training loop asks `batch_kinds(phase)` which samplers to draw from (one batch per entry, in that
order; two equal kinds mean two consecutive draws from that sampler), calls `loss(batches, phase)`
(or the module itself: `forward` is `loss`, so DDP can wrap the whole method) and evaluates with
`predict(x)`, a plain forward without mixing.

Phases: "warmup" and "main". Every method gets the same warm-up epochs from the loop; the baselines
use their own loss with the uniform sampler in both phases, TALLY trains plain ERM in warm-up while
filling its memories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tally.method.losses import balanced_softmax_loss, effective_number_weights, focal_loss, log_prior
from tally.method.memory import FeatureMemory, MemorySync
from tally.method.stats import mix, moments, sample_lambdas, to_device

PHASES = ("warmup", "main")
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (x float (B,3,H,W), y int64 (B,), d int64 (B,))


@dataclass
class TrainInfo:
    """What a method needs to know about the training set."""

    num_classes: int
    num_domains: int
    class_counts: torch.Tensor  # (K,) training examples per class (0 for classes absent from training)
    image_size: int | tuple[int, int]

    def __post_init__(self):
        self.class_counts = torch.as_tensor(self.class_counts, dtype=torch.int64).reshape(-1)
        if self.class_counts.numel() != self.num_classes:
            raise ValueError(
                f"class_counts has {self.class_counts.numel()} entries, num_classes={self.num_classes}"
            )


METHODS: dict[str, type[Method]] = {}


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


class Method(nn.Module):
    """Base: config with defaults (unknown keys rejected), a seeded CPU generator, the interface.

    Every method accepts `seed` (its own RNG stream: lambdas, pairings; None = drawn from the global torch
    RNG at construction, so a seeded run stays reproducible). The generator state is saved as the
    module's extra state, so `state_dict()` / `load_state_dict()` resume it exactly.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self, net: nn.Module, info: TrainInfo, cfg: dict | None = None, sync: MemorySync | None = None
    ):
        super().__init__()
        self.net = net
        self.info = info
        self.sync = sync
        self.cfg = self.resolve_config(cfg)
        seed = self.cfg["seed"]
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(int(seed))

    @classmethod
    def resolve_config(cls, cfg: dict | None) -> dict[str, Any]:
        """Defaults overlaid by cfg; a key the method does not know is a ValueError naming it."""
        cfg = dict(cfg or {})
        if cfg.get("name", cls.name) != cls.name:
            raise ValueError(f"method config names {cfg['name']!r} but builds {cls.name!r}")
        cfg.pop("name", None)
        known = {"seed": None} | cls.defaults
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ValueError(f"method {cls.name!r}: unknown config key(s) {unknown}; known: {sorted(known)}")
        return known | cfg

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    def batch_kinds(self, phase: str) -> tuple[str, ...]:
        _check_phase(phase)
        return ("uniform",)

    def loss(self, batches: tuple[Batch, ...], phase: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batches: tuple[Batch, ...], phase: str) -> torch.Tensor:
        """The training loss (so that DistributedDataParallel(method)(batches, phase) works)."""
        return self.loss(batches, phase)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a plain forward pass (no mixing)."""
        return self.net(x)

    def _unpack(self, batches: tuple[Batch, ...], phase: str) -> tuple[Batch, ...]:
        kinds = self.batch_kinds(phase)
        if len(batches) != len(kinds):
            raise ValueError(
                f"{self.name} in phase {phase!r} takes {len(kinds)} batch(es) {kinds}, got {len(batches)}"
            )
        return tuple(batches)


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")


@register("erm")
class ERM(Method):
    """Empirical risk minimisation: unweighted cross-entropy on uniform batches."""

    def loss(self, batches, phase):
        ((x, y, _),) = self._unpack(batches, phase)
        return F.cross_entropy(self.net(x), y)


@register("reweight")
class Reweight(Method):
    """Class-balanced re-weighting: CE with effective-number weights (beta)."""

    defaults = {"beta": 0.999}

    def __init__(self, net, info, cfg=None, sync=None):
        super().__init__(net, info, cfg, sync)
        w = effective_number_weights(info.class_counts, self.cfg["beta"])
        self.register_buffer("class_weight", w.to(self._device()), persistent=False)

    def loss(self, batches, phase):
        ((x, y, _),) = self._unpack(batches, phase)
        return F.cross_entropy(self.net(x), y, weight=self.class_weight)


@register("balanced_softmax")
class BalancedSoftmax(Method):
    """Balanced softmax: CE on logits + log class prior; prediction uses the plain logits."""

    def __init__(self, net, info, cfg=None, sync=None):
        super().__init__(net, info, cfg, sync)
        self.register_buffer("log_prior", log_prior(info.class_counts).to(self._device()), persistent=False)

    def loss(self, batches, phase):
        ((x, y, _),) = self._unpack(batches, phase)
        return balanced_softmax_loss(self.net(x), y, prior=self.log_prior)


@register("focal")
class Focal(Method):
    """Focal loss with focusing parameter gamma."""

    defaults = {"gamma": 2.0}

    def loss(self, batches, phase):
        ((x, y, _),) = self._unpack(batches, phase)
        return focal_loss(self.net(x), y, self.cfg["gamma"])


@register("mixstyle")
class MixStyle(Method):
    """MixStyle-like baseline (Zhou et al. 2021) at the stem output: with probability p per batch, mix each
    example's (mu, sigma) with those of a random partner, lam ~ Beta(alpha, alpha) (unfolded). As in
    MixStyle the statistics are detached; no prototypes, no balanced sampling.
    """

    defaults = {"p": 0.5, "alpha": 0.1}

    def loss(self, batches, phase):
        ((x, y, _),) = self._unpack(batches, phase)
        z = self.net.stem(x)
        if torch.rand((), generator=self.generator).item() < self.cfg["p"]:
            b = z.shape[0]
            perm = to_device(torch.randperm(b, generator=self.generator), z.device)
            lam = sample_lambdas(b, self.cfg["alpha"], False, self.generator, z.device)
            mu, sigma = (t.detach() for t in moments(z))
            zhat = (z - mu) / sigma
            z = mix(zhat, zhat, mu, sigma, mu[perm], sigma[perm], torch.ones_like(lam), lam)
        return F.cross_entropy(self.net.head(z), y)


@register("tally")
class Tally(Method):
    """TALLY (METHOD.md): warm-up = ERM on uniform batches while filling the memories; main = class-balanced
    batch A + domain-balanced batch N, one stem pass over both, A's semantics mixed with its class
    prototype and N's style mixed with its domain's stored statistics, head, class-weighted CE on y_A.

    The memories are updated after the mix (mixing uses the memories from before the step). An example
    whose class (domain) has never been observed keeps its own zhat (mu, sigma): lam = 1 for it.
    A and N share one stem pass (torch.cat), so BatchNorm normalises over both (the reference ran two
    passes). Ablations: use_prototype / use_domain_memory False fix lam1 / lam2 to 1; class_balanced /
    domain_balanced False draw A / N from the uniform sampler instead.
    """

    defaults = {
        "alpha": 0.5,
        "fold": True,
        "momentum": 0.8,
        "loss_beta": 0.999,
        "use_prototype": True,
        "use_domain_memory": True,
        "class_balanced": True,
        "domain_balanced": True,
    }

    def __init__(self, net, info, cfg=None, sync=None):
        super().__init__(net, info, cfg, sync)
        device = self._device()
        shape = _stem_shape(net, info.image_size)
        self.memory = FeatureMemory(info.num_classes, info.num_domains, shape, self.cfg["momentum"])
        self.memory.to(device)
        beta = self.cfg["loss_beta"]
        w = None if beta is None else effective_number_weights(info.class_counts, beta).to(device)
        self.register_buffer("class_weight", w, persistent=False)

    def batch_kinds(self, phase):
        _check_phase(phase)
        if phase == "warmup":
            return ("uniform",)
        return (
            "class_balanced" if self.cfg["class_balanced"] else "uniform",
            "domain_balanced" if self.cfg["domain_balanced"] else "uniform",
        )

    def loss(self, batches, phase):
        batches = self._unpack(batches, phase)
        return self._warmup_loss(*batches) if phase == "warmup" else self._main_loss(*batches)

    def _warmup_loss(self, batch: Batch) -> torch.Tensor:
        x, y, d = batch
        z = self.net.stem(x)
        loss = F.cross_entropy(self.net.head(z), y)
        with torch.no_grad():
            zf = z.detach().float()
            mu, sigma = moments(zf)
            self.memory.update(((zf - mu) / sigma, y), (mu, sigma, d), self.sync)
        return loss

    def _main_loss(self, batch_a: Batch, batch_n: Batch) -> torch.Tensor:
        (xa, ya, _), (xn, _, dn) = batch_a, batch_n
        b = xa.shape[0]
        if xn.shape[0] != b:
            raise ValueError(f"TALLY pairs A and N example by example: sizes {b} and {xn.shape[0]} differ")
        if xa.shape[1:] == xn.shape[1:] and xa.dtype == xn.dtype:
            # split, not slicing: its backward is one cat, slicing's is a zero-filled full map per slice
            za, zn = self.net.stem(torch.cat([xa, xn])).float().split(b)
        else:
            za, zn = self.net.stem(xa).float(), self.net.stem(xn).float()
        mu_a, sig_a = moments(za)
        mu_n, sig_n = moments(zn)
        zhat_a = (za - mu_a) / sig_a

        mem, cfg, dev = self.memory, self.cfg, za.device
        ones = torch.ones(b, device=dev)
        lam = sample_lambdas(2 * b, cfg["alpha"], cfg["fold"], self.generator, dev)
        lam1 = torch.where(mem.class_seen[ya], lam[:b], 1.0) if cfg["use_prototype"] else ones
        lam2 = torch.where(mem.domain_seen[dn], lam[b:], 1.0) if cfg["use_domain_memory"] else ones
        proto = mem.prototypes[ya] if cfg["use_prototype"] else zhat_a
        z_mix = mix(zhat_a, proto, mu_n, sig_n, mem.domain_mean[dn], mem.domain_std[dn], lam1, lam2)
        loss = F.cross_entropy(self.net.head(z_mix), ya, weight=self.class_weight)

        mem.update((zhat_a.detach(), ya), (mu_n.detach(), sig_n.detach(), dn), self.sync)
        return loss


@torch.no_grad()
def _stem_shape(net: nn.Module, image_size) -> tuple[int, int, int]:
    """(C, H, W) of net.stem's output: SplitResNet.stem_shape, or one zero image in eval mode."""
    if hasattr(net, "stem_shape"):
        return tuple(net.stem_shape(image_size))
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    p = next(net.parameters())
    was = net.training
    net.eval()
    try:
        return tuple(net.stem(torch.zeros(1, 3, h, w, device=p.device, dtype=p.dtype)).shape[1:])
    finally:
        net.train(was)


def method_defaults(name: str) -> dict[str, Any]:
    """The full default config of a method (for validation and search specs)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name].resolve_config({})


def build_method(
    name: str, net: nn.Module, info: TrainInfo, cfg: dict | None = None, sync: MemorySync | None = None
) -> Method:
    """Build a registered method; cfg holds method params only (a `name` key, if present, must match)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](net, info, cfg, sync)
