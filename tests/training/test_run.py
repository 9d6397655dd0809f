"""One training run on the embedded data: it learns, writes the store layout, resumes exactly, keeps
only epochs after the warm-up, and refuses settings that cannot work before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tally import evaluation, results
from tally.errors import TallyError
from tally.evaluation import calibration, intervals
from tally.training import evaluate_run_split, train_run
from tally.training.checkpoints import load_checkpoint


def tiny_config(**train) -> dict:
    return {
        "data": {"source": "embedded", "setting": "domain", "held_out": ["noisy"]},
        "model": {"arch": "resnet10", "cut": "layer2"},
        "method": {"name": "tally"},
        "train": {"epochs": 4, "warmup_epochs": 1, "steps_per_epoch": 25, "batch_size": 32, "lr": 2e-3,
                  "device": "cpu", **train},
    }


@pytest.mark.slow
def test_training_learns_and_writes_the_run_folder(tmp_path):
    metrics = train_run(tiny_config(), tmp_path / "run")
    run = results.read_run(tmp_path / "run")
    assert run.state == "done" and not run.missing
    assert set(run.eval_table["split"]) == {"val", "test_sub", "test_domain:noisy"}
    # 10 classes: chance is 0.1 on balanced validation
    assert metrics["val"]["pair_acc_mean"] > 0.3
    assert len(run.epochs) == 4 and list(run.epochs["phase"]) == ["warmup", "main", "main", "main"]
    main = run.epochs[run.epochs["phase"] == "main"]  # the warm-up epoch is never kept
    assert run.status["best_epoch"] == int(main["val/pair_acc_mean"].idxmax())
    # the held-out domain never appears in training counts
    held = run.eval_table[run.eval_table["domain"] == "noisy"]
    assert (held["n_train"] == 0).all()

    # `tally evaluate` re-scores the kept checkpoint from the run folder alone: same numbers
    table, again = evaluate_run_split(tmp_path / "run", "test_domain:noisy")
    assert again == pytest.approx(metrics["test_domain:noisy"], nan_ok=True)

    # the kept checkpoint's logits of every evaluated split (val included), in predictions' order,
    # and the temperature fitted on val alone
    logits = calibration.read_logits(tmp_path / "run")
    assert set(logits) == {"val", "test_sub", "test_domain:noisy"}
    preds = intervals.read_predictions(tmp_path / "run")
    for split in ("test_sub", "test_domain:noisy"):
        mine = preds[preds["split"] == split].sort_values("index")
        assert (logits[split][0].argmax(1) == mine["prediction"].to_numpy()).all()
        assert (logits[split][1] == mine["label"].to_numpy()).all()
    info = results.read_json(tmp_path / "run" / calibration.CALIBRATION_FILE)
    assert info["fitted_on"] == "val"
    assert info["temperature"] == pytest.approx(calibration.fit_temperature(*logits["val"][:2]))


@pytest.mark.slow
def test_resume_ends_with_the_same_weights(tmp_path):
    cfg = tiny_config(epochs=3, steps_per_epoch=4, batch_size=16)
    train_run(cfg, tmp_path / "straight")
    train_run(cfg, tmp_path / "resumed", stop_after_epoch=1)
    assert results.read_run(tmp_path / "resumed").state == "running"
    train_run(cfg, tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:  # the method's own RNG state
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert len(results.read_jsonl(tmp_path / "resumed" / "epochs.jsonl")) == 3


@pytest.mark.slow
@pytest.mark.parametrize("patch, expected", [
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"method": {"name": "magic"}}, "method.name"),
    ({"data": {"source": "folder", "root": "/does/not/exist"}}, "/does/not/exist"),
])
def test_cli_rejects_bad_configs_with_one_line(tmp_path, patch, expected):
    cfg = tiny_config()
    for section, values in patch.items():
        cfg[section].update(values)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "tally.cli", "train", str(path), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_only_epochs_after_the_warmup_may_be_kept(tmp_path, monkeypatch):
    """Validation is made worse at every epoch, so by value alone the first (warm-up) epoch would win:
    the reference's protocol keeps the first TALLY epoch; select_from: all keeps the warm-up epoch; last
    keeps the last epoch whatever its value (no early stopping)."""
    real, calls = evaluation.split_metrics, []

    def worse_every_epoch(*args, **kwargs):
        metrics = real(*args, **kwargs)
        calls.append(1)
        return metrics | {"pair_acc_mean": 1.0 / len(calls)}

    monkeypatch.setattr(evaluation, "split_metrics", worse_every_epoch)
    for select_from, kept in (("main", [None, None, 2, 2]), ("all", [0, 0, 0, 0]), ("last", [0, 1, 2, 3])):
        calls.clear()
        cfg = tiny_config(epochs=4, warmup_epochs=2, steps_per_epoch=2, batch_size=32, select_from=select_from)
        cfg["data"]["max_per_class"] = 12
        train_run(cfg, tmp_path / select_from)
        run = results.read_run(tmp_path / select_from)
        epochs = results.read_jsonl(tmp_path / select_from / "epochs.jsonl")
        assert run.status["best_epoch"] == kept[-1]  # nothing kept during the warm-up under 'main'
        assert [e["best_epoch"] for e in epochs] == kept
        assert load_checkpoint(tmp_path / select_from / "checkpoints" / "best.pt")["epoch"] == kept[-1]
        assert ("rule" in run.status["selection"]) == (select_from == "last")


@pytest.mark.parametrize("patch, field", [
    ({"method": {"name": "tally", "alpha": 0}}, "method.alpha"),
    ({"method": {"name": "mixstyle", "alpha": 0.0}}, "method.alpha"),
    ({"method": {"name": "tally", "loss_beta": 1.0}}, "method.loss_beta"),
    ({"method": {"name": "tally", "momentum": 1.5}}, "method.momentum"),
    ({"method": {"name": "tally", "stem_pass": "twice"}}, "method.stem_pass"),
    ({"method": {"name": "reweight", "beta": None}}, "method.beta"),
    ({"train": {"epochs": 2, "warmup_epochs": 2}}, "train.warmup_epochs"),
    ({"method": {"name": "erm"}, "train": {"epochs": 2, "warmup_epochs": 2}}, "train.select_from"),
    ({"train": {"select_from": "warmup"}}, "train.select_from"),
    ({"train": {"sync_bn": "yes"}}, "train.sync_bn"),
    ({"train": {"compile": True, "compile_mode": "reduce-overhead"}}, "train.compile_mode"),  # CUDA graphs, on cpu
])
def test_settings_that_cannot_work_are_refused_before_anything_runs(tmp_path, patch, field):
    cfg = tiny_config()
    for section, values in patch.items():
        cfg[section] = {**cfg[section], **values} if section == "train" else values
    with pytest.raises(TallyError, match=rf"^{field}: "):
        train_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_keeping_the_last_epoch_selects_on_nothing():
    from tally.config import validate

    cfg = tiny_config(select_from="last")
    cfg["data"] = {**cfg["data"], "setting": "domain", "held_out": ["noisy"], "oracle_selection": True}
    with pytest.raises(TallyError, match=r"^data.oracle_selection: train.select_from 'last'"):
        validate(cfg)


def test_an_erm_run_without_a_main_phase_is_fine_when_every_epoch_may_be_kept():
    from tally.config import validate

    cfg = validate(tiny_config(epochs=2, warmup_epochs=2, select_from="all") | {"method": {"name": "erm"}})
    assert cfg["train"]["select_from"] == "all"


# ---------------------------------------------------------------- a final retrain (train.final)
@pytest.mark.usefixtures("one_thread")
def test_a_final_retrain_trains_on_train_and_val_keeps_its_last_epoch_and_resumes_exactly(tmp_path):
    from tally.config import validate
    from tally.data import load_splits

    cfg = tiny_config(epochs=2, warmup_epochs=1, steps_per_epoch=3, batch_size=32, final=True)
    cfg["data"]["max_per_class"] = 12
    splits = load_splits(validate(cfg)["data"])
    train_run(cfg, tmp_path / "final")
    run = results.read_run(tmp_path / "final")
    assert run.state == "done" and run.status["best_epoch"] == 1  # the last epoch, whatever validation says
    assert run.status["selection"]["split"] is None
    assert set(run.eval_table["split"]) == {"test_sub", "test_domain:noisy"}  # val is training data now
    # the model's training counts are train + val, pair by pair; the warm-up is one pass over both
    sub = run.eval_table[run.eval_table["split"] == "test_sub"].set_index(["domain_idx", "class_idx"])
    counts = splits["train"].counts() + splits["val"].counts()
    assert [int(counts[d, c]) for d, c in sub.index] == sub["n_train"].tolist()
    n = len(splits["train"]) + len(splits["val"])
    assert list(run.epochs["steps"]) == [-(-n // 32), 3]
    assert not any(k.startswith("val/") for k in run.epochs.columns)  # nothing validated
    # nothing held out to fit a temperature on: T = 1, and the reason is kept
    info = results.read_json(tmp_path / "final" / calibration.CALIBRATION_FILE)
    assert info["temperature"] == 1.0 and info["fitted_on"] is None and "final" in info["reason"]
    kept = load_checkpoint(tmp_path / "final" / "checkpoints" / "best.pt")
    last = load_checkpoint(tmp_path / "final" / "checkpoints" / "last.pt")["model"]
    assert kept["epoch"] == 1 and all(torch.equal(v, last[k]) for k, v in kept["model"].items() if torch.is_tensor(v))

    # killed after its last epoch (before the evaluation): --resume keeps the same weights and numbers
    train_run(cfg, tmp_path / "resumed", stop_after_epoch=1)
    assert not (tmp_path / "resumed" / "checkpoints" / "best.pt").exists()
    train_run(cfg, tmp_path / "resumed", resume=True)
    resumed = results.read_run(tmp_path / "resumed")
    assert resumed.eval_table["correct"].tolist() == run.eval_table["correct"].tolist()
    with pytest.raises(TallyError, match="^--split: 'val' is training data"):
        evaluate_run_split(tmp_path / "final", "val")


@pytest.mark.parametrize("patch, field", [
    ({"data": {"source": "embedded", "setting": "domain", "held_out": ["noisy"], "oracle_selection": True}},
     "data.oracle_selection"),
    ({"train": {"final": "yes"}}, "train.final"),
])
def test_a_final_retrain_refuses_what_would_select(tmp_path, patch, field):
    cfg = tiny_config(final=True)
    for section, values in patch.items():
        cfg[section] = {**cfg[section], **values}
    with pytest.raises(TallyError, match=rf"^{field}: "):
        train_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_final_erm_retrain_may_end_in_its_warmup():
    from tally.config import validate

    cfg = validate(tiny_config(epochs=2, warmup_epochs=2, final=True) | {"method": {"name": "erm"}})
    assert cfg["train"]["final"] and cfg["train"]["select_from"] == "main"  # nothing is selected


# ---------------------------------------------------------------- the GPU path, as far as a CPU shows it
def _embedded(**data):
    from tally.config import validate
    from tally.data import load_splits
    from tally.data.bank import bank_for_training

    cfg = validate({"data": {"source": "embedded", "max_per_class": 12, **data}, "model": {"arch": "resnet10"},
                    "train": {"device": "cpu"}})
    splits = load_splits(cfg["data"])
    return cfg, splits["train"], bank_for_training(splits["train"], cfg["data"]["image_size"])


def test_evaluation_is_float32_even_inside_a_bf16_autocast():
    """Two logits 2^-10 apart tie once rounded to bf16 (8 bits of mantissa): the first class would win
    on the precision setting, not on the model. predict() computes them in float32 whatever the caller's
    autocast."""
    from torch import nn

    from tally.data.bank import ImageBank
    from tally.training import predict

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 1.0 + 2**-10]))
    bank = ImageBank(torch.zeros(5, 3, 4, 4, dtype=torch.uint8), torch.ones(5, dtype=torch.long),
                     torch.zeros(5, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.zeros(5, 3, 4, 4)
        assert model(x).dtype == torch.bfloat16 and (model(x).argmax(1) == 0).all()  # the tie, under bf16
        preds, conf = predict(model, bank, 2, torch.device("cpu"), confidence=True)
    assert preds.tolist() == [1] * 5
    assert conf == pytest.approx([torch.tensor([1.0, 1.0 + 2**-10]).softmax(0)[1].item()] * 5)


def test_host_prefetched_batches_equal_the_direct_ones():
    """A bank left on the CPU (too big for the GPU) is gathered in a background thread into double
    buffers: the same batches, in the same order, and the same stream states after the epoch, as the
    bank indexed directly. Two ranks' streams, augmentation on, both TALLY kinds."""
    from tally.training import BatchSource

    cfg, _, bank = _embedded(flip=True, crop_padding=2)
    cpu = torch.device("cpu")
    direct = BatchSource(bank, cfg["data"], 5, 3, cpu, ranks=(0, 1), world_size=2, placement="device")
    host = BatchSource(bank, cfg["data"], 5, 3, cpu, ranks=(0, 1), world_size=2, placement="host")
    assert direct.on_device and not host.on_device
    for kinds, steps in ((("uniform",), 3), (("class_balanced", "domain_balanced"), 4)):
        got = list(host.batches(kinds, steps))
        want = [direct.draw(kinds) for _ in range(steps)]
        assert len(got) == steps
        for g, w in zip(got, want, strict=True):
            for (gx, gy, gd), (wx, wy, wd) in zip(g, w, strict=True):
                assert torch.equal(gx, wx) and torch.equal(gy, wy) and torch.equal(gd, wd)
    assert str(host.state_dict()) == str(direct.state_dict())
    # the prefetching source reused its two buffers instead of allocating one per step
    assert len(host._buffers) == 2


