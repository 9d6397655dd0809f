"""bench/protocol_effects.py on a tiny setting (1 seed, switches b and d, 2 short epochs): the plan, the
paired differences (each equal to A - B of the two runs' eval tables), the markdown table and the doc
update. The full measurement (3 seeds, every switch) is in docs/PROTOCOL.md."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {"epochs": 2, "warmup_epochs": 1, "steps_per_epoch": 2}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_protocol_effects", ROOT / "bench" / "protocol_effects.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves its annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_plan_pairs_each_switch_with_the_paper_run_of_its_setting_and_seed():
    bench = load_bench()
    runs = {r.name: r for r in bench.plan(2, ["b", "d", "reference"])}
    assert set(runs) == {f"{n}-seed{s}" for n in ("paper-sub", "paper-domain", "b", "d", "reference") for s in (0, 1)}
    b, d, ref, paper = runs["b-seed1"], runs["d-seed0"], runs["reference-seed1"], runs["paper-sub-seed1"]
    assert (b.baseline, d.baseline, ref.baseline) == ("paper-sub-seed1", "paper-domain-seed0", "paper-sub-seed1")
    assert (b.split, d.split) == ("test_sub", f"test_domain:{bench.HELD_OUT}")
    # a switch differs from its paper run in its own fields only
    assert b.config["data"] == {**paper.config["data"], "crop_padding": 0}
    assert {k: v for k, v in b.config.items() if k != "data"} == {k: v for k, v in paper.config.items() if k != "data"}
    pd_ = runs["paper-domain-seed0"].config
    assert d.config["data"] == {**pd_["data"], "carve_validation": False, "oracle_selection": True}
    assert ref.config["method"]["memory_snapshot"] and ref.config["train"]["tie_rule"] == "latest"
    assert ref.config["train"]["protocol"] == "reference" and paper.config["train"]["protocol"] == "paper"
    with pytest.raises(Exception, match="bogus"):
        bench.plan(1, ["bogus"])


def test_summary_verdicts_and_the_doc_update_on_fixed_differences(tmp_path):
    """Over seeds: the mean of the per-seed differences, the verdict only when every seed's interval lies
    on one side of 0; the doc's effect column gets the switches' rows only, the section is replaced."""
    bench = load_bench()
    rows = []
    for row, diffs, lows in (("b", (0.05, 0.07), (0.01, 0.02)), ("reference", (0.02, -0.01), (-0.01, -0.03))):
        for seed, (d, lo) in enumerate(zip(diffs, lows, strict=True)):
            rows += [{"row": row, "seed": seed, "metric": m, "diff": d, "low": lo, "high": d + (d - lo),
                      "a": 0.5 + d, "b": 0.5, "baseline": f"paper-sub-seed{seed}"} for m in bench.HEADLINE]
    per_seed = pd.DataFrame(rows)
    summ = bench.summary(per_seed).set_index(["row", "metric"])
    assert summ.at[("b", "acc"), "mean"] == pytest.approx(0.06) and summ.at[("b", "acc"), "verdict"] == "higher"
    assert summ.at[("b", "acc"), "excluding_0"] == 2 and summ.at[("reference", "acc"), "excluding_0"] == 0
    assert summ.at[("reference", "acc"), "verdict"] == "no clear difference"
    cells = bench.effect_cells(per_seed)
    assert set(cells) == {"b"} and "higher on every seed" in cells["b"]
    runs = bench.plan(2, ["b", "reference"])
    text = bench.markdown(per_seed, runs, "HEADER")
    doc = tmp_path / "PROTOCOL.md"
    doc.write_text((ROOT / "docs" / "PROTOCOL.md").read_text())
    bench.write_doc(text, cells, doc)
    written = doc.read_text()
    head, section = written.split(bench.SECTION)
    assert text in section  # the section's own tables untouched by the effect column's update
    assert next(x for x in head.splitlines() if x.startswith("| b |")).endswith(f"| {cells['b']} |")
    assert "| reference |" not in head and section.count("| reference | `") == 1


@pytest.mark.slow
def test_tiny_measurement_differences_are_a_minus_b_of_the_eval_tables(tmp_path, one_thread):
    from tally.evaluation.metrics import all_metrics

    bench = load_bench()
    runs = bench.plan(1, ["b", "d"], size=TINY)
    assert [r.name for r in runs] == ["paper-sub-seed0", "paper-domain-seed0", "b-seed0", "d-seed0"]
    bench.train_all(runs, tmp_path, jobs=1)
    per_seed = bench.differences(runs, tmp_path, replicates=50)
    assert set(per_seed["metric"]) == set(bench.HEADLINE) and len(per_seed) == 2 * len(bench.HEADLINE)
    for r in runs[2:]:
        a = all_metrics(pd.read_parquet(tmp_path / "runs" / r.name / "eval.parquet"))[r.split]
        b = all_metrics(pd.read_parquet(tmp_path / "runs" / r.baseline / "eval.parquet"))[r.split]
        mine = per_seed[per_seed["row"] == r.row].set_index("metric")
        for metric in bench.HEADLINE:
            assert mine.at[metric, "diff"] == pytest.approx(a[metric] - b[metric], abs=1e-12)
            assert mine.at[metric, "low"] <= mine.at[metric, "diff"] <= mine.at[metric, "high"]

    text = bench.markdown(per_seed, runs, "HEADER")
    lines = text.splitlines()
    assert lines[0] == "HEADER"
    for r in runs[2:]:
        row = next(line for line in lines if line.startswith(f"| {r.row} | `"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 3 + len(bench.HEADLINE) and cells[2] == r.split
        mine = per_seed[per_seed["row"] == r.row].set_index("metric")
        for cell, metric in zip(cells[3:], bench.HEADLINE, strict=True):
            shown = float(re.match(r"([+-]\d+\.\d)", cell).group(1))  # one seed: the mean is that seed's diff
            assert shown == pytest.approx(100 * mine.at[metric, "diff"], abs=0.051)
            assert "(" in cell and "/1)" in cell
    assert "| a | not measured: " in text and "`data.crop_padding: 2 -> 0`" in text

    doc = tmp_path / "PROTOCOL.md"
    doc.write_text((ROOT / "docs" / "PROTOCOL.md").read_text())
    cells = bench.effect_cells(per_seed)
    bench.write_doc(text, cells, doc)
    written = doc.read_text()
    assert "HEADER" in written and "## The paper's published numbers" in written  # the next section survives
    assert written.count(bench.SECTION) == 1
    for row in ("b", "d"):
        line = next(x for x in written.splitlines() if x.startswith(f"| {row} |"))
        assert line.endswith(f"| {cells[row]} |") and "(1 seed)" in line
    bench.write_doc(text, cells, doc)  # idempotent: a rerun replaces, never appends
    assert doc.read_text() == written
