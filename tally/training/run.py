"""One training run from one complete config, and the re-evaluation of a finished run.

The same function runs locally (`tally train`) and inside every Ray Train worker: the Ray side
only passes a `RunContext` (rank, device, report hook). The file reads top to bottom: set-up (device,
method, optimiser, batches), the loop (warm-up epochs, then method epochs), evaluation (the best
epoch after the warm-up by a validation metric is kept and evaluated on every split through the
evaluator), and checkpoints (exact resume). The run folder follows the results-store layout.
A final retrain (train.final) trains on train + validation and keeps its last epoch: no selection.

Data parallelism is exact: K workers with batch B compute what one process computes on their
concatenated K*B batch (METHOD.md, "Training schedule" 4). Each rank draws from its own random
streams, the uniform sampler shards each pass over the ranks, losses and memory updates are reduced
over the global batch.
"""

from __future__ import annotations

import contextlib
import errno
import math
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from tally import evaluation, results
from tally.config import load, validate
from tally.data import run_splits
from tally.data.augment import augment, to_float_normalized
from tally.data.bank import ImageBank, bank_for_training
from tally.errors import TallyError
from tally.evaluation import calibration, intervals
from tally.method.backbone import SplitResNet
from tally.method.memory import MemorySync
from tally.method.methods import Method, TrainInfo, build_method
from tally.method.perf import keep_cpu_memory
from tally.method.samplers import build_sampler
from tally.method.stats import to_device
from tally.schema import mode_of
from tally.training.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from tally.training.distributed import (
    broadcast_object,
    gather_object,
    memory_sync,
    stream_seed,
    use_sync_batchnorm,
)

# 2: one random-stream state per rank ("ranks"); version 1 checkpoints shared streams across ranks
CHECKPOINT_VERSION = 2


@dataclass
class RunContext:
    """Where this process stands in a (possibly data-parallel) run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    # called after every epoch with the epoch record and the checkpoint folder (rank 0 has one)
    report: Callable[[dict, Path | None], None] | None = None
    # a checkpoint folder to resume from (Ray hands one to a restarted trial)
    resume_from: Path | None = None
    progress: bool = True
    extra_status: dict = field(default_factory=dict)
    # every rank writes its memories here at the end (to check data-parallel runs keep them identical)
    memory_dump_dir: Path | None = None
    # test hook: one process plays this many data-parallel ranks at once, its batches being their
    # batches concatenated in rank order (each drawn from that rank's streams). It computes what that
    # many workers compute together, so a K-worker run can be checked against it
    # (tests/training/test_distributed.py).
    emulate_world_size: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_ranks(self) -> Sequence[int]:
        """The ranks whose rows this process's batches hold."""
        return range(self.emulate_world_size) if self.emulate_world_size else (self.rank,)

    @property
    def data_world_size(self) -> int:
        return self.emulate_world_size or self.world_size


# ---------------------------------------------------------------- set-up
def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TallyError("train.device: 'cuda' asked for but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Global RNGs (weight init); the samplers, augmentation and mixing draw from their own streams."""
    random.seed(seed)
    torch.manual_seed(seed)


def build_method_for(cfg: dict, train_ds, ranks: Sequence[int] = (0,), sync: MemorySync | None = None,
                     load_pretrained: bool = True) -> Method:
    """The run's method (network, memories, loss) for a validated config, on the CPU.

    One builder for training and re-evaluation. ranks: the data-parallel ranks whose rows a batch
    holds, each with its own mixing stream. load_pretrained=False when a checkpoint replaces the
    weights anyway (re-evaluation needs no ImageNet download).
    """
    counts = train_ds.counts()
    info = TrainInfo(num_classes=len(train_ds.class_names), num_domains=len(train_ds.domain_names),
                     class_counts=torch.as_tensor(counts.sum(0)), image_size=cfg["data"]["image_size"])
    net = SplitResNet(cfg["model"]["arch"], cfg["model"]["cut"], info.num_classes,
                      pretrained=cfg["model"]["pretrained"] if load_pretrained else None,
                      weights=cfg["model"]["imagenet_weights"])
    method_cfg = {k: v for k, v in cfg["method"].items() if k != "name"}
    seeds = [stream_seed(method_cfg["seed"], r, "mixing") for r in ranks]
    return build_method(cfg["method"]["name"], net, info, method_cfg, sync=sync, seeds=seeds)


def build_optimizer(params, train_cfg: dict, device: torch.device) -> torch.optim.Optimizer:
    lr, wd = train_cfg["lr"], train_cfg["weight_decay"]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if train_cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, amsgrad=train_cfg["amsgrad"], **fused)
    if train_cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, amsgrad=train_cfg["amsgrad"], **fused)
    return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=train_cfg["sgd_momentum"], **fused)


