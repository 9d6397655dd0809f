"""One training run from one complete config, and the re-evaluation of a finished run.

The same function runs locally (`tally train`) and inside every Ray Train worker: the Ray side
only passes a `RunContext` (rank, device, report hook). The file reads top to bottom: set-up (device,
method, optimiser, batches), the loop (warm-up epochs, then method epochs), evaluation (the best
epoch after the warm-up by a validation metric is kept and evaluated on every split through the
evaluator), and checkpoints (exact resume). The run folder follows the results-store layout.

Data parallelism is exact: K workers with batch B compute what one process computes on their
concatenated K*B batch (METHOD.md, "Training schedule" 4). Each rank draws from its own random
streams, the uniform sampler shards each pass over the ranks, losses and memory updates are reduced
over the global batch.
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from tally import evaluation, intervals, results
from tally.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from tally.config import load, validate
from tally.data import load_splits
from tally.data.augment import augment, to_float_normalized
from tally.data.bank import ImageBank, bank_for_training
from tally.distributed import broadcast_object, gather_object, memory_sync, stream_seed
from tally.errors import TallyError
from tally.method.backbone import SplitResNet
from tally.method.memory import MemorySync
from tally.method.methods import Method, TrainInfo, build_method
from tally.method.perf import keep_cpu_memory
from tally.method.samplers import build_sampler

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
    # (tests/test_distributed.py).
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
                      pretrained=cfg["model"]["pretrained"] if load_pretrained else None)
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


class BatchSource:
    """Draws (x, y, d) batches from a decoded image bank for the data-parallel ranks this process plays.

    Every rank owns independent streams (tally.distributed.stream_seed) for its class- and
    domain-balanced samplers and its augmentation. The uniform sampler's permutations are shared on
    purpose and sharded: each rank takes its own block of every global draw, so a warm-up epoch shows
    each example once across all ranks. Playing several ranks concatenates their draws in rank order,
    which is the global batch of a data-parallel run.
    """

    def __init__(self, bank: ImageBank, data_cfg: dict, batch_size: int, seed: int, device: torch.device,
                 ranks: Sequence[int] = (0,), world_size: int = 1):
        self.bank, self.batch_size, self.device = bank, batch_size, device
        self.flip, self.crop_padding = data_cfg["flip"], data_cfg["crop_padding"]
        # small banks live on the device: indexing then costs no host->device copy
        on_device = device.type == "cpu" or bank.images.numel() < 2**31
        self.images = bank.images.to(device) if on_device else bank.images
        self.labels, self.domains = bank.labels.to(device), bank.domains.to(device)
        self.ranks = [self._rank_streams(bank, seed, r, world_size) for r in ranks]

    def _rank_streams(self, bank: ImageBank, seed: int, rank: int, world_size: int) -> dict:
        samplers = {"uniform": build_sampler("uniform", bank.labels, bank.domains,
                                             stream_seed(seed, None, "uniform"), rank, world_size)}
        for kind in ("class_balanced", "domain_balanced"):
            samplers[kind] = build_sampler(kind, bank.labels, bank.domains, stream_seed(seed, rank, kind))
        augment_gen = torch.Generator(device=self.device).manual_seed(stream_seed(seed, rank, "augment"))
        return {"samplers": samplers, "augment": augment_gen}

    def draw(self, kinds: tuple[str, ...]):
        out = []
        for kind in kinds:
            idx = torch.cat([r["samplers"][kind].draw(self.batch_size) for r in self.ranks])
            x = self.images[idx.to(self.images.device)].to(self.device, non_blocking=True)
            idx = idx.to(self.device)
            parts = x.split(self.batch_size)  # each rank's rows flip and crop from that rank's stream
            x = torch.cat([augment(part, r["augment"], flip=self.flip, crop_padding=self.crop_padding)
                           for part, r in zip(parts, self.ranks, strict=True)])
            out.append((x, self.labels[idx], self.domains[idx]))
        return tuple(out)

    def state_dict(self) -> list[dict]:
        return [{"samplers": {k: s.state_dict() for k, s in r["samplers"].items()},
                 "augment": r["augment"].get_state()} for r in self.ranks]

    def load_state_dict(self, state: list[dict]) -> None:
        for r, saved in zip(self.ranks, state, strict=True):
            for k, s in r["samplers"].items():
                s.load_state_dict(saved["samplers"][k])
            r["augment"].set_state(saved["augment"])


class _LossModule(nn.Module):
    """Wraps a method so DDP sees one forward per step (it hooks forward, not stem/head calls)."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batches, phase: str):
        return self.method.loss(batches, phase)


