"""What the image decoders share: the error type, the limits, the DICOM marker, bit-depth stretching.

Both `scoring.imaging` (PNG/JPEG, and the dispatch) and `scoring.dicom` build on this module, so
neither imports the other's internals.
"""

from __future__ import annotations

import numpy as np

# The one upload limit per file, for every client (app, REST, on-device page, CLI, Spark); a deployment may
# lower it (`python app.py --max-file-mb`), never raise it. Sizes are in MB (10^6 bytes) everywhere.
MAX_FILE_BYTES = 50_000_000
# File name suffixes taken for images when a folder is searched (names without one are tested for the DICOM
# marker); the decoders go by content, not by name.
IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "tif", "tiff", "bmp", "gif", "webp", "dcm", "dicom")
# Largest chest X-ray detectors are ~4300 x 4300; anything far above that is a bomb or not an X-ray.
MAX_PIXELS = 50_000_000
MIN_SIDE = 32
DICOM_MAGIC_OFFSET = 128
# Formats PIL may try (JPEG includes its multi-picture MPO variant). Others are refused rather than
# handed to rarely exercised decoders, and EPS would run Ghostscript on the upload.
RASTER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP")


class ImageDecodeError(ValueError):
    """An input that cannot be turned into a greyscale image, with a reason a user can act on."""


def describe(error: BaseException) -> str:
    """An exception's message, or its type where it has none (IndexError() reads as nothing)."""
    return str(error) or type(error).__name__


def is_dicom(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def stretch_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map a high-bit-depth array linearly onto 0..255 using its own min and max."""
    pixels = np.asarray(pixels, dtype=np.float64)
    if not np.isfinite(pixels).all():
        raise ImageDecodeError("image holds non-finite pixel values")
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - low) * (255.0 / (high - low))).astype(np.uint8)
