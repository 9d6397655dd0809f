"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright.

Why besides AppTest: AppTest runs the script but not the frontend; this test proves the server starts
through ``tally.dashboard.launch`` on localhost, the page loads, a trial can be picked with the mouse
and keyboard, plotly draws the grids (values read back from the DOM) with no cell text wider than its
cell, and a DomainNet-sized grid (120 classes) draws without cell text next to a correct worst-pairs
table, and the reliability diagram's points are the evaluator's. One server, three page states. No browser is downloaded: Playwright drives /usr/bin/chromium
(apt package ``chromium``; TALLY_TEST_CHROMIUM overrides the path). Without it the test skips, unless
TALLY_REQUIRE_BROWSER is set (CI), where it fails.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from tally import evaluation as ev
from tally import results
from tally.dashboard import grids
from tally.evaluation import calibration
from tests import store_factory as sf
from tests.dashboard.server import dashboard_server

CHROMIUM = Path(os.environ.get("TALLY_TEST_CHROMIUM", "/usr/bin/chromium"))
REQUIRE_ENV = "TALLY_REQUIRE_BROWSER"  # set by .ci/run: there a missing browser fails instead of skipping
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
UI_TIMEOUT_MS = 90_000  # generous: 2 shared CPU cores; a normal load takes a few seconds
BIG_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
BIG_CLASSES = 120

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

# Per plotly graph: title, trace types, the heat map's axis ticks, and every heat-map cell text with its drawn width
# next to the width of one cell (plot width / number of columns).
GRAPHS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => {
    const heat = gd.data.find(t => t.type === 'heatmap');
    const layer = gd.querySelector('.heatmaplayer');
    const plot = layer ? layer.closest('.subplot, .plot') : null;
    const xa = heat ? gd._fullLayout[(heat.xaxis || 'x').replace('x', 'xaxis')] : null;
    return {
      title: ((gd.layout.title && gd.layout.title.text) || '').replace(/<[^>]+>/g, ''), types: gd.data.map(t => t.type),
      xticks: Array.from(gd.querySelectorAll(`.${heat ? heat.xaxis || 'x' : 'x'}tick text`)).map(t => t.textContent),
      yticks: Array.from(gd.querySelectorAll(`.${heat ? heat.yaxis || 'y' : 'y'}tick text`)).map(t => t.textContent),
      ncols: heat ? heat.x.length : 0, cellWidth: heat && xa ? xa._length / heat.x.length : 0,
      cells: layer ? Array.from(layer.querySelectorAll('text')).map(t => [t.textContent, t.getBBox().width]) : []};
})"""
TABLE_JS = """key => Array.from(document.querySelectorAll(`.st-key-table_${key} table tr`))
    .map(tr => Array.from(tr.querySelectorAll('th,td')).map(c => c.textContent))"""


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


RELIABILITY_JS = """() => { const gd = Array.from(document.querySelectorAll('.js-plotly-plot')).find(
  g => g.layout.title && (g.layout.title.text || '').includes('reliability diagram'));
  const traces = {}; gd.data.slice(1).forEach(t => { traces[t.name] = t.x.map((x, i) => [x, t.y[i]]); });
  return {title: gd.layout.title.text, traces: traces}; }"""


def _settled(page) -> None:
    """Wait until the script has finished its run (Streamlit's own end-to-end tests wait the same way):
    a click during a rerun can land on an element that the rerun then replaces."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]'
                           '[data-test-connection-state="CONNECTED"]', state="attached")


def _pick(page, label: str, value: str) -> None:
    """Choose ``value`` in the selectbox labelled ``label`` with the keyboard (type to filter) and the
    mouse (click the filtered option, once it is listed: Enter would take whatever is highlighted)."""
    _settled(page)
    box = page.locator('[data-testid="stSelectbox"]').filter(has_text=label)
    box.locator("input").click()
    page.keyboard.type(value)
    page.get_by_role("option").filter(has_text=re.compile("^" + re.escape(value))).first.click()
    page.wait_for_function(
        "v => Array.from(document.querySelectorAll('[data-testid=stSelectbox] input'))"
        ".some(e => e.value.startsWith(v))", arg=value)
    _settled(page)