# ---------------------------------------------------------------- the run
def train_run(config: dict, run_dir: str | Path, resume: bool = False, ctx: RunContext | None = None,
              stop_after_epoch: int | None = None) -> dict:
    """Train, select on validation, evaluate the kept checkpoint on every split.

    Returns {split: {metric: value}} of the kept checkpoint. ``stop_after_epoch`` ends the
    process early as an interruption would (the resume test uses it); the run stays 'running'.
    """
    cfg = validate(config)
    ctx = ctx or RunContext()
    run_dir = Path(run_dir)
    device = ctx.device or resolve_device(cfg["train"]["device"])
    if ctx.world_size > 1 and cfg["train"]["sync_bn"] and device.type != "cuda":
        raise TallyError("train.sync_bn: SyncBatchNorm runs on CUDA devices only (torch); set it false on CPU")
    if ctx.emulate_world_size and ctx.world_size > 1:
        raise ValueError("RunContext.emulate_world_size is for one process, not a data-parallel worker")
    if device.type == "cpu":
        keep_cpu_memory()  # no page faults on large activations every step (bench/train_step.py)
    splits = load_splits(cfg["data"])  # bad data fail here, before anything is written
    if len(splits["train"]) == 0:
        raise TallyError("data: the training split is empty")
    if ctx.is_main:
        _prepare_run_dir(run_dir, cfg, resume)
    try:
        return _train(cfg, splits, run_dir, resume, ctx, device, stop_after_epoch)
    except BaseException as e:
        current = (results.read_json(run_dir / "status.json") or {}).get("status")
        if ctx.is_main and current != "stopped":  # a scheduler's stop is not this run's failure
            status = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
            results.write_status(run_dir, status, error=f"{type(e).__name__}: {e}", ended=time.time())
        raise


def _prepare_run_dir(run_dir: Path, cfg: dict, resume: bool) -> None:
    existing = results.read_yaml(run_dir / "config.yaml")
    if existing is not None and not resume and (run_dir / "checkpoints" / "last.pt").exists():
        raise TallyError(f"{run_dir}: already holds a run; pass --resume to continue it or pick another --out")
    if existing is not None and resume and existing != cfg:
        raise TallyError(f"{run_dir}: config.yaml differs from the config given; refusing to resume")
    results.write_yaml(run_dir / "config.yaml", cfg)
    results.write_status(run_dir, "running", error=None, started=time.time(), ended=None,
                         node=socket.gethostname())


def _train(cfg, splits, run_dir: Path, resume: bool, ctx: RunContext, device, stop_after_epoch) -> dict:
    tcfg, dcfg = cfg["train"], cfg["data"]
    seed_everything(tcfg["seed"])
    train_ds = splits["train"]
    train_counts = train_ds.counts()
    banks = {name: bank_for_training(ds, dcfg["image_size"], workers=dcfg["decode_workers"])
             for name, ds in splits.items()}

    distributed = ctx.world_size > 1
    sync = memory_sync(len(train_ds.class_names), ctx.world_size, tcfg["batch_size"])
    method = build_method_for(cfg, train_ds, ctx.data_ranks, sync).to(device)
    if distributed and tcfg["sync_bn"]:
        # BatchNorm over the global batch: what one process sees on the concatenated batch
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    loss_module: nn.Module = _LossModule(method)
    if distributed:
        # memories are all-reduced explicitly; broadcasting buffers would copy them every step
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    optimizer = build_optimizer(method.parameters(), tcfg, device)
    source = BatchSource(banks["train"], dcfg, tcfg["batch_size"], tcfg["seed"], device,
                         ctx.data_ranks, ctx.data_world_size)

    start_epoch, best = 0, {"value": -math.inf, "epoch": None}
    last_path = run_dir / "checkpoints" / "last.pt"
    resume_path = (ctx.resume_from / "last.pt") if ctx.resume_from else last_path
    if resume and resume_path.exists():
        start_epoch, best = _resume(resume_path, method, optimizer, source, run_dir, ctx)

    autocast = device.type == "cuda" and tcfg["bf16"]
    selection = selection_split(cfg, splits)
    for epoch in range(start_epoch, tcfg["epochs"]):
        t0 = time.time()
        phase = "warmup" if epoch < tcfg["warmup_epochs"] else "main"
        # a warm-up epoch is one pass of the (sharded) uniform sampler over the training set
        steps = (math.ceil(len(train_ds) / (tcfg["batch_size"] * ctx.data_world_size)) if phase == "warmup"
                 else tcfg["steps_per_epoch"])
        train_loss = _train_epoch(loss_module, optimizer, source, method.batch_kinds(phase), phase,
                                  steps, autocast, epoch, ctx)
        record = {"epoch": epoch, "phase": phase, "train_loss": train_loss, "steps": steps}
        checkpoint_dir = None
        if ctx.is_main:
            key = _validate_epoch(method, cfg, splits, banks, train_counts, device, selection, record)
            # the reference keeps only TALLY-phase epochs: a warm-up epoch is never the kept model
            # unless train.select_from is 'all'
            eligible = phase == "main" or tcfg["select_from"] == "all"
            if eligible and key > (best["value"], best.get("tiebreak", -math.inf)):
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
    return finalize(cfg, run_dir, method, banks, splits, train_counts, device)


