"""bench/train_step.py's stem pass, the time floor of TALLY's default (separate) stem pass: it must do exactly
the convolution work TALLY's step adds to ERM's, and nothing of the step around it (no optimiser step)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ARGS = argparse.Namespace(batch=6, compile_mode="default", placement="auto")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_stem_pass_does_the_work_tallys_second_pass_adds_and_no_optimiser_step():
    bench = load_bench()
    bank = bench.make_bank(32)
    cpu = torch.device("cpu")
    erm, tally, stem = (cls(name, "resnet10", 32, bank, cpu, ARGS, compiled=False)
                        for cls, name in ((bench.Runner, "erm"), (bench.Runner, "tally"), (bench.StemPass, "stem")))
    tally.run(1, "warmup")  # TALLY's main step mixes with filled memories
    # FLOPs: TALLY's main step = ERM's step + one stem pass (forward and backward), exactly
    assert stem.flops() == tally.flops() - erm.flops() > 0
    before = [p.detach().clone() for p in stem.method.parameters()]
    out = stem.run(2)
    assert out.shape[1:] == (128, 4, 4)  # the stem's map, layer2 of ResNet-10 at 32 px
    assert all(torch.equal(p, q) for p, q in zip(stem.method.parameters(), before, strict=True))
    assert all(p.grad is None for p in stem.method.parameters())
