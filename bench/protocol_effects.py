"""What each difference between `protocol: paper` and `protocol: reference` is worth on the embedded data.

Trains `tally reproduce embedded`'s fixed configuration (tally.reproduce.PAPERS["embedded"]) under the
paper protocol, each switch of docs/PROTOCOL.md's table that can act on the embedded data flipped
alone, and `protocol: reference` as a whole, over the same seeds; in-process (tally.training.train_run,
no Ray). Then per seed the paired difference switch - paper on the same test images with its 95%
interval (tally.evaluation.intervals.compare_runs), and over seeds the mean ± SE of
intervals.seed_summary (seed spread plus the test-set noise every seed shares).

    flock /tmp/tally-ray.lock env PYTHONPATH=$PWD .venv/bin/python bench/protocol_effects.py \
        [--seeds 3] [--jobs 2] [--out results/protocol_effects] [--write]

Finished runs in --out are kept and not retrained (an interrupted measurement resumes). --write puts
the table into docs/PROTOCOL.md (the section "What the effects are worth" and the effect column).
"""

from __future__ import annotations

import argparse
import calendar
import copy
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PROTOCOL.md"
SECTION = "## What the effects are worth"
HEADLINE = {"pair_acc_mean": "avg pair", "pair_acc_worst": "worst pair", "class_acc_worst": "worst class",
            "macro_f1": "macro F1", "acc": "accuracy"}
HELD_OUT = "ink"  # the domain setting's held-out domain (one, to keep the measurement cheap)
# docs/PROTOCOL.md's rows that can act on the embedded data: row -> (setting, overrides of the paper config)
SWITCHES = {
    "b": ("sub", {("data", "crop_padding"): 0}),
    "d": ("domain", {("data", "carve_validation"): False, ("data", "oracle_selection"): True}),
    "g1": ("sub", {("method", "memory_init"): "noise"}),
    "g2": ("sub", {("method", "warmup_swap"): True}),
    "g3": ("sub", {("method", "mixing_swap"): True}),
    "g4": ("sub", {("method", "memory_snapshot"): True}),
    "g5": ("sub", {("method", "unbiased_std"): True}),
    "h": ("sub", {("train", "tie_rule"): "latest"}),
}
REFERENCE = "reference"  # the whole protocol (sub setting), a row of its own
# why the table's other rows are not measured (docs/PROTOCOL.md says the same in its effect column)
CANNOT_ACT = {"a": "ImageNet weights: the embedded model is a resnet10 trained from scratch",
              "c": "bf16 autocast is CUDA-only; these runs are on a CPU",
              "e": "TerraIncognita's lists only", "f": "iWildCam (WILDS) only"}


@dataclass(frozen=True)
class Run:
    name: str  # folder under <out>/runs
    row: str  # "paper", a key of SWITCHES, or REFERENCE
    setting: str  # sub or domain
    seed: int
    config: dict  # validated
    split: str  # the test split the differences are taken on
    baseline: str | None  # the paper run of the same setting and seed (None for a paper run)


def _paper_run(setting: str, protocol: str, seed: int, seeds: int):
    from tally import reproduce

    label = HELD_OUT if setting == "domain" else "sub"
    return next(r for r in reproduce.plan("embedded", setting, protocol, seeds)
                if r.setting == label and r.seed == seed)


def switch_text(row: str) -> str:
    """``data.crop_padding 2 -> 0``: each field a switch flips, from the paper's value to the one set."""
    setting, overrides = SWITCHES[row]
    base = _paper_run(setting, "paper", 0, 1).config
    return ", ".join(f"`{s}.{k}: {str(base[s][k]).lower()} -> {str(v).lower()}`" for (s, k), v in overrides.items())


