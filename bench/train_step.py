"""Time per training step of TALLY (main phase, both stem passes) against ERM, side by side in one process.

Runners: ERM (its warm-up step), TALLY with A and N through the stem in two passes (stem_pass: separate,
the default and the reference's protocol: BatchNorm normalises each batch by its own statistics) and
TALLY with one concatenated pass (stem_pass: joint). All use the same backbone, batch size and input size;
a step covers the whole hot path: sampler draws, the data path from a pre-decoded uint8 bank (index ->
float -> normalise), forward, backward, TALLY's memory update, and the optimiser step (Adam, amsgrad).
FLOPs of one forward+backward are counted with FlopCounterMode; "floor" = TALLY FLOPs / ERM FLOPs (stem
over A and N, head over A only; the same for both passes), and meas/floor shows how much of TALLY's extra
time its extra arithmetic does not explain. Images/s counts labelled images: B per step for every runner.

    python bench/train_step.py [--quick] [--device cpu|cuda] [--bf16] [--channels-last] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tally.method import SplitResNet, TrainInfo, build_method, build_sampler
from tally.method.perf import keep_cpu_memory

# runner -> the phase it is timed in; "tally" is stem_pass: separate (the default)
RUNNERS = {"erm": "warmup", "tally": "main", "tally-joint": "main"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
K, D, BANK = 7, 4, 256  # PACS-like: 7 classes, 4 domains; a small bank of pre-decoded images


def make_bank(size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BANK, 3, size, size), dtype=torch.uint8, generator=g)
    # long-tailed labels (class c has weight 2^-c), domains uniform
    prior = 2.0 ** -torch.arange(K, dtype=torch.float)
    labels = torch.multinomial(prior, BANK, replacement=True, generator=g)
    labels[:K] = torch.arange(K)  # every class present
    domains = torch.randint(D, (BANK,), generator=g)
    return images, labels, domains


class Runner:
    """One method, its optimiser, samplers and data path; `step(phase)` is one full training step."""

    def __init__(self, name, arch, size, bank, device, channels_last, batch, bf16=False):
        images, labels, domains = bank
        torch.manual_seed(0)
        net = SplitResNet(arch, "layer2", K)
        info = TrainInfo(K, D, torch.bincount(labels, minlength=K), size)
        method_name, _, stem_pass = name.partition("-")  # "tally-joint" -> ("tally", "joint")
        cfg = {"seed": 0} | ({"stem_pass": stem_pass} if stem_pass else {})
        self.method = build_method(method_name, net, info, cfg).to(device)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.method.net.to(memory_format=self.fmt)
        self.method.train()
        params = list(self.method.parameters())
        try:
            self.opt = torch.optim.Adam(params, lr=1e-5, weight_decay=1e-6, amsgrad=True, fused=True)
            self.opt_kind = "fused"
        except (RuntimeError, TypeError):
            self.opt = torch.optim.Adam(params, lr=1e-5, weight_decay=1e-6, amsgrad=True, foreach=True)
            self.opt_kind = "foreach"
        self.images, self.labels, self.domains = images, labels, domains
        kinds = ("uniform", "class_balanced", "domain_balanced")
        self.samplers = {k: build_sampler(k, labels, domains, seed=i) for i, k in enumerate(kinds)}
        self.device, self.batch = device, batch
        self.scale = (1.0 / (255.0 * torch.tensor(STD))).view(1, 3, 1, 1).to(device)
        self.shift = (-torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1).to(device)

    def batches(self, phase):
        out = []
        for kind in self.method.batch_kinds(phase):
            idx = self.samplers[kind].draw(self.batch)
            x = self.images.index_select(0, idx).to(self.device, non_blocking=True)
            x = torch.addcmul(self.shift, x.float(), self.scale).contiguous(memory_format=self.fmt)
            out.append((x, self.labels[idx].to(self.device), self.domains[idx].to(self.device)))
        return tuple(out)

    def step(self, phase):
        with self.amp:
            loss = self.method(self.batches(phase), phase)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def flops(self, phase):
        batches = self.batches(phase)
        with FlopCounterMode(display=False) as fc, self.amp:
            self.method(batches, phase).backward()
        self.opt.zero_grad(set_to_none=True)
        return fc.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(runner, phase, steps, device):
    """(wall, process CPU) seconds per step. On a shared CPU box the process CPU time is the steadier
    measure: it does not count time this process waited for a core that another process held."""
    out = []
    for _ in range(steps):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        runner.step(phase)
        sync(device)
        out.append((time.perf_counter() - t, time.process_time() - c))
    return out


def bench(arch, size, args, device):
    bank = make_bank(size)
    runs = {name: (Runner(name, arch, size, bank, device, args.channels_last, args.batch, args.bf16), phase)
            for name, phase in RUNNERS.items()}
    floor = runs["tally"][0].flops("main") / runs["erm"][0].flops("warmup")
    for _ in range(args.warmup):  # also fills TALLY's memories, as its warm-up epochs would
        for runner, phase in runs.values():
            if phase == "main":
                runner.step("warmup")
            runner.step(phase)
    times = {k: [] for k in runs}
    order = list(runs)
    for r in range(args.repeats):  # interleaved, rotating order, so drifting load hits all alike
        for k in order[r % len(order) :] + order[: r % len(order)]:
            times[k] += timed(*runs[k], args.steps, device)
    wall = {k: statistics.median(w for w, _ in ts) for k, ts in times.items()}
    cpu = {k: statistics.median(c for _, c in ts) for k, ts in times.items()}
    return {"floor": floor, "wall": wall, "cpu": cpu, "n": len(times["erm"]), "opt": runs["erm"][0].opt_kind}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="resnet18 at 64 px only, fewer steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=18)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as training on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--default-malloc", action="store_true", help="skip keep_cpu_memory() (glibc defaults)")
    args = p.parse_args(argv)
    malloc = "glibc default" if args.default_malloc else f"keep_cpu_memory={keep_cpu_memory()}"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # arch, px, steps per round, rounds, warm-up steps
    configs = (
        [("resnet18", 64, 2, 3, 2)] if args.quick else [("resnet18", 64, 5, 8, 3), ("resnet50", 224, 1, 4, 1)]
    )
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"batch {args.batch} (+{args.batch} for TALLY), cut layer2, {'bf16 autocast, ' if args.bf16 else ''}"
        f"{'channels_last' if args.channels_last else 'contiguous'}, malloc {malloc}"
    )
    print(
        f"{'arch':9} {'px':>4} {'ERM img/s':>9} {'2-pass img/s':>12} {'joint img/s':>11} {'2-pass/ERM':>10} "
        f"{'joint/ERM':>9} {'2-pass/joint':>12} {'FLOP floor':>10} {'2-pass meas/floor':>17} "
        f"{'cpu: 2-pass/ERM':>15} {'joint/ERM':>9} {'2-pass/joint':>12} {'steps':>5}"
    )
    for arch, size, steps, repeats, warmup in configs:
        args.steps, args.repeats, args.warmup = steps, repeats, warmup
        r = bench(arch, size, args, device)
        w, c, b = r["wall"], r["cpu"], args.batch
        two, joint = w["tally"] / w["erm"], w["tally-joint"] / w["erm"]
        print(
            f"{arch:9} {size:>4} {b / w['erm']:>9.1f} {b / w['tally']:>12.1f} {b / w['tally-joint']:>11.1f} "
            f"{two:>10.3f} {joint:>9.3f} {w['tally'] / w['tally-joint']:>12.3f} {r['floor']:>10.3f} "
            f"{two / r['floor']:>17.3f} {c['tally'] / c['erm']:>15.3f} {c['tally-joint'] / c['erm']:>9.3f} "
            f"{c['tally'] / c['tally-joint']:>12.3f} {r['n']:>5}",
            flush=True,
        )
    print(
        f"optimizer: Adam(amsgrad, {r['opt']}); medians over interleaved rounds of wall-clock time; ratios are of\n"
        "seconds per step ('cpu:' the same ratios on process CPU time, steadier on a shared machine);\n"
        "img/s = labelled images (B per step for every runner); 2-pass = stem_pass separate (default), joint =\n"
        "one concatenated stem pass"
    )


if __name__ == "__main__":
    main()
