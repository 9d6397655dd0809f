"""One training run from one complete config.

The same function runs locally (`tally train`) and inside every Ray Train worker: the Ray side
only passes a `RunContext` (rank, device, all-reduce, report hook). Warm-up epochs then method
epochs; the best epoch by a validation metric is kept; the kept checkpoint is evaluated on every
test split through the evaluator; the run folder follows the results-store layout.
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from tally import evaluation, intervals, results
from tally.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from tally.config import validate
from tally.data import load_splits
from tally.data.augment import augment, to_float_normalized
from tally.data.bank import ImageBank, bank_for_training
from tally.distributed import broadcast_object, gather_object, memory_sync
from tally.errors import TallyError
from tally.method.backbone import SplitResNet
from tally.method.methods import TrainInfo, build_method
from tally.method.perf import keep_cpu_memory
from tally.method.samplers import build_sampler

CHECKPOINT_VERSION = 1


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _LossModule(nn.Module):
    """Wraps a method so DDP sees one forward per step (it hooks forward, not stem/head calls)."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batches, phase: str):
        return self.method.loss(batches, phase)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TallyError("train.device: 'cuda' asked for but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Global RNGs; the samplers, augmentation and mixing draw from their own seeded generators."""
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- batches
class BatchSource:
    """Draws (x, y, d) batches from a decoded image bank with the method's samplers."""

    def __init__(self, bank: ImageBank, data_cfg: dict, batch_size: int, seed: int, device: torch.device):
        self.bank, self.batch_size, self.device = bank, batch_size, device
        self.flip, self.crop_padding = data_cfg["flip"], data_cfg["crop_padding"]
        # small banks live on the device: indexing then costs no host->device copy
        on_device = device.type == "cpu" or bank.images.numel() < 2**31
        self.images = bank.images.to(device) if on_device else bank.images
        self.labels, self.domains = bank.labels.to(device), bank.domains.to(device)
        self.samplers = {kind: build_sampler(kind, bank.labels, bank.domains, seed + i)
                         for i, kind in enumerate(("uniform", "class_balanced", "domain_balanced"))}
        self.augment_gen = torch.Generator(device=device).manual_seed(seed + 7)

    def draw(self, kinds: tuple[str, ...]):
        out = []
        for kind in kinds:
            idx = self.samplers[kind].draw(self.batch_size)
            x = self.images[idx.to(self.images.device)].to(self.device, non_blocking=True)
            idx = idx.to(self.device)
            x = augment(x, self.augment_gen, flip=self.flip, crop_padding=self.crop_padding)
            out.append((x, self.labels[idx], self.domains[idx]))
        return tuple(out)

    def state_dict(self) -> dict:
        return {"samplers": {k: s.state_dict() for k, s in self.samplers.items()},
                "augment": self.augment_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        for k, s in self.samplers.items():
            s.load_state_dict(state["samplers"][k])
        self.augment_gen.set_state(state["augment"])


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


# ---------------------------------------------------------------- optimiser
def build_optimizer(params, train_cfg: dict, device: torch.device) -> torch.optim.Optimizer:
    lr, wd = train_cfg["lr"], train_cfg["weight_decay"]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if train_cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, amsgrad=train_cfg["amsgrad"], **fused)
    if train_cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, amsgrad=train_cfg["amsgrad"], **fused)
    return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=train_cfg["sgd_momentum"], **fused)


