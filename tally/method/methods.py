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

Data parallelism: a method's random draws (mixing coefficients, partners) come from one generator per
data-parallel rank whose rows the batch holds, in rank order (`seeds`; normally just this process's
rank). A process that plays several ranks at once therefore draws exactly what those ranks draw apart,
and no two ranks share a stream. Losses normalised over the batch are normalised over the global batch
(`sync`), so K workers with batch B compute what one process computes on their concatenated K*B batch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tally.method.losses import (
    balanced_softmax_loss,
    effective_number_weights,
    focal_loss,
    log_prior,
    weighted_cross_entropy,
)
from tally.method.memory import FeatureMemory, MemorySync
from tally.method.stats import mix, moments, sample_lambdas, tally_mix, to_device

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


class Method(nn.Module, abc.ABC):
    """Base: config with defaults (unknown keys rejected), seeded CPU generators, the interface.

    Every method accepts `seed` (its own RNG stream: lambdas, pairings; None = drawn from the global torch
    RNG at construction, so a seeded run stays reproducible). `seeds`, when given, replace it: one
    independent stream per data-parallel rank in the batch (module docstring). The generator states are
    saved as the module's extra state, so `state_dict()` / `load_state_dict()` resume them exactly.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # the method's own hyperparameters' search distributions (DomainBed's hparams_registry style: one line
    # per hparam beside its default, in tally.search.space's format); the default point is ``defaults``.
    # The shared knobs (lr, weight decay, batch size) are tally.search.tuning.SHARED_SPACE.
    space: ClassVar[dict[str, dict]] = {}
    # the loop must run epochs after the warm-up for this method to be itself (TALLY's mixing)
    needs_main_phase: ClassVar[bool] = False

    def __init__(
        self,
        net: nn.Module,
        info: TrainInfo,
        cfg: dict | None = None,
        sync: MemorySync | None = None,
        seeds: list[int] | None = None,
    ):
        super().__init__()
        self.net = net
        self.info = info
        self.sync = sync
        self.cfg = self.resolve_config(cfg)
        if seeds is None:
            seed = self.cfg["seed"]
            seeds = [int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed]
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    @property
    def generator(self) -> torch.Generator:
        """The stream of the first (usually only) rank."""
        return self.generators[0]

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
        cfg = known | cfg
        cls.check_config(cfg)
        return cfg

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        """Refuse values that cannot work, before any training (ValueError "key: expected ..., got ...").

        Types are checked by tally.config; this is the method's own knowledge of its admissible values.
        """

    def get_extra_state(self) -> dict:
        # one tensor (not a list), so state dicts compare and load like every other entry
        return {"generators": torch.stack([g.get_state() for g in self.generators])}

    def set_extra_state(self, state: dict) -> None:
        # {"generator": state}: a checkpoint from before per-rank streams (re-evaluating an old run)
        states = state["generators"] if "generators" in state else [state["generator"]]
        if len(states) != len(self.generators):
            raise ValueError(f"the saved state holds {len(states)} random streams, this method {len(self.generators)}")
        for g, s in zip(self.generators, states, strict=True):
            g.set_state(s.clone())

    def _per_rank(self, n: int, draw) -> torch.Tensor:
        """draw(generator, rows) for each rank's share of the n rows, concatenated along the last dim."""
        k = len(self.generators)
        if n % k:
            raise ValueError(f"a batch of {n} rows cannot be split over {k} ranks' streams")
        return torch.cat([draw(g, n // k) for g in self.generators], dim=-1)

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    def batch_kinds(self, phase: str) -> tuple[str, ...]:
        _check_phase(phase)
        return ("uniform",)

    def start_epoch(self, phase: str) -> None:
        """Called by the training loop before each epoch's first step (TALLY's memory snapshot uses it)."""
        _check_phase(phase)

    @abc.abstractmethod
    def loss(self, batches: tuple[Batch, ...], phase: str) -> torch.Tensor:
        """The training loss of one step; every registered method defines its own."""

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


def _check(cfg: dict, key: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{key}: expected {expected}, got {cfg[key]!r}")


def _check_beta(cfg: dict, key: str, nullable: bool) -> None:
    """An effective-number beta in [0, 1) (the effective number (1 - beta^n) / (1 - beta) needs beta < 1),
    or null = re-weighting off, where the method allows it."""
    value = cfg[key]
    if value is None:
        _check(cfg, key, nullable, "a number in [0, 1)")
        return
    _check(cfg, key, 0.0 <= value < 1.0, "a number in [0, 1)" + (" or null" if nullable else ""))


def _full_precision(t: torch.Tensor):
    """No autocast: feature statistics (and what the memories store) stay float32 under bf16 training."""
    return torch.autocast(t.device.type, enabled=False)


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
    space = {"beta": {"type": "categorical", "choices": [0.9, 0.99, 0.999, 0.9999]}}

    def __init__(self, net, info, cfg=None, sync=None, seeds=None):
        super().__init__(net, info, cfg, sync, seeds)
        w = effective_number_weights(info.class_counts, self.cfg["beta"])
        self.register_buffer("class_weight", w.to(self._device()), persistent=False)

    @classmethod
    def check_config(cls, cfg):
        _check_beta(cfg, "beta", nullable=False)

    def loss(self, batches, phase):
        ((x, y, _),) = self._unpack(batches, phase)
        return weighted_cross_entropy(self.net(x), y, self.class_weight, self.sync)


@register("balanced_softmax")
class BalancedSoftmax(Method):
    """Balanced softmax: CE on logits + log class prior; prediction uses the plain logits."""

    def __init__(self, net, info, cfg=None, sync=None, seeds=None):
        super().__init__(net, info, cfg, sync, seeds)
        self.register_buffer("log_prior", log_prior(info.class_counts).to(self._device()), persistent=False)

    def loss(self, batches, phase):
        ((x, y, _),) = self._unpack(batches, phase)
        return balanced_softmax_loss(self.net(x), y, prior=self.log_prior)


@register("focal")
class Focal(Method):
    """Focal loss with focusing parameter gamma."""

    defaults = {"gamma": 2.0}
    space = {"gamma": {"type": "uniform", "low": 0.0, "high": 3.0}}

    @classmethod
    def check_config(cls, cfg):
        _check(cfg, "gamma", cfg["gamma"] >= 0, "a number >= 0")

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
    space = {"p": {"type": "uniform", "low": 0.1, "high": 1.0},
             "alpha": {"type": "loguniform", "low": 0.05, "high": 1.0}}

    @classmethod
    def check_config(cls, cfg):
        _check(cfg, "p", 0.0 <= cfg["p"] <= 1.0, "a number in [0, 1]")
        _check(cfg, "alpha", cfg["alpha"] > 0, "a number > 0")

    def loss(self, batches, phase):
        ((x, y, _),) = self._unpack(batches, phase)
        mixing, perm, lam, rows = self._draw(x.shape[0], x.device)
        z = self.net.stem(x)
        if any(mixing):
            mixed = self._mix_styles(z, perm, lam)
            if not all(mixing):  # the other ranks' rows stay exactly as they were
                mixed = torch.where(rows, mixed, z)
            z = mixed
        return F.cross_entropy(self.net.head(z), y)

    @torch.compiler.disable  # CPU generators: host-side draws, before the stem (train.compile)
    def _draw(self, rows: int, device: torch.device):
        """Per rank, from its own stream: mix that rank's rows or not, partners among its rows, lambdas.

        Returns (mixing per rank, perm, lam, a (rows, 1, 1, 1) mask of the mixed rows), tensors on device.
        """
        k = len(self.generators)
        n = rows // k
        mixing, perms, lams = [], [], []
        for rank, g in enumerate(self.generators):
            mixing.append(torch.rand((), generator=g).item() < self.cfg["p"])
            perms.append((torch.randperm(n, generator=g) if mixing[-1] else torch.arange(n)) + rank * n)
            lams.append(sample_lambdas(n, self.cfg["alpha"], False, g) if mixing[-1] else torch.ones(n))
        mask = torch.tensor(mixing).repeat_interleave(n).reshape(-1, 1, 1, 1)
        return mixing, *(to_device(t, device) for t in (torch.cat(perms), torch.cat(lams), mask))

    def _mix_styles(self, z: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Each example's (mu, sigma) blended with its partner's; statistics in float32, detached."""
        with _full_precision(z):
            zf = z.float()
            mu, sigma = (t.detach() for t in moments(zf))
            zhat = (zf - mu) / sigma
            return mix(zhat, zhat, mu, sigma, mu[perm], sigma[perm], torch.ones_like(lam), lam)


@register("tally")
class Tally(Method):
    """TALLY (METHOD.md): warm-up = ERM on uniform batches while filling the memories; main = class-balanced
    batch A + domain-balanced batch N through the stem, A's semantics mixed with its class prototype and
    N's style mixed with its domain's stored statistics, head, class-weighted CE on y_A.

    The memories are updated after the mix (mixing uses the memories from before the step). An example
    whose class (domain) has never been observed keeps its own zhat (mu, sigma): lam = 1 for it.
    stem_pass "separate" (the reference's protocol) runs A and N through the stem in two passes, so
    BatchNorm normalises each batch by its own statistics and updates its running statistics once per
    batch; "joint" runs one concatenated pass (faster on small batches; BatchNorm then mixes A's and
    N's statistics). Ablations: use_prototype / use_domain_memory False fix lam1 / lam2 to 1;
    class_balanced / domain_balanced False draw A / N from the uniform sampler instead.

    The reference code's behaviours, each a switch (all on under `protocol: reference`, docs/PROTOCOL.md):
    memory_init "noise" starts the memories as N(0, 1) noise (dataset.py:205-207); warmup_swap stores
    the warm-up's sigma in the mean memory and mu in the std memory (main.py:111 unpacks the forward's
    (.., mu, sig) as (.., sig, mu), then update_statistics(norm, sig, mu) at main.py:118); mixing_swap
    mixes N's mean with the std memory and its std with the mean memory (main.py:147 passes (s2, m2) to
    forward_train_aug(x1, n1, x2, m2, s2), tally.py:102); memory_snapshot mixes with the memories as they
    were when the epoch began (its 4 DataLoader workers hold copies of the dataset, where the memories
    live, made when each epoch's workers start: initialize.py:52-58); unbiased_std takes sigma from the
    unbiased variance (tally.py:9).
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
        "stem_pass": "separate",
        "memory_init": "first",
        "warmup_swap": False,
        "mixing_swap": False,
        "memory_snapshot": False,
        "unbiased_std": False,
    }
    space = {  # the ablation switches and stem_pass stay at their defaults: they change the method itself
        "alpha": {"type": "uniform", "low": 0.1, "high": 2.0},
        "momentum": {"type": "uniform", "low": 0.5, "high": 0.95},
        "fold": {"type": "categorical", "choices": [True, False]},
        "loss_beta": {"type": "categorical", "choices": [0.99, 0.999, None]},
    }
    needs_main_phase = True
    STEM_PASSES = ("separate", "joint")
    MEMORY_INITS = ("first", "noise")

    @classmethod
    def check_config(cls, cfg):
        _check(cfg, "alpha", cfg["alpha"] > 0, "a number > 0")
        _check(cfg, "momentum", 0.0 <= cfg["momentum"] <= 1.0, "a number in [0, 1]")
        _check_beta(cfg, "loss_beta", nullable=True)
        _check(cfg, "stem_pass", cfg["stem_pass"] in cls.STEM_PASSES, f"one of {', '.join(cls.STEM_PASSES)}")
        _check(cfg, "memory_init", cfg["memory_init"] in cls.MEMORY_INITS, f"one of {', '.join(cls.MEMORY_INITS)}")
        for key in ("warmup_swap", "mixing_swap", "memory_snapshot", "unbiased_std"):
            _check(cfg, key, isinstance(cfg[key], bool), "true or false")

    def __init__(self, net, info, cfg=None, sync=None, seeds=None):
        super().__init__(net, info, cfg, sync, seeds)
        device = self._device()
        shape = _stem_shape(net, info.image_size)
        self.memory = FeatureMemory(info.num_classes, info.num_domains, shape, self.cfg["momentum"])
        if self.cfg["memory_init"] == "noise":  # from the method's own stream: the run's seed repeats it
            self.memory.fill_noise(self.generators[0])
        self.memory.to(device)
        self._snapshot: tuple[torch.Tensor, ...] | None = None  # memory_snapshot: what this epoch mixes with
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

    def start_epoch(self, phase: str) -> None:
        """memory_snapshot: copy the memories the coming epoch mixes with (the reference's workers' copy)."""
        super().start_epoch(phase)
        if self.cfg["memory_snapshot"]:
            m = self.memory
            self._snapshot = tuple(t.clone() for t in (m.prototypes, m.domain_mean, m.domain_std,
                                                      m.class_seen, m.domain_seen))

    def _read_memory(self) -> tuple[torch.Tensor, ...]:
        """(prototypes, domain_mean, domain_std, class_seen, domain_seen) the mixing reads."""
        if self.cfg["memory_snapshot"]:
            if self._snapshot is None:
                raise RuntimeError("memory_snapshot: start_epoch must be called before the epoch's first step")
            return self._snapshot
        m = self.memory
        return m.prototypes, m.domain_mean, m.domain_std, m.class_seen, m.domain_seen

    def _moments(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return moments(z, unbiased=self.cfg["unbiased_std"])

    def _warmup_loss(self, batch: Batch) -> torch.Tensor:
        x, y, d = batch
        z = self.net.stem(x)
        loss = F.cross_entropy(self.net.head(z), y)
        with torch.no_grad(), _full_precision(z):
            zf = z.detach().float()
            mu, sigma = self._moments(zf)
            stats = (sigma, mu) if self.cfg["warmup_swap"] else (mu, sigma)  # the reference's main.py:111
            self.memory.update(((zf - mu) / sigma, y), (*stats, d), self.sync)
        return loss

    def _stem_pair(self, xa: torch.Tensor, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg["stem_pass"] == "joint" and xa.shape[1:] == xn.shape[1:] and xa.dtype == xn.dtype:
            # split, not slicing: its backward is one cat, slicing's is a zero-filled full map per slice
            return self.net.stem(torch.cat([xa, xn])).split(xa.shape[0])
        return self.net.stem(xa), self.net.stem(xn)

    @torch.compiler.disable
    def _mixing_inputs(self, ya: torch.Tensor, dn: torch.Tensor):
        """(lam1, lam2, P[y_A] or None, M[d_N], S[d_N]) of every row, each rank's lambdas from its own stream.

        Outside compiled graphs (train.compile): the lambdas come from CPU generators, and the memories
        are updated in place after the forward, so a graph that saved them for its backward would find
        them changed. Read here, the graph gets copies, and runs from the stem to the loss unbroken.
        """
        cfg, b = self.cfg, ya.shape[0]
        prototypes, domain_mean, domain_std, class_seen, domain_seen = self._read_memory()
        lam = self._per_rank(b, lambda g, n: sample_lambdas(2 * n, cfg["alpha"], cfg["fold"], g).view(2, n))
        lam = to_device(lam, ya.device)
        ones = torch.ones(b, device=ya.device)
        lam1 = torch.where(class_seen[ya], lam[0], 1.0) if cfg["use_prototype"] else ones
        lam2 = torch.where(domain_seen[dn], lam[1], 1.0) if cfg["use_domain_memory"] else ones
        proto = prototypes[ya] if cfg["use_prototype"] else None
        if cfg["mixing_swap"]:  # the reference's main.py:147: the std memory lends the mean, and vice versa
            domain_mean, domain_std = domain_std, domain_mean
        return lam1, lam2, proto, domain_mean[dn], domain_std[dn]

    def _main_loss(self, batch_a: Batch, batch_n: Batch) -> torch.Tensor:
        (xa, ya, _), (xn, _, dn) = batch_a, batch_n
        b = xa.shape[0]
        if xn.shape[0] != b:
            raise ValueError(f"TALLY pairs A and N example by example: sizes {b} and {xn.shape[0]} differ")
        lam1, lam2, proto, mem_mu, mem_sig = self._mixing_inputs(ya, dn)
        za, zn = self._stem_pair(xa, xn)
        with _full_precision(za):
            z_mix, zhat_a, mu_n, sig_n = tally_mix(za.float(), zn.float(), proto, mem_mu, mem_sig, lam1, lam2,
                                                   unbiased=self.cfg["unbiased_std"])
        loss = weighted_cross_entropy(self.net.head(z_mix), ya, self.class_weight, self.sync)
        self.memory.update((zhat_a, ya), (mu_n, sig_n, dn), self.sync)
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
    name: str,
    net: nn.Module,
    info: TrainInfo,
    cfg: dict | None = None,
    sync: MemorySync | None = None,
    seeds: list[int] | None = None,
) -> Method:
    """Build a registered method; cfg holds method params only (a `name` key, if present, must match);
    seeds: one per data-parallel rank whose rows a batch holds (see the module docstring)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](net, info, cfg, sync, seeds)
