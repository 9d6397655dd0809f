"""model.pt2 is not safe to load from others (torch.export.load unpickles without restriction): the
README and every bundle's model card say so and name the safe ways. The claim itself is checked
against the installed torch's source, so the advice is revisited if torch changes."""

from __future__ import annotations

import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_torch_export_load_still_unpickles_what_the_archive_marks():
    from torch.export.pt2_archive import _package

    source = inspect.getsource(_package._load_state_dict) + inspect.getsource(_package._load_constants)
    assert "weights_only=False" in source and "pickle.loads" in source


def test_model_card_warns_and_names_the_safe_ways():
    from tally.deploy.export import _model_card

    config = {"method": {"name": "tally"}, "model": {"arch": "resnet10", "cut": "layer2"},
              "data": {"image_size": 32, "source": "embedded", "setting": "sub", "held_out": [],
                       "oracle_selection": False},
              "train": {"selection_metric": "pair_acc_mean"}}
    provenance = {"code": {"package": "tally-platform", "version": "0"}, "seeds": {"train": 0, "split": 0}}
    card = _model_card(config, {}, "t0", {"classes": ["a"], "domains": ["d"]}, provenance)
    loading = card.split("Loading:", 1)[1]
    assert "torch.export.load" in loading and "run code" in loading
    assert "tally predict" in loading and "onnxruntime" in loading and "sha256" in loading


def test_readme_warns_before_it_shows_torch_export_load():
    readme = (ROOT / "README.md").read_text()
    before = readme[:readme.index('torch.export.load("bundle/model.pt2")')]
    advice = before[before.rindex("Load `model.pt2`"):]
    assert "can run code" in advice and "weights_only=False" in advice
    assert "tally predict" in advice and "onnxruntime" in advice
