"""The one serving preprocessing: raw file bytes -> 8-bit greyscale pixels -> model input.

Training (preprocess stage), the predict CLI, the app and the MLflow model all go through
`decode_greyscale` and `resize_grey`, so a model never sees pixels prepared differently from what it
was trained on. Every failure is an `ImageDecodeError` (a `ValueError`) with a message fit to show a user.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from scoring.dicom import decode_dicom
from scoring.pixels import (
    DICOM_MAGIC_OFFSET,
    MAX_FILE_BYTES,
    MAX_PIXELS,
    MIN_SIDE,
    RASTER_FORMATS,
    ImageDecodeError,
    describe,
    is_dicom,
    stretch_to_uint8,
)
from scoring.wording import too_large

__all__ = [
    "DICOM_MAGIC_OFFSET",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "RASTER_FORMATS",
    "ImageDecodeError",
    "decode_greyscale",
    "describe",
    "is_dicom",
    "read_bytes",
    "resize_grey",
    "resize_to",
    "stretch_to_uint8",
]


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
        raise ImageDecodeError(too_large(size, max_bytes))


def decode_greyscale(data: bytes, max_bytes: int = MAX_FILE_BYTES) -> np.ndarray:
    """Decode PNG/JPEG (any mode, EXIF orientation honoured) or DICOM bytes to a 2-D uint8 array."""
    _check_size(len(data), max_bytes)
    if is_dicom(data):
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


def resize_grey(grey: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D uint8 image to size x size; aspect is not kept, as in the training data."""
    return resize_to(grey, (size, size))


def resize_to(grey: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D uint8 image to (height, width) with PIL's bilinear filter (antialiased when shrinking).

    The browser page (`serving/web`) reimplements exactly this filter, so keep them in step."""
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 array, got {grey.dtype} with shape {grey.shape}")
    height, width = shape
    if grey.shape == (height, width):
        return grey
    return np.asarray(Image.fromarray(grey).resize((width, height), Image.Resampling.BILINEAR))
