"""Bad input, as a hostile-but-realistic user gives it: every case ends with exit code 2, exactly one line on
stderr that names the file, field or value, and nothing written where the command would write.

Cases run the real command line in-process (`tally.cli.main`), so each costs milliseconds, not a torch import.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tally import cli, results

GOOD = {
    "data": {"source": "embedded", "setting": "sub", "image_size": 32},
    "model": {"arch": "resnet10", "cut": "layer2"},
    "method": {"name": "tally"},
    "train": {"epochs": 2, "warmup_epochs": 1, "steps_per_epoch": 2, "batch_size": 16, "device": "cpu"},
}
SPEC = {"name": "s", "base": GOOD, "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        "budget": {"trials": 2}}


def patched(doc: dict, dotted: str, value) -> dict:
    out = json.loads(json.dumps(doc))
    *path, last = dotted.split(".")
    node = out
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value
    return out


@dataclass
class Case:
    """Files to lay out in tmp (name -> text, bytes or a builder), the argv (with {tmp}), the stderr word."""

    files: dict[str, object]
    argv: list[str]
    names: str
    writes: str = "out"  # a path under tmp that must not exist afterwards ('' = none to check)


def config_case(dotted: str | None, value=None, names: str = "", text: str | bytes | None = None) -> Case:
    body = text if text is not None else yaml.safe_dump(patched(GOOD, dotted, value) if dotted else GOOD)
    return Case({"c.yaml": body}, ["train", "{tmp}/c.yaml", "--out", "{tmp}/out"], names)


def spec_case(dotted: str | None, value=None, names: str = "", text: str | bytes | None = None) -> Case:
    body = text if text is not None else yaml.safe_dump(patched(SPEC, dotted, value) if dotted else SPEC)
    return Case({"s.yaml": body}, ["search", "{tmp}/s.yaml", "--storage", "{tmp}/out"], names)


def reference_case(lines: str, names: str) -> Case:
    cfg = patched(GOOD, "data", {"source": "reference", "root": "{tmp}/lists", "dataset": "PACS",
                                 "setting": "sub", "image_size": 32})
    return Case({"c.yaml": yaml.safe_dump(cfg), "lists/PACS/photo_train_sub.txt": lines,
                 "lists/PACS/photo_val_sub.txt": "photo/dog/1.png 0\n",
                 "lists/PACS/photo_test_sub.txt": "photo/dog/2.png 0\n"},
                ["train", "{tmp}/c.yaml", "--out", "{tmp}/out"], names)


def big_png(path: Path) -> None:
    Image.new("L", (9000, 6000)).save(path)  # 54 M pixels declared in a small file


CASES: dict[str, Case] = {
    # run configs
    "config-unknown-section": config_case("trian", {}, "trian: unknown section"),
    "config-unknown-field": config_case("train.epoch", 3, "train.epoch: unknown field"),
    "config-epochs-0": config_case("train.epochs", 0, "train.epochs"),
    "config-seed-1e23": config_case("train.seed", 1e23, "train.seed"),
    "config-seed-2**64": config_case("train.seed", 2**64, "train.seed"),  # torch.manual_seed refuses it
    "config-split-seed-10**30": config_case("data.split_seed", 10**30, "data.split_seed"),
    "config-batch-10**30": config_case("train.batch_size", 10**30, "train.batch_size"),
    "config-lr-string": config_case("train.lr", "fast", "train.lr"),
    "config-warmup-over-epochs": config_case("train.warmup_epochs", 5, "train.warmup_epochs"),
    "config-method-list": config_case("method.name", ["tally"], "method.name"),
    "config-method-unknown-param": config_case("method.alpah", 1.0, "method.alpah"),
    "config-pretrained-missing": config_case("model.pretrained", "/no/weights.pt", "model.pretrained"),
    "config-alpha-0": config_case("method.alpha", 0, "method.alpha"),
    "config-momentum-1.5": config_case("method.momentum", 1.5, "method.momentum"),
    "config-loss-beta-1": config_case("method.loss_beta", 1.0, "method.loss_beta"),
    "config-no-main-phase": config_case("train.warmup_epochs", 2, "train.warmup_epochs"),
    "config-arch-unknown": config_case("model.arch", "vit", "model.arch"),
    "config-source-unknown": config_case("data.source", "ftp", "data.source"),
    "config-heldout-unknown-domain": config_case("data", {"setting": "domain", "held_out": ["mars"]}, "mars"),
    "config-folder-root-missing": config_case("data", {"source": "folder", "root": "/no/such/root"}, "/no/such/root"),
    "config-not-utf8": config_case(None, text=b"train: {lr: \xff}\n", names="c.yaml: not UTF-8"),
    "config-yaml-syntax": config_case(None, text="train: {epochs: [\n", names="c.yaml: not valid YAML"),
    "config-yaml-tag": config_case(None, text="train: !!python/object/apply:os.system [ls]\n", names="c.yaml"),
    "config-a-list": config_case(None, text="- 1\n", names="c.yaml: expected a YAML mapping"),
    "config-missing-file": Case({}, ["train", "{tmp}/none.yaml", "--out", "{tmp}/out"], "none.yaml"),
    "reproduce-unknown-dataset": Case({}, ["reproduce", "NOPE", "--dry-run"], "DATASET: expected one of"),
    "set-bad-yaml": Case({"c.yaml": yaml.safe_dump(GOOD)},
                         ["train", "{tmp}/c.yaml", "--out", "{tmp}/out", "--set", "train.lr=["], "train.lr=["),
    "set-no-equals": Case({"c.yaml": yaml.safe_dump(GOOD)},
                          ["train", "{tmp}/c.yaml", "--out", "{tmp}/out", "--set", "train.lr"], "--set"),
    "set-unknown-section": Case({"c.yaml": yaml.safe_dump(GOOD)},
                                ["train", "{tmp}/c.yaml", "--out", "{tmp}/out", "--set", "foo.bar=1"], "foo"),
    # search specs (refused before Ray starts; the storage folder is never made)
    "spec-unknown-key": spec_case("budgets", {}, "budgets: unknown top-level key"),
    "spec-space-path": spec_case("space", {"train.nope": {"type": "uniform", "low": 0, "high": 1}}, "space.train.nope"),
    "spec-loguniform-0": spec_case("space", {"train.lr": {"type": "loguniform", "low": 0, "high": 1}}, "space.train.lr.low"),
    "spec-bound-invalid": spec_case("space", {"train.warmup_epochs": {"type": "int", "low": 0, "high": 9}},
                                    "space.train.warmup_epochs.high"),
    "spec-alpha-reaches-0": spec_case("space", {"method.alpha": {"type": "uniform", "low": 0, "high": 1}},
                                      "space.method.alpha.low"),
    "spec-momentum-passes-1": spec_case("space", {"method.momentum": {"type": "uniform", "low": 0.5, "high": 1.5}},
                                        "space.method.momentum.high"),
    "spec-trials-0": spec_case("budget.trials", 0, "budget.trials"),
    "spec-trials-2**64": spec_case("budget.trials", 2**64, "budget.trials"),
    "spec-seed-2**32": spec_case("seed", 2**32, "seed"),  # Optuna's samplers take seeds < 2**32
    "spec-int-bound-2**70": spec_case("space", {"train.epochs": {"type": "int", "low": 2, "high": 2**70}},
                                      "space.train.epochs.high"),
    "spec-gpus-negative": spec_case("resources", {"gpus_per_worker": -1}, "resources.gpus_per_worker"),
    "spec-name-escapes": spec_case("name", "../x", "name"),
    "spec-metric-unknown": spec_case("selection", {"metric": "top5"}, "selection.metric"),
    "spec-metric-after-temperature": spec_case("selection", {"metric": "ts_ece"},
                                               "s.yaml: selection.metric: 'ts_ece' cannot be selected on"),
    "spec-start-outside": spec_case("start_with", [{"train.lr": 5.0}], "start_with[0].train.lr"),
    "spec-not-utf8": spec_case(None, text=b"name: \xfe\n", names="s.yaml: not UTF-8"),
    "spec-root-env-unset": spec_case("base.data", {"source": "folder", "root": "${TALLY_NO_SUCH_VAR}"},
                                     "TALLY_NO_SUCH_VAR"),
    # flags
    "flag-port": Case({}, ["dashboard", "{tmp}", "--port", "99999"], "--port", writes=""),
    "flag-confirm-seeds": Case({}, ["search", "{tmp}/s.yaml", "--confirm-seeds", "-1"], "--confirm-seeds"),
    "flag-batch-size": Case({}, ["predict", "{tmp}/b", "x.png", "--batch-size", "0"], "--batch-size"),
    "flag-serve-port": Case({}, ["serve", "{tmp}/b", "--port", "0"], "--port"),
    "flag-unknown-command": Case({}, ["trian"], "trian", writes=""),
    # split lists
    "list-dotdot": reference_case("photo/../../etc/passwd 0\n", "leaves the image root"),
    "list-absolute": reference_case("/etc/passwd 0\n", "leaves the image root"),
    "list-huge-label": reference_case("photo/dog/1.png 50000000\n", "photo_train_sub.txt:1: label 50000000"),
    "list-malformed": reference_case("photo/dog/1.png dog\n", "photo_train_sub.txt:1: malformed line"),
    "list-phantom-classes": reference_case("photo/dog/1.png 3\n", "labels run to 3"),
    # store files
    "report-missing": Case({}, ["report", "{tmp}/none"], "none", writes=""),
    "export-no-finished-trial": Case({"exp/trials/t1/status.json": '{"status": "failed"}',
                                      "exp/spec.yaml": "name: exp\n"},
                                     ["export", "{tmp}/exp", "--out", "{tmp}/out"], "no finished trial"),
    "export-unknown-trial": Case({"exp/trials/t1/status.json": '{"status": "done"}'},
                                 ["export", "{tmp}/exp", "--trial", "t9", "--out", "{tmp}/out"], "t9"),
    "evaluate-not-a-run": Case({"x/a.txt": "x"}, ["evaluate", "{tmp}/x"], "not a run folder", writes=""),
    "compare-not-a-run": Case({"x/a.txt": "x"}, ["compare", "{tmp}/x", "{tmp}/x"], "not a finished run folder",
                              writes=""),
    "benchmark-seed-2**32": Case({"b.yaml": yaml.safe_dump({"name": "b", "data": {"source": "embedded"}, "methods": ["erm"],
                                                            "settings": ["sub"], "seeds": [2**32]})},
                                 ["benchmark", "{tmp}/b.yaml", "--storage", "{tmp}/out"], "seeds"),
}
# Commands whose bad input is tested elsewhere (they need a dataset on disk) or that take none.
ELSEWHERE = {"data": "tests/test_cli.py, tests/data/test_cli.py", "splits": "tests/test_cli.py",
             "demo": "no input of its own"}


def lay_out(tmp: Path, files: dict[str, object]) -> None:
    for name, body in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(body):
            body(path)
        elif isinstance(body, bytes):
            path.write_bytes(body)
        else:
            path.write_text(str(body).replace("{tmp}", str(tmp)))


def snapshot(tmp: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(tmp)): (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp.rglob("*")}


def run_case(tmp: Path, case: Case, capsys) -> tuple[int, str]:
    lay_out(tmp, case.files)
    before = snapshot(tmp)
    capsys.readouterr()
    with pytest.raises(SystemExit) if case.argv[0] in ("dashboard", "trian") or any(
            a in case.argv for a in ("--port", "--confirm-seeds", "--batch-size")) else _no_raise() as exit_info:
        code = cli.main([a.replace("{tmp}", str(tmp)) for a in case.argv])
    if exit_info is not None and getattr(exit_info, "value", None) is not None:
        code = exit_info.value.code
    err = capsys.readouterr().err
    assert snapshot(tmp) == before, "the command wrote or changed files"
    if case.writes:
        assert not (tmp / case.writes).exists()
    return code, err


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, tmp_path, capsys):
    case = CASES[name]
    code, err = run_case(tmp_path, case, capsys)
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line, got:\n{err}"
    assert case.names in err, err


def test_every_command_has_a_bad_input_case():
    """A new subcommand without a case here (or a named home elsewhere) fails this, not a user."""
    parser = cli.build_parser()
    (commands,) = [a.choices for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    covered = {case.argv[0] for case in CASES.values()} | set(ELSEWHERE)
    assert sorted(set(commands) - covered) == []


# ---------------------------------------------------------------- bundles and images (one tiny run)
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from tally.deploy.export import export_bundle
    from tests.bundle_factory import tiny_run

    tmp = tmp_path_factory.mktemp("bundle")
    return export_bundle(tiny_run(tmp / "run"), tmp / "bundle")


def _resign(bundle: Path, name: str) -> None:
    from tally.deploy.export import MANIFEST, _sha256

    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["sha256"][name] = _sha256(bundle / name)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def _edit_json(name: str, change: dict, resign: bool) -> Callable[[Path], None]:
    def edit(bundle: Path) -> None:
        data = json.loads((bundle / name).read_text())
        data.update(change)
        (bundle / name).write_text(json.dumps(data))
        if resign:
            _resign(bundle, name)
    return edit


def _garbage_weights(bundle: Path) -> None:
    (bundle / "model.pt").write_bytes(b"\x80\x04not a checkpoint")
    _resign(bundle, "model.pt")


BUNDLE_CASES = {
    "bundle-tampered-labels": (_edit_json("labels.json", {"classes": ["x"]}, resign=False), "sha256 differs"),
    "bundle-image-size-200000": (_edit_json("preprocessing.json", {"image_size": 200000}, resign=True), "image_size"),
    "bundle-garbage-weights": (_garbage_weights, "model.pt: cannot load the weights"),
    "bundle-missing-file": (lambda b: (b / "labels.json").unlink(), "labels.json: missing"),
}
IMAGE_CASES = {"image-too-many-pixels": "pixels; the limit is", "image-not-an-image": "x.png"}


@pytest.mark.parametrize("name", sorted(BUNDLE_CASES))
def test_bad_bundles(name, bundle, tmp_path, capsys):
    edit, names = BUNDLE_CASES[name]
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    edit(copy)
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(image)
    case = Case({}, ["predict", str(copy), str(image), "--out", "{tmp}/out.csv"], names, writes="out.csv")
    code, err = run_case(tmp_path, case, capsys)
    assert code == 2 and err.count("\n") == 1 and names in err, err


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_bad_images(name, bundle, tmp_path, capsys, monkeypatch):
    image = tmp_path / "x.png"
    if name == "image-too-many-pixels":
        big_png(image)
    else:
        image.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    case = Case({}, ["predict", str(bundle), str(image), "--out", "{tmp}/out.csv"], IMAGE_CASES[name],
                writes="out.csv")
    code, err = run_case(tmp_path, case, capsys)
    assert code == 2 and err.count("\n") == 1 and IMAGE_CASES[name] in err, err


def test_a_status_file_that_is_a_list_does_not_stop_the_report(tmp_path, capsys):
    """Store files are read tolerantly: the report shows what it can and names what it cannot."""
    exp = tmp_path / "exp"
    results.write_json(exp / "trials" / "t1" / "status.json", [1, 2])
    code = cli.main(["report", str(exp)])
    err = capsys.readouterr().err
    assert code == 2 and "t1: pending; status.json unreadable: expected a dict, got list" in err
    assert "no finished runs" in err.splitlines()[-1]
