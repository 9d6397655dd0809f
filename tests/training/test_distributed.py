"""Exact data parallelism: K workers with batch B compute what one process computes on their K*B batch.

Real torch.distributed (gloo, 2 CPU processes, torch.multiprocessing.spawn; no Ray) against one process
that plays both ranks (RunContext.emulate_world_size): its batches are the two ranks' draws concatenated
in rank order, each drawn from that rank's own streams.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tally import results
from tally.config import validate
from tally.data import load_splits
from tally.data.augment import to_float_normalized
from tally.data.bank import bank_for_training
from tally.errors import TallyError
from tally.method.backbone import SplitResNet
from tally.training import BatchSource, RunContext, build_method_for, train_run
from tally.training.checkpoints import load_checkpoint
from tally.training.distributed import RANK_STREAMS, stream_seed, use_sync_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 8


def _config(method: str) -> dict:
    return {
        # a warm-up epoch is ceil(n_train / (2 * 8)) steps (checked below against the decoded size)
        "data": {"source": "embedded", "max_per_class": 4, "flip": False, "crop_padding": 0},
        "model": {"arch": "resnet10", "cut": "layer2"},
        "method": {"name": method},
        # SGD: Adam's first steps divide by sqrt(v) ~ |g| and would magnify float rounding differences
        "train": {"epochs": 2, "warmup_epochs": 1, "steps_per_epoch": 3, "batch_size": BATCH,
                  "optimizer": "sgd", "lr": 0.05, "device": "cpu", "select_from": "all",
                  "sync_bn": False},  # GroupNorm below: per-worker normalisation is no departure here
    }


class GroupNormResNet(SplitResNet):
    """SplitResNet with every BatchNorm replaced by GroupNorm, which normalises each example alone.

    Per-worker BatchNorm would normalise each rank's B rows by their own statistics, not the K*B rows'
    (that is train.sync_bn's job, but torch's SyncBatchNorm runs on CUDA only). A batch-independent
    normaliser leaves everything else that data parallelism must get right under test.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for module in list(self.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.BatchNorm2d):
                    setattr(module, name, nn.GroupNorm(8, child.num_features))


