"""What Ray costs: the same configs run back-to-back in-process, then as Tune trials on Ray Train.

Prints both wall times and their ratio (goal <= 1.15 for trials of >= 60 s each). The Ray side
includes each trial's TorchTrainer start and teardown and the store writes; starting the local Ray
and decoding the banks are once per search and timed apart.
Each run's own time (its status.json started -> ended) is read back from both halves, so the
fixed cost Ray adds per trial is measured directly, not inferred from the difference of totals
(later in-process runs can be a few percent slower than fresh processes, which flatters Ray).

Where the seconds go: every process the Ray half starts is sampled (/proc, every 0.2 s) and its CPU
seconds are summed by process title (ray::TrainController, ray::RayTrainWorker, ...), per trial.
On a loaded machine wall seconds stretch but CPU seconds do not: they say what each process costs.

Both halves read the same banks, decoded once before either is timed; the halves alternate (A B A B,
--rounds 2) and each round's figures are printed.

    .venv/bin/python bench/search_overhead.py [--trials 3] [--steps 135] [--rounds 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import threading
import time
from pathlib import Path

import torch


def configs(n: int, steps: int) -> dict[str, dict]:
    from tally.config import validate

    out = {}
    for i in range(n):
        out[f"c{i}"] = validate({
            "data": {"source": "embedded", "setting": "sub", "image_size": 32},
            "model": {"arch": "resnet18", "cut": "layer2"},
            "method": {"name": "tally", "alpha": 0.2 + 0.3 * i},
            "train": {"epochs": 3, "warmup_epochs": 1, "steps_per_epoch": steps, "batch_size": 32,
                      "lr": 1e-3, "device": "cpu", "seed": i}})
    return out


def run_seconds(group_dir: Path, run_ids) -> list[float]:
    """Each run's own time, started -> ended, from the store."""
    from tally import results

    statuses = [results.read_json(group_dir / run_id / "status.json") or {} for run_id in run_ids]
    return [s["ended"] - s["started"] for s in statuses]


class ProcessSampler:
    """CPU seconds and lifetimes of every descendant process, by title, sampled from /proc."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.seen, self._stop = interval, {}, threading.Event()
        self._clock = os.sysconf("SC_CLK_TCK")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _ours(self, pid: str, parents: dict) -> bool:
        me = str(os.getpid())
        for _ in range(12):
            pid = parents.get(pid)
            if pid is None or pid in ("0", "1"):
                return False
            if pid == me:
                return True
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            stats, parents = {}, {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                parents[pid] = fields[1]
                stats[pid] = (title, (int(fields[11]) + int(fields[12])) / self._clock)
            for pid, (title, cpu) in stats.items():
                if self._ours(pid, parents):
                    entry = self.seen.setdefault(pid, {"title": title})
                    entry["cpu"] = cpu
                    # a Ray worker starts as ray::IDLE and is renamed for its actor; while it is being
                    # renamed /proc shows an empty command line: keep the most telling title seen
                    if title.strip() and not title.startswith("ray::IDLE"):
                        entry["title"] = title
            time.sleep(self.interval)

    def by_title(self) -> dict[str, tuple[int, float]]:
        """title -> (processes, CPU seconds); Ray's titles lose the method suffix (ray::X.run -> ray::X)."""
        out = collections.defaultdict(lambda: [0, 0.0])
        for entry in self.seen.values():
            title = entry["title"].strip() or "(exited)"
            title = title.split(".", 1)[0] if title.startswith("ray::") else Path(title.split()[0]).name
            out[title][0] += 1
            out[title][1] += entry["cpu"]
        return {k: (n, cpu) for k, (n, cpu) in out.items()}


def in_process_half(cfgs: dict[str, dict], out: Path) -> tuple[float, list[float]]:
    """A: the configs back-to-back in this process; (wall seconds, each run's own seconds)."""
    from tally.training import RunContext, train_run

    t0 = time.perf_counter()
    for run_id, cfg in cfgs.items():
        train_run(cfg, out / run_id, ctx=RunContext(progress=False))
    return time.perf_counter() - t0, run_seconds(out, cfgs)


