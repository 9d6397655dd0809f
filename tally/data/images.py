"""The one image decoder of the project: data readers, image banks, `tally predict` and `tally serve`.

Images come from others (datasets, HTTP requests), so every decode follows the same rules:
- the input is bounded in bytes before it is read (``max_bytes``);
- PIL reads the header, and width x height is checked against ``max_pixels`` BEFORE any pixel is
  decoded. A file whose header PIL cannot size is refused, not handed to another decoder: libjpeg
  decodes JPEGs that PIL cannot parse (an unknown marker), and such a file used to skip the check;
- only the first frame is decoded. An animated GIF / PNG / WebP or a multi-page TIFF is read as its
  first frame (what a classifier of still images sees), because torchvision's GIF decoder expands
  every frame to the full canvas: a 7 KB GIF of 1x1 frames on a large canvas cost a GiB;
- PIL's own limit (``Image.MAX_IMAGE_PIXELS``) is set to the same value, so no PIL path decodes past
  it, and only the formats below are opened (PIL's EPS plugin, say, runs Ghostscript).

Errors are ``ImageError``: one line naming the file, with the HTTP status a server answers with.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import TYPE_CHECKING

from tally.errors import TallyError

if TYPE_CHECKING:
    import torch

MAX_PIXELS = 40_000_000  # width x height; override with TALLY_MAX_PIXELS (the paper's images are < 4M)
MAX_BYTES = 64 * 2**20  # one image file; override with TALLY_MAX_IMAGE_BYTES
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
TORCHVISION_FORMATS = ("JPEG", "PNG")  # decoded as one frame by torchvision (the decoder training used)


class ImageError(TallyError):
    """A refused or undecodable image; ``status`` is the HTTP status `tally serve` answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _limit(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else default


def max_pixels() -> int:
    return _limit("TALLY_MAX_PIXELS", MAX_PIXELS)


def max_bytes() -> int:
    return _limit("TALLY_MAX_IMAGE_BYTES", MAX_BYTES)


def _pil(limit: int):
    from PIL import Image

    # PIL raises DecompressionBombError past 2x this and warns past 1x; the check below refuses
    # anything past 1x itself, so the warning is noise. Plain assignment: safe across threads.
    if limit != Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return Image


def image_size(data: bytes, name: str, limit: int, hint: str = "") -> tuple[int, int, str]:
    """(width, height, format) from the header alone; ImageError if unreadable or over ``limit`` pixels."""
    Image = _pil(limit)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:  # parses the header only
            width, height, kind = *im.size, im.format
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image has more than {2 * limit} pixels; the limit is {limit}{hint}", 413) from None
    except Exception:  # PIL raises many types on what it cannot parse
        raise ImageError(f"{name}: not an image whose size can be read (expected {', '.join(FORMATS)})",
                         415) from None
    if width * height > limit:
        raise ImageError(f"{name}: image is {width}x{height} = {width * height} pixels; the limit is {limit}{hint}",
                         413)
    return width, height, kind


def decode_image(data: bytes, name: str, limit: int | None = None, hint: str = "") -> torch.Tensor:
    """uint8 (3, H, W) RGB of the first frame of encoded bytes, size checked before decoding.

    torchvision's decoder for JPEG and PNG (fast, and what the training data were decoded with), PIL for
    the rest and for what torchvision refuses.
    """
    import torch

    limit = max_pixels() if limit is None else int(limit)
    width, height, kind = image_size(data, name, limit, hint)
    if kind in TORCHVISION_FORMATS:
        import torchvision.io as tio

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision >= 0.29 warns that its decoders are deprecated
                image = tio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                         mode=tio.ImageReadMode.RGB)
            if image.dtype == torch.uint8 and tuple(image.shape) == (3, height, width):
                return image
        except Exception:  # any torchvision decoder failure falls through to PIL
            pass
    return _decode_with_pil(data, name, limit, (width, height))


def _decode_with_pil(data: bytes, name: str, limit: int, size: tuple[int, int]) -> torch.Tensor:
    import numpy as np
    import torch

    Image = _pil(limit)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            if im.size != size:  # the header parsed twice must agree; never decode past the checked size
                raise ValueError(f"size {im.size} differs from the checked {size}")
            im.seek(0)
            im.load()  # the first frame only
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale, don't clip
                arr = np.asarray(im, dtype=np.float64)
                arr = (arr / max(arr.max(), 1.0) * 255.0).astype(np.uint8)
                arr = np.repeat(arr[..., None], 3, axis=2)
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt data
        reason = str(e).splitlines()[0][:200] if str(e) else ""
        raise ImageError(f"{name}: cannot decode the image ({type(e).__name__}{': ' + reason if reason else ''})",
                         400) from None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def read_image(path: str, limit: int | None = None, size_limit: int | None = None) -> torch.Tensor:
    """uint8 (3, H, W) RGB of an image file (decode_image), reading at most ``size_limit`` bytes
    (default TALLY_MAX_IMAGE_BYTES) and decoding at most ``limit`` pixels (default TALLY_MAX_PIXELS)."""
    size_limit = max_bytes() if size_limit is None else int(size_limit)
    try:
        with open(path, "rb") as f:
            data = f.read(size_limit + 1)
    except FileNotFoundError:
        raise TallyError(f"image not found: {path}") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read the image ({e.strerror or type(e).__name__})") from None
    if len(data) > size_limit:
        raise ImageError(f"{path}: image file is over {size_limit} bytes (TALLY_MAX_IMAGE_BYTES raises the limit)",
                         413)
    return decode_image(data, str(path), limit, hint=" (TALLY_MAX_PIXELS raises it)")