def _worker(rank, method, rendezvous, run_dir, dump_dir):
    import tally.training.run

    torch.set_num_threads(1)
    tally.training.run.SplitResNet = GroupNormResNet  # this spawned process only
    decoded = []  # the splits this rank decodes (their sizes)
    real_bank = tally.training.run.bank_for_training
    tally.training.run.bank_for_training = lambda ds, *a, **k: decoded.append(len(ds)) or real_bank(ds, *a, **k)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        ctx = RunContext(rank=rank, world_size=2, device=torch.device("cpu"), progress=False,
                         memory_dump_dir=dump_dir)
        train_run(_config(method), run_dir, ctx=ctx)
        torch.save(decoded, f"{run_dir}/../decoded{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["tally", "erm"])
def test_two_workers_compute_what_one_process_computes_on_the_concatenated_batch(tmp_path, monkeypatch,
                                                                                 method):
    """2 gloo workers x batch 8 == 1 process x batch 16 (both ranks' draws), BatchNorm replaced by
    GroupNorm (see GroupNormResNet): the same epoch losses, weights and memories to 1e-5.

    Covers the sharded warm-up sampler (TALLY and ERM), per-rank class-/domain-balanced draws and
    mixing coefficients, the globally normalised class-weighted loss and the memory reduction (TALLY).
    """
    mp.spawn(_worker, args=(method, str(tmp_path / "rendezvous"), str(tmp_path / "ddp"), str(tmp_path / "dumps")),
             nprocs=2, join=True)
    monkeypatch.setattr("tally.training.run.SplitResNet", GroupNormResNet)
    ctx = RunContext(progress=False, emulate_world_size=2, memory_dump_dir=tmp_path / "one")
    train_run(_config(method), tmp_path / "one", ctx=ctx)

    # only rank 0 evaluates: rank 1 decodes the training split alone, rank 0 every split
    decoded = [torch.load(tmp_path / f"decoded{r}.pt") for r in range(2)]
    n_train = decoded[0][0]
    assert decoded[1] == [n_train] and len(decoded[0]) == 3
    ddp, one = results.read_run(tmp_path / "ddp"), results.read_run(tmp_path / "one")
    assert list(ddp.epochs["steps"]) == list(one.epochs["steps"]) == [math.ceil(n_train / (2 * BATCH)), 3]
    assert list(ddp.epochs["train_loss"]) == pytest.approx(list(one.epochs["train_loss"]), abs=1e-5)
    a = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    # network weights to 1e-5; the memories (buffers) below. Random-stream states: 1 rank vs 2
    weights = [k for k in a if k.startswith("net.")]
    assert weights == [k for k in b if k.startswith("net.")]
    for key in weights:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    if method == "erm":  # ERM draws nothing but the sharded uniform batches: even the hook is not needed
        plain = _config(method)
        plain["train"]["batch_size"] = 2 * BATCH
        train_run(plain, tmp_path / "plain", ctx=RunContext(progress=False))
        c = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")["model"]
        for key in weights:
            torch.testing.assert_close(a[key], c[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    moved = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")["model"]["net.head.fc.weight"]
    assert not torch.allclose(moved, torch.zeros_like(moved))
    if method == "tally":
        mems = [load_checkpoint(tmp_path / "dumps" / f"rank{r}.pt") for r in range(2)]
        ref = load_checkpoint(tmp_path / "one" / "rank0.pt")
        for key in ref:
            assert torch.equal(mems[0][key], mems[1][key]), key  # the workers agree bit for bit
            # prototypes hold zhat = (z - mu) / sigma: for a near-constant map sigma is ~1e-3 (its eps),
            # which turns the weights' 1e-7 rounding differences into 1e-4
            atol = 1e-3 if key == "prototypes" else 1e-5
            torch.testing.assert_close(mems[0][key].float(), ref[key].float(), atol=atol, rtol=0,
                                       msg=lambda m, key=key: f"{key}: {m}")


def _bank(data_cfg: dict):
    splits = load_splits(validate({"data": data_cfg})["data"])
    return splits["train"], bank_for_training(splits["train"], 32)


@pytest.mark.parametrize(("sync_bn", "world_size", "device", "used", "warns"), [
    (None, 1, "cuda", False, False), (None, 1, "cpu", False, False),  # one process: nothing to sync
    (None, 4, "cuda", True, False),    # the default: one big batch wherever torch can give it
    (False, 4, "cuda", False, False),  # asked for per-worker BatchNorm
    (True, 4, "cuda", True, False),
    (None, 2, "cpu", False, True),     # gloo has no SyncBatchNorm: the run goes on and says so
    (False, 2, "cpu", False, False),   # the user accepted per-worker BatchNorm
])
def test_sync_batchnorm_is_the_default_with_workers_on_cuda_and_said_on_cpu(sync_bn, world_size, device, used, warns):
    use, warning = use_sync_batchnorm(sync_bn, world_size, device)
    assert use is used and (warning is not None) is warns
    if warns:
        assert warning.startswith("warning: train.sync_bn:") and "not one big batch" in warning
    assert validate({})["train"]["sync_bn"] is None  # the default is the choice above, not a fixed false


def test_sync_batchnorm_asked_for_on_cpu_workers_is_refused():
    with pytest.raises(TallyError, match="train.sync_bn: SyncBatchNorm runs on CUDA devices only"):
        use_sync_batchnorm(True, 2, "cpu")


def test_every_rank_draws_from_its_own_streams():
    """No two ranks share a sampler, augmentation or mixing stream (today's seed + i offsets made rank
    r's class-balanced stream rank r+1's uniform one, and every rank drew the same lambdas)."""
    seeds = [stream_seed(0, None, "uniform")] + [stream_seed(0, r, s) for r in range(4) for s in RANK_STREAMS]
    assert len(set(seeds)) == len(seeds)
    assert stream_seed(0, 1, "mixing") != stream_seed(1, 1, "mixing")

    data = {"source": "embedded", "max_per_class": 12, "flip": True, "crop_padding": 2}
    train_ds, bank = _bank(data)
    cfg = validate({"data": data})
    sources = [BatchSource(bank, cfg["data"], BATCH, 0, torch.device("cpu"), (r,), 4) for r in range(4)]
    draws = [s.draw(("uniform", "class_balanced", "domain_balanced")) for s in sources]
    for r in range(4):
        for q in range(r):
            for kind in range(3):
                assert not torch.equal(draws[r][kind][0], draws[q][kind][0]), (r, q, kind)

    lambdas = []
    for r in range(2):
        method = build_method_for(validate({"method": {"name": "tally"}}), train_ds, ranks=(r,))
        lambdas.append(torch.rand(16, generator=method.generator))
    assert not torch.equal(lambdas[0], lambdas[1])


def test_a_warmup_epoch_shows_every_example_once_across_ranks():
    data = {"source": "embedded", "max_per_class": 12, "crop_padding": 0}
    train_ds, bank = _bank(data)
    cfg = validate({"data": data})
    world = 3
    sources = [BatchSource(bank, cfg["data"], 5, 0, torch.device("cpu"), (r,), world) for r in range(world)]
    steps = len(train_ds) // (5 * world)  # whole steps within the first pass
    seen = torch.cat([torch.cat([s.ranks[0]["samplers"]["uniform"].draw(5) for s in sources])
                      for _ in range(steps)])
    assert len(seen) == steps * 5 * world and len(torch.unique(seen)) == len(seen)
    # one process playing the three ranks draws the same rows in the same order
    both = BatchSource(bank, cfg["data"], 5, 0, torch.device("cpu"), range(world), world)
    again = torch.cat([both.draw(("uniform",))[0][0] for _ in range(steps)])
    assert torch.equal(again, to_float_normalized(bank.images[seen]))


@pytest.mark.parametrize("resources, message", [
    ("{workers: 2, gpus_per_worker: 0.5}", "two ranks on one GPU"),
    ("{workers: 1, gpus_per_worker: 2}", "expected at most 1"),
])
def test_gpu_shares_that_break_nccl_or_idle_gpus_are_refused_at_spec_validation(resources, message):
    import yaml

    from tally.errors import TallyError
    from tally.search.spec import validate_spec

    spec = yaml.safe_load(f"""
base:
  data: {{source: embedded}}
  method: {{name: tally}}
  train: {{epochs: 2, warmup_epochs: 1}}
space:
  train.lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-2}}
budget: {{trials: 2}}
resources: {resources}
""")
    with pytest.raises(TallyError, match=rf"^resources.gpus_per_worker: .*{message}"):
        validate_spec(spec)
    # one trial per quarter GPU stays allowed (one rank each), as does one GPU per worker
    for fine in ("{workers: 1, gpus_per_worker: 0.25}", "{workers: 4, gpus_per_worker: 1}"):
        spec["resources"] = yaml.safe_load(fine)
        assert validate_spec(spec)["resources"]["gpus_per_worker"] == yaml.safe_load(fine)["gpus_per_worker"]