def bank_fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Keep a bank on the training device? Yes on the CPU (it is already there); on a GPU when it takes
    at most half of the memory free now (torch.cuda.mem_get_info): the other half is for the step
    (activations, memories, optimiser state) and for other runs sharing the GPU."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= free // 2


class BatchSource:
    """Draws (x, y, d) batches from a decoded image bank for the data-parallel ranks this process plays.

    Every rank owns independent streams (tally.training.distributed.stream_seed) for its class- and
    domain-balanced samplers and its augmentation. The uniform sampler's permutations are shared on
    purpose and sharded: each rank takes its own block of every global draw, so a warm-up epoch shows
    each example once across all ranks. Playing several ranks concatenates their draws in rank order,
    which is the global batch of a data-parallel run.

    Placement: the bank is indexed on the training device when it fits there (bank_fits_on_device);
    otherwise ("host") `batches()` gathers the next step's images on the CPU in a background thread into
    pinned double buffers while this step computes, and copies them without blocking. Either way one
    draw makes one pinned, non-blocking index copy. Every random stream is a CPU generator, so
    checkpoints hold no device-specific state: on a GPU each augmentation draws from a device
    generator seeded from the rank's CPU stream.
    """

    def __init__(self, bank: ImageBank, data_cfg: dict, batch_size: int, seed: int, device: torch.device,
                 ranks: Sequence[int] = (0,), world_size: int = 1, placement: str = "auto"):
        if placement not in ("auto", "device", "host"):
            raise ValueError(f"placement: expected auto, device or host, got {placement!r}")
        self.bank, self.batch_size, self.device = bank, batch_size, device
        self.flip, self.crop_padding = data_cfg["flip"], data_cfg["crop_padding"]
        images = bank.images
        self.on_device = placement == "device" or (
            placement == "auto" and bank_fits_on_device(images.numel() * images.element_size(), device))
        self.images = images.to(device) if self.on_device else images
        self.labels, self.domains = bank.labels.to(device), bank.domains.to(device)
        self.ranks = [self._rank_streams(bank, seed, r, world_size) for r in ranks]
        self._device_generator = torch.Generator(device=device) if device.type != "cpu" else None
        self._buffers: list[torch.Tensor] = []  # host placement: two pinned (kinds, rows, 3, S, S) buffers
        self._copied: list = [None, None]  # host placement: the device copy out of each buffer (CUDA event)

    def _rank_streams(self, bank: ImageBank, seed: int, rank: int, world_size: int) -> dict:
        samplers = {"uniform": build_sampler("uniform", bank.labels, bank.domains,
                                             stream_seed(seed, None, "uniform"), rank, world_size)}
        for kind in ("class_balanced", "domain_balanced"):
            samplers[kind] = build_sampler(kind, bank.labels, bank.domains, stream_seed(seed, rank, kind))
        augment_gen = torch.Generator().manual_seed(stream_seed(seed, rank, "augment"))
        return {"samplers": samplers, "augment": augment_gen}

    def _indices(self, kinds: tuple[str, ...]) -> torch.Tensor:
        """(len(kinds), rows) CPU int64: each kind's draw, the ranks' draws concatenated in rank order."""
        return torch.stack([torch.cat([r["samplers"][kind].draw(self.batch_size) for r in self.ranks])
                            for kind in kinds])

    def _augment_generator(self, rank: dict) -> torch.Generator:
        if self._device_generator is None:
            return rank["augment"]
        seed = int(torch.randint(2**62, (), generator=rank["augment"]))  # a CPU tensor: no device sync
        return self._device_generator.manual_seed(seed)

    def _assemble(self, idx: torch.Tensor, images: torch.Tensor) -> tuple:
        """Batches from the drawn indices (on the device) and their uint8 images ((kinds, rows, 3, S, S))."""
        labels, domains = self.labels[idx], self.domains[idx]
        out = []
        for i in range(idx.shape[0]):
            parts = images[i].to(self.device, non_blocking=True).split(self.batch_size)
            # each rank's rows flip and crop from that rank's stream
            x = torch.cat([augment(part, self._augment_generator(r), flip=self.flip, crop_padding=self.crop_padding)
                           for part, r in zip(parts, self.ranks, strict=True)])
            out.append((x, labels[i], domains[i]))
        return tuple(out)

    def draw(self, kinds: tuple[str, ...]):
        """One batch per kind, gathered now (no prefetch)."""
        idx_cpu = self._indices(kinds)
        idx = to_device(idx_cpu, self.device)  # the one pinned, non-blocking index copy of this draw
        return self._assemble(idx, self.images[idx] if self.on_device else self.images[idx_cpu])

    def batches(self, kinds: tuple[str, ...], steps: int):
        """The `steps` batches of an epoch: what `steps` calls of draw(kinds) return, in order.

        From a host-side bank the next step's images are gathered while this step runs. Prefetching
        stays within the epoch, so the samplers' states at its end (what a checkpoint saves) are those
        after exactly `steps` draws.
        """
        if self.on_device:
            for _ in range(steps):
                yield self.draw(kinds)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="tally-gather") as pool:
            idx = self._indices(kinds) if steps else None
            pending = pool.submit(self._gather, idx, 0) if steps else None
            for step in range(steps):
                images, current = pending.result(), idx
                if step + 1 < steps:  # the next step's draw, gathered while this one computes
                    idx = self._indices(kinds)
                    pending = pool.submit(self._gather, idx, (step + 1) % 2)
                batch = self._assemble(to_device(current, self.device), images)
                if self.device.type == "cuda":  # the buffer may be refilled once its copy is done
                    self._copied[step % 2] = torch.cuda.Event()
                    self._copied[step % 2].record()
                yield batch

    def _gather(self, idx: torch.Tensor, slot: int) -> torch.Tensor:
        """The images of idx (kinds, rows) into host buffer `slot` (pinned when a GPU is the target)."""
        shape = (*idx.shape, *self.images.shape[1:])
        if not self._buffers or self._buffers[0].shape != shape:
            pin = self.device.type == "cuda"
            self._buffers = [torch.empty(shape, dtype=self.images.dtype, pin_memory=pin) for _ in range(2)]
            self._copied = [None, None]
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # its previous contents are still being copied to the device
        buffer = self._buffers[slot]
        torch.index_select(self.images, 0, idx.reshape(-1), out=buffer.view(-1, *self.images.shape[1:]))
        return buffer

    def state_dict(self) -> list[dict]:
        return [{"samplers": {k: s.state_dict() for k, s in r["samplers"].items()},
                 "augment": r["augment"].get_state()} for r in self.ranks]

    def load_state_dict(self, state: list[dict]) -> None:
        for r, saved in zip(self.ranks, state, strict=True):
            for k, s in r["samplers"].items():
                s.load_state_dict(saved["samplers"][k])
            augment_state = saved["augment"]
            if augment_state.numel() != r["augment"].get_state().numel():
                raise TallyError("checkpoint: its augmentation stream was saved from a device generator (a "
                                 "run before device-independent streams); it cannot resume: start a new run")
            r["augment"].set_state(augment_state)


