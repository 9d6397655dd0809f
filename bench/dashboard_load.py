"""Benchmark: time until the dashboard shows the trials table, for 500 and 5,000 trials, cold and warm.

Goal (issue 13): with 500 trials the first page load on a cold server shows the trials table in
<= 1.5 s; 5,000 trials stay usable (the table is paged: one page goes to the browser).

Stores are made by tests/store_factory.py (one experiment of N trials, the usual mix of done, running,
failed, stopped) in a temporary folder unless --store is given; nothing else is needed, so it runs on
a fresh checkout (the browser part needs /usr/bin/chromium and playwright, else it is skipped).
Where the time goes, printed per size, each on its own line:

1. data layer: ``tally.dashboard.data.load_trials`` (summary.parquet + freshness check, no cache);
2. app script, server side: a fresh interpreter runs the app once under Streamlit's AppTest (its
   imports included, interpreter start-up excluded), then a warm rerun (cache hit: an auto-refresh);
3. real browser, the number the goal is about: a fresh server started by ``tally.dashboard.launch``
   (cold: no cache, first script run), headless chromium from navigation until the trials table is
   drawn; then a reload (warm). Cold twice: on a new port (the browser compiles Streamlit's scripts
   for a new origin) and on a port the browser opened before (a user restarting `tally dashboard`).
   Median of --repeat fresh servers, with the CPU seconds the server and the browser used (from
   /proc) and the server's start-up time. Beside it, the same cold load with plain
   ``python -m streamlit run`` (no warm start: Streamlit imports pandas/pyarrow in the first script
   run) and a one-table Streamlit page (the framework's floor).

On a shared 2-core machine wall times move with the load of other users: the 1-minute load average
is printed, and CPU times next to wall times.

Run: .venv/bin/python bench/dashboard_load.py [--trials 500 5000] [--store DIR] [--repeat 3] [--no-browser]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the store factory and the server helper of the tests

from tally.dashboard import APP_PATH  # noqa: E402
from tally.dashboard import data as dd  # noqa: E402
from tally.dashboard.launch import command  # noqa: E402
from tests import store_factory as sf  # noqa: E402
from tests.dashboard.server import dashboard_server  # noqa: E402

GOAL_S = 1.5
TABLE = '.st-key-table_trials [data-testid="stDataFrame"] canvas'
PLAIN = '[data-testid="stDataFrame"] canvas'
CHROMIUM = Path("/usr/bin/chromium")

APPTEST_CODE = """
import os, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=300)
at.run()
cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
assert not at.exception, [e.value for e in at.exception]
rows = len([df for df in at.dataframe][-1].value)
t1, c1 = time.perf_counter(), time.process_time()
at.run()
print(f"{cold:.3f} {cold_cpu:.3f} {time.perf_counter() - t1:.3f} {time.process_time() - c1:.3f} {rows}")
"""
FLOOR_APP = "import streamlit as st\nst.title('ready')\nst.dataframe({'a': [1, 2]})\n"


def _load() -> str:
    return f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"


def _line(what: str, seconds: float, goal: bool = False, cpu: float | None = None, extra: str = "",
          split: tuple[float, float] | None = None) -> None:
    verdict = f"  goal <= {GOAL_S} s: {'met' if seconds <= GOAL_S else 'MISSED'}" if goal else ""
    cpu_text = f" (CPU {cpu:5.2f} s)" if cpu is not None else ""
    if split is not None:
        cpu_text = f" (CPU {split[0]:4.2f} s server + {split[1]:4.2f} s browser)"
    print(f"  {what:<64s} {seconds:6.2f} s{cpu_text}{extra}{verdict}", flush=True)


def _tree_cpu() -> dict[str, float] | None:
    """CPU seconds used so far by this process's descendants, split into the browser (chromium's
    processes) and the rest (the dashboard server, Playwright's driver), from /proc.

    Printed next to browser wall times: on a shared machine the wall time mostly measures the
    other users, the CPU time what a page load costs, and on which side.
    """
    try:
        stats = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    text = Path(entry.path, "stat").read_text()
                except OSError:
                    continue
                name = text[text.index("(") + 1:text.rindex(")")]
                fields = text.rsplit(")", 1)[1].split()
                stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), name)
    except OSError:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    todo, ticks = list(children.get(os.getpid(), [])), {"browser": 0, "server": 0}
    while todo:
        pid = todo.pop()
        ticks["browser" if stats[pid][2].startswith("chrom") else "server"] += stats[pid][1]
        todo += children.get(pid, [])
    return {k: v / os.sysconf("SC_CLK_TCK") for k, v in ticks.items()}


def _cpu_since(start: dict | None) -> dict | None:
    now = _tree_cpu()
    return None if start is None or now is None else {k: now[k] - start[k] for k in now}


def make(root: Path, trials: int) -> Path:
    name = f"bench{trials}"
    exp = root / name / name
    if (exp / "summary.parquet").is_file() and len(list((exp / "trials").iterdir())) == trials:
        print(f"reusing the store at {exp}")
        return exp.parent
    shutil.rmtree(exp.parent, ignore_errors=True)
    t = time.perf_counter()
    sf.make_experiment(exp.parent, name, trials, seed=0)
    print(f"made {trials} trials under {exp} in {time.perf_counter() - t:.1f} s")
    return exp.parent


def data_layer(root: Path) -> None:
    exp = dd.experiments_under(root)[0]
    t, c = time.perf_counter(), time.process_time()
    trials = dd.load_trials(exp)
    _line(f"data layer: load_trials, {len(trials.frame)} trials (summary.parquet)", time.perf_counter() - t,
          cpu=time.process_time() - c)
    t, c = time.perf_counter(), time.process_time()
    dd.experiment_signature(exp)
    _line("data layer: experiment_signature (the cache key, every rerun)", time.perf_counter() - t,
          cpu=time.process_time() - c)


def apptest(root: Path) -> None:
    env = {**os.environ, "TALLY_RESULTS_ROOT": str(root), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", APPTEST_CODE, str(APP_PATH)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    cold, cold_cpu, warm, warm_cpu, rows = (float(v) for v in out)
    _line(f"app script cold (AppTest, fresh interpreter; {rows:.0f} rows sent)", cold, cpu=cold_cpu)
    _line("app script warm rerun (cache hit: an auto-refresh)", warm, cpu=warm_cpu)


def _page_load(page, url: str | None, selector: str) -> tuple[float, dict | None]:
    t, c = time.perf_counter(), _tree_cpu()
    page.goto(url) if url else page.reload()
    page.wait_for_selector(selector)
    return time.perf_counter() - t, _cpu_since(c)


def _served(page, root: Path, cmd: list[str] | None, selector: str, repeat: int,
            port: int | None = None) -> dict[str, list]:
    """Cold first load and warm reload on ``repeat`` fresh servers: wall, CPU and start-up seconds.

    ``port``: every server on that port, so the browser has seen the page's origin before (its
    compiled-script cache is per origin: a user restarting `tally dashboard` on 8501); default a new
    port each time (a browser that never opened the dashboard).
    """
    out = {"cold": [], "cold_cpu": [], "warm": [], "warm_cpu": [], "start": []}
    nan = {"server": float("nan"), "browser": float("nan")}
    for _ in range(repeat):
        t = time.perf_counter()
        with dashboard_server(root, command=cmd, port=port) as url:
            out["start"].append(time.perf_counter() - t)
            time.sleep(0.5)  # the server idles, as it does before anyone opens the page
            for kind, target in (("cold", url), ("warm", None)):
                wall, cpu = _page_load(page, target, selector)
                out[kind].append(wall)
                out[f"{kind}_cpu"].append(cpu if cpu is not None else nan)
    return out


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _cpu(samples: list[dict]) -> tuple[float, float]:
    """Median server and browser CPU seconds of the runs."""
    return (statistics.median(s["server"] for s in samples), statistics.median(s["browser"] for s in samples))


def browser(root: Path, trials: int, repeat: int, plain_too: bool) -> None:
    from playwright.sync_api import sync_playwright

    port = "{port}"  # filled in by dashboard_server
    flags = command(root, 0)[5:]  # the launcher's streamlit flags after `run APP`
    flags[flags.index("--server.port") + 1] = port
    plain = [sys.executable, "-m", "streamlit", "run", str(APP_PATH), *flags]
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = b.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(180_000)
            floor_dir = Path(tempfile.mkdtemp())
            (floor_dir / "app.py").write_text(FLOOR_APP)
            floor = [*plain[:4], str(floor_dir / "app.py"), *flags]
            if plain_too:  # also loads the frontend's scripts into the browser cache before any timing
                f = _served(page, floor_dir, floor, PLAIN, repeat)
                _line("browser: one-table Streamlit page, cold server (the floor)", _median(f["cold"]),
                      split=_cpu(f["cold_cpu"]))
                _line("browser: one-table Streamlit page, reload (the floor)", _median(f["warm"]),
                      split=_cpu(f["warm_cpu"]))
            else:
                _served(page, floor_dir, floor, PLAIN, 1)  # warms the browser cache only
            shutil.rmtree(floor_dir, ignore_errors=True)
            r = _served(page, root, None, TABLE, repeat)
            _line(f"browser: first page load, cold server, new origin ({trials} trials)", _median(r["cold"]),
                  goal=trials <= 500, split=_cpu(r["cold_cpu"]),
                  extra=f" [runs {', '.join(f'{v:.2f}' for v in r['cold'])}]")
            from tests.dashboard.server import free_port

            same = free_port()
            _served(page, root, None, TABLE, 1, port=same)  # the browser visits this origin once
            o = _served(page, root, None, TABLE, repeat, port=same)
            _line(f"browser: first page load, cold server, origin seen before ({trials})", _median(o["cold"]),
                  goal=trials <= 500, split=_cpu(o["cold_cpu"]),
                  extra=f" [runs {', '.join(f'{v:.2f}' for v in o['cold'])}]")
            _line(f"browser: page reload, warm server ({trials} trials)", _median(r["warm"]),
                  split=_cpu(r["warm_cpu"]), extra=f" [runs {', '.join(f'{v:.2f}' for v in r['warm'])}]")
            _line("  server start-up until healthy (tally.dashboard.launch)", _median(r["start"]))
            if plain_too:
                q = _served(page, root, plain, TABLE, repeat)
                _line("browser: first page load, cold plain `streamlit run` (no warm start)", _median(q["cold"]),
                      split=_cpu(q["cold_cpu"]), extra=f" [runs {', '.join(f'{v:.2f}' for v in q['cold'])}]")
                _line("  server start-up until healthy (plain streamlit run)", _median(q["start"]))
        finally:
            b.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--store", type=Path, help="folder to keep (and reuse) the stores in (default: temporary)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh servers per browser measurement")
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    base = args.store or Path(tempfile.mkdtemp(prefix="tally-dash-bench-"))
    can_browse = not args.no_browser and CHROMIUM.exists()
    try:
        import playwright  # noqa: F401
    except ImportError:
        can_browse = False
    if not args.no_browser and not can_browse:
        print("browser: skipped (needs /usr/bin/chromium and the playwright package)")
    try:
        for i, n in enumerate(args.trials):
            root = make(base, n)
            print(f"{n} trials {_load()}")
            data_layer(root)
            apptest(root)
            if can_browse:
                browser(root, n, args.repeat, plain_too=i == 0)
        print(_load())
    finally:
        if args.store is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
