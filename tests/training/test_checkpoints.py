"""Checkpoints hold no device-specific random state: a run saved on GPUs resumes on fewer GPUs or on the
CPU, and the other way round. No GPU here: a GPU run's states are simulated where the CPU allows (the
per-GPU list torch.cuda.get_rng_state_all() returned; a device generator's 16-byte Philox state)."""

from __future__ import annotations

import random

import pytest
import torch

from tally import results
from tally.config import validate
from tally.data import load_splits
from tally.data.bank import bank_for_training
from tally.errors import TallyError
from tally.training import BatchSource, train_run
from tally.training.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state

CUDA_STATES = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # 2 GPUs' Philox states


def test_rng_state_is_device_independent_and_ignores_old_per_gpu_states():
    torch.manual_seed(5)
    random.seed(5)
    state = rng_state()
    assert set(state) == {"torch", "python"}  # no per-GPU entry a resume on fewer GPUs could not restore
    want = (torch.rand(3), random.random())
    set_rng_state(state | {"cuda": CUDA_STATES})  # what older checkpoints written on 2 GPUs hold
    assert torch.equal(torch.rand(3), want[0]) and random.random() == want[1]


def _source(placement="device"):
    cfg = validate({"data": {"source": "embedded", "max_per_class": 12, "flip": True, "crop_padding": 2}})
    train = load_splits(cfg["data"])["train"]
    return BatchSource(bank_for_training(train, 32), cfg["data"], 4, 0, torch.device("cpu"), placement=placement)


def _as_if_on_a_gpu(source: BatchSource) -> BatchSource:
    """On a GPU each augmentation draws from a device generator seeded from the rank's CPU stream; a CPU
    generator stands in for the device's."""
    source._device_generator = torch.Generator()
    return source


def test_sampler_and_augmentation_states_are_cpu_states_on_any_device():
    gpu, cpu = _as_if_on_a_gpu(_source()), _source()
    for s in (gpu, cpu):
        s.draw(("class_balanced", "domain_balanced"))
    for s in (gpu, cpu):
        for rank in s.state_dict():
            assert rank["augment"].numel() == torch.Generator().get_state().numel()
    # a "GPU" source's state resumes a fresh "GPU" source exactly, and loads into a CPU one
    again = _as_if_on_a_gpu(_source())
    again.load_state_dict(gpu.state_dict())
    for a, b in zip(again.draw(("uniform",)), gpu.draw(("uniform",)), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    _source().load_state_dict(gpu.state_dict())


def test_an_augmentation_state_saved_from_a_device_generator_is_refused_with_one_line():
    source = _source()
    state = source.state_dict()
    state[0]["augment"] = CUDA_STATES[0]
    with pytest.raises(TallyError, match="device generator"):
        source.load_state_dict(state)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_checkpoint_written_on_two_gpus_resumes_on_the_cpu(tmp_path):
    """last.pt carrying two GPUs' global RNG states (as checkpoints did) resumes on the CPU and ends
    where a straight run ends."""
    cfg = {"data": {"source": "embedded", "max_per_class": 6, "image_size": 16},
           "model": {"arch": "resnet10", "cut": "layer2"}, "method": {"name": "tally"},
           "train": {"epochs": 2, "warmup_epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "device": "cpu"}}
    train_run(cfg, tmp_path / "straight")
    train_run(cfg, tmp_path / "resumed", stop_after_epoch=0)
    last = tmp_path / "resumed" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["rng"]["cuda"] = CUDA_STATES
    save_checkpoint(last, state)
    train_run(cfg, tmp_path / "resumed", resume=True)
    assert results.read_run(tmp_path / "resumed").state == "done"
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(last)["model"]
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key


def test_a_checkpoint_honours_the_umask_and_never_writes_through_a_link(tmp_path):
    import os
    import stat

    from tally.training.checkpoints import load_checkpoint, save_checkpoint

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "last.pt").symlink_to(victim)
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    finally:
        os.umask(old)
    assert victim.read_bytes() == b"precious" and not (tmp_path / "last.pt").is_symlink()
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == 0o644
    assert load_checkpoint(tmp_path / "last.pt") == {"epoch": 1}
