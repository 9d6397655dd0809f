"""The WILDS iWildCam reader on a small dataset written in the WILDS layout (the real package reads it)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from PIL import Image

from tally.data import load_splits
from tally.data.iwildcam import import_wilds
from tests.optional import require

try:
    import_wilds()  # never plain `import wilds`: its import asks PyPI for its latest version
except ImportError:
    require("wilds", "the wilds extra is not installed (CI installs it)")  # skips, or fails in CI

SPLIT_OF = {"train": 0, "id_val": 1, "id_test": 2, "test": 3}  # rows per split below


def write_wilds_layout(root):
    """root/iwildcam_v2.0/{RELEASE_v2.0.txt, metadata.csv, train/*.jpg}: 3 classes, 4 locations."""
    data = root / "iwildcam_v2.0"
    (data / "train").mkdir(parents=True)
    (data / "RELEASE_v2.0.txt").write_text("v2.0\n")
    rows = []
    rng = np.random.default_rng(0)
    plan = [("train", 0, 6), ("train", 1, 6), ("id_val", 0, 2), ("id_val", 1, 2), ("id_test", 0, 3),
            ("id_test", 1, 3), ("test", 2, 4), ("test", 3, 5), ("val", 4, 3)]  # (split, location, images)
    for split, location, n in plan:
        for i in range(n):
            name = f"{split}_{location}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(data / "train" / name)
            rows.append({"split": split, "filename": name, "y": i % 3, "location_remapped": location,
                         "sequence_remapped": len(rows), "datetime": "2013-06-01 08:30:00.000"})
    pd.DataFrame(rows).to_csv(data / "metadata.csv", index=False)
    return rows


def test_wilds_splits_locations_and_labels(tmp_path):
    rows = write_wilds_layout(tmp_path)
    splits = load_splits({"source": "wilds", "root": str(tmp_path)})
    assert set(splits) == {"train", "val", "test_sub", "test_domain:ood"}
    wanted = {"train": "train", "val": "id_val", "test_sub": "id_test", "test_domain:ood": "test"}
    for key, split in wanted.items():
        mine = [r for r in rows if r["split"] == split]
        ds = splits[key]
        assert len(ds) == len(mine)
        assert sorted(map(os.path.basename, ds.samples["path"])) == sorted(r["filename"] for r in mine)
        assert sorted(ds.labels.tolist()) == sorted(r["y"] for r in mine)
        names = {ds.domain_names[d] for d in ds.domains.tolist()}
        assert names == {f"location_{r['location_remapped']}" for r in mine}
    assert splits["train"].class_names == ["0", "1", "2"]
    image = splits["train"].load_image(0)
    assert tuple(image.shape) == (3, 12, 16)


# A fresh interpreter: the name lookup is refused (and recorded) before anything leaves the machine;
# any thread the reading started gets time to make its request. `outdated` needs pkg_resources, which
# setuptools 81 dropped: without it the check fails before asking; give it one, as older setuptools do.
ASKS_NO_ONE = """
import socket, sys, threading, types
from packaging.version import parse
sys.modules.setdefault("pkg_resources", types.ModuleType("pkg_resources"))
sys.modules["pkg_resources"].parse_version = parse
asked = []
def refuse(host, *args, **kwargs):
    asked.append(host)
    raise OSError("refused by the test")
socket.getaddrinfo = refuse
from tally.data import load_splits
load_splits({"source": "wilds", "root": sys.argv[1]})
for thread in threading.enumerate():
    if thread is not threading.main_thread():
        thread.join(60)
print("asked:", asked)
"""


def test_reading_wilds_asks_no_package_index(tmp_path):
    """wilds' import asks PyPI for its latest version in a thread; reading iWildCam must not."""
    import subprocess
    import sys
    from pathlib import Path

    write_wilds_layout(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "OUTDATED_IGNORE"}
    env.update(TMPDIR=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[2]))  # no cached answer
    proc = subprocess.run([sys.executable, "-c", ASKS_NO_ONE, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "asked: []" in proc.stdout, proc.stdout


def test_wilds_ood_validation_is_its_own_locations(tmp_path):
    """data.wilds_validation 'ood' (protocol reference): WILDS' val split, locations neither trained nor tested."""
    rows = write_wilds_layout(tmp_path)
    splits = load_splits({"source": "wilds", "root": str(tmp_path), "wilds_validation": "ood"})
    val = splits["val"]
    assert sorted(map(os.path.basename, val.samples["path"])) == sorted(r["filename"] for r in rows
                                                                         if r["split"] == "val")
    assert {val.domain_names[d] for d in val.domains.tolist()} == {"location_4"} and val.out_of_domain
    assert not set(val.domains.tolist()) & set(splits["test_domain:ood"].domains.tolist())
