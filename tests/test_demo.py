"""`make demo`'s conclusion: every sentence is a claim about the table it summarises. Each claim is
read back from the text and checked against the verdicts of constructed difference tables."""

from __future__ import annotations

import itertools
import re

import pandas as pd
import pytest

from tally import demo
from tally.evaluation import metric_label

LABELS = {metric_label(m): m for m in demo.HEADLINE}
VERDICTS = ("better", "worse", "no clear difference")


def summary(verdicts: dict[tuple[str, str], str], extra: dict | None = None) -> pd.DataFrame:
    """A difference summary as the benchmark writes it: (baseline, metric) -> verdict for TALLY."""
    rows = [{"method": "tally", "baseline": b, "setting": "sub", "metric": m, "mean_diff": 0.0, "stderr": 0.0,
             "seeds": 2, "per_seed": (), "verdict": v} for (b, m), v in verdicts.items()]
    rows += [{"method": "other", "baseline": b, "setting": "sub", "metric": m, "mean_diff": 0.0, "stderr": 0.0,
              "seeds": 2, "per_seed": (), "verdict": v} for (b, m), v in (extra or {}).items()]
    return pd.DataFrame(rows)


def claims(line: str) -> tuple[str, dict[str, set[str]]]:
    """(baseline, verdict -> metrics) as the sentence states them."""
    baseline = re.match(r"TALLY (?:beats|does not beat) (\S+) ", line).group(1)
    said = {v: set() for v in VERDICTS}
    for part in line.rstrip(".").split("; "):
        if ": " not in part:
            continue
        head, metrics = part.rsplit(": ", 1)
        verdict = ("better" if head.startswith("TALLY beats") else "worse" if "worse" in head
                   else "no clear difference")
        said[verdict] |= {LABELS[m] for m in metrics.split(", ")}
    return baseline, said


def check(table: pd.DataFrame, lines: list[str]) -> None:
    """Every claim follows from the table, and nothing the table says about a headline metric is left out."""
    rows = table[(table["method"] == "tally") & table["metric"].isin(demo.HEADLINE)]
    assert len(lines) == 1 + rows["baseline"].nunique()
    for line in lines[1:]:
        baseline, said = claims(line)
        mine = rows[rows["baseline"] == baseline]
        for verdict in VERDICTS:
            assert said[verdict] == set(mine.loc[mine["verdict"] == verdict, "metric"]), (line, verdict)
        if not said["better"]:
            assert "does not beat" in line


TUNE = {"trials": 3, "sampler": "random", "sampler_seed": 0, "trial_seed": 0, "seeds": 2}


@pytest.mark.parametrize("pattern", list(itertools.product(VERDICTS, repeat=2)))
def test_each_claim_follows_from_the_table(pattern):
    verdicts = {}
    for b, baseline in enumerate(demo.BASELINES):
        for i, metric in enumerate(demo.HEADLINE):
            verdicts[(baseline, metric)] = pattern[(i + b) % 2]
    # a non-headline metric and another method's rows are not TALLY's claims on the headline metrics
    verdicts[("erm", "domain_acc_worst")] = "better"
    table = summary(verdicts, extra={("erm", "macro_f1"): "worse"})
    lines = demo.conclusion(table, TUNE)
    check(table, lines)


def test_all_unclear_says_no_win():
    table = summary({("erm", m): "no clear difference" for m in demo.HEADLINE})
    lines = demo.conclusion(table, TUNE)
    assert lines[1].startswith("TALLY does not beat erm beyond the intervals on any headline metric")
    assert "worse" not in lines[1]
    check(table, lines)


def test_the_budget_sentence_states_the_equal_budget():
    lines = demo.conclusion(summary({("erm", "macro_f1"): "better"}), {**TUNE, "trials": 5, "seeds": 4})
    assert lines[0].startswith("Equal budget: TALLY, ERM and re-weighting each had 5 random trials")
    assert "re-run with 4 seeds" in lines[0] and "sampler seed 0" in lines[0] and "no early stopping" in lines[0]


def test_the_demo_benchmark_tunes_every_method_alike():
    """The demo's spec: the three methods, one tune section for all, no method-specific budget."""
    from tally import search
    from tally.search import benchmark

    spec = search.load_spec(demo.QUICKSTART)
    raw = demo.benchmark_raw(spec, "demo-test")
    assert set(raw["methods"]) == set(demo.METHODS) and raw["tune"] is demo.TUNE
    assert all(set(entry) == {"method"} for entry in raw["methods"].values())
    bench = benchmark.benchmark_spec_from_raw(raw, "demo benchmark")
    counts = bench.tuning.plan.groupby("method").size()
    assert set(counts) == {demo.TUNE["trials"]} and set(counts.index) == set(demo.METHODS)
    assert "Equal budget" in demo.conclusion(summary({("erm", "macro_f1"): "better"}), bench.resolved["tune"])[0]
