"""Decoding one encoded image (JPEG, PNG, ...) with a bound on what it may cost.

An image file says its own size in its header, and a few kilobytes of PNG can
say 12000x12000: decoding it allocates 432 MB of RGB (more on the way, in
PIL's intermediate buffers). So `decode_image` reads the header first and
refuses images over `MAX_IMAGE_PIXELS` before anything is decoded, and the
loaders refuse image *files* over `image_file_limit` before they are read.
Only the decoders in `FORMATS` are used, whatever the file's content says.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

from localssl.data.base import DatasetError
from localssl.data.files import SizeLimit

#: The most pixels (height x width) an image may declare: 8192 x 8192. That is
#: well above anything a camera or an image data set in this field stores
#: (ImageNet photos are a few megapixels) and keeps one decoded RGB image at
#: 192 MiB. PIL's own guard (`PIL.Image.MAX_IMAGE_PIXELS`, ~89 M) only warns
#: until twice its value, which let a 12000 x 12000 PNG through. Raise it with
#: the environment variable ``LOCALSSL_MAX_IMAGE_PIXELS`` or by assigning
#: ``localssl.data.images.MAX_IMAGE_PIXELS``; both are read at decode time.
MAX_IMAGE_PIXELS = 1 << 26

#: PIL modes that hold one gray channel (kept single-channel when asked).
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")

#: The only decoders PIL may use: those of the file names the loaders read
#: (``.jpg .jpeg .png .bmp .webp``; camera JPEGs that PIL calls MPO come in
#: through its JPEG decoder). Content decides the format, not the name, so
#: without this an EPS file named ``x.png`` would be handed to Ghostscript,
#: an external program, and dozens of rarely-used decoders would parse
#: whatever a data set ships.
FORMATS = ("JPEG", "PNG", "BMP", "WEBP")

_HOW_TO_RAISE = "set LOCALSSL_MAX_IMAGE_PIXELS (or localssl.data.images.MAX_IMAGE_PIXELS) to allow larger images"


def max_image_pixels() -> int:
    """The pixel limit in force: ``$LOCALSSL_MAX_IMAGE_PIXELS`` if set, else `MAX_IMAGE_PIXELS`."""
    env = os.environ.get("LOCALSSL_MAX_IMAGE_PIXELS")
    if env:
        try:
            return int(env)
        except ValueError:
            raise DatasetError(f"LOCALSSL_MAX_IMAGE_PIXELS must be an integer, got {env!r}") from None
    return MAX_IMAGE_PIXELS


def image_file_limit() -> SizeLimit:
    """The most bytes one image file may have: an uncompressed 8-bit RGBA image at the pixel limit.

    Compressed formats need far less; the bound is there so that a member or
    file declaring hundreds of megabytes is refused before it is read.
    """
    pixels = max_image_pixels()
    # 64 KiB on top: headers, palettes and metadata chunks of an image that is all pixels.
    return SizeLimit(4 * pixels + (64 << 10), f"an image file of at most {pixels:,} pixels ({_HOW_TO_RAISE})")


def _open(data: bytes, where: str) -> Image.Image:
    """Open (header only) and refuse images over the pixel limit before any decoding."""
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            # PIL warns from ~89 M pixels; our own limit decides, just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:  # over twice PIL's limit: ours is lower unless raised
        raise DatasetError(f"{where}: image too large to decode ({e}); {_HOW_TO_RAISE}") from e
    except Image.UnidentifiedImageError as e:
        raise DatasetError(f"{where}: cannot decode image: not a {', '.join(FORMATS)} file") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... depending on the codec
        raise DatasetError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e
    w, h = im.size
    if w * h > limit:
        im.close()
        raise DatasetError(
            f"{where}: image is {h}x{w} = {w * h:,} pixels, more than the limit of {limit:,}; "
            f"not decoding it ({_HOW_TO_RAISE})"
        )
    return im


def decode_image(data: bytes, where: str, size: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """Encoded bytes (JPEG, PNG, ...) -> uint8 ``(H, W, channels)``, optionally resized to ``size=(H, W)``.

    ``channels=3``: grayscale, palette and RGBA images become RGB;
    ``channels=1``: everything becomes 8-bit gray (PIL's "L"). An image over
    `MAX_IMAGE_PIXELS` is refused from its header, before it is decoded. Any
    decoding failure (unknown format, truncated file) is a `DatasetError`
    naming ``where``.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    im = _open(data, where)
    try:
        with im:
            out = im.convert("L" if channels == 1 else "RGB")  # decodes fully: a truncated file fails here
        if size is not None and out.size != (size[1], size[0]):
            out = out.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        arr = np.asarray(out, dtype=np.uint8)
        return arr[..., None] if arr.ndim == 2 else arr
    except Exception as e:
        raise DatasetError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e


def image_mode(data: bytes, where: str) -> str:
    """PIL mode of an encoded image, from its header only."""
    with _open(data, where) as im:
        return str(im.mode)
