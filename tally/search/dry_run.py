"""What `tally search --dry-run` prints: the resolved spec, the space and the budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tally.search.space import upper_bound

if TYPE_CHECKING:
    from tally.search.spec import Spec


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def space_table(space: dict) -> str:
    rows = [("parameter", "distribution", "range / choices", "when")]
    for path, p in space.items():
        if p["type"] == "categorical":
            rng = ", ".join(_fmt(c) for c in p["choices"])
        else:
            rng = f"[{_fmt(p['low'])}, {_fmt(p['high'])}]"
            if p.get("step", 1) != 1:
                rng += f" step {p['step']}"
        when = ", ".join(f"{k} = {_fmt(v)}" for k, v in p.get("when", {}).items())
        rows.append((path, p["type"], rng, when))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def budget_text(spec: Spec) -> str:
    """What --dry-run prints about cost: trials, epochs, resources, early stopping, the space."""
    r = spec.resolved
    budget, res, es, train = r["budget"], r["resources"], r["budget"]["early_stopping"], r["base"]["train"]
    epochs, steps = upper_bound(r, "train.epochs"), upper_bound(r, "train.steps_per_epoch")
    up_to = "up to " if "train.epochs" in r["space"] else ""
    at_once = min(budget["concurrency"], budget["trials"])
    if es["enabled"]:
        rungs, t = [], es["grace_epochs"]
        while t < epochs:
            rungs.append(str(t))
            t *= es["reduction_factor"]
        stopping = (f"ASHA on {spec.metric}: trials compared after epoch(s) {', '.join(rungs)}; "
                    f"the best 1/{es['reduction_factor']} continue")
    else:
        stopping = "off (every trial runs all its epochs)"
    rob = r["robustness"]
    robust = "none" if not rob["settings"] else (
        ", ".join(rob["settings"]) + f" x {rob['seeds']} seed(s) after the search"
        + (" (each_domain: one run per domain)" if "each_domain" in rob["settings"] else ""))
    worker = f"{_fmt(res['cpus_per_worker'])} CPU, {_fmt(res['gpus_per_worker'])} GPU"
    lines = [
        f"experiment      {spec.name}",
        f"selection       {spec.metric} ({spec.mode}) on validation; best epoch by {train['selection_metric']}",
        f"trials          {budget['trials']}, at most {budget['concurrency']} at once",
        f"per trial       {up_to}{epochs} epochs x {steps} steps (warm-up {train['warmup_epochs']}"
        f"{', searched' if 'train.warmup_epochs' in r['space'] else ''}), batch {train['batch_size']}",
        f"total           at most {budget['trials'] * epochs} epochs = {budget['trials'] * epochs * steps} steps",
        f"resources       {res['workers']} worker(s) x ({worker}) per trial"
        f"{' (the trial is its worker)' if res['workers'] == 1 else ' + 1 TRAIN_DRIVER slot'}; "
        f"{at_once} at once: {_fmt(at_once * res['workers'] * res['cpus_per_worker'])} CPU, "
        f"{_fmt(at_once * res['workers'] * res['gpus_per_worker'])} GPU",
        f"early stopping  {stopping}",
        f"robustness      {robust}",
        f"sampler         Optuna TPE, seed {_fmt(r['seed'])}",
        f"space           {len(r['space'])} parameter(s)",
        space_table(r["space"]),
    ]
    return "\n".join(lines)


def dry_run_text(spec: Spec) -> str:
    """`tally search SPEC --dry-run`: the resolved spec, then the budget."""
    return f"# resolved spec ({spec.source})\n{spec.to_yaml()}\n# budget\n{budget_text(spec)}\n"
