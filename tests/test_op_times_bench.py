"""bench/op_times.py: its op table must account for TALLY's step exactly as ERM's step + the stem pass +
TALLY's own ops (call counts are exact, unlike times), and its op times are a part of the step's wall time."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_op_times():
    spec = importlib.util.spec_from_file_location("bench_op_times", ROOT / "bench" / "op_times.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tallys_ops_are_erms_plus_the_stem_pass_plus_its_own_mix_and_memories():
    op_times = load_op_times()
    bench = op_times.bench  # bench/train_step.py, whose runners it times
    bank = bench.make_bank(32)
    args = argparse.Namespace(batch=6, compile_mode="default", placement="auto")
    cpu = torch.device("cpu")
    runners = {name: bench.build_runner(name, "resnet10", 32, bank, cpu, args, compiled=False)
               for name in ("erm", "stem", "tally")}
    runners["tally"].run(1, "warmup")
    timed = {name: op_times.time_ops(runner, steps=2, settle_most=2) for name, runner in runners.items()}
    for t in timed.values():
        assert 0 < t["ops ms"] <= t["wall ms"]  # op times are a part of the timed steps, never more
    diff = op_times.difference(timed["tally"]["ops"], timed["erm"]["ops"], timed["stem"]["ops"])
    extra = {key[0] for key, (_, calls) in diff.items() if calls}
    # the network's work is ERM's + one stem pass, call for call
    for key, (_, calls) in diff.items():
        if key[0] in ("convolution", "convolution_backward", "native_batch_norm", "native_batch_norm_backward",
                      "max_pool2d_with_indices", "threshold_backward"):
            assert calls == 0, (key, calls)
    # what is left is TALLY's own: its lambdas, the mix and the memory update
    assert {"_sample_dirichlet", "lerp", "addcmul", "index_add_"} <= extra, sorted(extra)
