"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright.

Why besides AppTest: AppTest runs the script but not the frontend; this test proves the server starts
through ``tally.dashboard.launch`` on localhost, the page loads, a trial can be picked with the mouse
and keyboard, and plotly draws the grid (values read back from the DOM). No browser is downloaded:
Playwright drives /usr/bin/chromium (apt package ``chromium``; TALLY_TEST_CHROMIUM overrides the path).
Without it the test skips, unless TALLY_REQUIRE_BROWSER is set (CI), where it fails.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tally import evaluation as ev
from tally import results
from tests import store_factory as sf  # noqa: E402

CHROMIUM = Path(os.environ.get("TALLY_TEST_CHROMIUM", "/usr/bin/chromium"))
REQUIRE_ENV = "TALLY_REQUIRE_BROWSER"  # set by .ci/run: there a missing browser fails instead of skipping
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
START_TIMEOUT_S = 90
UI_TIMEOUT_MS = 90_000  # generous: 2 shared CPU cores; a normal load takes a few seconds

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: str = "its output") -> str:
    """Poll Streamlit's health endpoint until it answers; fail early if the server died."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited with {proc.returncode}; see {log}")
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"dashboard not up after {START_TIMEOUT_S} s; see {log}")
        time.sleep(0.3)


@contextmanager
def dashboard_server(root: Path) -> Iterator[str]:
    """``tally.dashboard.launch.launch`` in a subprocess (own process group, always killed)."""
    port = free_port()
    code = ("import sys; from tally.dashboard.launch import launch; "
            "sys.exit(launch(sys.argv[1], int(sys.argv[2])))")
    ARTIFACTS.mkdir(exist_ok=True)  # the bench calls this from a fresh checkout too
    log = open(ARTIFACTS / "dashboard-server.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = wait_healthy(proc, f"http://127.0.0.1:{port}", log.name)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # launch() and its streamlit child
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


GRAPHS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => ({
    title: (gd.layout.title && gd.layout.title.text) || '', type: gd.data[0].type,
    xticks: Array.from(gd.querySelectorAll('.xtick text')).map(t => t.textContent),
    yticks: Array.from(gd.querySelectorAll('.ytick text')).map(t => t.textContent),
    cells: Array.from(gd.querySelectorAll('text')).map(t => t.textContent)}))"""


def _browser_or_skip():
    """Playwright's sync API when a browser can run; else skip, or fail where CI requires it."""
    missing = None
    if not CHROMIUM.exists():
        missing = f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        from playwright import sync_api
    except ImportError:
        missing = missing or "needs the playwright Python package (pip install playwright)"
    if missing:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but the browser test cannot run: {missing}")
        pytest.skip(missing)
    return sync_api


def test_dashboard_in_chromium(tmp_path):
    sync_api = _browser_or_skip()
    ARTIFACTS.mkdir(exist_ok=True)
    store = sf.make_store(tmp_path, n_trials=8)
    exp = store.experiments["pacs-domain"]
    trial = next(t for t in exp.trials_with("done") if t != exp.best)  # not the default selection
    table = results.read_parquet(exp.path / results.TRIALS_DIR / trial / "eval.parquet")
    acc = ev.accuracy_grid(table, "test_sub")
    n_train = ev.accuracy_grid(table, "test_sub", "n_train")
    present = acc[ev.accuracy_grid(table, "test_sub", "n").sum(axis=1) > 0]
    domain, cls = next((d, c) for d in present.index for c in present.columns if acc.at[d, c] == acc.at[d, c])
    expected_cell = f"{acc.at[domain, cls]:.2f}n_train={int(n_train.at[domain, cls])}"  # <br> has no text

    with dashboard_server(store.root) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 2000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(url)
            page.wait_for_selector('.st-key-trials_table [data-testid="stDataFrame"] canvas')
            assert page.get_by_text("Experiment pacs-domain").is_visible()
            for status, n in (("done", len(exp.trials_with("done"))), ("failed", 1)):
                metric = page.locator('[data-testid="stMetric"]').filter(has_text=status)
                assert metric.locator('[data-testid="stMetricValue"]').inner_text().strip() == str(n)

            refresh = page.get_by_role("switch", name="Auto-refresh")
            assert refresh.is_checked()  # on by default: the store has a running trial
            page.locator('[data-testid="stSidebar"] label').filter(has_text="Auto-refresh").click()
            page.wait_for_function(  # off: no periodic rerun in the middle of the clicks below
                "() => !document.querySelector('input[aria-label=\"Auto-refresh\"]').checked")

            box = page.locator('[data-testid="stSelectbox"]').filter(has_text="Trial")
            box.locator("input").click()
            page.keyboard.type(trial)
            page.keyboard.press("Enter")
            page.wait_for_function(
                "t => Array.from(document.querySelectorAll('[data-testid=stSelectbox] input'))"
                ".some(e => e.value.startsWith(t))", arg=trial)
            page.get_by_role("tab", name="Accuracy grid").click()
            page.wait_for_function(  # both grids (sub-shift and held-out domain) drawn for the trial
                "t => Array.from(document.querySelectorAll('.js-plotly-plot')).filter(gd => gd.layout.title"
                " && (gd.layout.title.text || '').includes(t) && gd.querySelector('.heatmaplayer text'))"
                ".length == 2",
                arg=trial)
            graphs = page.evaluate(GRAPHS_JS)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()

    sub = next(g for g in graphs if "test_sub" in g["title"])
    assert sub["type"] == "heatmap" and trial in sub["title"]
    assert sub["xticks"] == list(acc.columns)  # every class, in order
    assert sub["yticks"] == list(present.index)  # every domain with test examples (held-out one omitted)
    assert expected_cell in sub["cells"], (expected_cell, sub["cells"][:20])
    labels = [c for c in sub["cells"] if re.fullmatch(r"\d\.\d\dn_train=\d+", c)]
    assert len(labels) == int(present.notna().sum().sum())  # a label per non-empty pair, none for empty ones
    held = next(g for g in graphs if "test_domain:sketch" in g["title"])
    assert held["yticks"] == ["sketch"]
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