class _LossModule(nn.Module):
    """Wraps a method so DDP sees one forward per step (it hooks forward, not stem/head calls)."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batches, phase: str):
        return self.method.loss(batches, phase)


class TrainStep:
    """One optimisation step exactly as training runs it (bench/train_step.py times this very object):
    the loss under bf16 autocast when asked (CUDA), zero_grad, backward, the optimiser step.

    With compile_mode (train.compile) the loss module runs through torch.compile (inductor, fixed
    shapes: dynamic=False): per phase one graph from the stem(s) to the loss, backward compiled with
    it. The random draws (CPU generators), the memory update and the collectives are excluded
    (torch.compiler.disable) and run eagerly between graphs, so they behave exactly as in eager mode.
    "reduce-overhead" replays the compiled graphs as CUDA graphs (a step at batch 18 is launch-bound).
    """

    def __init__(self, loss_module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 autocast: bool = False, compile_mode: str | None = None):
        self.loss_module, self.optimizer, self.compile_mode = loss_module, optimizer, compile_mode
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        self.forward = (torch.compile(loss_module, mode=compile_mode, dynamic=False) if compile_mode
                        else loss_module)

    def __call__(self, batches, phase: str) -> torch.Tensor:
        """The step's loss (detached, on the device: reading it would wait for the step)."""
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused
        with self.amp:
            loss = self.forward(batches, phase)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


