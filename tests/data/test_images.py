"""The one image decoder against hostile files: crafted in the tests, checked by peak memory or refusal."""

from __future__ import annotations

import io
import struct

import pytest
import torch
from PIL import Image

from tally.data.dataset import read_image
from tally.data.images import ImageError, decode_image


def many_frame_gif(width: int, height: int, frames: int) -> bytes:
    """A GIF whose canvas is width x height and holds ``frames`` frames of 1x1 pixel: ~15 bytes a frame,
    but a decoder that expands every frame to the canvas allocates frames x width x height x 3 bytes."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"  # one pixel, LZW
    return head + frame * frames + b"\x3b"


def jpeg_pil_cannot_size(width: int, height: int) -> bytes:
    """A valid JPEG with a TEM marker (0xFF01) after APP0: libjpeg (torchvision) skips it and decodes
    width x height; PIL's header parser stops at it and cannot tell the size."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 120).save(buffer, format="JPEG", quality=10)
    data = buffer.getvalue()
    assert data[2:4] == b"\xff\xe0"  # APP0 (JFIF) first
    cut = 4 + int.from_bytes(data[4:6], "big")
    return data[:cut] + b"\xff\x01" + data[cut:]


def peak_rss_growth(call) -> int:
    """Bytes the resident-set high-water mark grows by during call() (Linux: clear_refs resets it)."""
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    call()
    return status("VmHWM:") - before


def test_an_animated_gif_decodes_its_first_frame_only():
    gif = many_frame_gif(1000, 1000, 150)  # 2 KB; all frames on the canvas would be 450 MB
    assert len(gif) < 3000
    decode_image(gif, "warm.gif", 2_000_000)  # first call imports decoders: not counted
    out = []
    grown = peak_rss_growth(lambda: out.append(decode_image(gif, "anim.gif", 2_000_000)))
    assert out[0].shape == (3, 1000, 1000) and out[0].dtype == torch.uint8
    assert grown < 60 * 2**20, f"decoding a 2 KB GIF grew the peak RSS by {grown / 2**20:.0f} MiB"


def test_a_jpeg_whose_header_pil_cannot_parse_is_refused_before_decoding(tmp_path):
    data = jpeg_pil_cannot_size(3000, 3000)
    path = tmp_path / "trick.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="trick.jpg: not an image whose size can be read") as e:
        read_image(str(path))  # the data readers' path, limit 40 M pixels: refused, not decoded
    assert e.value.status == 415 and "\n" not in str(e.value)
    with pytest.raises(ImageError, match="req: not an image"):
        decode_image(data, "req", 1_000_000)


def test_the_pixel_limit_is_read_from_the_header_and_applies_to_every_format(tmp_path):
    for kind in ("PNG", "GIF", "BMP", "TIFF", "WEBP", "JPEG"):
        buffer = io.BytesIO()
        Image.new("RGB", (1500, 1000)).save(buffer, format=kind)
        with pytest.raises(ImageError, match="x.img: image is 1500x1000 = 1500000 pixels; the limit is 1000000") as e:
            decode_image(buffer.getvalue(), "x.img", 1_000_000)
        assert e.value.status == 413
        assert decode_image(buffer.getvalue(), "x.img", 1_500_000).shape == (3, 1000, 1500)
    # a header that declares more than twice PIL's limit: PIL's own DecompressionBombError, answered
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, format="PNG")
    with pytest.raises(ImageError, match="the limit is 1000000") as e:
        decode_image(buffer.getvalue(), "y.png", 1_000_000)
    assert e.value.status == 413


def test_files_are_bounded_in_bytes_and_errors_name_them(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue() + bytes(5000))  # trailing bytes after IEND
    monkeypatch.setenv("TALLY_MAX_IMAGE_BYTES", "4000")
    with pytest.raises(ImageError, match=r"big.png: image file is over 4000 bytes \(TALLY_MAX_IMAGE_BYTES") as e:
        read_image(str(path))
    assert e.value.status == 413
    monkeypatch.delenv("TALLY_MAX_IMAGE_BYTES")
    assert read_image(str(path)).shape == (3, 200, 200)
    eps = tmp_path / "x.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError, match="x.eps: not an image"):  # PIL would hand EPS to Ghostscript
        read_image(str(eps))
