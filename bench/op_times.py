"""Where a CPU training step's time goes, op by op: ERM, the stem pass and TALLY from bench/train_step.py, each
op's wall time per step, and TALLY's ops minus ERM's minus the stem pass's (what TALLY's own code adds).

Why not torch.profiler: on the CPU, training keeps its heap (keep_cpu_memory) so that steps stop
page-faulting once it has grown, and the profiler's own allocations break that: a profiled ResNet-50 stem
pass at 224 px page-faulted 200-330 k times per step and took 2.2-2.9x its unprofiled time here, so its
per-op times measured the kernel's page zeroing. This times each aten op from a TorchDispatchMode instead
(a few microseconds per op, no large allocations), after steps that no longer fault; "faults" says whether the timed steps stayed
so, and "ops / wall" how much of the step the ops account for. Op calls are keyed by the shapes of their
first two tensor arguments; counts are exact, times are one process's and move with the machine's load.

    PYTHONPATH=. python bench/op_times.py [--config r50-224] [--runners erm,stem,tally] [--steps 3] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tally.method.perf import keep_cpu_memory


def _load_train_step():
    """bench/train_step.py, for its runners and settle (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_train_step", Path(__file__).with_name("train_step.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_train_step()


class OpTimer(TorchDispatchMode):
    """Wall time and calls of every aten op run under it, keyed by (op, shapes of its first two tensors)."""

    def __init__(self):
        super().__init__()
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))[:2]
        key = (str(func.overloadpacket.__name__), shapes)
        self.seconds[key] += elapsed
        self.calls[key] += 1
        return out


def time_ops(runner, steps: int, settle_most: int = 8) -> dict:
    """Run `runner` until a step no longer page-faults (at most `settle_most` steps), then `steps` steps
    under an OpTimer: {"ops": {key: (ms per step, calls per step)}, "wall ms", "ops ms", "faults"}."""
    bench.settle([runner], 1, settle_most)
    timer = OpTimer()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    with timer:
        runner.run(steps)
    wall = (time.perf_counter() - start) / steps
    ops = {key: (1000 * s / steps, timer.calls[key] / steps) for key, s in timer.seconds.items()}
    return {"ops": ops, "wall ms": 1000 * wall, "ops ms": sum(ms for ms, _ in ops.values()),
            "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps}


def difference(tally: dict, erm: dict, stem: dict | None) -> dict:
    """Per op key: TALLY's (ms, calls) per step minus ERM's minus the stem pass's (when timed)."""
    parts = [erm, stem] if stem else [erm]
    zero = (0.0, 0.0)
    return {k: tuple(t - sum(p.get(k, zero)[i] for p in parts) for i, t in enumerate(tally.get(k, zero)))
            for k in set(tally).union(*parts)}


def _row(key, ms: float, calls: float) -> str:
    name, shapes = key
    return f"  {ms:9.1f} ms {calls:6.1f}x  {name:32s} {' '.join(str(list(s)) for s in shapes)}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="r50-224", choices=sorted(bench.CONFIGS))
    p.add_argument("--runners", default="erm,stem,tally", help="comma-separated, of erm, stem, tally")
    p.add_argument("--steps", type=int, default=3, help="timed steps per runner")
    p.add_argument("--batch", type=int, default=18)
    p.add_argument("--top", type=int, default=25, help="ops listed per table")
    args = p.parse_args(argv)
    names = args.runners.split(",")
    unknown = [n for n in names if n not in ("erm", "stem", "tally")]
    if unknown:
        p.error(f"--runners: unknown {', '.join(unknown)}; expected erm, stem or tally")
    keep_cpu_memory()  # as training does on the CPU
    arch, size = bench.CONFIGS[args.config]
    bank = bench.make_bank(size)
    options = argparse.Namespace(batch=args.batch, compile_mode="default", placement="auto")
    timed = {}
    for name in names:
        runner = bench.build_runner(name, arch, size, bank, torch.device("cpu"), options, compiled=False)
        if runner.phase == "main":
            runner.run(1, "warmup")  # TALLY's main step mixes with filled memories
        timed[name] = time_ops(runner, args.steps)
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, {arch} {size} px, batch {args.batch}, "
          f"{args.steps} timed steps per runner, eager float32")
    for name, t in timed.items():
        print(f"{name}: {t['wall ms']:.0f} ms per step, ops {t['ops ms']:.0f} ms ({t['ops ms'] / t['wall ms']:.0%} of it), "
              f"faults per step {t['faults']:.0f}")
        for key, (ms, calls) in sorted(t["ops"].items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(_row(key, ms, calls))
    if "tally" in timed and "erm" in timed:
        stem = timed["stem"]["ops"] if "stem" in timed else None
        diff = difference(timed["tally"]["ops"], timed["erm"]["ops"], stem)
        label = "TALLY - ERM - stem pass" if stem else "TALLY - ERM"
        # TALLY's own ops are the calls that differ (its mix and memories, less what the stem pass alone does
        # around its backward); the rest is the same network work, whose time difference is the machine's
        # noise between the runners' timed steps
        own = {k: v for k, v in diff.items() if v[1]}
        print(f"{label}: {sum(ms for ms, _ in diff.values()):+.0f} ms per step of ops: TALLY's own ops (calls that "
              f"differ) {sum(ms for ms, _ in own.values()):.0f} ms, the same network ops "
              f"{sum(ms for k, (ms, _) in diff.items() if k not in own):+.0f} ms (noise). Its own, largest first:")
        for key, (ms, calls) in sorted(own.items(), key=lambda kv: -abs(kv[1][0]))[: args.top]:
            print(_row(key, ms, calls))


if __name__ == "__main__":
    main()
