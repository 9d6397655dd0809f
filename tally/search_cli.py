"""CLI commands around searches: search, export, predict, report, demo."""

from __future__ import annotations

import time
from pathlib import Path


def cmd_search(args) -> int:
    from tally.spec import load_spec
    from tally.spec_text import dry_run_text

    spec = load_spec(args.spec, name_override=args.name)  # validated: nothing written before this
    if args.dry_run:
        print(dry_run_text(spec))
        return 0
    from tally import search

    started = time.time()
    summary = search.run_search(spec, args.storage, address=args.address, resume=args.resume,
                                quiet=not args.verbose)
    exp_dir = search.experiment_dir(args.storage, spec.name)
    counts = summary["status"].value_counts().to_dict() if not summary.empty else {}
    print(f"search {spec.name}: {len(summary)} trials ({', '.join(f'{v} {k}' for k, v in counts.items())}) "
          f"in {time.time() - started:.0f}s")
    selection = spec.resolved["selection"]
    best = search.best_trial(summary, selection["metric"], selection["mode"])
    if best is None:
        print("no trial finished: nothing to select")
        return 1
    metric = selection["metric"]
    print(f"best trial on validation {metric}: {best['trial_id']}  val {best[f'val/{metric}']:.3f}")
    for column in sorted(c for c in summary.columns if c.startswith("test_") and c.endswith(f"/{metric}")):
        print(f"  {column}: {best[column]:.3f}")
    if args.confirm_seeds:
        table = search.confirm_seeds(spec, exp_dir, best["trial_id"], args.confirm_seeds)
        print(f"\nbest config re-run with {args.confirm_seeds} seeds (mean +- standard error):")
        for row in table.itertuples():
            print(f"  {row.split:>22s} {row.metric:>16s} {row.mean:.3f} +- {row.stderr:.3f}")
    if spec.resolved.get("robustness", {}).get("settings"):
        from tally.data import load_splits

        base = spec.resolved["base"]
        domains = load_splits(base["data"])["train"].domain_names
        table = search.robustness(spec, exp_dir, best["trial_id"], domains)
        print("\nrobustness of the chosen config (held-out runs selected on training-domain validation):")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nresults: {exp_dir}")
    return 0


def cmd_export(args) -> int:
    from tally.export import export_bundle, export_config, resolve_trial

    run_dir = resolve_trial(Path(args.experiment), args.trial)
    if args.config_only:
        print(f"config of {run_dir.name} written to {export_config(run_dir, Path(args.out), force=args.force)}")
        return 0
    out = export_bundle(run_dir, Path(args.out), force=args.force, onnx=args.onnx)
    print(f"exported {run_dir.name} to {out}")
    return 0


def cmd_predict(args) -> int:
    from tally.export import run_predict

    return run_predict(args.bundle, args.images, labels=args.labels, root=args.root, out=args.out,
                       top_k=args.top_k, batch_size=args.batch_size, device=args.device, workers=args.workers)


def cmd_report(args) -> int:
    from tally.report import experiment_table, format_table

    print(format_table(experiment_table(Path(args.experiment), args.split, args.group), args.format))
    return 0


def cmd_demo(args) -> int:
    from tally.demo import run_demo

    return run_demo(Path(args.storage))


def add_commands(sub) -> None:
    p = sub.add_parser("search", help="run a hyperparameter search from a spec YAML on Ray")
    p.add_argument("spec")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--storage", default="results", help="results store root (shared storage on a cluster)")
    p.add_argument("--name", help="experiment name (default: the spec's name)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved spec and budget")
    p.add_argument("--confirm-seeds", type=int, default=0, metavar="K",
                   help="re-run the best config with K more seeds")
    p.add_argument("--verbose", action="store_true", help="show Ray's own progress output")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="write a deployable bundle of a trial (default: the best)")
    p.add_argument("experiment")
    p.add_argument("--trial")
    p.add_argument("--out", required=True, help="bundle folder (with --config-only: the config file)")
    p.add_argument("--force", action="store_true", help="replace a different bundle already at --out")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs the onnx extra)")
    p.add_argument("--config-only", action="store_true", help="write only the trial's complete run config")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="classify images (files, folders, list files) with an exported bundle")
    p.add_argument("bundle")
    p.add_argument("images", nargs="*", help="image files, folders, or .txt lists of paths")
    p.add_argument("--labels", help="a split list '<domain>/<class>/<file> <label>': predict and score it")
    p.add_argument("--root", help="folder the --labels paths are relative to (default: the list's folder)")
    p.add_argument("--out", help="write predictions to a .csv or .parquet file (default: print them)")
    p.add_argument("--top-k", type=int, default=1, help="also write the k most probable classes")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (bounds memory)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="decoding processes")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="DomainBed-style tables of an experiment")
    p.add_argument("experiment")
    p.add_argument("--format", choices=("markdown", "latex"), default="markdown")
    p.add_argument("--split", help="one split (default: every test split)")
    p.add_argument("--group", default="trials", choices=("trials", "confirm", "robustness"))
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the quickstart search on the embedded data, then export the best")
    p.add_argument("--storage", default="results")
    p.set_defaults(func=cmd_demo)