def test_the_bank_stays_on_the_gpu_when_half_the_free_memory_holds_it(monkeypatch):
    from tally.training import bank_fits_on_device

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 80 * gib))
    cuda = torch.device("cuda")
    assert bank_fits_on_device(3 * gib, cuda)  # over 2^31 elements: the old rule kept it on the CPU
    assert not bank_fits_on_device(21 * gib, cuda)
    assert bank_fits_on_device(10**12, torch.device("cpu"))  # on the CPU it is already where it is used


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stem_pass", ["separate", "joint"])
def test_a_compiled_step_computes_the_eager_losses(stem_pass):
    """train.compile: 5 steps (2 warm-up, 3 TALLY) through torch.compile give the eager losses and
    memories to 1e-3 relative, with training's optimiser (Adam, amsgrad, lr 1e-5); the smallest network.

    The first loss is equal; inductor reorders float32 sums, and Adam (which divides by ~|g| on its
    first steps) and the prototypes (zhat divides by sigma, ~1e-3 on near-constant maps) amplify those
    differences: measured 1e-6 relative at step 2, 1.4e-4 at step 5."""
    from tally.config import validate
    from tally.training import BatchSource, TrainStep, build_method_for, build_optimizer
    from tally.training.run import _LossModule

    _, train_ds, bank = _embedded()
    cfg = validate({"data": {"source": "embedded"}, "model": {"arch": "resnet10"},
                    "method": {"name": "tally", "stem_pass": stem_pass, "seed": 1},
                    "train": {"device": "cpu", "batch_size": 8}})
    cpu = torch.device("cpu")
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        method = build_method_for(cfg, train_ds)
        step = TrainStep(_LossModule(method), build_optimizer(method.parameters(), cfg["train"], cpu), cpu,
                         compile_mode="default" if compiled else None)
        source = BatchSource(bank, cfg["data"], 8, 0, cpu)
        losses = [step(b, "warmup").item() for b in source.batches(method.batch_kinds("warmup"), 2)]
        losses += [step(b, "main").item() for b in source.batches(method.batch_kinds("main"), 3)]
        runs[compiled] = losses, method.memory.state_dict()
    (eager, eager_memory), (compiled, compiled_memory) = runs[False], runs[True]
    assert eager[0] != eager[-1]
    assert compiled[0] == pytest.approx(eager[0], rel=1e-6)  # same weights: only kernel rounding differs
    assert compiled == pytest.approx(eager, rel=1e-3)
    for key, value in eager_memory.items():
        if key != "prototypes":
            torch.testing.assert_close(compiled_memory[key], value, rtol=1e-3, atol=1e-3)
    # prototypes hold zhat = (z - mu) / sigma: on a near-constant channel of the 4x4 stem map sigma sits at
    # its 1e-3 floor (sqrt of the 1e-6 eps) and turns 1e-5 differences in z into 1e-2 (measured: 1 to 6
    # of 20480 values); at least 99.9% of the values agree to 1e-3
    diff = (compiled_memory["prototypes"] - eager_memory["prototypes"]).abs()
    assert (diff > 1e-3).float().mean() <= 1e-3 and diff.max() < 0.1