# ---------------------------------------------------------------- the run
def train_run(config: dict, run_dir: str | Path, resume: bool = False, ctx: RunContext | None = None,
              stop_after_epoch: int | None = None, validated: bool = False) -> dict:
    """Train, select on validation, evaluate the kept checkpoint on every split.

    Returns {split: {metric: value}} of the kept checkpoint. ``stop_after_epoch`` ends the
    process early as an interruption would (the resume test uses it); the run stays 'running'.
    ``validated``: the caller passes what tally.config.validate returned (a search trial's config is
    validated once, by Spec.trial_config, and passed on as it is).
    """
    cfg = config if validated else validate(config)
    ctx = ctx or RunContext()
    run_dir = Path(run_dir)
    device = ctx.device or resolve_device(cfg["train"]["device"])
    _, warning = use_sync_batchnorm(cfg["train"]["sync_bn"], ctx.world_size, device.type)  # refused here, early
    if warning and ctx.rank == 0:
        print(warning, file=sys.stderr, flush=True)
    if ctx.emulate_world_size and ctx.world_size > 1:
        raise ValueError("RunContext.emulate_world_size is for one process, not a data-parallel worker")
    if device.type == "cpu":
        keep_cpu_memory()  # no page faults on large activations every step (bench/train_step.py)
    splits = run_splits(cfg)  # bad data fail here, before anything is written
    if len(splits["train"]) == 0:
        raise TallyError("data: the training split is empty")
    if not ctx.is_main:  # only rank 0 owns the run folder; the others train beside it
        return _train(cfg, splits, run_dir, resume, ctx, device, stop_after_epoch)
    # One writer per run folder for the run's lifetime (a second `tally train --out` of the same folder
    # fails at once, naming the holder); SIGTERM ends a run like Ctrl-C; a heartbeat tells readers on
    # other hosts that a long epoch is alive.
    with results.exclusive(run_dir, "run folder"), _sigterm_as_interrupt(), results.heartbeat(run_dir):
        _prepare_run_dir(run_dir, cfg, resume)
        try:
            return _train(cfg, splits, run_dir, resume, ctx, device, stop_after_epoch)
        except BaseException as e:
            _record_ending(run_dir, e)
            raise


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (what Kubernetes, Slurm and systemd send) stops a run as Ctrl-C does: status "stopped",
    the last epoch's checkpoint kept for --resume."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (a Ray Train worker): Ray delivers its own stop
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _record_ending(run_dir: Path, e: BaseException) -> None:
    """The status a run that did not finish leaves behind (a scheduler's earlier "stopped" stands)."""
    if (results.read_json(run_dir / "status.json") or {}).get("status") == "stopped":
        return
    if isinstance(e, KeyboardInterrupt):
        status, error = "stopped", f"interrupted ({e or 'SIGINT'}); continue it with --resume"
    elif isinstance(e, SystemExit):  # Ray Tune ends a trial's training thread so when it stops the trial
        status, error = "stopped", "stopped by Ray Tune (its scheduler or the search's end)"
    elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
        status, error = "failed", f"disk full: no space left on device writing {e.filename or run_dir}"
    else:
        status, error = "failed", f"{type(e).__name__}: {e}"
    with contextlib.suppress(OSError):  # a full disk may not take even status.json; then it stays "running"
        results.write_status(run_dir, status, error=error, ended=time.time())


def _same_config(stored: dict, cfg: dict) -> bool:
    """A run's stored config is the given one, also when it was written before a field was added
    (validation fills the new field's default, which reproduces what that run did)."""
    if stored == cfg:
        return True
    try:
        return validate(stored) == cfg
    except TallyError:
        return False


def check_run_folder(run_dir: Path, cfg: dict, resume: bool) -> None:
    """Refuse a folder that holds another run (or, to resume, a run of another config)."""
    existing = results.read_yaml(Path(run_dir) / "config.yaml")
    if existing is not None and not resume and (Path(run_dir) / "checkpoints" / "last.pt").exists():
        raise TallyError(f"{run_dir}: already holds a run; pass --resume to continue it or pick another --out")
    if existing is not None and resume and not _same_config(existing, cfg):
        raise TallyError(f"{run_dir}: config.yaml differs from the config given; refusing to resume")


def _prepare_run_dir(run_dir: Path, cfg: dict, resume: bool) -> None:
    check_run_folder(run_dir, cfg, resume)
    results.write_yaml(run_dir / "config.yaml", cfg)
    results.write_status(run_dir, "running", error=None, started=time.time(), ended=None,
                         node=socket.gethostname())


