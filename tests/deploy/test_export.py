"""Bundles: integrity, exported programs (torch.export, ONNX), provenance, and `tally predict`.

One tiny run on the embedded data is trained and exported once for the module (seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from tally import results
from tally.data import load_splits
from tally.data.augment import to_float_normalized
from tally.data.bank import resize_square
from tally.data.dataset import read_image
from tally.deploy.export import Predictor, export_bundle, export_config, retrain_source, verify_bundle
from tally.errors import TallyError
from tests.bundle_factory import TINY_CONFIG, tiny_run
from tests.optional import require

pytestmark = pytest.mark.slow  # trains a tiny model once (about 5 s) and exports it


@pytest.fixture
def tally(capsys):
    """The command line in-process (a subprocess would re-import torch each time): (exit code, out, err)."""
    from tally.cli import main

    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory):
    old = os.umask(0o077)  # a strict umask must not leak into the bundle's permissions
    _RUN_TEMPERATURE[:] = [results.read_json(run_dir / "calibration.json")["temperature"]]
    try:
        return export_bundle(run_dir, tmp_path_factory.mktemp("bundles") / "bundle")
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def test_split():
    return load_splits(TINY_CONFIG["data"])["test_sub"]


@pytest.fixture(scope="module")
def sized_images(tmp_path_factory, test_split):
    """Real images (embedded scans) re-saved at several sizes and formats, smaller and larger than 32 px."""
    folder = tmp_path_factory.mktemp("sized")
    paths = []
    for i, (w, h, ext) in enumerate([(32, 32, "png"), (17, 23, "png"), (64, 48, "jpg"), (301, 199, "png"),
                                     (33, 31, "bmp")]):
        with Image.open(test_split.paths[i * 7]) as im:
            target = folder / f"img{i}_{w}x{h}.{ext}"
            im.convert("RGB").resize((w, h), Image.BICUBIC).save(target)
        paths.append(target)
    return paths


# ---------------------------------------------------------------- integrity
def test_bundle_files_are_readable_by_others_and_listed_in_the_manifest(bundle):
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o755
    for path in bundle.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    manifest = verify_bundle(bundle)
    assert set(manifest["sha256"]) == {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert {"model.pt", "model.pt2", "config.yaml", "labels.json", "preprocessing.json", "provenance.json",
            "metrics.json", "eval.parquet", "MODEL_CARD.md"} <= set(manifest["sha256"])
    torch.load(bundle / "model.pt", weights_only=True)


def test_a_changed_file_is_refused_with_one_line(bundle, tmp_path, tally):
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    labels = json.loads((copy / "labels.json").read_text())
    labels["classes"][0] = "tampered"
    (copy / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(TallyError, match=r"labels\.json: sha256 differs from the manifest"):
        Predictor(copy)
    proc = tally("predict", copy, bundle / "MODEL_CARD.md")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "labels.json" in proc.stderr, proc.stderr
    shutil.copy2(bundle / "labels.json", copy / "labels.json")
    assert verify_bundle(copy)["trial"] == "run"
    (copy / "model.pt2").unlink()
    with pytest.raises(TallyError, match=r"model\.pt2: missing"):
        verify_bundle(copy)


def test_export_never_overwrites_a_different_bundle_unless_forced(run_dir, bundle, tmp_path, tally):
    before = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    assert export_bundle(run_dir, bundle) == bundle  # the same provenance: kept as is
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == before

    other_run = Path(shutil.copytree(run_dir, tmp_path / "other-trial"))
    out = Path(shutil.copytree(bundle, tmp_path / "out"))
    proc = tally("export", other_run, "--out", out)
    assert proc.returncode == 2 and "--force" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert json.loads((out / "manifest.json").read_text())["trial"] == "run"
    proc = tally("export", other_run, "--out", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert verify_bundle(out)["trial"] == "other-trial"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(TallyError, match="not a tally bundle; refusing"):
        export_bundle(run_dir, precious, force=True)
    assert (precious / "notes.txt").read_text() == "mine"


def test_bundle_records_how_to_rebuild_the_model(run_dir, bundle, tmp_path, tally):
    provenance = json.loads((bundle / "provenance.json").read_text())
    splits = load_splits(TINY_CONFIG["data"])
    assert provenance["data_splits"] == {name: {"sha256": ds.fingerprint(), "images": len(ds)}
                                         for name, ds in splits.items()}
    assert provenance["seeds"] == {"train": 0, "split": 0}
    assert provenance["code"]["version"] and provenance["code"]["package"] == "tally-platform"
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    if git.returncode == 0:
        assert provenance["code"]["git_commit"] == git.stdout.strip()
    # --config-only: the trial's complete run config, the same one the bundle holds
    proc = tally("export", run_dir, "--config-only", "--out", tmp_path / "final.yaml")
    assert proc.returncode == 0, proc.stderr
    written = yaml.safe_load((tmp_path / "final.yaml").read_text())
    assert written == yaml.safe_load((bundle / "config.yaml").read_text()) == results.read_yaml(run_dir / "config.yaml")
    assert written["train"]["seed"] == 0 and written["data"]["split_seed"] == 0
    (tmp_path / "other.yaml").write_text("train: {}\n")
    with pytest.raises(TallyError, match="--force"):
        export_config(run_dir, tmp_path / "other.yaml")


# ---------------------------------------------------------------- configs to retrain
def test_a_final_retrain_starts_from_a_trial_an_experiment_or_a_bundle(run_dir, bundle, tmp_path, tally):
    config, kept = results.read_yaml(run_dir / "config.yaml"), results.read_json(run_dir / "status.json")["best_epoch"]
    experiment = tmp_path / "exp"
    shutil.copytree(run_dir, experiment / results.TRIALS_DIR / "t1")
    for source, name in ((run_dir, run_dir.name), (bundle, run_dir.name), (experiment, "t1")):
        got = retrain_source(str(source))
        assert (got.config, got.kept_epoch, got.name) == (config, kept, name), source
    assert retrain_source(str(experiment), trial="t1").name == "t1"

    # `tally train BUNDLE --final`: train + validation for the kept epoch + 1 epochs, the last one kept
    proc = tally("train", bundle, "--final", "--out", tmp_path / "final")
    assert proc.returncode == 0, proc.stderr
    final = results.read_run(tmp_path / "final")
    assert final.config["train"]["final"] and final.config["train"]["epochs"] == kept + 1
    assert {k: v for k, v in final.config.items() if k != "train"} == {k: v for k, v in config.items() if k != "train"}
    assert final.status["best_epoch"] == kept and "val" not in set(final.eval_table["split"])
    # its bundle says what it is: no selection, trained on train + val (and rebuilds with `tally train`)
    rebuilt = export_bundle(tmp_path / "final", tmp_path / "final-bundle")
    assert "final retrain on train + validation" in (rebuilt / "MODEL_CARD.md").read_text()
    assert json.loads((rebuilt / "provenance.json").read_text())["trained_on"] == ["train", "val"]

    # a config file records no kept epoch: --epochs says how many; nothing is written before that
    export_config(run_dir, tmp_path / "c.yaml")
    for args, message in ((("--final",), "--epochs N"), (("--trial", "t1"), "--trial: ")):
        proc = tally("train", tmp_path / "c.yaml", *args, "--out", tmp_path / "x")
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert not (tmp_path / "x").exists()
    with pytest.raises(TallyError, match="no such config file, run folder, experiment or bundle"):
        retrain_source(str(tmp_path / "nope"))


# ---------------------------------------------------------------- exported programs
def _eager_logits(bundle: Path, path: Path) -> torch.Tensor:
    """The package's own pipeline: the training decoder, its resize, normalisation, the eager net, and
    the temperature fitted on the run's validation split (read from the run, not the bundle)."""
    predictor = Predictor(bundle)
    x = to_float_normalized(resize_square(read_image(str(path)), predictor.image_size)[None])
    with torch.inference_mode():
        return predictor.net(x) / _RUN_TEMPERATURE[0]


