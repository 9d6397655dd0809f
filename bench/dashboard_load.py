"""Benchmark: time until the dashboard shows the trials table of a 500-trial experiment. Goal <= 3 s.

The store is made by tests/store_factory.py (one experiment, 500 trials, the usual mix of done,
running, failed, stopped). What is measured, each printed on its own line:

1. data layer: ``dashboard_data.load_trials`` (summary.parquet + freshness check, no cache), and the
   same without summary.parquet (an older store: every trial folder is read);
2. app script, cold: a fresh interpreter runs the app once under Streamlit's AppTest (imports of
   streamlit, pandas and the app included; interpreter start-up excluded) until the trials
   table is built; then a warm rerun (cache hit, what auto-refresh costs);
3. real browser (if /usr/bin/chromium and playwright exist): a server started by
   ``tally.dashboard.launch``, headless chromium from navigation until the trials table is in the DOM,
   first load (cold server) and a reload (warm cache). This includes the frontend's own JavaScript.
   Next to it: the CPU seconds the server and the browser used meanwhile (from /proc), and the same
   for a one-table Streamlit page served the same way (the framework's floor).

The goal applies to the warm page load of 3 and to 2 cold. On a shared 2-core machine wall times
move with the load of other users: the script prints the 1-minute load average and CPU times.

Run: .venv/bin/python bench/dashboard_load.py [--trials 500] [--store DIR] [--no-browser]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the store factory of the tests

from tally.dashboard import APP_PATH  # noqa: E402
from tally.dashboard import data as dd  # noqa: E402
from tests import store_factory as sf  # noqa: E402

GOAL_S = 3.0

APPTEST_CODE = """
import os, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=120)
at.run()
cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
assert not at.exception, [e.value for e in at.exception]
rows = max(len(df.value) for df in at.dataframe)
t1, c1 = time.perf_counter(), time.process_time()
at.run()
print(f"{cold:.3f} {cold_cpu:.3f} {time.perf_counter() - t1:.3f} {time.process_time() - c1:.3f} {rows}")
"""
EMPTY_APP = "import streamlit as st\nst.title('ready')\nst.dataframe({'a': [1, 2]})\n"


def _load() -> str:
    return f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"


def _line(what: str, seconds: float, goal: bool = False, cpu: float | None = None) -> None:
    verdict = f"  goal <= {GOAL_S:.0f} s: {'met' if seconds <= GOAL_S else 'MISSED'}" if goal else ""
    cpu_text = f" (CPU {cpu:5.2f} s)" if cpu is not None else ""
    print(f"{what:<62s} {seconds:6.2f} s{cpu_text}{verdict}")


def _tree_cpu() -> float | None:
    """CPU seconds used so far by this process's descendants (server, browser, driver), from /proc.

    Printed next to browser wall times: on a shared machine the wall time mostly measures the
    other users, the CPU time what a page load costs.
    """
    try:
        stats = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, ticks
    except OSError:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    todo, ticks = list(children.get(os.getpid(), [])), 0
    while todo:
        pid = todo.pop()
        ticks += stats[pid][1]
        todo += children.get(pid, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def make(root: Path, trials: int) -> Path:
    exp = root / "bench"
    if (exp / "summary.parquet").is_file() and len(list((exp / "trials").iterdir())) == trials:
        print(f"reusing the store at {exp}")
        return exp
    shutil.rmtree(exp, ignore_errors=True)
    t = time.perf_counter()
    sf.make_experiment(root, "bench", trials, seed=0)
    print(f"made {trials} trials under {exp} in {time.perf_counter() - t:.1f} s")
    return exp


def data_layer(exp: Path) -> None:
    t, c = time.perf_counter(), time.process_time()
    trials = dd.load_trials(exp)
    _line(f"data layer: load_trials, {len(trials.frame)} trials (summary.parquet)", time.perf_counter() - t,
          cpu=time.process_time() - c)
    old = Path(tempfile.mkdtemp()) / "old"
    shutil.copytree(exp, old)
    (old / "summary.parquet").unlink()
    t, c = time.perf_counter(), time.process_time()
    dd.load_trials(old)
    _line("data layer: load_trials without summary.parquet (old store)", time.perf_counter() - t,
          cpu=time.process_time() - c)
    shutil.rmtree(old.parent)


def apptest(root: Path) -> None:
    env = {**os.environ, "TALLY_RESULTS_ROOT": str(root)}
    out = subprocess.run([sys.executable, "-c", APPTEST_CODE, str(APP_PATH)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    cold, cold_cpu, warm, warm_cpu, rows = (float(v) for v in out)
    _line(f"app script cold (AppTest, fresh interpreter, {rows:.0f}-row table)", cold, goal=True,
          cpu=cold_cpu)
    _line("app script warm rerun (cache hit: an auto-refresh)", warm, cpu=warm_cpu)


def browser(root: Path) -> None:
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("browser: skipped (no playwright)")
        return
    if not chromium.exists():
        print("browser: skipped (no /usr/bin/chromium)")
        return
    from tests.dashboard.test_browser import dashboard_server

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium), args=args)
        try:
            page = b.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(120_000)
            with _plain_streamlit() as url:  # the framework's floor: a page with one tiny table
                page.goto(url)
                page.wait_for_selector('[data-testid="stDataFrame"] canvas')
                t, c = time.perf_counter(), _tree_cpu()
                page.reload()
                page.wait_for_selector('[data-testid="stDataFrame"] canvas')
                _line("browser: reload of a one-table Streamlit page (the floor)", time.perf_counter() - t,
                      cpu=_cpu_since(c))
            with dashboard_server(root) as url:
                for label in ("browser: first page load to trials table (cold server)",
                              "browser: page reload to trials table (warm server)"):
                    t, c = time.perf_counter(), _tree_cpu()
                    page.goto(url) if "first" in label else page.reload()
                    page.wait_for_selector('.st-key-trials_table [data-testid="stDataFrame"] canvas')
                    _line(label, time.perf_counter() - t, goal="warm" in label, cpu=_cpu_since(c))
        finally:
            b.close()


def _cpu_since(start: float | None) -> float | None:
    now = _tree_cpu()
    return None if start is None or now is None else now - start


@contextlib.contextmanager
def _plain_streamlit():
    """A minimal Streamlit app served exactly like the dashboard (same flags), always stopped."""
    from tests.dashboard.test_browser import free_port, wait_healthy

    from tally.dashboard.launch import command

    folder = Path(tempfile.mkdtemp())
    (folder / "app.py").write_text(EMPTY_APP)
    port = free_port()
    cmd = command(folder, port)
    cmd[cmd.index(str(APP_PATH))] = str(folder / "app.py")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield wait_healthy(proc, f"http://127.0.0.1:{port}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--store", type=Path, help="store root to (re)use (default: a temporary folder)")
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    root = args.store or Path(tempfile.mkdtemp(prefix="tally-dash-bench-"))
    exp = make(root, args.trials)
    print(_load())
    data_layer(exp)
    apptest(root)
    if not args.no_browser:
        browser(root)
    print(_load())
    if args.store is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