def _train(cfg, splits, run_dir: Path, resume: bool, ctx: RunContext, device, stop_after_epoch) -> dict:
    tcfg, dcfg = cfg["train"], cfg["data"]
    train_ds = splits["train"]
    train_counts = train_ds.counts()
    # only rank 0 evaluates: the other ranks decode the training split alone
    banks = {name: bank_for_training(ds, dcfg["image_size"], workers=dcfg["decode_workers"])
             for name, ds in splits.items() if ctx.is_main or name == "train"}
    # seeded after the banks: decoding one (a DataLoader draws its base seed from the global stream)
    # must not change the model's initialisation, or a run would differ with its bank cached or not
    seed_everything(tcfg["seed"])
    if device.type == "cuda":
        # shapes are fixed, so cuDNN may time its algorithms once per shape and keep the fastest; that
        # choice can differ between runs (the reference's defect 6), so train.deterministic keeps it off
        torch.backends.cudnn.benchmark = not tcfg["deterministic"]
        torch.backends.cudnn.deterministic = tcfg["deterministic"]

    distributed = ctx.world_size > 1
    sync = memory_sync(len(train_ds.class_names), ctx.world_size, tcfg["batch_size"])
    method = build_method_for(cfg, train_ds, ctx.data_ranks, sync).to(device)
    if use_sync_batchnorm(tcfg["sync_bn"], ctx.world_size, device.type)[0]:
        # BatchNorm over the global batch: what one process sees on the concatenated batch
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    loss_module: nn.Module = _LossModule(method)
    if distributed:
        # memories are all-reduced explicitly; broadcasting buffers would copy them every step.
        # Gradients are views of the all-reduce buckets (no copy in or out); the graph is static: every
        # step of every phase uses every parameter (so DDP can skip its per-step search for unused ones)
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, gradient_as_bucket_view=True, static_graph=True)
    optimizer = build_optimizer(method.parameters(), tcfg, device)
    source = BatchSource(banks["train"], dcfg, tcfg["batch_size"], tcfg["seed"], device,
                         ctx.data_ranks, ctx.data_world_size)
    step = TrainStep(loss_module, optimizer, device, autocast=device.type == "cuda" and tcfg["bf16"],
                     compile_mode=tcfg["compile_mode"] if tcfg["compile"] else None)

    mode = mode_of(tcfg["selection_metric"])  # lower is better for ECE, Brier, NLL, AURC (tally.schema)
    start_epoch, best = 0, {"value": _worst(mode), "epoch": None}
    last_path = run_dir / "checkpoints" / "last.pt"
    resume_path = (ctx.resume_from / "last.pt") if ctx.resume_from else last_path
    if resume and resume_path.exists():
        start_epoch, best = _resume(resume_path, method, optimizer, source, run_dir, ctx)

    final = tcfg["final"]
    selection = None if final else selection_split(cfg, splits)
    for epoch in range(start_epoch, tcfg["epochs"]):
        t0 = time.time()
        phase = "warmup" if epoch < tcfg["warmup_epochs"] else "main"
        # a warm-up epoch is one pass of the (sharded) uniform sampler over the training set
        steps = (math.ceil(len(train_ds) / (tcfg["batch_size"] * ctx.data_world_size)) if phase == "warmup"
                 else tcfg["steps_per_epoch"])
        method.start_epoch(phase)  # TALLY's memory_snapshot: the memories this epoch mixes with
        train_loss = _train_epoch(step, source, method.batch_kinds(phase), phase, steps, epoch, ctx)
        record = {"epoch": epoch, "phase": phase, "train_loss": train_loss, "steps": steps}
        checkpoint_dir = None
        if ctx.is_main and final:
            best = {"value": None, "epoch": epoch}  # the last epoch is kept, nothing is validated
        elif ctx.is_main:
            key = _validate_epoch(method, cfg, splits, banks, train_counts, device, selection, record)
            # the reference keeps only TALLY-phase epochs: a warm-up epoch is never the kept model
            # unless train.select_from is 'all'; 'last' keeps every epoch in turn, so the last one stays
            eligible = phase == "main" or tcfg["select_from"] != "main"
            if eligible and (tcfg["select_from"] == "last" or improves(key, best, tcfg["tie_rule"], mode)):
                best = {"value": key[0], "tiebreak": key[1], "epoch": epoch}
                save_checkpoint(run_dir / "checkpoints" / "best.pt",
                                {"model": method.state_dict(), "epoch": epoch})
        best = broadcast_object(best, distributed)
        rank_states = gather_object(_rank_state(source, method), distributed)
        if ctx.is_main:
            _save_last(last_path, method, optimizer, rank_states, epoch, best)
            record["seconds"] = round(time.time() - t0, 3)
            record["best_epoch"] = best["epoch"]
            # the selection value of the kept epoch (None while nothing may be kept): what a search
            # should report as the trial's objective so far, not the best of every epoch
            record["best_value"] = best["value"] if best["epoch"] is not None else None
            results.append_jsonl(run_dir / "epochs.jsonl", record)
            results.write_status(run_dir, "running", epoch=epoch, best_epoch=best["epoch"],
                                 **ctx.extra_status)
            checkpoint_dir = last_path.parent
            if ctx.progress:
                _print_epoch(record, best, tcfg)
        if ctx.report is not None:
            ctx.report(record, checkpoint_dir)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            return {}

    memory = getattr(method, "memory", None)
    if ctx.memory_dump_dir is not None and memory is not None:
        save_checkpoint(Path(ctx.memory_dump_dir) / f"rank{ctx.rank}.pt", memory.state_dict())
    if not ctx.is_main:
        return {}
    if final:  # also after a resume past the last epoch: the weights are the last epoch's (last.pt)
        save_checkpoint(run_dir / "checkpoints" / "best.pt", {"model": method.state_dict(), "epoch": tcfg["epochs"] - 1})
    return finalize(cfg, run_dir, method, banks, splits, train_counts, device)