_RUN_TEMPERATURE: list[float] = []  # filled by the bundle fixture from the run folder


def test_the_bundle_keeps_the_temperature_fitted_on_validation(run_dir, bundle):
    info = results.read_json(run_dir / "calibration.json")
    pre = json.loads((bundle / "preprocessing.json").read_text())
    assert info["fitted_on"] == "val" and pre["temperature_fitted_on"] == "val"
    assert pre["temperature"] == info["temperature"] and abs(info["temperature"] - 1) > 1e-3  # a real T, not 1


def test_exported_program_equals_the_eager_model_on_images_of_several_sizes(bundle, sized_images):
    program = torch.export.load(bundle / "model.pt2").module()
    for path in sized_images:
        image = read_image(str(path))
        logits = program(image[None])
        # measured: bit-identical on the CPU (same aten ops); 1e-5 leaves room for kernel choice
        torch.testing.assert_close(logits, _eager_logits(bundle, path), atol=1e-5, rtol=0)
        # a batch of one size gives each image's logits
        torch.testing.assert_close(program(image[None].repeat(3, 1, 1, 1)), logits.repeat(3, 1), atol=1e-5, rtol=0)


def readme_snippet() -> str:
    """The README's Deploy section: its Python block, the five lines a serving team copies."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    deploy = text[text.index("## Deploy"):]
    return deploy[deploy.index("```python") + len("```python"):].split("```")[0]


def test_model_pt2_loads_with_torch_alone(bundle, sized_images, tmp_path):
    """The README's lines, run where tally cannot be imported."""
    snippet = readme_snippet().replace("bundle/", f"{bundle}/").replace("photo.jpg", str(sized_images[3]))
    assert len(snippet.strip().splitlines()) == 5
    script = "import sys\nsys.modules['tally'] = None  # any import of tally now fails\n" + snippet + (
        "assert not [m for m in sys.modules if m.split('.')[0] == 'tally' and sys.modules[m]]\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    label, confidence = proc.stdout.split()
    probs = _eager_logits(bundle, sized_images[3]).softmax(1)
    classes = json.loads((bundle / "labels.json").read_text())["classes"]
    assert label == classes[int(probs.argmax())]
    assert float(confidence) == pytest.approx(float(probs.max()), abs=1e-6)


def test_onnx_program_gives_the_same_top1_on_the_test_split(run_dir, bundle, test_split, tmp_path):
    ort = require("onnxruntime", "the onnx extra is not installed (pip install '.[onnx]')")
    require("onnxscript", "the onnx extra is not installed (pip install '.[onnx]')")
    out = export_bundle(run_dir, tmp_path / "with-onnx", onnx=True)
    assert "model.onnx" in verify_bundle(out)["sha256"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    images = torch.stack([read_image(p) for p in test_split.paths])  # the embedded scans are 32 x 32
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    eager = Predictor(bundle).probabilities(images)
    assert np.array_equal(logits.argmax(1), eager.argmax(1).numpy())
    # the temperature is in the ONNX graph too: its softmax is the calibrated probabilities
    np.testing.assert_allclose(torch.from_numpy(logits).softmax(1).numpy(), eager.numpy(), atol=1e-4)
    # and on a size that must be resized inside the program
    big = torch.nn.functional.interpolate(images[:8].float(), size=(45, 51)).round().to(torch.uint8)
    (logits,) = session.run(None, {session.get_inputs()[0].name: big.numpy()})
    program = torch.export.load(out / "model.pt2").module()
    assert np.array_equal(logits.argmax(1), program(big).argmax(1).numpy())


# ---------------------------------------------------------------- tally predict
def test_predict_a_folder_to_csv_with_top_k(bundle, sized_images, tmp_path, tally):
    out = tmp_path / "preds.csv"
    proc = tally("predict", bundle, sized_images[0].parent, "--out", out, "--top-k", "3", "--batch-size", "2",
                 "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out, dtype={"label": str, "top1_label": str, "top2_label": str, "top3_label": str})
    assert sorted(table["path"]) == sorted(str(p) for p in sized_images)
    assert list(table.columns[:3]) == ["path", "label", "confidence"]
    assert (table["label"] == table["top1_label"]).all()
    assert (table["top1_confidence"] >= table["top2_confidence"]).all()
    assert (table["top2_confidence"] >= table["top3_confidence"]).all()
    program = torch.export.load(bundle / "model.pt2").module()
    for row in table.itertuples():  # the same answer as the eager model, image by image
        probs = _eager_logits(bundle, Path(row.path)).softmax(1)[0]
        assert row.confidence == pytest.approx(float(probs.max()), abs=1e-5)
        # and as model.pt2's calibrated probabilities (the temperature is inside its graph)
        calibrated = program(read_image(str(row.path))[None]).softmax(1)[0].detach()
        assert row.confidence == pytest.approx(float(calibrated.max()), abs=1e-5)
        assert row.top2_confidence == pytest.approx(float(calibrated.topk(2).values[1]), abs=1e-5)


def test_predict_scores_a_labelled_list_like_the_training_evaluation(run_dir, bundle, test_split, tmp_path, tally):
    root = Path(test_split.paths[0]).parents[2]
    lines = [f"{Path(p).relative_to(root)} {y}" for p, y in zip(test_split.paths, test_split.labels, strict=True)]
    listing = tmp_path / "test_sub.txt"
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "preds.parquet"
    proc = tally("predict", bundle, "--labels", listing, "--root", root, "--out", out, "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr
    stored = results.read_json(run_dir / "metrics.json")["test_sub"]
    assert f"test_sub: acc {stored['acc']:.3f}" in proc.stdout
    assert "domain" in proc.stdout and "n_train" in proc.stdout
    table = pd.read_parquet(out)
    assert len(table) == len(test_split)
    assert (table["true_label"] == table["label"]).mean() == pytest.approx(stored["acc"], abs=1e-12)

    listing.write_text(lines[0].rsplit(" ", 1)[0] + " 99\n")
    proc = tally("predict", bundle, "--labels", listing, "--root", root)
    assert proc.returncode == 2 and "outside the bundle's 10 classes" in proc.stderr


def test_predict_bad_inputs_are_one_line_errors(bundle, tmp_path, tally):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    for args, culprit in [((tmp_path / "missing.png",), "missing.png"),
                          ((tmp_path / "broken.png",), "broken.png"),
                          ((tmp_path / "broken.png", "--out", tmp_path / "p.json"), "p.json"),
                          ((), "--labels")]:
        proc = tally("predict", bundle, *args)
        assert proc.returncode == 2, args
        assert culprit in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "p.json").exists()


def test_predict_uses_the_gpu_when_there_is_one_and_bounded_batches(bundle, sized_images, monkeypatch):
    from tally.deploy.export import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(TallyError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(TallyError, match="--device"):
        resolve_device("tpu")

    predictor = Predictor(bundle, device="auto")
    seen = []
    original = predictor.probabilities
    monkeypatch.setattr(predictor, "probabilities", lambda images: seen.append(len(images)) or original(images))
    paths = [str(p) for p in sized_images] * 3
    table = predictor.predict_files(paths, batch_size=4, progress=False)
    assert seen == [4, 4, 4, 3] and list(table["path"]) == paths


@pytest.mark.parametrize(("name", "change", "message"), [
    ("preprocessing.json", {"image_size": 200000}, r"preprocessing\.json: image_size: expected the config's"),
    ("preprocessing.json", {"std": [0, 1, 1]}, r"preprocessing\.json: std: expected 3 finite numbers"),
    ("labels.json", {"classes": "abc"}, r"labels\.json: classes: expected a non-empty list"),
])
def test_a_consistent_but_malicious_bundle_is_refused_before_any_allocation(bundle, tmp_path, tally, name, change,
                                                                             message):
    """The manifest is re-signed, as an attacker would: the contents themselves are checked."""
    from tally.deploy.export import MANIFEST, _sha256

    copy = Path(shutil.copytree(bundle, tmp_path / "evil"))
    content = json.loads((copy / name).read_text())
    content.update(change)
    (copy / name).write_text(json.dumps(content))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["sha256"][name] = _sha256(copy / name)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TallyError, match=message):
        Predictor(copy)
    proc = tally("predict", copy, bundle / "MODEL_CARD.md")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_a_pickle_in_place_of_the_weights_is_refused_with_one_line(bundle, tmp_path, tally):
    import pickle

    from tally.deploy.export import MANIFEST, _sha256

    copy = Path(shutil.copytree(bundle, tmp_path / "pickled"))
    (copy / "model.pt").write_bytes(pickle.dumps({"x": os.system}))  # weights_only refuses globals
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["sha256"]["model.pt"] = _sha256(copy / "model.pt")
    (copy / MANIFEST).write_text(json.dumps(manifest))
    proc = tally("predict", copy, bundle / "MODEL_CARD.md")
    assert proc.returncode == 2 and "model.pt: cannot load the weights" in proc.stderr
    assert proc.stderr.count("\n") == 1


# ---------------------------------------------------------------- bundles from others (issue 21)
def _resign(copy: Path, name: str) -> None:
    """Re-sign one file in the manifest, as an attacker would."""
    from tally.deploy.export import MANIFEST, _sha256

    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["sha256"][name] = _sha256(copy / name)
    (copy / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("trial", ["../../../escaped", "/ABS/escaped", "a/b", ".hidden", "x" * 300])
def test_a_bundles_trial_name_never_chooses_where_train_writes(bundle, tmp_path, tally, monkeypatch, trial):
    copy = Path(shutil.copytree(bundle, tmp_path / "evil"))
    provenance = json.loads((copy / "provenance.json").read_text())
    provenance["trial"] = trial.replace("/ABS", str(tmp_path))
    (copy / "provenance.json").write_text(json.dumps(provenance))
    _resign(copy, "provenance.json")
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    proc = tally("train", copy, "--final", "--epochs", "2")
    assert proc.returncode == 2 and "provenance.json: trial" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "not a safe name" in proc.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_export_force_replaces_only_a_verified_bundle(run_dir, bundle, tmp_path, tally):
    from tally.data.atomic import write_folder_atomically

    lists = tmp_path / "lists"  # a split-lists folder also holds a manifest.json
    lists.mkdir()
    (lists / "manifest.json").write_text(json.dumps({"format": "tally-splits-v1", "files": {}}))
    (lists / "photo_train_sub.txt").write_text("photo/dog/1.jpg 0\n")
    for folder in (lists, Path(shutil.copytree(bundle, tmp_path / "with-notes"))):
        if folder.name == "with-notes":
            (folder / "notes.txt").write_text("mine")
        kept = {p.name: p.read_bytes() for p in folder.iterdir()}
        proc = tally("export", run_dir, "--out", folder, "--force")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "refusing to replace it" in proc.stderr and "pass --force" not in proc.stderr
        assert ("not a tally bundle" in proc.stderr) if folder == lists else ("notes.txt" in proc.stderr)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept
    # and `tally splits make --out BUNDLE` never deletes a bundle
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle-copy"))
    with pytest.raises(TallyError, match="not a split manifest"):
        write_folder_atomically(copy, {"a_train_sub.txt": ""})
    assert verify_bundle(copy)["trial"] == "run"


def test_a_bundle_loads_only_listed_regular_files(bundle, tmp_path, tally):
    from tally.deploy.export import MANIFEST

    copy = Path(shutil.copytree(bundle, tmp_path / "unlisted"))  # labels.json dropped from the manifest
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["sha256"]["labels.json"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    (copy / "labels.json").write_text(json.dumps({"classes": ["evil"] * 3, "domains": []}))
    with pytest.raises(TallyError, match=r"labels\.json is not listed"):
        Predictor(copy)

    outside = tmp_path / "outside-labels.json"  # a link out of the bundle, to a file of the same bytes
    shutil.copy2(bundle / "labels.json", outside)
    copy = Path(shutil.copytree(bundle, tmp_path / "linked"))
    (copy / "labels.json").unlink()
    (copy / "labels.json").symlink_to(outside)
    with pytest.raises(TallyError, match=r"labels\.json: is a symbolic link"):
        Predictor(copy)


@pytest.mark.parametrize("manifest", [
    {"format": "tally-bundle-v2", "sha256": ["model.pt"], "trial": "t"},
    {"format": "tally-bundle-v2", "sha256": {"model.pt": 5}, "trial": "t"},
    {"format": "tally-bundle-v2", "sha256": {"../x": "0" * 64}, "trial": "t"},
    {"format": "tally-bundle-v2", "sha256": None},
    ["tally-bundle-v2"],
    "[" * 20000,
])
def test_a_malformed_manifest_is_one_line(bundle, tmp_path, tally, manifest):
    copy = Path(shutil.copytree(bundle, tmp_path / "bad"))
    (copy / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    for args in (("predict", copy, bundle / "MODEL_CARD.md"), ("train", copy, "--final", "--out", tmp_path / "o")):
        proc = tally(*args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "manifest.json" in proc.stderr or "not a tally bundle" in proc.stderr, proc.stderr


def test_the_bytes_hashed_are_the_bytes_loaded(bundle, tmp_path, monkeypatch):
    """A file swapped after its hash was checked is never the one parsed (no check-then-reopen window)."""
    import hashlib

    from tally.deploy import export

    copy = Path(shutil.copytree(bundle, tmp_path / "swap"))
    digest = json.loads((copy / "manifest.json").read_text())["sha256"]["model.pt"]
    original = torch.load(copy / "model.pt", weights_only=True)
    zeros = {k: torch.zeros_like(v) for k, v in original.items()}
    swapped = []

    class Hasher:
        def __init__(self, data=b""):
            self.h = hashlib.sha256(data)

        def update(self, data):
            self.h.update(data)

        def hexdigest(self):
            value = self.h.hexdigest()
            if value == digest and not swapped:  # the check has passed: now swap the file
                torch.save(zeros, copy / "model.pt")
                swapped.append(True)
            return value

    monkeypatch.setattr(export, "hashlib", SimpleNamespace(sha256=Hasher))
    predictor = Predictor(copy)
    assert swapped
    loaded = {k.removeprefix("net."): v for k, v in predictor.net.state_dict().items()}
    assert all(torch.equal(loaded[k], v) for k, v in original.items())


def test_a_trial_name_given_on_the_command_line_stays_inside_the_experiment(tmp_path):
    from tally.deploy.export import resolve_trial

    (tmp_path / "exp" / "trials" / "t1").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    with pytest.raises(TallyError, match=r"--trial: '\.\./\.\./secret' is not a safe name"):
        resolve_trial(tmp_path / "exp", "../../secret")
    assert resolve_trial(tmp_path / "exp", "t1") == tmp_path / "exp" / "trials" / "t1"
