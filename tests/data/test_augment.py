"""Vectorised batch augmentation: shapes, determinism, that flips flip and crops are padded windows."""

import pytest
import torch
import torch.nn.functional as F

from tally.data.augment import IMAGENET_MEAN, IMAGENET_STD, augment, to_float_normalized


def batch(b=32, s=8, seed=0):
    return torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_normalisation():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = to_float_normalized(x)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert out.dtype == torch.float32 and torch.allclose(out[0, :, 0, 0], expected)
    assert torch.equal(augment(x, gen(0), flip=False, crop_padding=0), out)


def test_shapes_and_determinism():
    x = batch()
    a = augment(x, gen(1), flip=True, crop_padding=2)
    b = augment(x, gen(1), flip=True, crop_padding=2)
    c = augment(x, gen(2), flip=True, crop_padding=2)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flip_flips():
    x = batch(64)
    out = augment(x, gen(3), flip=True, crop_padding=0)
    plain, mirrored = to_float_normalized(x), to_float_normalized(x.flip(-1))
    same = (out == plain).flatten(1).all(1)
    flipped = (out == mirrored).flatten(1).all(1)
    assert (same | flipped).all()
    assert 10 < int(flipped.sum()) < 54, "about half the batch should be flipped"


@pytest.mark.parametrize("flip", [False, True])
def test_crop_is_a_window_of_the_reflect_padded_image(flip):
    p, s = 3, 8
    x = batch(24, s, seed=4)
    out = augment(x, gen(5), flip=flip, crop_padding=p)
    padded = F.pad(x.float(), (p, p, p, p), mode="reflect")
    windows = padded.unfold(2, s, 1).unfold(3, s, 1)  # (B, 3, 2p+1, 2p+1, s, s)
    windows = windows.permute(0, 2, 3, 1, 4, 5).flatten(1, 2)  # (B, (2p+1)^2, 3, s, s)
    if flip:
        windows = torch.cat([windows, windows.flip(-1)], dim=1)
    candidates = to_float_normalized(windows.flatten(0, 1).to(torch.uint8)).view(windows.shape)
    match = (candidates == out[:, None]).flatten(2).all(2).any(1)
    assert match.all()
    shifted = ~(out == to_float_normalized(x)).flatten(1).all(1)
    assert shifted.sum() > 12, "most crops should move the image"


def test_padding_must_fit():
    with pytest.raises(ValueError, match="crop_padding"):
        augment(batch(2, 4), gen(0), flip=False, crop_padding=4)
