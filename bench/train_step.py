"""Time training's own step: ERM (warm-up step) against TALLY (main step, both stem passes), eager against
torch.compile, side by side in one process.

Every runner is built from training's own parts (tally.training): the method (build_method, the
SplitResNet cut after layer2), the optimiser (build_optimizer: Adam amsgrad, fused on CUDA), the batch
source (BatchSource: bank placement, pinned index copies, host prefetch when the bank stays on the CPU,
augmentation) and the step (TrainStep: bf16 autocast on CUDA, zero_grad, backward, optimiser step,
torch.compile with train.compile). A step is the whole hot path from the sampler draw to the optimiser.

Timing: on CUDA, CUDA events around blocks of steps (no synchronisation between steps) after warm-up
steps, and the GPU memory peak of each runner; on the CPU, wall and process-CPU time around the same
blocks (the CPU time is the steadier measure on a shared machine: it does not count time spent waiting
for a core), after rounds of all runners until none page-faults (their shared heap stopped growing;
"faults/step" says whether it stayed so). Blocks of runners are interleaved in rotating order so that
drifting load hits all alike; img/s are medians over blocks of labelled images (B per step for every
runner). The TALLY step against its FLOP floor (the ERM step times TALLY/ERM FLOPs) is a ratio per
rotation of blocks (TALLY's block over the ERM block beside it), printed as the median and range of those
ratios. The FLOP floor counts the second stem pass at the whole network's FLOP/s, but the stem's
convolutions (large maps, few channels) run at fewer: the "stem" runner times that pass alone (StemPass),
and TALLY is also printed against ERM + stem pass, its time floor, block by block (beyond 1: its own
mixing and memories). "compile s" is the time of a compiled runner's first steps (both phases' graphs)
beyond its steady step time.

    PYTHONPATH=. python bench/train_step.py [--device cpu|cuda] [--configs r18-64,r50-224] [--modes eager,compiled]
        [--runners erm,stem,tally,tally-joint] [--steps N] [--blocks N] [--warmup N] [--batch 18] [--threads N]
        [--compile-mode default|reduce-overhead] [--placement auto|device|host]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from tally.config import validate
from tally.data.bank import ImageBank
from tally.method import SplitResNet, TrainInfo, build_method
from tally.method.perf import keep_cpu_memory
from tally.training.run import BatchSource, TrainStep, _LossModule, build_optimizer

# runner -> (method, stem pass, the phase it is timed in); "stem" times the ERM network's stem alone (StemPass)
RUNNERS = {"erm": ("erm", None, "warmup"), "stem": ("erm", None, "warmup"), "tally": ("tally", "separate", "main"),
           "tally-joint": ("tally", "joint", "main")}
CONFIGS = {"r18-64": ("resnet18", 64), "r50-224": ("resnet50", 224), "r10-32": ("resnet10", 32)}
K, D, BANK = 7, 4, 256  # PACS-like: 7 classes, 4 domains; a small bank of pre-decoded images


def make_bank(size: int, seed: int = 0) -> ImageBank:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BANK, 3, size, size), dtype=torch.uint8, generator=g)
    prior = 2.0 ** -torch.arange(K, dtype=torch.float)  # long-tailed labels: class c has weight 2^-c
    labels = torch.multinomial(prior, BANK, replacement=True, generator=g)
    labels[:K] = torch.arange(K)  # every class present
    return ImageBank(images, labels, torch.randint(D, (BANK,), generator=g))


class Runner:
    """One method with its optimiser, batch source and step, exactly as tally.training builds them."""

    def __init__(self, name: str, arch: str, size: int, bank: ImageBank, device, args, compiled: bool):
        method_name, stem_pass, self.phase = RUNNERS[name]
        cfg = validate({"data": {"image_size": size}, "model": {"arch": arch},
                        "method": {"name": method_name, **({"stem_pass": stem_pass} if stem_pass else {})},
                        "train": {"batch_size": args.batch, "device": device.type, "compile": compiled,
                                  "compile_mode": args.compile_mode}})
        torch.manual_seed(0)
        net = SplitResNet(arch, cfg["model"]["cut"], K)
        info = TrainInfo(K, D, torch.bincount(bank.labels, minlength=K), size)
        method_cfg = {k: v for k, v in cfg["method"].items() if k != "name"}
        self.method = build_method(method_name, net, info, method_cfg).to(device)
        if device.type == "cuda":  # as training: channels_last on CUDA
            self.method = self.method.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.method.parameters(), cfg["train"], device)
        self.source = BatchSource(bank, cfg["data"], args.batch, 0, device, placement=args.placement)
        self.step = TrainStep(_LossModule(self.method), self.optimizer, device,
                              autocast=device.type == "cuda" and cfg["train"]["bf16"],
                              compile_mode=args.compile_mode if compiled else None)
        self.device = device

    def run(self, steps: int, phase: str | None = None) -> torch.Tensor:
        phase = phase or self.phase
        loss = None
        for batches in self.source.batches(self.method.batch_kinds(phase), steps):
            loss = self.step(batches, phase)
        return loss

    def flops(self) -> int:
        batches = self.source.draw(self.method.batch_kinds(self.phase))
        with FlopCounterMode(display=False) as counter, self.step.amp:
            self.method(batches, self.phase).backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


class StemPass(Runner):
    """The work TALLY's second stem pass adds to an ERM step: one more batch drawn and augmented, the stem's
    forward, and its backward from a fixed gradient map (no head, no optimiser step: the TALLY step has one
    of each, as ERM's). ERM step + stem pass is the time floor of the default (separate) stem pass: what
    the FLOP floor misses is that the stem's convolutions, on large maps with few channels, run at fewer
    FLOP/s than the head's."""

    def run(self, steps: int, phase: str | None = None) -> torch.Tensor:
        stem, grad, out = self.method.net.stem, None, None
        for (x, _, _), in self.source.batches(self.method.batch_kinds(self.phase), steps):
            with self.step.amp:
                out = stem(x)
            grad = torch.ones_like(out) if grad is None else grad
            out.backward(grad)
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.run(1)
        return counter.get_total_flops()


def build_runner(name: str, arch: str, size: int, bank: ImageBank, device, args, compiled: bool) -> Runner:
    """The runner of RUNNERS' `name`: the stem pass (StemPass) or a method's step (Runner)."""
    return (StemPass if name == "stem" else Runner)(name, arch, size, bank, device, args, compiled)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_block(runner: Runner, steps: int) -> tuple[float, float, float]:
    """(wall s, process-CPU s, page faults) per step over one block; on CUDA the wall time is from CUDA
    events (and the last two are nan)."""
    if runner.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.run(steps)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / steps, float("nan"), float("nan")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t, c = time.perf_counter(), time.process_time()
    runner.run(steps)
    wall, cpu = (time.perf_counter() - t) / steps, (time.process_time() - c) / steps
    return wall, cpu, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps


def settle(runners: list[Runner], steps: int, most: int = 6) -> int:
    """CPU: rounds of every runner in turn until a round page-faults no more (at most `most`); returns
    the rounds run. The runners share one heap (kept, never trimmed: keep_cpu_memory), and it grows
    while their steps alternate: a block that faults pays the kernel for fresh pages (0.2-0.6 s of a
    4 s ResNet-50 TALLY step here), which a run of one method pays only in its first steps."""
    for rounds in range(1, most + 1):
        faults = [timed_block(runner, steps)[2] for runner in runners]  # every runner, every round
        if not any(faults):
            return rounds
    return most


def host_syncs_per_step(runner: Runner, steps: int = 3) -> float:
    """CUDA only: synchronising calls per step, counted by torch's sync debug mode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.run(steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def bench(arch: str, size: int, args, device) -> list[dict]:
    bank = make_bank(size)
    runners, rows = {}, []
    for name in args.runners:
        for mode in args.modes:
            before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            if name == "stem" and mode != "eager":
                continue  # the stem pass is the floor of the eager step only
            runner = build_runner(name, arch, size, bank, device, args, compiled=mode == "compiled")
            t0 = time.perf_counter()
            if runner.phase == "main":  # fill TALLY's memories (and compile its warm-up graph)
                runner.run(1, "warmup")
            runner.run(args.warmup)
            sync(device)
            first = time.perf_counter() - t0
            # what stays allocated between steps: weights, optimiser state, memories, bank, graphs
            runner.resident = torch.cuda.memory_allocated() - before if device.type == "cuda" else 0
            runners[(name, mode)] = (runner, first, 1 + args.warmup if runner.phase == "main" else args.warmup)
    # FLOPs of one eager step of each runner, counted once: the floor and the stem's share are against ERM's
    flops = {name: runners[(name, "eager")][0].flops() for name in ("erm", "stem", "tally")
             if (name, "eager") in runners and ("erm", "eager") in runners}
    floor = flops["tally"] / flops["erm"] if {"erm", "tally"} <= flops.keys() else None
    times = {key: [] for key in runners}
    order = list(runners)
    settled = settle([runners[key][0] for key in order], args.steps) if device.type == "cpu" else 0
    for b in range(args.blocks):
        for key in order[b % len(order):] + order[: b % len(order)]:
            times[key].append(timed_block(runners[key][0], args.steps))
    for (name, mode), (runner, first, first_steps) in runners.items():
        wall = statistics.median(w for w, _, _ in times[(name, mode)])
        cpu = statistics.median(c for _, c, _ in times[(name, mode)])
        row = {"config": f"{arch} {size}px", "runner": name, "mode": mode, "img/s": args.batch / wall,
               "ms/step": 1000 * wall, "steps": args.blocks * args.steps,
               "compile s": max(first - first_steps * wall, 0.0) if mode == "compiled" else None, "floor": floor,
               "over floor": None}
        if floor and name not in ("erm", "stem") and ("erm", mode) in times:
            # paired by block: each block's step against the ERM block of the same rotation, over the FLOP
            # floor; the median and the spread of those ratios say how far one run can be trusted
            ratios = sorted(t[0] / e[0] / floor for t, e in zip(times[(name, mode)], times[("erm", mode)], strict=True))
            row["over floor"] = (statistics.median(ratios), ratios[0], ratios[-1])
            if ("stem", mode) in times:  # and against ERM + the stem pass, block by block
                ratios = sorted(t[0] / (e[0] + s[0]) for t, e, s in
                                zip(times[(name, mode)], times[("erm", mode)], times[("stem", mode)], strict=True))
                row["over work floor"] = (statistics.median(ratios), ratios[0], ratios[-1])
        if name == "stem" and ("erm", mode) in times:
            row["stem share"] = statistics.median(s[0] / e[0] for s, e in zip(times[(name, mode)], times[("erm", mode)],
                                                                             strict=True))
            row["stem flop share"] = flops["stem"] / flops["erm"]
        if device.type == "cuda":
            row["peak MB"] = gpu_peak(runner) / 2**20
            row["syncs/step"] = host_syncs_per_step(runner)
        else:
            row["cpu img/s"] = args.batch / cpu
            row["faults/step"] = statistics.median(f for _, _, f in times[(name, mode)])
            row["settle rounds"] = settled
        rows.append(row)
    return rows


def gpu_peak(runner: Runner) -> int:
    """Bytes this runner needs alone: what it keeps allocated plus the peak a step adds on top (other
    runners' allocations are in the same process and are left out)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner.run(2)
    torch.cuda.synchronize()
    return runner.resident + torch.cuda.max_memory_allocated() - base


def print_rows(rows: list[dict], device, args) -> None:
    cols = ["config", "runner", "mode", "img/s", "ms/step"]
    cols += ["peak MB", "syncs/step"] if device.type == "cuda" else ["cpu img/s", "faults/step", "settle rounds"]
    cols += ["compile s", "steps"]
    print(" ".join(f"{c:>13}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'-':>13}" if v is None else f"{v:>13.1f}" if isinstance(v, float) else f"{v!s:>13}")
        print(" ".join(cells), flush=True)
    by = {(r["config"], r["runner"], r["mode"]): r for r in rows}
    for config in dict.fromkeys(r["config"] for r in rows):
        parts = []
        for name in RUNNERS:
            e, c = by.get((config, name, "eager")), by.get((config, name, "compiled"))
            if e and c:
                parts.append(f"{name} compiled/eager {c['img/s'] / e['img/s']:.3f}x")
                if "cpu img/s" in e:
                    parts[-1] += f" (cpu time {c['cpu img/s'] / e['cpu img/s']:.3f}x)"
        for mode in ("eager", "compiled"):
            e, t = by.get((config, "erm", mode)), by.get((config, "tally", mode))
            if e and t:
                parts.append(f"{mode} TALLY/ERM step {e['img/s'] / t['img/s']:.3f}")
        floor = next(iter(r["floor"] for r in rows if r["config"] == config))
        if floor:
            parts.append(f"FLOP floor TALLY/ERM {floor:.3f}")
        print(f"{config}: " + "; ".join(parts), flush=True)
        for r in rows:
            if r["config"] == config and r["over floor"]:
                median, low, high = r["over floor"]
                print(f"  {r['runner']} {r['mode']} step / its FLOP floor (ERM step x {floor:.3f}): median {median:.3f}x "
                      f"over {args.blocks} paired blocks (min {low:.3f}, max {high:.3f}; goal <= 1.05)", flush=True)
        stem = by.get((config, "stem", "eager"))
        if stem and "stem share" in stem:
            share, flop_share = stem["stem share"], stem["stem flop share"]
            print(f"  stem pass (one more batch through the stem, forward and backward): {share:.3f} of the ERM step's "
                  f"time, {flop_share:.3f} of its FLOPs; so ERM + stem pass = {(1 + share) / (1 + flop_share):.3f}x "
                  "the FLOP floor", flush=True)
            for r in rows:
                if r["config"] == config and r.get("over work floor"):
                    median, low, high = r["over work floor"]
                    print(f"  {r['runner']} {r['mode']} step / (ERM step + stem pass): median {median:.3f}x (min {low:.3f}, "
                          f"max {high:.3f}; beyond 1: the time of its mixing and memories)", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--configs", default="r18-64,r50-224", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--runners", default="erm,stem,tally,tally-joint", help=f"comma-separated, of {', '.join(RUNNERS)}")
    p.add_argument("--modes", default="eager,compiled", help="eager, compiled or both")
    p.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead"))
    p.add_argument("--placement", default="auto", choices=("auto", "device", "host"), help="of the image bank")
    p.add_argument("--batch", type=int, default=18)
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (CUDA 10, CPU 2)")
    p.add_argument("--blocks", type=int, default=None, help="timed blocks per runner (CUDA 9, CPU 9)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (CUDA 10, CPU 2)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.steps = args.steps or (10 if gpu else 2)
    args.blocks = args.blocks or 9  # the spread of 9 paired blocks: one run is enough to judge a ratio
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    args.runners, args.modes = args.runners.split(","), args.modes.split(",")
    if gpu:
        torch.backends.cudnn.benchmark = True  # as training does on CUDA (unless train.deterministic)
    else:
        keep_cpu_memory()  # as training does on the CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if gpu else f"cpu, {torch.get_num_threads()} threads"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {where}, load average {load}, batch {args.batch} (+{args.batch} for TALLY), "
          f"cut layer2, {'bf16 autocast, channels_last' if gpu else 'float32'}, compile mode {args.compile_mode}, "
          f"{args.warmup} warm-up steps, {args.blocks} blocks x {args.steps} steps", flush=True)
    for key in args.configs.split(","):
        arch, size = CONFIGS[key]
        print_rows(bench(arch, size, args, device), device, args)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