def improves(key: tuple[float, float], best: dict, tie_rule: str, mode: str = "max") -> bool:
    """Does an epoch with selection key (value, tie-break) replace the best so far?

    earliest: strictly better value, equal values decided by the tie-break (mean pair accuracy, always
    higher-is-better), the earlier epoch kept when both tie. latest: the reference's
    `val >= max(previous)` (utils.py:41): the value alone, the latest of tied epochs kept. ``mode``
    'min' (an ECE, Brier, NLL or AURC: tally.schema.mode_of) compares the negated value.
    """
    sign = 1.0 if mode == "max" else -1.0
    if tie_rule == "latest":
        return sign * key[0] >= sign * best["value"]
    return (sign * key[0], key[1]) > (sign * best["value"], best.get("tiebreak", -math.inf))


def _train_epoch(step: TrainStep, source: BatchSource, kinds, phase, steps, epoch, ctx: RunContext) -> float:
    """The mean training loss of the epoch, over the global batch (every rank returns the same)."""
    step.loss_module.train()
    total = torch.zeros((), device=source.device)
    bar = None
    if ctx.is_main and ctx.progress:
        try:  # optional: a bare GPU image (torch, torchvision, pandas, pyarrow, PyYAML) trains without it
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=steps, desc=f"epoch {epoch + 1} {phase}", leave=False, mininterval=1.0, disable=None)
    for i, batches in enumerate(source.batches(kinds, steps)):
        loss = step(batches, phase)
        total += loss
        if bar is not None:
            bar.update(1)
        if i == 0 and not torch.isfinite(loss):  # the only per-step host read, once per epoch
            raise TallyError(f"training diverged: loss is {loss.item()} at epoch {epoch + 1}, step 1")
    if bar is not None:
        bar.close()
    if ctx.world_size > 1:
        # each rank's loss is its share of the global loss times world_size (DDP averages gradients):
        # their mean is the global batch's loss. One all-reduce per epoch, not per step.
        dist.all_reduce(total)
        total /= ctx.world_size
    mean = (total / steps).item()  # one host sync per epoch, not per step
    if not math.isfinite(mean):
        raise TallyError(f"training diverged: mean loss is {mean} in epoch {epoch + 1}")
    return mean


def _print_epoch(record: dict, best: dict, tcfg: dict) -> None:
    if tcfg["final"]:
        print(f"epoch {record['epoch'] + 1}/{tcfg['epochs']} {record['phase']:6s} loss {record['train_loss']:.4f} "
              f"(final retrain: the last epoch is kept) {record['seconds']:.1f}s", flush=True)
        return
    metric = tcfg["selection_metric"]
    kept = f"{best['value']:.4f} @ {best['epoch'] + 1}" if best["epoch"] is not None else "- (warm-up)"
    print(f"epoch {record['epoch'] + 1}/{tcfg['epochs']} {record['phase']:6s} loss {record['train_loss']:.4f} "
          f"val/{metric} {record[f'val/{metric}']:.4f} (best {kept}) {record['seconds']:.1f}s", flush=True)


def _finite(x: float, mode: str = "max") -> float:
    """A selection value, with a missing one (NaN: e.g. an empty shot bucket) as the worst possible."""
    return _worst(mode) if x is None or math.isnan(x) else x


def _worst(mode: str) -> float:
    return -math.inf if mode == "max" else math.inf


# ---------------------------------------------------------------- evaluation
@torch.inference_mode()
def predict(model: nn.Module, bank: ImageBank, batch_size: int, device: torch.device,
            confidence: bool = False, logits_out: list | None = None):
    """Plain forward passes (no mixing) over a whole bank; returns predicted class indices (and, with
    ``confidence``, each prediction's softmax probability). With ``logits_out``, the float32 logits
    (N, C) are appended to it (calibration).

    Always float32, even inside a caller's autocast: logits rounded to bf16 tie (3 significant
    digits), and which class wins a tie would then depend on the precision setting, not the model.
    """
    was_training = model.training
    model.eval()
    preds, confs, all_logits = [], [], []
    with torch.autocast(device.type, enabled=False):
        for start in range(0, len(bank.labels), batch_size):
            x = to_float_normalized(bank.images[start:start + batch_size].to(device, non_blocking=True))
            logits = model(x).float()
            preds.append(logits.argmax(1).cpu())
            confs.append((logits.amax(1) - logits.logsumexp(1)).exp().cpu())  # softmax of the argmax
            if logits_out is not None:
                all_logits.append(logits.cpu())
    model.train(was_training)
    if logits_out is not None:
        logits_out.append(torch.cat(all_logits).numpy() if all_logits else np.zeros((0, 0), dtype=np.float32))
    out = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    if confidence:
        return out, (torch.cat(confs).numpy() if confs else np.zeros(0, dtype=np.float32))
    return out