def plan(seeds: int = 3, rows: list[str] | None = None, size: dict | None = None) -> list[Run]:
    """Paper runs of each setting a row needs, each row's runs, per seed; validated (no data read).
    ``size`` overrides the training budget (epochs, warmup_epochs, steps_per_epoch): a test's tiny runs."""
    from tally.config import validate
    from tally.errors import TallyError

    rows = list(SWITCHES) + [REFERENCE] if rows is None else rows
    settings = list(dict.fromkeys(SWITCHES[r][0] if r in SWITCHES else "sub" for r in rows))
    runs = []
    for seed in range(seeds):
        for setting in settings:
            paper = _paper_run(setting, "paper", seed, seeds)
            cfg = copy.deepcopy(paper.config)
            cfg["train"].update(size or {})
            runs.append(Run(f"paper-{setting}-seed{seed}", "paper", setting, seed, validate(cfg), paper.test_split, None))
        for row in rows:
            if row == REFERENCE:
                ref = _paper_run("sub", "reference", seed, seeds)
                cfg, setting, split = copy.deepcopy(ref.config), "sub", ref.test_split
                cfg["train"].update(size or {})
            elif row in SWITCHES:
                setting, overrides = SWITCHES[row]
                cfg = copy.deepcopy(_paper_run(setting, "paper", seed, seeds).config)
                cfg["train"].update(size or {})
                for (section, key), value in overrides.items():
                    if cfg[section][key] == value:  # a switch that changes nothing would measure nothing
                        raise TallyError(f"{row}: {section}.{key} is already {value!r} under protocol paper")
                    cfg[section][key] = value
                split = next(r.split for r in runs if r.row == "paper" and r.setting == setting)
            else:
                raise TallyError(f"--rows: expected some of {', '.join([*SWITCHES, REFERENCE])}, got {row!r}")
            runs.append(Run(f"{row}-seed{seed}", row, setting, seed, validate(cfg), split,
                            f"paper-{setting}-seed{seed}"))
    return runs


def _train_one(config: dict, run_dir: str, deadline: float | None = None) -> float | None:
    if deadline is not None and time.time() > deadline:
        return None  # not started: past the deadline
    import torch

    from tally.training import train_run

    torch.set_num_threads(1)  # two runs side by side on 2 cores; OpenMP spinning slows tiny nets
    started = time.time()
    train_run(config, run_dir, validated=True, resume=(Path(run_dir) / "checkpoints" / "last.pt").exists())
    return time.time() - started


def train_all(runs: list[Run], out: Path, jobs: int = 1, deadline: float | None = None) -> dict[str, float]:
    """Train the runs not finished yet (``jobs`` processes), in plan order (seed by seed), none started
    after ``deadline`` (epoch seconds); seconds per run trained."""
    from tally import results

    todo = [r for r in runs if (results.read_json(out / "runs" / r.name / "status.json") or {}).get("status") != "done"]
    if jobs <= 1:
        took = {r.name: _train_one(r.config, str(out / "runs" / r.name), deadline) for r in todo}
        return {k: v for k, v in took.items() if v is not None}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {r.name: pool.submit(_train_one, r.config, str(out / "runs" / r.name), deadline) for r in todo}
        took = {name: f.result() for name, f in futures.items()}
        return {k: v for k, v in took.items() if v is not None}


def differences(runs: list[Run], out: Path, replicates: int = 1000) -> pd.DataFrame:
    """Per row and seed: switch - paper on the same test images (compare_runs), the headline metrics."""
    from tally.evaluation.intervals import compare_runs

    parts = []
    for r in runs:
        if r.baseline is None:
            continue
        frame, _ = compare_runs(out / "runs" / r.name, out / "runs" / r.baseline, splits=[r.split],
                                replicates=replicates)
        frame = frame[frame["metric"].isin(HEADLINE)]
        parts.append(frame.assign(row=r.row, seed=r.seed, run=r.name, baseline=r.baseline))
    return pd.concat(parts, ignore_index=True)


def _verdict(r: pd.DataFrame) -> str:
    # the platform's rule (tally.evaluation.benchmark_tables.VERDICT_RULE): a direction only when every
    # seed's paired interval lies on that side of 0
    return "higher" if (r["low"] > 0).all() else "lower" if (r["high"] < 0).all() else "no clear difference"