@pytest.mark.parametrize("tie_rule,expected", [("earliest", 3), ("latest", 4)])
def test_a_lower_is_better_selection_metric_keeps_the_lowest_epoch(tie_rule, expected):
    """The kept-epoch rule in a metric's direction (tally.schema.mode_of): for an ECE the lowest value
    wins; 'earliest' breaks ties by the better mean pair accuracy, 'latest' keeps the later epoch; a
    missing value (NaN) counts as the worst."""
    from tally.schema import mode_of
    from tally.training.run import _finite, _worst, improves

    mode = mode_of("ece_worst_domain")
    keys = [(0.30, 0.5), (0.10, 0.4), (0.20, 0.9), (0.10, 0.6), (0.10, 0.5), (float("nan"), 1.0)]
    best = {"value": _worst(mode), "epoch": None}
    for epoch, (value, tiebreak) in enumerate(keys):
        key = (_finite(value, mode), tiebreak)
        if improves(key, best, tie_rule, mode):
            best = {"value": key[0], "tiebreak": key[1], "epoch": epoch}
    assert (best["epoch"], best["value"]) == (expected, 0.10)
    assert improves((0.9, 0.0), {"value": _worst("max"), "epoch": None}, tie_rule)  # accuracy: up is better


def test_a_run_is_the_same_with_its_banks_cached_or_decoded_in_the_run(tmp_path, monkeypatch, one_thread):
    """A search decodes its banks once before the trials (tally.search.banks); `tally train` decodes them
    itself. Decoding draws from torch's global stream (a DataLoader's base seed), so the run is seeded after
    its banks are in hand: an exported trial retrained alone reproduces the trial bit for bit."""
    from tally.config import validate
    from tally.data.bank import BANK_DIR_ENV, cached_bank, use_bank_dir
    from tally.training.run import run_splits

    cfg = validate(tiny_config(epochs=2, steps_per_epoch=3, batch_size=16))
    monkeypatch.delenv(BANK_DIR_ENV, raising=False)
    decoded = train_run(cfg, tmp_path / "decoded")
    for ds in run_splits(cfg).values():  # what a search's pre-flight leaves for its trials
        cached_bank(ds, cfg["data"]["image_size"], tmp_path / "banks")
    use_bank_dir(tmp_path / "banks")
    cached = train_run(cfg, tmp_path / "cached")
    assert json.dumps(cached, sort_keys=True) == json.dumps(decoded, sort_keys=True)  # NaN-aware, exact