def evaluate_split(model, name: str, bank: ImageBank, ds, train_counts, cfg, device,
                   keep: list | None = None, keep_logits: dict | None = None) -> pd.DataFrame:
    """The split's long table; with ``keep``, its per-example predictions are appended to it too, and
    with ``keep_logits`` its (logits, labels, domains) are stored under its name (calibration)."""
    out: list | None = [] if keep_logits is not None else None
    preds, conf = predict(model, bank, cfg["train"]["eval_batch_size"], device, confidence=True, logits_out=out)
    if keep is not None:
        # a stable key per image, so `tally compare` pairs two runs image by image (not by position)
        keys = intervals.image_keys(getattr(ds, "paths", None), cfg["data"].get("root"), bank.images)
        keep.append(intervals.prediction_frame(name, preds, bank.labels, bank.domains, conf, keys))
    if keep_logits is not None:
        keep_logits[name] = (out[0], bank.labels.numpy(), bank.domains.numpy())
    return evaluation.pair_table(name, preds, bank.labels.numpy(), bank.domains.numpy(),
                                 ds.class_names, ds.domain_names, train_counts)


def selection_split(cfg: dict, splits: dict) -> str:
    """The split that picks the best epoch: training-domain validation unless oracle is asked for."""
    if not cfg["data"]["oracle_selection"]:
        return "val"
    held = sorted(name for name in splits if name.startswith("test_domain:"))
    if not held:
        raise TallyError("data.oracle_selection: needs data.setting 'domain' (a held-out test domain)")
    return held[0]


def _epoch_metrics(method, name: str, cfg, splits, banks, train_counts, device) -> dict[str, float]:
    """One split's accuracy metrics (the long table) and calibration metrics (its logits, before any
    temperature: T is fitted on validation only at the end, and a value after it would be in-sample)."""
    logits: dict = {}
    table = evaluate_split(method.net, name, banks[name], splits[name], train_counts, cfg, device, keep_logits=logits)
    thresholds = evaluation.shot_thresholds_of(cfg["data"])
    return {**calibration.validation_metrics(logits[name], table, name, thresholds),
            **evaluation.split_metrics(table)}


def _validate_epoch(method, cfg, splits, banks, train_counts, device, selection: str,
                    record: dict) -> tuple[float, float]:
    """Validation metrics into `record`; returns the epoch's selection key (value, tie-break)."""
    metric = cfg["train"]["selection_metric"]
    val = _epoch_metrics(method, "val", cfg, splits, banks, train_counts, device)
    record.update({f"val/{k}": v for k, v in val.items()})
    value = val[metric]
    if selection != "val":  # oracle (test-domain) selection, only when asked for; labelled
        value = record[f"oracle:{selection}/{metric}"] = _epoch_metrics(
            method, selection, cfg, splits, banks, train_counts, device)[metric]
    # ties (frequent for worst-pair metrics on small validation sets) go to the better mean
    return _finite(value, mode_of(metric)), _finite(val["pair_acc_mean"])


