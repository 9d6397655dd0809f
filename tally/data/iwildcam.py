"""WILDS iWildCam through the optional ``wilds`` package (pip install 'tally-platform[wilds]').

Camera locations are the domains. Splits follow WILDS: train; val = its in-distribution validation
(id_val: images of the training locations) by default; test_sub = in-distribution test;
test_domain:ood = the held-out test locations together (one key: they are many).

WILDS' out-of-distribution validation (`val`) holds other camera locations, disjoint from both the
training and the test locations, so selecting on it never sees a test image either; the reference
selects on it (main.py:168 with initialize.py:24-26). `validation="ood"` (data.wilds_validation, set by
`protocol: reference`) does the same; it is not oracle selection. The default (id_val) is the
training-domain validation of our `paper` protocol, as for every other dataset.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from tally.data.dataset import MultiDomainDataset, make_samples
from tally.errors import TallyError

SPLITS = {"train": "train", "val": "id_val", "test_sub": "id_test", "test_domain:ood": "test"}


def import_wilds():
    """The ``wilds`` package, imported without its version check (ImportError when not installed).

    wilds/version.py starts a thread at import that asks PyPI for wilds' latest version
    (``outdated.check_outdated``: no timeout, three retries). OUTDATED_IGNORE does not stop it: wilds
    sets that variable itself, and it only silences ``outdated``'s warnings. So ``outdated`` is hidden
    while wilds is first imported: wilds then skips the check. OUTDATED_IGNORE=0, set by the user,
    lets the check run.
    """
    if "wilds" in sys.modules or os.environ.get("OUTDATED_IGNORE") == "0":
        import wilds

        return wilds
    os.environ.setdefault("OUTDATED_IGNORE", "1")
    missing = object()
    saved = sys.modules.get("outdated", missing)
    sys.modules["outdated"] = None  # `from outdated import ...` raises ImportError: wilds skips its check
    try:
        import wilds
    finally:
        if saved is missing:
            del sys.modules["outdated"]
        else:
            sys.modules["outdated"] = saved
    return wilds


def read_iwildcam(root: str | Path, validation: str = "id") -> dict[str, MultiDomainDataset]:
    if validation not in ("id", "ood"):
        raise TallyError(f"data.wilds_validation: expected 'id' or 'ood', got {validation!r}")
    root = Path(root).expanduser()
    hint = f"install tally-platform[wilds] and put the data under {root / 'iwildcam_v2.0'}"
    try:
        get_dataset = import_wilds().get_dataset
    except ImportError:
        raise TallyError(f"the wilds package is not installed: {hint}") from None
    try:
        data = get_dataset(dataset="iwildcam", root_dir=str(root), download=False)
    except Exception as e:  # wilds raises several types for missing or partial data
        raise TallyError(f"cannot open iWildCam under {root} ({type(e).__name__}: {e}): {hint}") from None
    files = np.asarray(data._input_array)  # file names under <data_dir>/train
    labels = np.asarray(data.y_array, dtype=np.int64)
    location = np.asarray(data.metadata_array[:, 0], dtype=np.int64)
    locations, domains = np.unique(location, return_inverse=True)
    image_dir = Path(data.data_dir) / "train"
    paths = [str(image_dir / f) for f in files.tolist()]
    full = MultiDomainDataset(make_samples(paths, labels, domains),
                              [str(c) for c in range(int(data.n_classes))],
                              [f"location_{int(x)}" for x in locations])
    split_array = np.asarray(data.split_array)
    names = {**SPLITS, "val": "id_val" if validation == "id" else "val"}
    out = {key: full.subset(split_array == data.split_dict[name]) for key, name in names.items()}
    if validation == "ood":
        out["val"].out_of_domain = True
        out["val"].notes.append("validation: WILDS' OOD validation locations (neither trained nor tested on)")
    return out
