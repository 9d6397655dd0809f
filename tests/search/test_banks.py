"""The search's pre-flight: which banks a space needs, how they are sharded, and built once by Ray tasks."""

from __future__ import annotations

import pytest
import torch

from tally.data.bank import build_bank, find_cached_bank
from tally.data.synthetic import make_folder_dataset
from tally.search import spec_from_raw
from tally.search.banks import MIN_SHARD_ROWS, data_variants, needed_banks, shards


def spec_with(space: dict, root=None) -> object:
    data = {"source": "folder", "root": str(root), "n_val": 2, "n_test": 2, "imbalance": "natural",
            "image_size": 16} if root else {"source": "embedded", "image_size": 16}
    return spec_from_raw({
        "name": "banks", "base": {"data": data, "model": {"arch": "resnet10"}, "method": {"name": "erm"},
                                  "train": {"epochs": 1, "warmup_epochs": 0, "device": "cpu"}},
        "space": space, "selection": {"metric": "pair_acc_mean"},
        "budget": {"trials": 2, "concurrency": 1}, "resources": {"workers": 1, "cpus_per_worker": 1}})


def test_shards_cover_every_row_once_and_spread_over_cpus():
    for n, row_bytes, cpus in [(10, 3, 2), (20_000, 3 * 96 * 96, 2), (586_000, 3 * 224 * 224, 64), (1, 3, 8)]:
        ranges = shards(n, row_bytes, cpus)
        assert [a for a, _ in ranges] == [0, *[b for _, b in ranges[:-1]]] and ranges[-1][1] == n
        rows = [b - a for a, b in ranges]
        assert all(r <= max(MIN_SHARD_ROWS, 64 * 2**20 // row_bytes) for r in rows)
    assert len(shards(20_000, 3 * 96 * 96, 2)) >= 4  # two per CPU at least
    assert len(shards(586_000, 3 * 224 * 224, 64)) >= 128
    assert shards(MIN_SHARD_ROWS, 3, 8) == [(0, MIN_SHARD_ROWS)]  # one shard: decoded by the driver


def test_data_variants_follow_the_searched_bank_fields():
    assert data_variants(spec_with({"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}})) == [
        spec_with({"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}).trial_config({})["data"]]
    sizes = data_variants(spec_with({"data.image_size": {"type": "categorical", "choices": [16, 24]},
                                     "data.flip": {"type": "categorical", "choices": [True, False]}}))
    assert [v["image_size"] for v in sizes] == [16, 24]  # flip does not change a bank
    ints = data_variants(spec_with({"data.split_seed": {"type": "int", "low": 0, "high": 4, "step": 2}}))
    assert [v["split_seed"] for v in ints] == [0, 2, 4]
    assert data_variants(spec_with({"data.image_size": {"type": "int", "low": 8, "high": 512}})) is None


def test_needed_banks_are_distinct_per_split_and_size(tmp_path):
    root = make_folder_dataset(tmp_path / "d", per_pair=6, size=8)
    spec = spec_with({"data.image_size": {"type": "categorical", "choices": [8, 12]}}, root)
    needed = needed_banks(data_variants(spec) * 2, tmp_path / "banks")  # repeated sections add nothing
    assert sorted((b.split, b.size) for b in needed) == sorted(
        (s, z) for s in ("train", "val", "test_sub") for z in (8, 12))
    assert len({b.path for b in needed}) == 6


@pytest.mark.slow
def test_prepare_builds_missing_banks_once_with_several_tasks(tmp_path, local_ray, monkeypatch):
    from tally.search import banks

    monkeypatch.setattr(banks, "MIN_SHARD_ROWS", 16)  # a small dataset still spreads over tasks
    root = make_folder_dataset(tmp_path / "d", per_pair=20, size=8)
    spec = spec_with({"method.seed": {"type": "int", "low": 0, "high": 3}}, root)
    lines = []
    first = banks.prepare_banks(data_variants(spec), tmp_path / "banks", log=lines.append)
    train = next(r for r in first if r["split"] == "train")
    assert train["built"] and train["tasks"] >= 2 and train["images"] == 9 * 16
    assert any(line.startswith("bank train (144 images at 16px) decoded by") for line in lines)
    ds = needed_banks(data_variants(spec), tmp_path / "banks")[0].ds
    cached = find_cached_bank(ds, 16, tmp_path / "banks")
    assert torch.equal(cached.images, build_bank(ds, 16).images)  # every task wrote its own rows
    again = banks.prepare_banks(data_variants(spec), tmp_path / "banks", log=lines.append)
    assert not any(r["built"] for r in again) and len(lines) == len(first)


@pytest.mark.slow
def test_a_bad_image_fails_the_preflight_in_one_line_and_leaves_nothing(tmp_path, local_ray, monkeypatch):
    from tally.errors import TallyError
    from tally.search import banks

    monkeypatch.setattr(banks, "MIN_SHARD_ROWS", 16)
    root = make_folder_dataset(tmp_path / "d", per_pair=20, size=8)
    bad = sorted(root.rglob("*.png"))[50]
    bad.write_bytes(b"not an image")
    spec = spec_with({"method.seed": {"type": "int", "low": 0, "high": 3}}, root)
    with pytest.raises(TallyError, match=bad.name) as raised:
        banks.prepare_banks(data_variants(spec), tmp_path / "banks", log=None)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "banks").exists()
