"""Realistic results stores for the dashboard tests and benchmark, without training anything.

Why synthetic: a real search takes minutes; the dashboard only reads files. Every file is written
with the store's own writers (``tally.results``) and every eval table with the evaluator's
``pair_table`` on synthetic predictions, so the store has exactly the layout and columns a real run
writes: long-tailed training counts per domain, pairs without test examples, a held-out domain,
trials that are done, running (with and without results), failed and ASHA-stopped, and on request
the robustness runs of the chosen config and an Optuna study.

Use ``make_store(tmp_path)`` for the standard two-experiment store and ``make_experiment`` for one
experiment of any size (the benchmark makes 500 and 5,000 trials; ``classes=345`` makes a
DomainNet-sized grid).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tally import evaluation as ev
from tally import results

DOMAINS = ("photo", "art_painting", "cartoon", "sketch")
CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
EPOCHS, WARMUP = 8, 3
T0 = 1_750_000_000.0  # a fixed start time: stores are byte-reproducible apart from mtimes
ERROR = ("Traceback (most recent call last):\n  File \"tally/training/run.py\", line 212, in fit\n"
         "    loss.backward()\nRuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")


@dataclass
class Experiment:
    """What a generated experiment holds, so tests can assert against it."""

    path: Path
    statuses: dict[str, str]  # trial_id -> status as written ("pending" = config.yaml only)
    best: str | None  # best trial by the spec's selection metric (finished trials only)
    splits: tuple[str, ...]
    domains: tuple[str, ...] = DOMAINS
    classes: tuple[str, ...] = CLASSES
    metric: str = "val/pair_acc_worst"
    robustness: dict[str, str] = field(default_factory=dict)  # run id -> status, as written

    def trials_with(self, status: str) -> list[str]:
        return [t for t, s in self.statuses.items() if s == status]


@dataclass
class Store:
    root: Path
    experiments: dict[str, Experiment] = field(default_factory=dict)


@dataclass(frozen=True)
class Names:
    """The domains and classes of a generated dataset (PACS-like by default)."""

    domains: tuple[str, ...] = DOMAINS
    classes: tuple[str, ...] = CLASSES

    @classmethod
    def of(cls, domains=DOMAINS, classes=CLASSES) -> Names:
        """``classes`` may be a count: ``class_000`` ... (a DomainNet-sized grid is ``classes=345``)."""
        if isinstance(classes, int):
            classes = tuple(f"class_{i:03d}" for i in range(classes))
        return cls(tuple(domains), tuple(classes))


def _train_counts(rng: np.random.Generator, held_out: tuple[str, ...], names: Names = Names()) -> np.ndarray:
    """Per-domain long tails: each domain ranks the classes its own way; a few zero-shot pairs."""
    D, C = len(names.domains), len(names.classes)
    counts = np.zeros((D, C), dtype=np.int64)
    ladder = np.round(300 * 0.02 ** (np.arange(C) / (C - 1))).astype(np.int64)  # 300 .. 6
    for d, name in enumerate(names.domains):
        if name in held_out:
            continue
        counts[d, rng.permutation(C)] = ladder
        counts[d, rng.integers(C)] = 0  # one class absent from training in each domain
    return counts


def _split_data(split: str, held_out: tuple[str, ...], per_pair: int, names: Names):
    """Labels and domains of a balanced evaluation split; some pairs have no examples."""
    C = len(names.classes)
    cells = []
    for d, name in enumerate(names.domains):
        wanted = name == split.split(":", 1)[1] if split.startswith("test_domain:") else name not in held_out
        if not wanted:
            continue
        c = np.arange(C)
        if split != "val":
            c = c[(d + 3 * c) % 11 != 5]  # pairs the split does not contain: empty cells in the grid
        cells.append(np.stack([np.full(len(c), d), c], axis=1))
    cells = np.concatenate(cells) if cells else np.zeros((0, 2), dtype=np.int64)
    pairs = np.repeat(cells, per_pair, axis=0)
    return pairs[:, 1].astype(np.int64), pairs[:, 0].astype(np.int64)


def _predict(rng, labels, domains, train_counts, quality: float, held_out_ids, n_classes: int) -> np.ndarray:
    """Predictions whose accuracy grows with the pair's training count and the trial's quality."""
    n_train = train_counts[domains, labels]
    p = quality * (0.35 + 0.6 * np.log1p(n_train) / math.log1p(300))
    p = np.where(np.isin(domains, held_out_ids), p - 0.15, p)
    p = np.clip(p + rng.normal(0, 0.03, len(labels)), 0.02, 0.98)
    right = rng.random(len(labels)) < p
    wrong = (labels + rng.integers(1, n_classes, len(labels))) % n_classes
    return np.where(right, labels, wrong)


def eval_table(rng, train_counts, splits, held_out, quality, names: Names = Names()) -> pd.DataFrame:
    """The long table of every split, via ``evaluation.pair_table``."""
    held_ids = [names.domains.index(h) for h in held_out]
    parts = []
    for split in splits:
        labels, domains = _split_data(split, held_out, 20 if split == "val" else 10, names)
        preds = _predict(rng, labels, domains, train_counts, quality, held_ids, len(names.classes))
        parts.append(ev.pair_table(split, preds, labels, domains, list(names.classes), list(names.domains),
                                   train_counts))
    return pd.concat(parts, ignore_index=True)


def _params(rng, method: str) -> dict:
    return {"method.name": method, "train.lr": float(10 ** rng.uniform(-6, -3)),
            "method.alpha": round(float(rng.uniform(0.1, 2.0)), 3),
            "method.momentum": round(float(rng.uniform(0.5, 0.99)), 3),
            "model.cut": str(rng.choice(["layer1", "layer2", "layer3"])),
            "method.fold": bool(rng.random() < 0.5)}


def _quality(params: dict) -> float:
    """A smooth made-up response surface, so importance and the search plots have a signal."""
    lr_term = -0.12 * (math.log10(params["train.lr"]) + 4.5) ** 2
    cut = {"layer1": -0.05, "layer2": 0.05, "layer3": 0.0}[params["model.cut"]]
    tally = 0.06 if params["method.name"] == "tally" else 0.0
    return float(np.clip(1.0 + lr_term + cut + tally + 0.03 * params["method.alpha"], 0.4, 1.15))


def _config(params: dict, setting: str, held_out: tuple[str, ...], seed: int) -> dict:
    cfg = {"data": {"source": "embedded", "dataset": "PACS-synthetic", "setting": setting,
                    "held_out": list(held_out), "split_seed": 0, "image_size": 32},
           "model": {"arch": "resnet18", "cut": "layer2", "pretrained": None},
           "method": {"name": "tally", "alpha": 0.5, "fold": True, "momentum": 0.8, "loss_beta": 0.999},
           "train": {"epochs": EPOCHS, "warmup_epochs": WARMUP, "steps_per_epoch": 50, "batch_size": 18,
                     "optimizer": "adam", "lr": 1e-5, "weight_decay": 1e-6, "seed": seed,
                     "selection_metric": "pair_acc_worst", "device": "cpu"}}
    for key, value in params.items():
        section, name = key.split(".", 1)
        cfg[section][name] = value
    return cfg


def _epochs(rng, run_dir: Path, last: int, final_val: dict, best_epoch: int) -> None:
    """epochs.jsonl: loss falling, val metrics rising to their selected-epoch values."""
    lines = []
    for e in range(1, last + 1):
        rec = {"epoch": e, "phase": "warmup" if e <= WARMUP else "main",
               "train_loss": float(2.0 * math.exp(-e / 3) + 0.2 + rng.normal(0, 0.02)),
               "seconds": float(30 + rng.normal(0, 2))}
        for name in ("acc", "pair_acc_mean", "pair_acc_worst", "macro_f1"):
            final = final_val.get(name, float("nan"))
            rising = final * (1 - 0.4 * math.exp(-e / 2)) - 0.01 * abs(e - best_epoch)
            value = final if e == best_epoch else rising
            rec[f"val/{name}"] = float(value)
        lines.append(json.dumps(rec, sort_keys=True) + "\n")
    results.write_text(run_dir / "epochs.jsonl", "".join(lines))


def _status_plan(n: int) -> list[str]:
    """Mostly done, with one of each other state when there is room (running twice: with/without epochs)."""
    plan = ["done"] * n
    others = ("pending", "running", "failed", "stopped", "stopped")
    for i, status in zip((n - 1, n - 2, n - 3, n - 4, n - 5), others, strict=True):
        if i >= 2:
            plan[i] = status
    return plan


def make_trial(exp_dir: Path, trial_id: str, status: str, params: dict, rng, *, setting: str,
               held_out: tuple[str, ...], order: int, train_counts: np.ndarray, names: Names = Names(),
               group: str = results.TRIALS_DIR) -> dict | None:
    """One trial folder (under ``group``: trials, or robustness); returns its metrics (None when it has none)."""
    run_dir = exp_dir / group / trial_id
    seed = order
    results.write_yaml(run_dir / "config.yaml", _config(params, setting, held_out, seed))
    if status == "pending":  # a trial Ray has just started: config.yaml only
        return None
    started = T0 + 60.0 * order
    splits = ("val", "test_sub", *(f"test_domain:{h}" for h in held_out))
    last = {"done": EPOCHS, "running": 2, "failed": 4, "stopped": 5}[status]
    if status in ("done", "stopped"):
        table = eval_table(rng, train_counts, splits, held_out, _quality(params), names)
        metrics = ev.all_metrics(table)
        best_epoch = max(1, last - int(rng.integers(0, 3)))
        _epochs(rng, run_dir, last, metrics["val"], best_epoch)
        results.write_parquet(run_dir / "eval.parquet", table)
        results.write_json(run_dir / "metrics.json", metrics)
        fields = {"ended": started + 30.0 * last, "best_epoch": best_epoch}
    else:
        _epochs(rng, run_dir, last, {"acc": 0.5, "pair_acc_mean": 0.45, "pair_acc_worst": 0.1,
                                     "macro_f1": 0.4}, last)
        metrics = None
        fields = {"error": ERROR, "ended": started + 30.0 * last} if status == "failed" else {}
    results.write_status(run_dir, status, started=started, epoch=last, params=params,
                         node=f"node-{order % 2}", **fields)
    return metrics


def make_experiment(root: Path, name: str = "pacs-domain", n_trials: int = 10, *, seed: int = 0,
                    setting: str = "domain", held_out: tuple[str, ...] = ("sketch",), summary: bool = True,
                    spec: bool = True, study: bool = False, statuses: list[str] | None = None,
                    methods: tuple[str, ...] = ("tally",), selection: str = "val/pair_acc_worst",
                    domains: tuple[str, ...] = DOMAINS, classes: tuple[str, ...] | int = CLASSES,
                    robustness: bool = False) -> Experiment:
    """One experiment folder: spec.yaml, trials/<id>/, summary.parquet; study.db and the robustness
    runs of the best trial (robustness/<run>/ and robustness.parquet, as ``tally search`` writes
    them) when asked for."""
    rng = np.random.default_rng(seed)
    names = Names.of(domains, classes)
    exp_dir = Path(root) / name
    held_out = held_out if setting == "domain" else ()
    train_counts = _train_counts(rng, held_out, names)
    if spec:
        results.write_yaml(exp_dir / "spec.yaml", {
            "name": name, "data": {"source": "embedded", "setting": setting, "held_out": list(held_out)},
            "search": {"train.lr": {"loguniform": [1e-6, 1e-3]}, "method.alpha": {"uniform": [0.1, 2.0]},
                       "method.momentum": {"uniform": [0.5, 0.99]},
                       "model.cut": {"choice": ["layer1", "layer2", "layer3"]},
                       "method.fold": {"choice": [True, False]}},
            "budget": {"num_samples": n_trials, "max_concurrent": 2},
            "selection": {"metric": selection.removeprefix("val/"), "mode": "max"},
            "scheduler": {"name": "asha", "grace_period": 3},
            "robustness": {"settings": ["sub", "each_domain"] if robustness else [], "seeds": 1}})
    plan = statuses or _status_plan(n_trials)
    written, objective, all_params = {}, {}, {}
    for i, status in enumerate(plan):
        trial_id = f"trial_{i:04d}"
        params = _params(rng, methods[i % len(methods)])
        metrics = make_trial(exp_dir, trial_id, status, params, rng, setting=setting, held_out=held_out,
                             order=i, train_counts=train_counts, names=names)
        written[trial_id] = status
        all_params[trial_id] = params
        if metrics is not None:  # done and ASHA-stopped trials: both reach the Optuna study
            split, metric = selection.split("/", 1)
            objective[trial_id] = metrics[split][metric]
    if summary:
        results.refresh_summary(exp_dir)
    if study:
        _write_study(exp_dir / "study.db", name, all_params, objective, written)
    # the platform's one rule (done trials only, validation only, ties to the mean pair accuracy)
    chosen = results.best_trial(results.summarise(exp_dir), selection, "max")
    best = None if chosen is None else str(chosen["trial_id"])
    splits = ("val", "test_sub", *(f"test_domain:{h}" for h in held_out))
    exp = Experiment(exp_dir, written, best, splits, names.domains, names.classes, metric=selection)
    if robustness and best is not None:
        exp.robustness = _robustness(exp_dir, all_params[best], rng, names, seed=len(plan))
    return exp


def _robustness(exp_dir: Path, params: dict, rng, names: Names, seed: int) -> dict[str, str]:
    """The chosen config re-run on the sub-shift setting and with each domain held out (one seed),
    plus robustness.parquet, with the rows ``tally.search.run.robustness`` writes (test splits only).
    The last held-out run is left running: its row is what a store looks like mid-way."""
    runs = [("sub", "sub", ())] + [(f"heldout-{d}", "domain", (d,)) for d in names.domains]
    written, rows = {}, []
    for k, (label, setting, held) in enumerate(runs):
        run_id = f"{label}-seed{seed}"
        status = "running" if k == len(runs) - 1 else "done"
        counts = _train_counts(rng, held, names)
        metrics = make_trial(exp_dir, run_id, status, params, rng, setting=setting, held_out=held,
                             order=seed + k, train_counts=counts, names=names, group="robustness")
        written[run_id] = status
        rows += [{"run": run_id, "split": split, **values}
                 for split, values in (metrics or {}).items() if split != "val"]
    results.write_parquet(exp_dir / "robustness.parquet", pd.DataFrame(rows))
    return written


def _write_study(path: Path, name: str, params: dict[str, dict], values: dict[str, float],
                 statuses: dict[str, str]) -> None:
    """An Optuna study as the search stores it: done trials COMPLETE with their selection value,
    ASHA-stopped ones PRUNED with their intermediate value (tally.search.searcher tells Optuna so),
    in trial order."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {"train.lr": optuna.distributions.FloatDistribution(1e-6, 1e-3, log=True),
             "method.alpha": optuna.distributions.FloatDistribution(0.1, 2.0),
             "method.momentum": optuna.distributions.FloatDistribution(0.5, 0.99),
             "model.cut": optuna.distributions.CategoricalDistribution(["layer1", "layer2", "layer3"]),
             "method.fold": optuna.distributions.CategoricalDistribution([True, False])}
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}", direction="maximize")
    trials = []
    for trial_id, value in values.items():
        chosen = {k: params[trial_id][k] for k in dists}
        if statuses[trial_id] == "done":
            trials.append(optuna.trial.create_trial(params=chosen, distributions=dists, value=value))
        else:
            trials.append(optuna.trial.create_trial(params=chosen, distributions=dists, intermediate_values={
                0: value}, state=optuna.trial.TrialState.PRUNED))
    study.add_trials(trials)


