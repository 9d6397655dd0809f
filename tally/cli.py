"""`tally` command line: one table of commands, each a thin handler over the library.

Every handler returns an exit code; user mistakes raise TallyError, printed here on one line with
exit code 2. Handlers import what they need when they run, so `tally search --dry-run` or
`tally report` never pay for torch, Ray or Streamlit they do not use.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tally.errors import TallyError


# ---------------------------------------------------------------- one run
def cmd_train(args) -> int:
    from tally import config as config_mod
    from tally.deploy.export import retrain_source

    source = retrain_source(args.config, args.trial)
    raw = source.config
    if not isinstance(raw, dict):
        raise TallyError(f"{source.where}: expected a run config mapping, got {type(raw).__name__}")
    epochs = args.epochs
    if args.final:
        if epochs is None and source.kept_epoch is None:
            raise TallyError(f"--final: {source.where} records no kept epoch; pass --epochs N (how many epochs "
                             "the final retrain runs: the trial's kept epoch + 1)")
        config_mod.set_path(raw, "train.final", True)
        epochs = epochs if epochs is not None else source.kept_epoch + 1
    if epochs is not None:
        config_mod.set_path(raw, "train.epochs", epochs)
    for item in args.set or []:
        key, value = _parse_override(item)
        config_mod.set_path(raw, key, value)
    cfg = config_mod.validate(raw, source=source.where)
    resources = _scale(args)
    out = Path(args.out) if args.out else Path("results") / "runs" / (
        f"{source.name}{'-final' if args.final else ''}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"run folder: {out}", flush=True)
    if args.final:
        print(f"final retrain of {source.where}: train + validation, {cfg['train']['epochs']} epochs, the last "
              "one kept (no selection). Validation images join training, so tail pairs gain images: its test "
              "numbers are not comparable with the search's", flush=True)
    if resources is None:
        from tally.training import train_run

        metrics = train_run(cfg, out, resume=args.resume, ctx=None, validated=True)
    else:
        from tally.search import train_on_ray

        print(f"on Ray: {resources['workers']} worker(s), {resources['gpus_per_worker']:g} GPU and "
              f"{resources['cpus_per_worker']:g} CPU each", flush=True)
        metrics = train_on_ray(cfg, out, resources, args.address, resume=args.resume)
    _print_metrics(metrics)
    print(f"\nresults in {out} (eval.parquet, metrics.json, epochs.jsonl)")
    return 0


def _scale(args) -> dict | None:
    """The Ray Train resources `tally train` asked for; None: one process here, no Ray."""
    if args.workers == 1 and not args.gpus_per_worker and args.address is None and args.cpus_per_worker is None:
        return None
    from tally.search.spec import check_resources

    raw = {"workers": args.workers, "gpus_per_worker": args.gpus_per_worker or 0,
           "cpus_per_worker": 1 if args.cpus_per_worker is None else args.cpus_per_worker}
    return check_resources(raw, name=lambda key: "--" + key.replace("_", "-"))


def cmd_evaluate(args) -> int:
    from tally.training import evaluate_run_split

    table, metrics = evaluate_run_split(Path(args.run_dir), args.split)
    if args.out:
        table.to_csv(args.out, index=False)
        print(f"long table written to {args.out}")
    _print_metrics({args.split: metrics})
    return 0


# ---------------------------------------------------------------- many runs
def cmd_search(args) -> int:
    from tally import results
    from tally.results import storage as bucket
    from tally.search import dry_run_text, load_spec

    spec = load_spec(args.spec, name_override=args.name)  # validated: nothing written before this
    if args.dry_run:
        print(dry_run_text(spec))
        return 0
    from tally import search

    if args.cache:  # the banks' folder for the pre-flight, its follow-ups and every trial
        os.environ["TALLY_BANK_DIR"] = str(Path(args.cache).expanduser().resolve())
    started = time.time()
    summary = search.run_search(spec, args.storage, address=args.address, resume=args.resume,
                                quiet=not args.verbose)
    exp_dir = bucket.experiment_dir(args.storage, spec.name)  # a bucket store: the driver's staging copy
    counts = summary["status"].value_counts().to_dict() if not summary.empty else {}
    print(f"search {spec.name}: {len(summary)} trials ({', '.join(f'{v} {k}' for k, v in counts.items())}) "
          f"in {time.time() - started:.0f}s")
    best, selection = results.best_of_experiment(exp_dir, summary)
    if best is None:
        print("no trial finished: nothing to select")
        return 1
    metric = selection.metric.split("/", 1)[1]
    print(f"best trial on validation {metric}: {best['trial_id']}  val {best[selection.metric]:.3f}")
    if selection.objectives:
        print(f"  picked by the rule: {selection.source}")
    for column in sorted(c for c in summary.columns if c.startswith("test_") and c.endswith(f"/{metric}")):
        print(f"  {column}: {best[column]:.3f}")
    if args.confirm_seeds:
        table = search.confirm_seeds(spec, exp_dir, best["trial_id"], args.confirm_seeds)
        print(f"\nbest config re-run with {args.confirm_seeds} seeds (mean +- standard error):")
        for row in table.itertuples():
            print(f"  {row.split:>22s} {row.metric:>16s} {row.mean:.3f} +- {row.stderr:.3f}")
    if spec.resolved.get("robustness", {}).get("settings"):
        from tally.data import load_splits

        domains = load_splits(spec.base["data"])["train"].domain_names
        table = search.robustness(spec, exp_dir, best["trial_id"], domains)
        print("\nrobustness of the chosen config (held-out runs selected on training-domain validation):")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nresults: {bucket.display(exp_dir)}")
    return 0


def cmd_benchmark(args) -> int:
    from tally import results
    from tally.search import benchmark

    spec = benchmark.load_benchmark_spec(args.spec, name_override=args.name)  # validated before Ray
    print(benchmark.dry_run_text(spec), flush=True)
    if args.dry_run:
        return 0
    out = benchmark.run_benchmark(spec, args.storage, address=args.address, quiet=not args.verbose)
    if spec.tuning is not None:  # one table per selection rule, then the tuning report
        print("\n" + benchmark.tuned_markdown(out, spec.resolved["tune"], spec.resolved["selection_metric"]))
        print(f"results: {results.experiment_dir(args.storage, spec.name)} "
              "(table.md; rules/<rule>/: each rule's tables; picks.csv, curves.csv, cost.csv)")
        return 0
    print("\n" + benchmark.markdown(out))
    print(f"results: {results.experiment_dir(args.storage, spec.name)} "
          "(table.md, table.tex, table.csv, differences.csv)")
    return 0


def cmd_report(args) -> int:
    from tally.evaluation.report import experiment_table, format_table, left_out, legend, seed_table
    from tally.results.storage import read_mirror

    experiment = read_mirror(args.experiment)  # a bucket store: a local mirror refreshed from it
    missing = left_out(experiment, args.group)
    if missing:  # said first: a table without them must not read as the whole experiment
        print(f"not in the table ({len(missing)} of the {args.group}):", file=sys.stderr)
        for line in missing:
            print(f"  {line}", file=sys.stderr)
    frame = experiment_table(experiment, args.split, args.group, replicates=args.replicates,
                             seed=args.bootstrap_seed, many_above=args.many_above, few_at_most=args.few_at_most)
    shown = seed_table(frame) if args.seeds else frame
    print(format_table(shown, args.format))
    print(("% " if args.format == "latex" else "") + legend(shown))
    if args.group == "trials":  # the run the experiment's one selection rule picks (results.select_trial)
        from tally import results

        best, selection = results.best_of_experiment(Path(experiment))  # the mirror of a bucket store
        if best is not None:
            print(f"selected: {best['trial_id']} ({selection.source})", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from tally.evaluation import METRIC_NAMES, calibration
    from tally.evaluation.intervals import LEGEND_DIFF, compare_runs, format_difference

    def is_calibration(m: str) -> bool:
        return m.removeprefix(calibration.TS_PREFIX) in calibration.METRIC_NAMES

    wanted = args.metric or list(METRIC_NAMES)
    unknown = [m for m in wanted if m not in METRIC_NAMES and not m.startswith("domain_acc:") and not is_calibration(m)]
    if unknown:
        raise TallyError(f"--metric: unknown metric {unknown[0]!r} (expected one of {', '.join(METRIC_NAMES)}, "
                         f"or {', '.join(calibration.METRIC_NAMES)}, with or without ts_)")
    frame, (name_a, name_b) = compare_runs(args.run_a, args.run_b, splits=args.split or None,
                                           replicates=args.replicates, seed=args.bootstrap_seed)
    # calibration (issue 24): paired too, on the same redrawn images; lower is better for most of them
    cal_wanted = [m for m in wanted if is_calibration(m)] if args.metric else list(calibration.HEADLINE)
    cal = calibration.calibration_differences(args.run_a, args.run_b, splits=sorted(set(frame["split"])),
                                              metrics=sorted({m.removeprefix(calibration.TS_PREFIX) for m in cal_wanted}),
                                              replicates=args.replicates, seed=args.bootstrap_seed)
    print(LEGEND_DIFF)
    for note in frame.attrs.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    for split, rows in frame.groupby("split", sort=False):
        print(f"{split}:")
        for metric in wanted:
            if is_calibration(metric):
                continue
            row = rows[rows["metric"] == metric]
            if row.empty:
                raise TallyError(f"--metric: {metric!r} not computed on split {split!r}")
            print("  " + format_difference(row.iloc[0], name_a, name_b))
        mine = cal[cal["split"] == split]
        if cal_wanted and mine.empty:
            print("  (no calibration: a run without logits.npz)")
        for metric in [m for m in cal_wanted + [calibration.TS_PREFIX + m for m in cal_wanted if not args.metric]
                       if m in set(mine["metric"])]:
            row = mine[mine["metric"] == metric].iloc[0]
            better = "higher" if calibration.higher_is_better(metric) else "lower"
            # no interval: the paired calibration bootstrap's coverage is not measured yet (docs/CONTRACTS.md)
            print(f"  {name_a} - {name_b} on {calibration.metric_label(metric)}: {row['diff']:+.3f} "
                  f"({better} is better; no interval: its coverage is not measured yet)")
    return 0


def cmd_reproduce(args) -> int:
    from tally.reproduce import reproduce

    print(reproduce(args.dataset, args.setting, args.protocol, args.seeds, args.root, args.out, args.dry_run,
                    args.replicates), flush=True)
    return 0


def cmd_demo(args) -> int:
    from tally.demo import run_demo

    return run_demo(Path(args.storage))


# ---------------------------------------------------------------- ship
def cmd_export(args) -> int:
    from tally.deploy.export import export_bundle, export_config, resolve_trial
    from tally.results.storage import fetch_run, read_mirror

    run_dir = resolve_trial(read_mirror(args.experiment), args.trial)
    fetch_run(run_dir)  # a bucket store: the chosen run's checkpoints too
    if args.config_only:
        print(f"config of {run_dir.name} written to {export_config(run_dir, Path(args.out), force=args.force)}")
        return 0
    out = export_bundle(run_dir, Path(args.out), force=args.force, onnx=args.onnx)
    print(f"exported {run_dir.name} to {out}")
    return 0


def cmd_predict(args) -> int:
    from tally.deploy.export import run_predict

    return run_predict(args.bundle, args.images, labels=args.labels, root=args.root, out=args.out,
                       top_k=args.top_k, batch_size=args.batch_size, device=args.device, workers=args.workers)


def cmd_serve(args) -> int:
    from tally.deploy.serve import serve_forever

    return serve_forever(args.bundle, host=args.host, port=args.port, address=args.address,
                         replicas=args.replicas, gpus=args.gpus, cpus=args.cpus, top_k=args.top_k,
                         max_batch_size=args.max_batch_size, max_bytes=args.max_bytes, max_pixels=args.max_pixels,
                         max_request_pixels=args.max_request_pixels, body_timeout_s=args.body_timeout,
                         request_timeout_s=args.request_timeout, decoders=args.decoders,
                         max_ongoing=args.max_ongoing, max_queued=args.max_queued)


# ---------------------------------------------------------------- look
def cmd_dashboard(args) -> int:
    from tally.dashboard.launch import launch
    from tally.results.storage import is_remote

    return launch(args.root if is_remote(args.root) else Path(args.root), port=args.port, address=args.address,
                  allow_remote=args.allow_remote)


# ---------------------------------------------------------------- arguments
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a config YAML, or a trial's run folder, experiment (its best trial; "
                                   "a bucket URI too) or bundle: its config")
    p.add_argument("--out", help="run folder (default results/runs/<config or trial>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config value")
    p.add_argument("--trial", help="with an experiment: this trial instead of the best on validation")
    p.add_argument("--final", action="store_true",
                   help="retrain on train + validation and keep the last epoch (train.final); the epochs are "
                        "the trial's kept epoch + 1 unless --epochs says otherwise")
    p.add_argument("--epochs", type=_ranged_int(1), help="train.epochs (with --final: instead of the trial's)")
    scale = p.add_argument_group("scale (workers > 1, a GPU, a CPU count or an address: data-parallel on Ray Train)")
    scale.add_argument("--workers", type=_ranged_int(1), default=1,
                       help="data-parallel workers; each draws train.batch_size (the global batch grows)")
    scale.add_argument("--gpus-per-worker", type=float, help="0 or 1 (NCCL); default 0")
    scale.add_argument("--cpus-per-worker", type=float, help="default 1")
    scale.add_argument("--address", help="a Ray cluster to join (default: a local Ray)")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--split", default="val", help="val, test_sub or test_domain:<name>")
    p.add_argument("--out", help="write the long (domain, class) table as CSV")


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--storage", default="results",
                   help="results store root: a folder (shared storage on a cluster) or s3://bucket/prefix, gs://...")
    p.add_argument("--name", help="experiment name (default: the spec's name)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.add_argument("--cache", metavar="DIR", help="folder every node sees where the search decodes its images "
                   "once before any trial (default: STORAGE/banks)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved spec and budget")
    p.add_argument("--confirm-seeds", type=_ranged_int(0), default=0, metavar="K",
                   help="re-run the best config with K more seeds")
    p.add_argument("--verbose", action="store_true", help="show Ray's own progress output")


def _benchmark_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--storage", default="results", help="results store root (shared storage on a cluster)")
    p.add_argument("--name", help="benchmark name (default: the spec's name)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the planned runs")
    p.add_argument("--verbose", action="store_true", help="show Ray's own progress output")


def _interval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicates", type=_ranged_int(1), default=1000, metavar="R",
                   help="draws for macro F1's 95%% interval (default 1000; other metrics need none)")
    p.add_argument("--bootstrap-seed", type=_ranged_int(0), default=0, help="seed of the interval draws (default 0)")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment")
    p.add_argument("--format", choices=("markdown", "latex"), default="markdown")
    p.add_argument("--split", help="one split (default: every test split)")
    p.add_argument("--group", default="trials", choices=("trials", "confirm", "robustness"))
    _interval_args(p)
    p.add_argument("--seeds", action="store_true",
                   help="fold runs that differ only in seed: mean ± standard error and each seed's value")
    p.add_argument("--many-above", type=_ranged_int(1), metavar="N",
                   help="many-shot: > N training images per pair (default: the dataset's; 100, OfficeHome 60)")
    p.add_argument("--few-at-most", type=_ranged_int(1), metavar="N",
                   help="few-shot: <= N training images per pair (default: the dataset's; 20, TerraIncognita 25)")


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--metric", action="append", help="a metric (repeatable; default: every metric)")
    p.add_argument("--split", action="append", help="a test split (repeatable; default: every test split)")
    _interval_args(p)


def _reproduce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET",
                   help="VLCS, PACS, OfficeHome, DomainNet, TerraIncognita, iWildCam, or embedded (small, CPU)")
    p.add_argument("--setting", choices=("sub", "domain"), default="sub",
                   help="sub, or domain: one run per held-out domain (TerraIncognita, iWildCam: their fixed split)")
    p.add_argument("--protocol", choices=("paper", "reference"), default="paper",
                   help="paper (ours) or reference (what the published code ran; docs/PROTOCOL.md)")
    p.add_argument("--seeds", type=_ranged_int(1), default=3)
    p.add_argument("--root", help="the data folder (default $TALLY_DATA)")
    p.add_argument("--out", help="output folder (default results/reproduce/<dataset>-<setting>-<protocol>)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and where selection looks; train nothing")
    p.add_argument("--replicates", type=_ranged_int(1), default=1000, metavar="R",
                   help="bootstrap replicates for the 95%% intervals (default 1000)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default="results")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment")
    p.add_argument("--trial")
    p.add_argument("--out", required=True, help="bundle folder (with --config-only: the config file)")
    p.add_argument("--force", action="store_true", help="replace a different bundle already at --out")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs the onnx extra)")
    p.add_argument("--config-only", action="store_true", help="write only the trial's complete run config")


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle")
    p.add_argument("images", nargs="*", help="image files, folders, or .txt lists of paths")
    p.add_argument("--labels", help="a split list '<domain>/<class>/<file> <label>': predict and score it")
    p.add_argument("--root", help="folder the --labels paths are relative to (default: the list's folder)")
    p.add_argument("--out", help="write predictions to a .csv or .parquet file (default: print them)")
    p.add_argument("--top-k", type=_ranged_int(1), default=1, help="also write the k most probable classes")
    p.add_argument("--batch-size", type=_ranged_int(1, 4096), default=64,
                   help="images per forward pass (bounds memory)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the GPU when there is one")
    p.add_argument("--workers", type=_ranged_int(0), default=0, help="decoding processes")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default localhost only)")
    p.add_argument("--port", type=_ranged_int(1, 65535), default=8000)
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--replicas", type=_ranged_int(1), default=1)
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica (fractions share a GPU)")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--top-k", type=_ranged_int(1), default=5)
    p.add_argument("--max-batch-size", type=_ranged_int(1, 4096), default=32, help="images per batched forward pass")
    p.add_argument("--max-bytes", type=_ranged_int(1), default=16 * 2**20, help="largest request body")
    p.add_argument("--max-pixels", type=_ranged_int(1), default=40_000_000, help="largest image (width x height)")
    # the serving limits (platform/README.md "Serving limits"); defaults as tally.deploy.serve's DEFAULT_*
    p.add_argument("--max-request-pixels", type=_ranged_int(1), default=100_000_000,
                   help="pixels of all images of one request together, read from headers before decoding")
    p.add_argument("--body-timeout", type=_ranged_float(0.1), default=20.0, help="seconds to receive a request body")
    p.add_argument("--request-timeout", type=_ranged_float(0.1), default=60.0, help="seconds to answer a request")
    p.add_argument("--decoders", type=_ranged_int(1, 64), default=2, help="image-decoding threads per replica")
    p.add_argument("--max-ongoing", type=_ranged_int(1), default=8, help="requests a replica works on at once")
    p.add_argument("--max-queued", type=_ranged_int(0), default=32,
                   help="requests waiting per proxy; past it the server answers 503")


def _dashboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", nargs="?", default="results")
    p.add_argument("--port", type=_ranged_int(1, 65535), default=8501)
    p.add_argument("--address", default="127.0.0.1", help="bind address (default localhost only; "
                   "share through an SSH tunnel or an authenticating reverse proxy: docs/DASHBOARD.md)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow an --address other than loopback (no login: anyone who reaches it reads the store)")


@dataclass(frozen=True)
class Command:
    handler: Callable[[argparse.Namespace], int]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]


COMMANDS: dict[str, Command] = {
    "train": Command(cmd_train, "one training run from a config YAML", _train_args),
    "evaluate": Command(cmd_evaluate, "evaluate a run's kept checkpoint on one split", _evaluate_args),
    "search": Command(cmd_search, "run a hyperparameter search from a spec YAML on Ray", _search_args),
    "benchmark": Command(cmd_benchmark, "methods x seeds x settings on Ray: the MDLT table, paired differences",
                         _benchmark_args),
    "report": Command(cmd_report, "DomainBed-style tables of an experiment, with intervals", _report_args),
    "compare": Command(cmd_compare, "paired difference of two runs on the same test set, with intervals",
                       _compare_args),
    "reproduce": Command(cmd_reproduce, "the paper's fixed configuration for a dataset (no search): its table",
                         _reproduce_args),
    "export": Command(cmd_export, "write a deployable bundle of a trial (default: the best)", _export_args),
    "predict": Command(cmd_predict, "classify images (files, folders, list files) with a bundle", _predict_args),
    "serve": Command(cmd_serve, "serve a bundle over HTTP on Ray Serve (POST /predict, GET /health)", _serve_args),
    "dashboard": Command(cmd_dashboard, "browse a results store in the browser", _dashboard_args),
    "demo": Command(cmd_demo, "TALLY, ERM and re-weighting tuned alike on the embedded data, then compared",
                    _demo_args),
}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line and exit 2 like every other user error (`tally CMD -h` shows usage)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tally", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", dest="show_traceback", action="store_true",
                        help="with an error, print its traceback too (tally --verbose COMMAND ...)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        command.arguments(p)
        p.set_defaults(func=command.handler)
    # `tally data ...` and `tally splits ...`: command groups of the data package, kept beside it
    from tally.data.cli import add_commands as add_data_commands

    add_data_commands(sub)
    return parser


def _parse_override(text: str) -> tuple[str, object]:
    import yaml

    from tally.config import parse_yaml

    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise TallyError(f"--set {text!r}: expected SECTION.FIELD=VALUE, e.g. train.epochs=3")
    try:
        return key, parse_yaml(value)
    except yaml.YAMLError as e:
        raise TallyError(f"--set {text!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None


def _ranged_int(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high], or argparse's own one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {value}")
        return value
    return parse



def _ranged_float(low: float):
    """An argparse type: a finite number >= low."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a number >= {low:g}, got {text}")
        return value
    return parse

def _print_metrics(metrics: dict) -> None:
    for split, values in metrics.items():
        shown = "  ".join(f"{k} {v:.3f}" for k, v in values.items() if v == v)
        print(f"{split:>24s}: {shown}")


def user_error(exc: BaseException) -> str | None:
    """The one line to print for an error the user caused (their file, value or flag); None for a bug.

    TallyError already names the culprit. The others are content the library met while reading a
    user's file deep inside a parser (an encoding, a YAML or pickle stream, an image bomb): named by
    type and message, since the place that raised them knows no better.
    """
    import pickle

    import yaml

    if isinstance(exc, TallyError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, yaml.YAMLError):
        return f"not valid YAML ({str(exc).splitlines()[0]})"
    if isinstance(exc, pickle.UnpicklingError):
        return f"refused to load: not a safe checkpoint ({str(exc).splitlines()[0][:200]})"
    if type(exc).__name__ == "DecompressionBombError":  # PIL's, without importing PIL here
        return f"image too large: {exc}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full: no space left on device{f' writing {exc.filename}' if exc.filename else ''}"
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = user_error(e)
        if line is None:
            raise  # a bug: the traceback is what a report needs
        if args.show_traceback:
            import traceback

            traceback.print_exc()
        print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