def _wait_grids(page, trial: str, n: int) -> None:
    page.wait_for_function(  # n grids drawn for the trial
        "([t, n]) => Array.from(document.querySelectorAll('.js-plotly-plot')).filter(gd => gd.layout.title"
        " && (gd.layout.title.text || '').includes(t) && gd.querySelector('.heatmaplayer')).length == n",
        arg=[trial, n])


def test_dashboard_in_chromium(tmp_path):
    sync_api = _browser_or_skip()
    ARTIFACTS.mkdir(exist_ok=True)
    store = sf.make_store(tmp_path, n_trials=8)
    exp = store.experiments["pacs-domain"]
    big = sf.make_experiment(tmp_path, "domainnet", 4, seed=7, domains=BIG_DOMAINS, classes=BIG_CLASSES,
                             held_out=("sketch",), statuses=["done"] * 4)
    trial = next(t for t in exp.trials_with("done") if t != exp.best)  # not the default selection
    sf.write_logits(exp.path / results.TRIALS_DIR / trial)  # this trial has calibration to show
    table = results.read_parquet(exp.path / results.TRIALS_DIR / trial / "eval.parquet")
    acc = ev.accuracy_grid(table, "test_sub")
    present = acc[ev.accuracy_grid(table, "test_sub", "n").sum(axis=1) > 0]
    order = grids.class_order(table, "training count")  # the default order: most trained first

    with dashboard_server(store.root, ARTIFACTS / "dashboard-server.log") as url, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 2000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(url)
            page.wait_for_selector('.st-key-table_trials [data-testid="stDataFrame"] canvas')
            assert page.get_by_text("Experiment domainnet").is_visible()  # the first experiment by name
            # a self-hosted tool: Streamlit's "Deploy" button (shown to localhost by default) is hidden
            assert page.locator('[data-testid="stAppDeployButton"]').count() == 0
            assert page.get_by_role("button", name="Deploy").count() == 0
            refresh = page.get_by_role("switch", name="Auto-refresh")
            assert not refresh.is_checked()  # off by default: nothing runs in domainnet

            # the small grid: pick a trial of pacs-domain with the keyboard
            _pick(page, "Experiment", "pacs-domain")
            page.wait_for_selector("text=Experiment pacs-domain")
            page.wait_for_function(  # the previous experiment's toggle (another key) is gone
                "() => document.querySelectorAll('input[aria-label=\"Auto-refresh\"]').length == 1")
            for status, n in (("done", len(exp.trials_with("done"))), ("failed", 1)):
                metric = page.locator('[data-testid="stMetric"]').filter(has_text=status)
                assert metric.locator('[data-testid="stMetricValue"]').inner_text().strip() == str(n)
            assert page.get_by_role("switch", name="Auto-refresh").is_checked()  # a trial runs here
            page.locator('[data-testid="stSidebar"] label').filter(has_text="Auto-refresh").click()
            page.wait_for_function(  # off: no periodic rerun in the middle of the clicks below
                "() => !document.querySelector('input[aria-label=\"Auto-refresh\"]').checked")
            _settled(page)
            _pick(page, "Trial", trial)
            page.get_by_role("tab", name="Accuracy grid").click()
            _wait_grids(page, trial, 3)  # test_sub and the held-out domain, and the calibration grid
            page.wait_for_function(  # the reliability diagram: the diagonal and one line per group
                "t => Array.from(document.querySelectorAll('.js-plotly-plot')).some(gd => gd.layout.title"
                " && (gd.layout.title.text || '').includes('reliability diagram (' + t) && gd.data.length > 2"
                " && gd.querySelector('.scatterlayer .trace'))", arg=trial)
            reliability = page.evaluate(RELIABILITY_JS)
            small = page.evaluate(GRAPHS_JS)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # the DomainNet-sized grid: 120 classes, no cell text, the worst pairs as a table
            _pick(page, "Experiment", "domainnet")
            page.wait_for_selector("text=Experiment domainnet")
            big_trial = big.best  # the default selection
            page.wait_for_function(  # the two 120-class grids drawn (the small ones gone)
                "n => Array.from(document.querySelectorAll('.js-plotly-plot')).filter(gd => gd.data.some("
                "t => t.type === 'heatmap' && t.x.length == n)).length == 2", arg=BIG_CLASSES)
            page.wait_for_function(  # the 120-class trial's worst pairs (k = 20), not the previous table
                "() => { const rows = Array.from(document.querySelectorAll('.st-key-table_worst_pairs table tr'));"
                " return rows.length > 20 && rows.slice(1).every(r => r.textContent.includes('class_')); }")
            large = page.evaluate(GRAPHS_JS)
            worst_shown = page.evaluate(TABLE_JS, "worst_pairs")
            page.screenshot(path=str(ARTIFACTS / "dashboard-large-grid.png"), full_page=True)
        finally:
            browser.close()

    # small grid: classes in training-count order, every non-empty pair labelled with its accuracy only,
    # and every label narrower than its cell (the old "n_train=..." labels overflowed it)
    sub = next(g for g in small if g["title"].startswith("test_sub: pair accuracy"))
    assert sub["types"] == ["heatmap", "bar"] and trial in sub["title"]
    assert sub["xticks"] == order  # every class, most trained first
    assert sub["yticks"] == list(present.index)  # every domain with test examples (held-out one omitted)
    labels = [text for text, _ in sub["cells"]]
    assert len(labels) == int(present.notna().sum().sum()) and all(re.fullmatch(r"\d\.\d\d", t) for t in labels)
    expected = sorted(f"{v:.2f}" for v in present.to_numpy().ravel() if v == v)
    assert sorted(labels) == expected
    assert all(0 < width <= sub["cellWidth"] for _, width in sub["cells"]), (sub["cellWidth"], sub["cells"][:5])
    held = next(g for g in small if g["title"].startswith("test_domain:sketch: pair"))
    assert held["yticks"] == ["sketch"]
    assert not any("n_train" in text for g in small for text, _ in g["cells"])

    # the reliability diagram: every domain with test examples and the tail pairs, before and after
    # temperature scaling, each point the (confidence, accuracy) of a bin as the evaluator computes it
    views = calibration.split_views(exp.path / results.TRIALS_DIR / trial, "test_sub")
    assert re.sub("<[^>]+>", "", reliability["title"]).startswith("test_sub: reliability diagram")  # <b> from the theme
    want = views["reliability"]
    assert sorted(reliability["traces"]) == sorted(f"{g} ({w})" for g, w in
                                                    want[["group", "when"]].drop_duplicates().itertuples(index=False))
    assert any(name.startswith(calibration.TAIL) for name in reliability["traces"])
    for (group, when), rows in want.groupby(["group", "when"]):
        got = reliability["traces"][f"{group} ({when})"]
        np.testing.assert_allclose(got, rows[["confidence", "accuracy"]].to_numpy().tolist(), atol=1e-9)

    # large grid: all 120 classes drawn, no cell text at all, and the worst pairs as the evaluator ranks them
    big_table = results.read_parquet(big.path / results.TRIALS_DIR / big_trial / "eval.parquet")
    large_sub = next(g for g in large if g["title"].startswith("test_sub: pair accuracy"))
    assert large_sub["ncols"] == BIG_CLASSES and large_sub["cells"] == []
    assert all(g["cells"] == [] for g in large if "heatmap" in g["types"] and g["ncols"] == BIG_CLASSES)
    header, *rows = worst_shown
    want = ev.worst_pairs(big_table, "test_sub", len(rows))
    assert header[:4] == ["rank", "domain", "class", "acc"]
    got = [(r[1], r[2]) for r in rows]
    assert got == list(zip(want["domain"], want["class"], strict=True))
    np.testing.assert_allclose([float(r[3]) for r in rows], want["correct"] / want["n"], atol=5e-4)
    assert len(rows) == 20  # k defaults to 20 above 40 classes, every row visible
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