def _train_epoch(loss_module, optimizer, source: BatchSource, kinds, phase, steps, autocast, epoch,
                 ctx: RunContext) -> float:
    """The mean training loss of the epoch, over the global batch (every rank returns the same)."""
    loss_module.train()
    total = torch.zeros((), device=source.device)
    bar = None
    if ctx.is_main and ctx.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"epoch {epoch + 1} {phase}", leave=False, mininterval=1.0, disable=None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    for step in range(steps):
        batches = source.draw(kinds)
        with amp:
            loss = loss_module(batches, phase)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        if bar is not None:
            bar.update(1)
        if step == 0 and not torch.isfinite(loss):
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
    metric = tcfg["selection_metric"]
    kept = f"{best['value']:.4f} @ {best['epoch'] + 1}" if best["epoch"] is not None else "- (warm-up)"
    print(f"epoch {record['epoch'] + 1}/{tcfg['epochs']} {record['phase']:6s} loss {record['train_loss']:.4f} "
          f"val/{metric} {record[f'val/{metric}']:.4f} (best {kept}) {record['seconds']:.1f}s", flush=True)


def _finite(x: float) -> float:
    return -math.inf if x is None or math.isnan(x) else x


# ---------------------------------------------------------------- evaluation
@torch.inference_mode()
def predict(model: nn.Module, bank: ImageBank, batch_size: int, device: torch.device,
            autocast: bool = False, confidence: bool = False):
    """Plain forward passes (no mixing) over a whole bank; returns predicted class indices (and, with
    ``confidence``, each prediction's softmax probability)."""
    was_training = model.training
    model.eval()
    preds, confs = [], []
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        for start in range(0, len(bank.labels), batch_size):
            x = to_float_normalized(bank.images[start:start + batch_size].to(device, non_blocking=True))
            logits = model(x).float()
            preds.append(logits.argmax(1).cpu())
            confs.append((logits.amax(1) - logits.logsumexp(1)).exp().cpu())  # softmax of the argmax
    model.train(was_training)
    out = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    if confidence:
        return out, (torch.cat(confs).numpy() if confs else np.zeros(0, dtype=np.float32))
    return out


def evaluate_split(model, name: str, bank: ImageBank, ds, train_counts, cfg, device,
                   keep: list | None = None) -> pd.DataFrame:
    """The split's long table; with ``keep``, its per-example predictions are appended to it too."""
    preds, conf = predict(model, bank, cfg["train"]["eval_batch_size"], device,
                          autocast=device.type == "cuda" and cfg["train"]["bf16"], confidence=True)
    if keep is not None:
        keep.append(intervals.prediction_frame(name, preds, bank.labels, bank.domains, conf))
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


def _validate_epoch(method, cfg, splits, banks, train_counts, device, selection: str,
                    record: dict) -> tuple[float, float]:
    """Validation metrics into `record`; returns the epoch's selection key (value, tie-break)."""
    metric = cfg["train"]["selection_metric"]
    val = evaluation.split_metrics(evaluate_split(method.net, "val", banks["val"], splits["val"],
                                                  train_counts, cfg, device))
    record.update({f"val/{k}": v for k, v in val.items()})
    value = val[metric]
    if selection != "val":  # oracle (test-domain) selection, only when asked for; labelled
        table = evaluate_split(method.net, selection, banks[selection], splits[selection], train_counts,
                               cfg, device)
        value = record[f"oracle:{selection}/{metric}"] = evaluation.split_metrics(table)[metric]
    # ties (frequent for worst-pair metrics on small validation sets) go to the better mean
    return _finite(value), _finite(val["pair_acc_mean"])


def finalize(cfg, run_dir: Path, method, banks, splits, train_counts, device) -> dict:
    """Evaluate the kept (best-on-validation) checkpoint on every split; write tables and metrics."""
    best_path = run_dir / "checkpoints" / "best.pt"
    state = load_checkpoint(best_path)
    method.load_state_dict(state["model"])
    kept: list = []  # per-example predictions of the test splits (paired comparisons, exact F1 intervals)
    tables = [evaluate_split(method.net, name, banks[name], ds, train_counts, cfg, device,
                             keep=None if name == "val" else kept)
              for name, ds in splits.items() if name != "train"]
    table = pd.concat(tables, ignore_index=True)
    metric, selection = cfg["train"]["selection_metric"], selection_split(cfg, splits)
    metrics = evaluation.all_metrics(table, *evaluation.shot_thresholds_of(cfg["data"]))
    results.write_parquet(run_dir / "eval.parquet", table)
    intervals.write_predictions(run_dir, kept)
    results.write_json(run_dir / "metrics.json", metrics)
    results.write_status(run_dir, "done", ended=time.time(), best_epoch=state["epoch"],
                         selection={"split": selection, "metric": metric, "value": metrics[selection][metric],
                                    "oracle": selection != "val"})
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
    splits = load_splits(cfg["data"])
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
