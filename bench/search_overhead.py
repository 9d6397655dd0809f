"""What Ray costs: the same configs run back-to-back in-process, then as Tune trials on Ray.

Two measurements, both halves doing the same work on the same prebuilt banks:

1. Ray's fixed cost per trial, for 1-worker trials (the trial is the worker: tally.search.trial) and
   for 2-worker trials (Ray Train, DDP), each with its spread over alternated rounds; and the ratio on
   Ray's cost alone, (run time + fixed cost) / run time (goals: <= 6 s and <= 1.10 at 60 s trials).
2. Trials per hour: a 20-trial search (Optuna TPE, concurrency 1) of ~20 s trials, against the same 20
   configs (read back from the store) run back to back in-process (goal: within 1.30x).

The Ray side includes each trial's start and teardown, Tune's and Optuna's bookkeeping and the store
writes; starting the local Ray and decoding the banks are once per search and timed apart.
Each run's own time (its status.json started -> ended) is read back from both halves, so the
fixed cost Ray adds per trial is measured directly, not inferred from the difference of totals
(later in-process runs can be a few percent slower than fresh processes, which flatters Ray).

Where the seconds go: every process the Ray half starts is sampled (/proc, every 0.2 s) and its CPU
seconds are summed by process title (ray::TrainController, ray::RayTrainWorker, ...), per trial.
On a loaded machine wall seconds stretch but CPU seconds do not: they say what each process costs.

Both halves read the same banks, decoded once before either is timed; the halves alternate (A B A B,
--rounds 2) and each round's figures are printed.

    .venv/bin/python bench/search_overhead.py [--trials 3] [--steps 245] [--rounds 2] [--workers 1 2]
        [--ddp-steps 60] [--search-trials 20] [--search-steps 75]
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


def base(steps: int) -> dict:
    return {"data": {"source": "embedded", "setting": "sub", "image_size": 32},
            "model": {"arch": "resnet18", "cut": "layer2"},
            "method": {"name": "tally"},
            "train": {"epochs": 3, "warmup_epochs": 1, "steps_per_epoch": steps, "batch_size": 32,
                      "lr": 1e-3, "device": "cpu"}}


def configs(n: int, steps: int) -> dict[str, dict]:
    import copy

    from tally.config import validate

    out = {}
    for i in range(n):
        cfg = copy.deepcopy(base(steps))
        cfg["method"]["alpha"] = 0.2 + 0.3 * i
        cfg["train"]["seed"] = i
        out[f"c{i}"] = validate(cfg)
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


def in_process_half(cfgs: dict[str, dict], out: Path, workers: int = 1) -> tuple[float, list[float]]:
    """A: the configs back-to-back in this process; (wall seconds, each run's own seconds). For
    2 workers the process plays both ranks (the global batch a data-parallel run computes)."""
    from tally.training import RunContext, train_run

    t0 = time.perf_counter()
    for run_id, cfg in cfgs.items():
        train_run(cfg, out / run_id, ctx=RunContext(progress=False, emulate_world_size=workers if workers > 1 else None))
    return time.perf_counter() - t0, run_seconds(out, cfgs)


def ray_half(cfgs: dict[str, dict], exp_dir: Path, workers: int = 1) -> tuple[float, list[float], dict]:
    """B: the same configs as Tune trials; (wall seconds, run seconds, CPU by process)."""
    from tally.search import run_fixed

    with ProcessSampler() as sampler:
        t0 = time.perf_counter()
        metrics = run_fixed(exp_dir, "trials", cfgs, {"workers": workers, "cpus_per_worker": 1}, 1)
        wall = time.perf_counter() - t0
    assert all(m for m in metrics.values()), "a Ray trial did not finish"
    return wall, run_seconds(exp_dir / "trials", cfgs), sampler.by_title()


def fixed_cost(cfgs: dict, workers: int, rounds: int, tmp: Path) -> list[dict]:
    """Rounds of A B (alternated: a drift in the machine's load hits both halves alike)."""
    out = []
    for r in range(rounds):
        plain, plain_runs = in_process_half(cfgs, tmp / f"plain-{workers}-{r}", workers)
        ray_time, ray_runs, cpu = ray_half(cfgs, tmp / f"ray-{workers}-{r}", workers)
        # start-up + teardown of one trial: time outside the runs, less what in-process spends outside them
        fixed = ((ray_time - sum(ray_runs)) - (plain - sum(plain_runs))) / len(cfgs)
        out.append({"plain": plain, "plain_runs": plain_runs, "ray": ray_time, "ray_runs": ray_runs,
                    "fixed": fixed, "cpu": cpu})
    return out


def search_half(steps: int, trials: int, storage: Path) -> tuple[float, dict[str, dict]]:
    """A 20-trial search, as `tally search` runs it; (wall seconds, the trials' configs by id)."""
    from tally import results
    from tally.search import run_search, spec_from_raw

    spec = spec_from_raw({"name": "overhead", "base": base(steps), "seed": 0,
                          "space": {"method.alpha": {"type": "uniform", "low": 0.1, "high": 2.0},
                                    "train.lr": {"type": "loguniform", "low": 3e-4, "high": 3e-3}},
                          "selection": {"metric": "pair_acc_mean"}, "budget": {"trials": trials, "concurrency": 1},
                          "resources": {"workers": 1, "cpus_per_worker": 1}})
    t0 = time.perf_counter()
    summary = run_search(spec, storage)
    wall = time.perf_counter() - t0
    assert (summary["status"] == "done").all(), summary["status"].value_counts()
    exp_dir = results.experiment_dir(storage, "overhead")
    return wall, {d.name: results.read_yaml(d / "config.yaml") for d in results.iter_trial_dirs(exp_dir)}


def spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.1f} s (min {min(values):.1f}, max {max(values):.1f}, {len(values)} rounds)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=245, help="steps per epoch of 1-worker trials (245: ~60 s a trial here)")
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs, alternated: A B A B for 2")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--ddp-steps", type=int, default=60, help="steps per epoch of 2-worker trials")
    parser.add_argument("--search-trials", type=int, default=20, help="0: skip the trials-per-hour search")
    parser.add_argument("--search-steps", type=int, default=75, help="steps per epoch of its trials (~20 s here)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a trial with 1 CPU runs 1 thread (Ray sets OMP_NUM_THREADS); same here

    from tally.data.bank import use_bank_dir
    from tally.search import connect
    from tally.search.banks import prepare_for_configs

    load = os.getloadavg()
    by_workers = {}
    with tempfile.TemporaryDirectory() as tmp:
        # One bank folder for every half, built before any is timed: the in-process runs and the
        # Ray trials memory-map the same decoded images (bank_for_training looks in $TALLY_BANK_DIR
        # first; the Ray half's own pre-flight finds every bank there and decodes nothing).
        use_bank_dir(Path(tmp) / "banks")
        t0 = time.perf_counter()
        connect(None, concurrency=1)  # once per search, not per trial: timed apart from the halves
        connect_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare_for_configs([base(1)], tmp, log=None)  # its decode tasks run on this Ray
        preflight = time.perf_counter() - t0
        for workers in args.workers:
            cfgs = configs(args.trials, args.steps if workers == 1 else args.ddp_steps)
            by_workers[workers] = fixed_cost(cfgs, workers, args.rounds, Path(tmp))
        search = None
        if args.search_trials:
            ray_wall, trial_cfgs = search_half(args.search_steps, args.search_trials, Path(tmp) / "search")
            plain, _ = in_process_half(trial_cfgs, Path(tmp) / "search-plain")
            search = (ray_wall, plain, len(trial_cfgs))

    print(f"banks decoded once before every half: {preflight:.1f} s; ray.init {connect_time:.1f} s (in no half)")
    for workers, rounds in by_workers.items():
        print(f"{workers}-worker trials: {args.trials} trials x {args.rounds} rounds (A = in-process, B = Ray; A B A B ...)")
        for r, rd in enumerate(rounds):
            run = sum(rd["plain_runs"]) / len(rd["plain_runs"])
            print(f"  round {r + 1}: run times in-process " + " ".join(f"{s:5.1f}" for s in rd["plain_runs"])
                  + " s, in Ray " + " ".join(f"{s:5.1f}" for s in rd["ray_runs"]) + " s")
            print(f"    A {rd['plain']:7.1f} s, B {rd['ray']:7.1f} s, B / A {rd['ray'] / rd['plain']:.3f}; "
                  f"fixed cost {rd['fixed']:5.1f} s per trial; on Ray's cost alone {(run + rd['fixed']) / run:.3f}")
        fixed = [rd["fixed"] for rd in rounds]
        run = sum(sum(rd["plain_runs"]) for rd in rounds) / sum(len(rd["plain_runs"]) for rd in rounds)
        print(f"  Ray's fixed cost per {workers}-worker trial: {spread(fixed)}")
        print(f"  ratio on Ray's cost alone at {run:.0f} s runs: {(run + sum(fixed) / len(fixed)) / run:.3f}"
              f"; at 60 s runs: {(60 + sum(fixed) / len(fixed)) / 60:.3f}"
              + ("  (goals: <= 6 s, <= 1.10)" if workers == 1 else ""))
        print("  CPU seconds per trial by process (last B half; the trial's own process includes its run):")
        for title, (n, cpu) in sorted(rounds[-1]["cpu"].items(), key=lambda kv: -kv[1][1]):
            print(f"    {title:32s} {n / args.trials:5.1f} processes {cpu / args.trials:7.1f} s")
    if search:
        ray_wall, plain, n = search
        print(f"trials per hour: a {n}-trial search (TPE, concurrency 1) {ray_wall:.1f} s = {3600 * n / ray_wall:.0f}/h; "
              f"the same {n} configs back to back in-process {plain:.1f} s = {3600 * n / plain:.0f}/h; "
              f"ratio {ray_wall / plain:.3f} (goal <= 1.30)")
    print(f"load average (1 min): {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