def selection_split(cfg: dict, splits: dict) -> str:
    """The split that picks the best epoch: training-domain validation unless oracle is asked for."""
    if not cfg["data"]["oracle_selection"]:
        return "val"
    held = sorted(name for name in splits if name.startswith("test_domain:"))
    if not held:
        raise TallyError("data.oracle_selection: needs data.setting 'domain' (a held-out test domain)")
    return held[0]


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

    info = TrainInfo(num_classes=len(train_ds.class_names), num_domains=len(train_ds.domain_names),
                     class_counts=torch.as_tensor(train_counts.sum(0)), image_size=dcfg["image_size"])
    net = SplitResNet(cfg["model"]["arch"], cfg["model"]["cut"], info.num_classes,
                      pretrained=cfg["model"]["pretrained"])
    distributed = ctx.world_size > 1
    method = build_method(cfg["method"]["name"], net, info,
                          {k: v for k, v in cfg["method"].items() if k != "name"},
                          sync=memory_sync(info.num_classes, ctx.world_size, tcfg["batch_size"])).to(device)
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    loss_module: nn.Module = _LossModule(method)
    if distributed:
        # memories are all-reduced explicitly; broadcasting buffers would copy them every step
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    optimizer = build_optimizer(method.parameters(), tcfg, device)
    source = BatchSource(banks["train"], dcfg, tcfg["batch_size"], tcfg["seed"] * 1000 + ctx.rank, device)

    start_epoch, best = 0, {"value": -math.inf, "epoch": None}
    last_path = run_dir / "checkpoints" / "last.pt"
    resume_path = (ctx.resume_from / "last.pt") if ctx.resume_from else last_path
    if resume and resume_path.exists():
        state = load_checkpoint(resume_path)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        source.load_state_dict(state["source"][min(ctx.rank, len(state["source"]) - 1)])
        set_rng_state(state["rng"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        if ctx.is_main:
            results.truncate_epochs(run_dir, state["epoch"])
            if ctx.resume_from and not (run_dir / "checkpoints" / "best.pt").exists():
                (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
                best_src = ctx.resume_from / "best.pt"
                if best_src.exists():
                    save_checkpoint(run_dir / "checkpoints" / "best.pt", load_checkpoint(best_src))

    autocast = device.type == "cuda" and tcfg["bf16"]
    metric = tcfg["selection_metric"]
    selection = selection_split(cfg, splits)
    for epoch in range(start_epoch, tcfg["epochs"]):
        t0 = time.time()
        phase = "warmup" if epoch < tcfg["warmup_epochs"] else "main"
        steps = (math.ceil(len(train_ds) / (tcfg["batch_size"] * ctx.world_size)) if phase == "warmup"
                 else tcfg["steps_per_epoch"])
        train_loss = _train_epoch(loss_module, optimizer, source, method.batch_kinds(phase), phase,
                                  steps, autocast, epoch, ctx)
        record = {"epoch": epoch, "phase": phase, "train_loss": train_loss, "steps": steps}
        checkpoint_dir = None
        if ctx.is_main:
            val_table = evaluate_split(method.net, "val", banks["val"], splits["val"],
                                       train_counts, cfg, device)
            val = evaluation.split_metrics(val_table)
            record.update({f"val/{k}": v for k, v in val.items()})
            value = val[metric]
            if selection != "val":  # oracle (test-domain) selection, only when asked for; labelled
                sel_table = evaluate_split(method.net, selection, banks[selection], splits[selection],
                                           train_counts, cfg, device)
                value = record[f"oracle:{selection}/{metric}"] = evaluation.split_metrics(sel_table)[metric]
            # ties (frequent for worst-pair metrics on small validation sets) go to the better mean
            key = (_finite(value), _finite(val["pair_acc_mean"]))
            if key > (best["value"], best.get("tiebreak", -math.inf)):
                best = {"value": key[0], "tiebreak": key[1], "epoch": epoch}
                save_checkpoint(run_dir / "checkpoints" / "best.pt",
                                {"model": method.state_dict(), "epoch": epoch})
        best = broadcast_object(best, distributed)
        sources = gather_object(source.state_dict(), distributed)
        if ctx.is_main:
            save_checkpoint(last_path, {
                "version": CHECKPOINT_VERSION, "model": method.state_dict(),
                "optimizer": optimizer.state_dict(), "source": sources, "rng": rng_state(),
                "epoch": epoch, "best": best})
            record["seconds"] = round(time.time() - t0, 3)
            record["best_epoch"] = best["epoch"]
            results.append_jsonl(run_dir / "epochs.jsonl", record)
            results.write_status(run_dir, "running", epoch=epoch, best_epoch=best["epoch"],
                                 **ctx.extra_status)
            checkpoint_dir = last_path.parent
            if ctx.progress:
                print(f"epoch {epoch + 1}/{tcfg['epochs']} {phase:6s} loss {train_loss:.4f} "
                      f"val/{metric} {record[f'val/{metric}']:.4f} (best {best['value']:.4f} "
                      f"@ {best['epoch'] + 1 if best['epoch'] is not None else '-'}) {record['seconds']:.1f}s",
                      flush=True)
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
    mean = (total / steps).item()  # one host sync per epoch, not per step
    if not math.isfinite(mean):
        raise TallyError(f"training diverged: mean loss is {mean} in epoch {epoch + 1}")
    return mean


def _finite(x: float) -> float:
    return -math.inf if x is None or math.isnan(x) else x


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
