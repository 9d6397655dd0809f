"""One dataset abstraction for every source: a table of samples plus the class and domain index spaces.

Readers (folder layout, reference split lists, WILDS, the embedded default) all produce a
``MultiDomainDataset``; everything downstream (split generator, image bank, evaluator) sees only this.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tally.data.images import read_image  # the project's one decoder; re-exported for callers
from tally.errors import TallyError

if TYPE_CHECKING:  # torch is imported where images are decoded: listing and splitting stay light
    import torch

COLUMNS = ("path", "label", "domain")


def make_samples(paths, labels, domains) -> pd.DataFrame:
    """The canonical sample table: absolute paths (str) and int64 label / domain indices."""
    return pd.DataFrame({
        "path": pd.Series(list(paths), dtype=object),
        "label": np.asarray(labels, dtype=np.int64).reshape(-1),
        "domain": np.asarray(domains, dtype=np.int64).reshape(-1),
    })


@dataclass
class MultiDomainDataset:
    """Samples (path, label, domain) over fixed class / domain index spaces shared by all splits.

    ``class_names`` and ``domain_names`` are the full index spaces of the dataset, so a split that
    lacks a domain (held-out) still indexes domains the same way as every other split.
    ``notes`` carries provenance remarks (e.g. where validation came from) for ``describe``.
    ``out_of_domain`` marks a validation split drawn from domains that are neither trained nor tested
    on (TerraIncognita's published OOD split), so reports can say that selection used unseen domains.
    """

    samples: pd.DataFrame
    class_names: list[str]
    domain_names: list[str]
    notes: list[str] = field(default_factory=list)
    out_of_domain: bool = False

    def __post_init__(self):
        missing = [c for c in COLUMNS if c not in self.samples.columns]
        if missing:
            raise ValueError(f"samples lacks columns {missing}")
        self.class_names = [str(c) for c in self.class_names]
        self.domain_names = [str(d) for d in self.domain_names]
        if len(self.samples):
            labels, domains = self.labels, self.domains
            if labels.min() < 0 or labels.max() >= len(self.class_names):
                raise TallyError(f"label out of range [0, {len(self.class_names)}) in dataset samples")
            if domains.min() < 0 or domains.max() >= len(self.domain_names):
                raise TallyError(f"domain out of range [0, {len(self.domain_names)}) in dataset samples")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return self.samples["label"].to_numpy(dtype=np.int64)

    @property
    def domains(self) -> np.ndarray:
        return self.samples["domain"].to_numpy(dtype=np.int64)

    @property
    def paths(self) -> list[str]:
        return self.samples["path"].tolist()

    def counts(self) -> np.ndarray:
        """(D, C) int64 number of samples per (domain, class) pair, from the table alone."""
        n_d, n_c = len(self.domain_names), len(self.class_names)
        flat = np.bincount(self.domains * n_c + self.labels, minlength=n_d * n_c)
        return flat.astype(np.int64).reshape(n_d, n_c)

    def subset(self, index) -> MultiDomainDataset:
        """Rows selected by positions or a boolean mask; index spaces, notes and the OOD flag are kept."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        rows = self.samples.iloc[index.astype(np.int64)].reset_index(drop=True)
        return MultiDomainDataset(rows, list(self.class_names), list(self.domain_names), list(self.notes),
                                  self.out_of_domain)

    def load_image(self, i: int) -> torch.Tensor:
        """Decode sample i as a uint8 (3, H, W) RGB tensor."""
        return read_image(self.samples["path"].iat[int(i)])

    def fingerprint(self) -> str:
        """sha256 of the sample list and index spaces: the key of anything cached from this dataset."""
        h = hashlib.sha256()
        h.update("\x1f".join(self.class_names).encode())
        h.update(b"\x1e")
        h.update("\x1f".join(self.domain_names).encode())
        h.update(b"\x1e")
        table = self.samples
        rows = (table["path"].astype(str) + "\t" + table["label"].astype(str) + "\t"
                + table["domain"].astype(str))
        h.update("\n".join(rows.tolist()).encode())
        return h.hexdigest()
