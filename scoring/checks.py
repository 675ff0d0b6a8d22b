"""Cheap plausibility checks run before scoring, the same for every way of serving.

They refuse obvious mistakes only (a colour photo, a strip, a blank image); `CHECKS_TEXT` says so to
users. Whether an image really is a paediatric frontal chest X-ray is the out-of-distribution gate's
question, answered from the model's own features after scoring.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from scoring.pixels import RASTER_FORMATS, is_dicom

COLOUR_SPREAD_LIMIT = 32.0  # mean of max-min over R, G, B per pixel, on 0..255
MAX_ASPECT = 3.0
MIN_PIXEL_STD = 4.0
COLOUR_PROBE_SIZE = 128

CHECKS_TEXT = (
    "An image is not scored if it is strongly coloured (PNG and JPEG only: mean spread between colour "
    f"channels above {COLOUR_SPREAD_LIMIT:.0f} of 255), if one side is over {MAX_ASPECT:.0f} times the "
    "other, or if it is almost uniform."
)


def implausibility(data: bytes, grey: np.ndarray) -> str | None:
    """Why a decoded image is implausible as a chest X-ray, or None."""
    height, width = grey.shape
    if max(height, width) > MAX_ASPECT * min(height, width):
        return f"not scored: {width} x {height} pixels is too elongated for a chest X-ray"
    if float(grey.std()) < MIN_PIXEL_STD:
        return "not scored: the image is almost uniform"
    spread = colour_spread(data)
    if spread is not None and spread > COLOUR_SPREAD_LIMIT:
        return f"not scored: strongly coloured (channel spread {spread:.0f} of 255); X-rays are greyscale"
    return None


def colour_spread(data: bytes) -> float | None:
    """Mean over pixels of (max - min) of R, G, B, from a small thumbnail; 0 for greyscale modes.

    Called only on bytes the decoder has accepted (so size and format are already checked). None for
    DICOM and for anything PIL cannot reopen: no claim is made then.
    """
    if is_dicom(data):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=RASTER_FORMATS) as image:
            if image.mode in ("1", "L", "LA", "I", "F") or image.mode.startswith("I;16"):
                return 0.0
            image.draft("RGB", (COLOUR_PROBE_SIZE, COLOUR_PROBE_SIZE))  # JPEG: decode at reduced scale
            image.thumbnail((COLOUR_PROBE_SIZE, COLOUR_PROBE_SIZE))
            rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    except Exception:  # noqa: BLE001 (the real decode already succeeded; this check is best effort)
        return None
    return float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean())
