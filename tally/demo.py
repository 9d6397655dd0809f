"""`make demo`: the quickstart search on the embedded data, export of the best trial, a prediction."""

from __future__ import annotations

import time
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "searches" / "quickstart.yaml"


def run_demo(storage: Path) -> int:
    from tally import results, search
    from tally.data import describe, load_splits
    from tally.export import Predictor, export_bundle

    started = time.time()
    spec = search.load_spec(QUICKSTART, name_override=f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}")
    splits = load_splits(spec.resolved["base"]["data"])
    print(describe(splits), flush=True)
    print(f"\nsearching: {spec.resolved['budget']['trials']} trials of TALLY on the embedded data "
          f"(Ray Tune + Optuna, local Ray) ...", flush=True)
    summary = search.run_search(spec, storage)
    exp_dir = results.experiment_dir(storage, spec.name)
    best, selection = results.best_of_experiment(exp_dir, summary)
    metric = selection.metric.split("/", 1)[1]
    columns = ["trial_id", "status", *[c for c in summary.columns if c.startswith("param.")],
               selection.metric, f"test_sub/{metric}"]
    print(summary[[c for c in columns if c in summary]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if best is None:
        print("no trial finished; see the trial folders for errors")
        return 1
    bundle = export_bundle(exp_dir / "trials" / best["trial_id"], exp_dir / "bundle")
    test = splits["test_sub"]
    sample = [test.samples["path"].iloc[i] for i in range(0, len(test), max(1, len(test) // 3))][:3]
    print(f"\nbest trial {best['trial_id']} (val {metric} {best[selection.metric]:.3f}); "
          f"bundle: {bundle}")
    for path, label, confidence in Predictor(bundle).predict(sample):
        truth = test.class_names[int(test.samples.loc[test.samples['path'] == path, 'label'].iloc[0])]
        print(f"  predict {Path(path).parent.parent.name}/{Path(path).name}: {label} ({confidence:.2f}), truth {truth}")
    print(f"\nresults:   {exp_dir}\nbundle:    {bundle}\ndashboard: .venv/bin/tally dashboard {storage}"
          f"\nreport:    .venv/bin/tally report {exp_dir}\ndemo took {time.time() - started:.0f}s")
    return 0
