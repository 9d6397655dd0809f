"""`tally` command line: thin argument parsing over the library; errors are one line, exit 2."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from tally.errors import TallyError


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise TallyError(f"--set {text!r}: expected SECTION.FIELD=VALUE, e.g. train.epochs=3")
    return key, yaml.safe_load(value)


def cmd_train(args) -> int:
    from tally import config as config_mod
    from tally.training import train_run

    raw = config_mod.read_yaml_file(args.config)
    for item in args.set or []:
        key, value = _parse_override(item)
        config_mod.set_path(raw, key, value)
    cfg = config_mod.validate(raw, source=args.config)
    out = Path(args.out) if args.out else Path("results") / "runs" / (
        f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"run folder: {out}", flush=True)
    metrics = train_run(cfg, out, resume=args.resume, ctx=None)
    _print_metrics(metrics)
    print(f"\nresults in {out} (eval.parquet, metrics.json, epochs.jsonl)")
    return 0


def cmd_evaluate(args) -> int:
    from tally.training import evaluate_run_split

    table, metrics = evaluate_run_split(Path(args.run_dir), args.split)
    if args.out:
        table.to_csv(args.out, index=False)
        print(f"long table written to {args.out}")
    _print_metrics({args.split: metrics})
    return 0


def cmd_dashboard(args) -> int:
    from tally.dashboard_launch import launch

    return launch(Path(args.root), port=args.port, address=args.address)


def _print_metrics(metrics: dict) -> None:
    for split, values in metrics.items():
        shown = "  ".join(f"{k} {v:.3f}" for k, v in values.items() if v == v)
        print(f"{split:>24s}: {shown}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tally", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="one training run from a config YAML")
    p.add_argument("config")
    p.add_argument("--out", help="run folder (default results/runs/<config>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config value")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a run's kept checkpoint on one split")
    p.add_argument("run_dir")
    p.add_argument("--split", default="val", help="val, test_sub or test_domain:<name>")
    p.add_argument("--out", help="write the long (domain, class) table as CSV")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("dashboard", help="browse a results store in the browser")
    p.add_argument("root", nargs="?", default="results")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="127.0.0.1", help="bind address (default localhost only)")
    p.set_defaults(func=cmd_dashboard)

    from tally.data.cli import add_commands as add_data_commands

    add_data_commands(sub)
    for module in ("tally.search_cli",):
        try:
            __import__(module, fromlist=["add_commands"]).add_commands(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TallyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