def ray_half(cfgs: dict[str, dict], exp_dir: Path) -> tuple[float, list[float], dict]:
    """B: the same configs as Tune trials on Ray Train; (wall seconds, run seconds, CPU by process)."""
    from tally.search import run_fixed

    with ProcessSampler() as sampler:
        t0 = time.perf_counter()
        metrics = run_fixed(exp_dir, "trials", cfgs, {"workers": 1, "cpus_per_worker": 1}, 1)
        wall = time.perf_counter() - t0
    assert all(m for m in metrics.values()), "a Ray trial did not finish"
    return wall, run_seconds(exp_dir / "trials", cfgs), sampler.by_title()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=135, help="TALLY steps per epoch (135: about 60 s a trial here)")
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs, alternated: A B A B for 2")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a Ray Train worker with 1 CPU runs 1 thread; same here, fair comparison
    cfgs = configs(args.trials, args.steps)

    from tally.data.bank import use_bank_dir
    from tally.search import connect
    from tally.search.banks import prepare_for_configs

    with tempfile.TemporaryDirectory() as tmp:
        # One bank folder for both halves, built before either is timed: the in-process runs and the
        # Ray trials memory-map the same decoded images (bank_for_training looks in $TALLY_BANK_DIR
        # first; the Ray half's own pre-flight finds every bank there and decodes nothing).
        use_bank_dir(Path(tmp) / "banks")
        load = os.getloadavg()
        t0 = time.perf_counter()
        connect(None, concurrency=1)  # once per search, not per trial: timed apart from the halves
        connect_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare_for_configs(list(cfgs.values()), tmp, log=None)  # its decode tasks run on this Ray
        preflight = time.perf_counter() - t0

        rounds = []
        for r in range(args.rounds):  # A B A B: a drift in the machine's load hits both halves alike
            plain, plain_runs = in_process_half(cfgs, Path(tmp) / f"plain-{r}")
            ray_time, ray_runs, cpu = ray_half(cfgs, Path(tmp) / f"ray-{r}")
            # start-up + teardown of one trial: time outside the runs, less what in-process spends outside them
            fixed = ((ray_time - sum(ray_runs)) - (plain - sum(plain_runs))) / args.trials
            rounds.append((plain, plain_runs, ray_time, ray_runs, fixed, cpu))

    print(f"{args.trials} trials x {args.rounds} rounds (A = in-process, B = Ray; run A B A B ...), "
          f"banks decoded once before both: {preflight:.1f} s; ray.init {connect_time:.1f} s (not in B)")
    for r, (plain, plain_runs, ray_time, ray_runs, fixed, _) in enumerate(rounds):
        print(f"round {r + 1}")
        print("  run times in-process    : " + " ".join(f"{s:6.1f}" for s in plain_runs) + " s")
        print("  run times in Ray workers: " + " ".join(f"{s:6.1f}" for s in ray_runs) + " s")
        print(f"  A in-process back-to-back: {plain:8.1f} s")
        print(f"  B Ray Tune + Ray Train   : {ray_time:8.1f} s")
        print(f"  ratio B / A              : {ray_time / plain:8.3f}  (goal <= 1.15 for trials >= 60 s)")
        print(f"  Ray's fixed cost         : {fixed:8.1f} s per trial (start-up + teardown, outside the run)")
    print(f"load average (1 min)    : {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)")
    print("CPU seconds per trial by process (last B half; the workers' include their runs):")
    for title, (n, cpu) in sorted(rounds[-1][5].items(), key=lambda kv: -kv[1][1]):
        print(f"  {title:32s} {n / args.trials:5.1f} processes {cpu / args.trials:7.1f} s")


if __name__ == "__main__":
    main()