def summary(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per row and metric over seeds: mean difference ± SE (intervals.seed_summary: seed spread plus the
    test-set noise every seed shares), seeds, how many seeds' intervals exclude 0, and the verdict."""
    from tally.evaluation.intervals import seed_summary

    rows = []
    for row, part in per_seed.groupby("row", sort=False):
        by_seed = {str(s): dict(zip(p["metric"], p["diff"], strict=True)) for s, p in part.groupby("seed")}
        half = {str(s): dict(zip(p["metric"], (p["high"] - p["low"]) / 2, strict=True))
                for s, p in part.groupby("seed")}
        over = seed_summary(by_seed, half).set_index("metric")
        for metric in HEADLINE:
            m = part[part["metric"] == metric]
            rows.append({"row": row, "metric": metric, "mean": over.at[metric, "mean"],
                         "stderr": over.at[metric, "stderr"], "seeds": int(over.at[metric, "n"]),
                         "excluding_0": int(((m["low"] > 0) | (m["high"] < 0)).sum()), "verdict": _verdict(m)})
    return pd.DataFrame(rows)


def paper_values(per_seed: pd.DataFrame) -> pd.DataFrame:
    """The paper runs' own values (the ``b`` column of the comparisons), mean ± SE over seeds, per setting."""
    from tally.evaluation.intervals import seed_summary

    parts = []
    for setting, part in per_seed.assign(setting=per_seed["baseline"].str.split("-").str[1]).groupby("setting"):
        first = part.drop_duplicates(["baseline", "metric"])
        by_seed = {str(s): dict(zip(p["metric"], p["b"], strict=True)) for s, p in first.groupby("seed")}
        parts.append(seed_summary(by_seed).assign(setting=setting))
    return pd.concat(parts, ignore_index=True)


def _pp(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.1f}"


def markdown(per_seed: pd.DataFrame, runs: list[Run], header: str) -> str:
    """The section's text: the header, the over-seeds table, the paper's own values, each seed's intervals."""
    summ = summary(per_seed).set_index(["row", "metric"])
    seeds = per_seed["seed"].nunique()
    split_of = {r.row: r.split for r in runs}
    lines = [header, "",
             "| row | switched alone (paper -> reference) | test split | " + " | ".join(HEADLINE.values()) + " |",
             "|---|---|---|" + "---|" * len(HEADLINE)]
    for row in dict.fromkeys(per_seed["row"]):
        what = "`train.protocol: paper -> reference` (all that act here)" if row == REFERENCE else switch_text(row)
        cells = []
        for metric in HEADLINE:
            s = summ.loc[(row, metric)]
            se = "" if math.isnan(s["stderr"]) else f" ± {100 * s['stderr']:.1f}"
            mark = f" **{s['verdict']}**" if s["verdict"] != "no clear difference" else ""
            cells.append(f"{_pp(s['mean'])}{se} ({s['excluding_0']}/{s['seeds']}){mark}")
        lines.append(f"| {row} | {what} | {split_of[row]} | " + " | ".join(cells) + " |")
    for row, why in CANNOT_ACT.items():
        lines.append(f"| {row} | not measured: {why} | |" + " |" * len(HEADLINE))
    lines += ["", f"Cells: switch - paper in percentage points, mean ± SE over {seeds} seed(s) (the SE of "
              "`tally.evaluation.intervals.seed_summary`: seed-to-seed spread plus the test-set noise every seed "
              "shares); (j/k): how many of the k seeds' paired 95% intervals (`compare_runs`, same test images) "
              "exclude 0; **higher** / **lower**: every seed's interval lies above / below 0 (the platform's "
              "verdict rule, no adjustment for the "
              f"{len(summ)} comparisons).", "",
              "The paper runs themselves (percent, mean ± SE over seeds, test noise included):", "",
              "| setting | " + " | ".join(HEADLINE.values()) + " |", "|---|" + "---|" * len(HEADLINE)]
    own = paper_values(per_seed).set_index(["setting", "metric"])
    for setting in dict.fromkeys(own.index.get_level_values(0)):
        cells = [f"{100 * own.at[(setting, m), 'mean']:.1f}"
                 + ("" if math.isnan(own.at[(setting, m), "stderr"]) else f" ± {100 * own.at[(setting, m), 'stderr']:.1f}")
                 for m in HEADLINE]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += ["", "Each seed: switch - paper [paired 95% interval], percentage points:", "",
              "| row | metric | " + " | ".join(f"seed {s}" for s in sorted(per_seed["seed"].unique())) + " |",
              "|---|---|" + "---|" * seeds]
    for row in dict.fromkeys(per_seed["row"]):
        for metric, label in HEADLINE.items():
            m = per_seed[(per_seed["row"] == row) & (per_seed["metric"] == metric)].sort_values("seed")
            lines.append(f"| {row} | {label} | " + " | ".join(
                f"{_pp(d)} [{_pp(lo)}, {_pp(hi)}]" for d, lo, hi in zip(m["diff"], m["low"], m["high"], strict=True))
                + " |")
    return "\n".join(lines)


def effect_cells(per_seed: pd.DataFrame) -> dict[str, str]:
    """One line per measured row for the doc's effect column."""
    summ = summary(per_seed)
    out = {}
    for row, part in summ.groupby("row", sort=False):
        if row not in SWITCHES:  # `reference` has no row of its own in the doc's table
            continue
        said = [f"{HEADLINE[m]} {v}" for m, v in zip(part["metric"], part["verdict"], strict=True)
                if v != "no clear difference"]
        seeds = int(part["seeds"].max())
        out[row] = ("measured below: " + ("; ".join(said) + " on every seed" if said else
                                          "no clear difference on any headline metric")
                   + f" ({seeds} seed{'s' if seeds > 1 else ''})")
    return out


def write_doc(section: str, cells: dict[str, str], doc: Path = DOC) -> None:
    """Replace the section's body and the measured rows' effect cells of docs/PROTOCOL.md."""
    from tally import results
    from tally.errors import TallyError

    text = doc.read_text()
    start = text.find(SECTION)
    if start < 0:
        raise TallyError(f"{doc}: no section {SECTION!r}")
    end = text.find("\n## ", start + len(SECTION))
    head = text[:start]  # the differences table; the section's own tables are never touched
    for row, cell in cells.items():
        pattern = re.compile(rf"^(\| {re.escape(row)} \|.*\| )([^|]*)( \|)$", re.MULTILINE)
        head, n = pattern.subn(lambda m, c=cell: m.group(1) + c + m.group(3), head, count=1)
        if n != 1:
            raise TallyError(f"{doc}: no table row {row!r} before {SECTION!r}")
    results.write_text(doc, head + SECTION + "\n\n" + section.rstrip() + "\n" + (text[end:] if end >= 0 else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="training processes side by side (one thread each)")
    ap.add_argument("--rows", help=f"comma-separated subset of {','.join([*SWITCHES, REFERENCE])} (default: all)")
    ap.add_argument("--out", default=str(ROOT / "results" / "protocol_effects"))
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--deadline", help="HH:MM UTC: start no run after it; the table covers the seeds finished")
    ap.add_argument("--write", action="store_true", help=f"put the table into {DOC.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    from tally import results
    from tally.errors import TallyError

    try:
        runs = plan(args.seeds, args.rows.split(",") if args.rows else None)
        out = Path(args.out)
        deadline = None
        if args.deadline:
            day = time.strftime("%Y-%m-%d", time.gmtime())
            deadline = calendar.timegm(time.strptime(f"{day} {args.deadline}", "%Y-%m-%d %H:%M"))
        train_all(runs, out, args.jobs, deadline)
        finished = {r.name for r in runs
                    if (results.read_json(out / "runs" / r.name / "status.json") or {}).get("status") == "done"}
        seeds = [s for s in range(args.seeds) if all(r.name in finished for r in runs if r.seed == s)]
        if not seeds:
            raise TallyError("--deadline: no seed finished all its runs")
        runs = [r for r in runs if r.seed in seeds]
        per_seed = differences(runs, out, args.replicates)
    except TallyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the runs' own start and end times (status.json): right also when a rerun only rewrites the table
    status = [results.read_json(out / "runs" / r.name / "status.json") for r in runs]
    first, last = min(x["started"] for x in status), max(x["ended"] for x in status)
    training = sum(x["ended"] - x["started"] for x in status)
    t = runs[0].config["train"]
    cmd = ("flock /tmp/tally-ray.lock env PYTHONPATH=$PWD .venv/bin/python bench/protocol_effects.py "
           f"--seeds {args.seeds} --jobs {args.jobs}" + (f" --rows {args.rows}" if args.rows else "")
           + (f" --deadline {args.deadline}" if args.deadline else "") + " --write")
    done = (f"seeds {', '.join(map(str, seeds))}" + ("" if len(seeds) == args.seeds else
                                                      f" (of {args.seeds} planned: the deadline stopped the rest)"))
    header = (f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} by `{cmd}`: {done}, "
              f"{len(runs)} runs trained {time.strftime('%H:%M', time.gmtime(first))}-"
              f"{time.strftime('%H:%M', time.gmtime(last))} UTC ({training / 60:.1f} min of training in "
              f"{(last - first) / 60:.1f} min wall, {args.jobs} process(es) of one thread on a shared 2-core CPU). "
              f"Run size: `tally reproduce embedded`'s fixed configuration (tally.reproduce.PAPERS), smaller than "
              f"the demo's: {t['epochs']} epochs ({t['warmup_epochs']} warm-up, then {t['steps_per_epoch']} TALLY "
              f"steps per epoch), batch {t['batch_size']}, lr {t['lr']:g}, resnet10 from scratch at 32 px; the "
              "demo's budget (6 epochs, 2 warm-up, 25 steps; about 4x longer per run, estimated from the warm-up "
              "and step times of this size) would not have fit the ~20 CPU minutes this measurement had. "
              f"Sub setting (test_sub) for every row but d; d in the domain setting with `{HELD_OUT}` held out "
              f"(test_domain:{HELD_OUT}), against paper runs of that setting. A run of this size is far from "
              "converged: these are effects on a small, short run, not on the paper's datasets.")
    text = markdown(per_seed, runs, header)
    print(text)
    per_seed.to_csv(out / "differences.csv", index=False)
    if args.write:
        write_doc(text, effect_cells(per_seed))
        print(f"\nwritten: {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