def make_store(root: Path, n_trials: int = 10, *, summary: bool = True, study: bool = False) -> Store:
    """The standard test store: a held-out-domain search and a small TALLY-vs-ERM sub-shift search."""
    root = Path(root)
    store = Store(root)
    store.experiments["pacs-domain"] = make_experiment(root, "pacs-domain", n_trials, seed=0, summary=summary,
                                                       study=study)
    store.experiments["pacs-sub"] = make_experiment(root, "pacs-sub", 4, seed=1, setting="sub",
                                                    summary=summary, methods=("tally", "erm"),
                                                    statuses=["done"] * 4)
    return store


def strip_to_old_version(exp: Experiment) -> None:
    """Make the store look written by an older version: no summary.parquet, no metrics.json."""
    (exp.path / "summary.parquet").unlink(missing_ok=True)
    for trial in exp.path.glob(f"{results.TRIALS_DIR}/*/metrics.json"):
        trial.unlink()


def write_logits(run_dir: Path, seed: int = 24) -> None:
    """logits.npz for a done trial, consistent with its eval.parquet: per pair, ``correct`` examples
    whose argmax is their label and the rest argmax the next class, with confidences that vary (so the
    reliability diagram has something to show). A separate random stream: the store's others are
    unchanged."""
    from tally.evaluation import calibration

    rng = np.random.default_rng(seed)
    table = results.read_parquet(run_dir / "eval.parquet")
    n_classes = int(table["class_idx"].max()) + 1
    arrays = {}
    for split, rows in table.groupby("split", sort=False):
        rows = rows[rows["n"] > 0]
        labels = np.repeat(rows["class_idx"].to_numpy(), rows["n"].to_numpy())
        domains = np.repeat(rows["domain_idx"].to_numpy(), rows["n"].to_numpy())
        rank = np.arange(len(labels)) - np.repeat(np.cumsum(rows["n"].to_numpy()) - rows["n"].to_numpy(),
                                                  rows["n"].to_numpy())
        right = rank < np.repeat(rows["correct"].to_numpy(), rows["n"].to_numpy())
        top = np.where(right, labels, (labels + 1) % n_classes)
        logits = rng.normal(0, 0.5, (len(labels), n_classes))
        logits[np.arange(len(labels)), top] += rng.uniform(1.0, 5.0, len(labels))
        arrays[str(split)] = (logits, labels, domains)
    calibration.write_logits(run_dir, arrays)