def finalize(cfg, run_dir: Path, method, banks, splits, train_counts, device) -> dict:
    """Evaluate the kept checkpoint (best on validation; a final retrain's last) on every split; write
    tables and metrics."""
    best_path = run_dir / "checkpoints" / "best.pt"
    state = load_checkpoint(best_path)
    method.load_state_dict(state["model"])
    kept: list = []  # per-example predictions of the test splits (paired comparisons, exact F1 intervals)
    logits: dict = {}  # every evaluated split's logits, val included: temperature scaling is fitted on val
    tables = [evaluate_split(method.net, name, banks[name], ds, train_counts, cfg, device,
                             keep=None if name == "val" else kept, keep_logits=logits)
              for name, ds in splits.items() if name != "train"]
    table = pd.concat(tables, ignore_index=True)
    metrics = evaluation.all_metrics(table, *evaluation.shot_thresholds_of(cfg["data"]))
    results.write_parquet(run_dir / "eval.parquet", table)
    intervals.write_predictions(run_dir, kept)
    calibration.write_logits(run_dir, logits)
    # the temperature (fitted on val) and the calibration metrics, apart from metrics.json: those come
    # from the per-(domain, class) table, these from per-example logits
    temperature = calibration.temperature_of(logits, cfg["train"]["final"])
    temperature["metrics"] = calibration.headline_metrics(logits, table, temperature,
                                                          evaluation.shot_thresholds_of(cfg["data"]))
    results.write_json(run_dir / calibration.CALIBRATION_FILE, temperature)
    results.write_json(run_dir / "metrics.json", metrics)
    if cfg["train"]["final"]:
        selection = {"split": None, "rule": "final retrain on train + val: the last epoch"}
    else:
        metric, split = cfg["train"]["selection_metric"], selection_split(cfg, splits)
        values = {**temperature["metrics"].get(split, {}), **metrics[split]}  # a calibration metric: calibration.json
        selection = {"split": split, "metric": metric, "value": values.get(metric), "oracle": split != "val"}
        if cfg["train"]["select_from"] == "last":
            selection["rule"] = "the last epoch (no early stopping)"
    results.write_status(run_dir, "done", ended=time.time(), best_epoch=state["epoch"], selection=selection)
    return metrics


def load_trained_method(run_dir: Path, cfg: dict, splits: dict, checkpoint: str = "best.pt") -> Method:
    """Rebuild the method of a run and load its kept weights (weights_only loading)."""
    method = build_method_for(cfg, splits["train"], load_pretrained=False)
    method.load_state_dict(load_checkpoint(run_dir / "checkpoints" / checkpoint)["model"])
    return method


def evaluate_run_split(run_dir: Path, split: str) -> tuple[pd.DataFrame, dict]:
    """(long table, metrics) of a run's kept checkpoint on ``split``, from its folder alone
    (`tally evaluate`): the same evaluation as finalize()."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise TallyError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load(run_dir / "config.yaml")
    if cfg["train"]["final"] and split == "val":
        raise TallyError("--split: 'val' is training data of this final retrain (train.final); score a test split")
    splits = run_splits(cfg)
    if split not in splits:
        raise TallyError(f"--split: unknown split {split!r} (this run has {', '.join(splits)})")
    device = resolve_device(cfg["train"]["device"])
    method = load_trained_method(run_dir, cfg, splits).to(device)
    bank = bank_for_training(splits[split], cfg["data"]["image_size"], workers=cfg["data"]["decode_workers"])
    table = evaluate_split(method.net, split, bank, splits[split], splits["train"].counts(), cfg, device)
    return table, evaluation.split_metrics(table, *evaluation.shot_thresholds_of(cfg["data"]))


# ---------------------------------------------------------------- checkpoints
def _rank_state(source: BatchSource, method: Method) -> dict:
    """What differs between ranks and must resume exactly: their sampler, augmentation and mixing streams."""
    return {"source": source.state_dict(), "mixing": method.get_extra_state()}


def _save_last(path: Path, method, optimizer, rank_states: list[dict], epoch: int, best: dict) -> None:
    save_checkpoint(path, {
        "version": CHECKPOINT_VERSION, "model": method.state_dict(), "optimizer": optimizer.state_dict(),
        "ranks": rank_states, "rng": rng_state(), "epoch": epoch, "best": best})


def _resume(path: Path, method, optimizer, source: BatchSource, run_dir: Path, ctx: RunContext):
    """Load last.pt into this rank's objects; returns (first epoch to run, best so far)."""
    state = load_checkpoint(path)
    if state.get("version") != CHECKPOINT_VERSION:
        raise TallyError(f"{path}: checkpoint format {state.get('version')} is not this version's "
                         f"({CHECKPOINT_VERSION}); its random streams cannot resume exactly: start a new run")
    if len(state["ranks"]) != ctx.world_size:
        raise TallyError(f"{path}: written by {len(state['ranks'])} worker(s), this run has {ctx.world_size}; "
                         "resume with the same number of workers")
    method.load_state_dict(state["model"])  # rank 0's; this rank's own streams next
    mine = state["ranks"][ctx.rank]
    method.set_extra_state(mine["mixing"])
    source.load_state_dict(mine["source"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    if ctx.is_main:
        results.truncate_epochs(run_dir, state["epoch"])
        if ctx.resume_from and not (run_dir / "checkpoints" / "best.pt").exists():
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            best_src = ctx.resume_from / "best.pt"
            if best_src.exists():
                save_checkpoint(run_dir / "checkpoints" / "best.pt", load_checkpoint(best_src))
    return state["epoch"] + 1, state["best"]
