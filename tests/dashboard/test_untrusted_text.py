"""Text from store files is shown, never followed: markdown from an error, a name or a note renders no
link and no remote image, and CSV downloads cannot smuggle spreadsheet formulas."""

from __future__ import annotations

import io
import re

import pandas as pd

from tally import results
from tally.dashboard import data as dd
from tally.dashboard.app import TABS
from tests import store_factory as sf
from tests.dashboard.test_app import assert_ok, run_app, show

# 192.0.2.0/24 is TEST-NET-1: nothing there, should a test ever follow the link
EVIL = ("see [the fix](http://192.0.2.1/x) ![pixel](http://192.0.2.1/p.png) <img src=http://192.0.2.1/q.png> "
        "https://192.0.2.1/y www.example.invalid ops@example.invalid :red[alarm] :material/home: $x^2$")
LINK_OR_IMAGE = re.compile(r"(?<!\\)\]\(|(?<!\\)!\[|(?<!\\)<img|(?<![\\])https?:/|(?i:www\.)|(?<!\\)@|(?<!\\):red")


def markdown_sources(at) -> list[str]:
    """Every string a view handed to a Streamlit element that renders markdown."""
    found = [str(e.value) for kind in ("markdown", "caption", "info", "warning", "error", "success", "subheader")
             for e in getattr(at, kind)]
    return found + [e.proto.label for e in at.get("expander")]


def test_store_text_renders_no_link_or_image(tmp_path, monkeypatch):
    store = sf.make_store(tmp_path)
    exp = store.experiments["pacs-domain"]
    failed = exp.trials_with("failed")[0]
    status_path = exp.path / results.TRIALS_DIR / failed / "status.json"
    status = results.read_json(status_path)
    status["error"] = "Traceback (most recent call last):\nValueError: " + EVIL
    results.write_json(status_path, status)
    (exp.path / "summary.parquet").unlink(missing_ok=True)  # the table is rebuilt from the status files

    at = run_app(store.root, monkeypatch)
    assert_ok(at)
    shown = [t for t in markdown_sources(at) if "pixel" in t]
    assert shown, "the error is not shown at all"
    for view in TABS:
        at = show(at, view)
        assert_ok(at)
        bad = [t for t in markdown_sources(at) if LINK_OR_IMAGE.search(t)]
        assert bad == [], (view, bad)
    assert any(dd.plain(EVIL) in t for t in shown)  # shown as written, escaped


def test_plain_shows_text_as_written():
    assert dd.plain("trial_0001 pacs-domain 0.5") == "trial_0001 pacs-domain 0.5"  # names stay readable
    escaped = dd.plain(EVIL)
    assert not LINK_OR_IMAGE.search(escaped)
    assert re.sub(r"\\(.)", r"\1", escaped) == EVIL  # removing the escapes gives the text back


def test_csv_cells_cannot_be_formulas():
    frame = pd.DataFrame({"trial_id": ["=HYPERLINK(\"http://192.0.2.1\")", "+1", "-cmd", "@SUM(A1)", "\tx",
                                       "\rx", "ok"], "value": [-1.5, 2, 3, 4, 5, 6, 7],
                          "=evil column": ["a", "b", "c", "d", "e", "f", "g"]})
    back = pd.read_csv(io.BytesIO(dd.csv_bytes(frame)), keep_default_na=False)
    assert all(not str(c).startswith(dd.FORMULA_START) for c in back["trial_id"])
    assert back["trial_id"].iloc[0] == "'=HYPERLINK(\"http://192.0.2.1\")" and back["trial_id"].iloc[-1] == "ok"
    assert dd.csv_bytes(frame).decode().splitlines()[1].endswith(",-1.5,a")  # numbers stay numbers
    assert "'=evil column" in back.columns
