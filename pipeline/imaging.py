"""The one serving preprocessing: raw file bytes -> 8-bit greyscale pixels -> model input.

Training (preprocess stage), the predict CLI and the app all go through `decode_greyscale` and
`to_model_input`, so a model never sees pixels prepared differently from what it was trained on.
Every failure is an `ImageDecodeError` (a `ValueError`) with a message fit to show a user.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_FILE_BYTES = 50 * 1024 * 1024
# Largest chest X-ray detectors are ~4300 x 4300; anything far above that is a bomb or not an X-ray.
MAX_PIXELS = 50_000_000
MIN_SIDE = 32
DICOM_MAGIC_OFFSET = 128
# Formats PIL may try (JPEG includes its multi-picture MPO variant). Others are refused rather than
# handed to rarely exercised decoders, and EPS would run Ghostscript on the upload.
RASTER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP")


class ImageDecodeError(ValueError):
    """An input that cannot be turned into a greyscale image, with a reason a user can act on."""


def read_bytes(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    path = Path(path)
    if path.is_dir():
        raise ImageDecodeError(f"{path.name}: is a folder, not an image file")
    if not path.is_file():
        raise ImageDecodeError(f"{path.name}: no such file")
    try:
        _check_size(path.stat().st_size, max_bytes)  # refuse before reading a huge file
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)  # one byte past the cap: the file may have grown
    except OSError as error:
        raise ImageDecodeError(f"{path.name}: cannot be read ({error.strerror or error})") from error
    _check_size(len(data), max_bytes)
    return data


def _check_size(size: int, max_bytes: int) -> None:
    if size == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    if size > max_bytes:
        actual, limit = _format_bytes(size), _format_bytes(max_bytes)
        if actual == limit:  # just over the cap: rounded, both would read the same ("52.4 MB, over 52.4 MB")
            actual, limit = f"{size:,} bytes", f"{max_bytes:,}-byte"
        raise ImageDecodeError(f"file is {actual}, over the {limit} limit")


def _format_bytes(count: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} bytes"


def describe(error: BaseException) -> str:
    """An exception's message, or its type where it has none (IndexError() reads as nothing)."""
    return str(error) or type(error).__name__


def is_dicom(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def decode_greyscale(data: bytes, max_bytes: int = MAX_FILE_BYTES) -> np.ndarray:
    """Decode PNG/JPEG (any mode, EXIF orientation honoured) or DICOM bytes to a 2-D uint8 array."""
    _check_size(len(data), max_bytes)
    if is_dicom(data):
        from pipeline.dicom import decode_dicom  # pydicom is only imported when a DICOM arrives

        pixels = decode_dicom(data)
    else:
        pixels = _decode_raster(data)
    _check_dimensions(pixels.shape[1], pixels.shape[0])
    return pixels


def _decode_raster(data: bytes) -> np.ndarray:
    # No warnings.catch_warnings() to turn PIL's DecompressionBombWarning into an error: it is not
    # thread-safe (preprocess and the app decode on threads), and MAX_PIXELS is below PIL's warning
    # threshold, so _check_dimensions refuses every such image before a pixel is decoded anyway.
    try:
        with Image.open(io.BytesIO(data), formats=RASTER_FORMATS) as image:
            _check_dimensions(*image.size)
            _check_single_frame(image)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_uint8_grey(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        # Raised by Image.open itself, before the size is known to us, for over twice PIL's limit.
        raise ImageDecodeError(
            f"image dimensions are over the {MAX_PIXELS / 1e6:.0f} megapixel limit"
        ) from error
    except UnidentifiedImageError as error:
        raise ImageDecodeError("not a recognised image (expected PNG, JPEG or DICOM)") from error
    except Exception as error:
        # PIL's decoders report malformed streams as OSError and SyntaxError, but also as EOFError,
        # struct.error, IndexError, ZeroDivisionError or MemoryError: none may escape as a crash.
        raise ImageDecodeError(f"corrupt or truncated image: {describe(error)}") from error


def _check_single_frame(image: Image.Image) -> None:
    # MPO is how phones save a JPEG with extra preview/depth pictures: its first frame is the photo.
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":
        raise ImageDecodeError(f"{image.format} with {frames} frames: upload a single still image")


def _check_dimensions(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(
            f"image is {width} x {height} pixels, over the {MAX_PIXELS / 1e6:.0f} megapixel limit"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageDecodeError(f"image is {width} x {height} pixels, too small to be an X-ray")


def _to_uint8_grey(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return stretch_to_uint8(np.asarray(image, dtype=np.float64))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # X-rays are bright-on-black: fill transparent areas with black, not with white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "L":
        image = image.convert("RGB").convert("L")  # via RGB so CMYK, YCbCr and palettes map the same way
    return np.asarray(image, dtype=np.uint8)


def stretch_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map a high-bit-depth array linearly onto 0..255 using its own min and max."""
    pixels = np.asarray(pixels, dtype=np.float64)
    if not np.isfinite(pixels).all():
        raise ImageDecodeError("image holds non-finite pixel values")
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - low) * (255.0 / (high - low))).astype(np.uint8)


def resize_grey(grey: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D uint8 image to size x size; aspect is not kept, as in the training data."""
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 array, got {grey.dtype} with shape {grey.shape}")
    if grey.shape == (size, size):
        return grey
    return np.asarray(Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR))


def to_model_input(grey: np.ndarray, size: int) -> np.ndarray:
    """2-D uint8 image -> float32 (size, size, 1); values stay raw 0..255, the model rescales them."""
    return resize_grey(grey, size).astype(np.float32)[..., np.newaxis]


def load_for_model(path: Path, size: int) -> np.ndarray:
    """File on disk -> model input (size, size, 1) float32; raises ImageDecodeError."""
    return to_model_input(decode_greyscale(read_bytes(path)), size)
