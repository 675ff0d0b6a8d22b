"""The class-activation map as a heatmap over the X-ray: where the model looked, not where a lesion is.

The artefact's `cam` output is in calibrated logit units per feature-map cell (positive: towards
pneumonia). For a PNEUMONIA decision the positive part is shown, for NORMAL the negative part, each
scaled so its strongest cell is 1; the map covers the central region the network sees (`Decision.crop`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Weight of the colour map where the heatmap is 1; where it is 0 the X-ray shows through unchanged.
OVERLAY_ALPHA = 0.6
# The map is drawn at most this many pixels a side, on the server page and on the on-device page: enough to
# see, cheap to send.
OVERLAY_MAX_SIDE = 512
# matplotlib's "jet" colour map, as its piecewise-linear segments (no matplotlib needed to serve).
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def heatmap(cam: np.ndarray, shape: tuple[int, int], towards_pneumonia: bool, crop: float = 1.0) -> np.ndarray:
    """A float32 map in [0, 1] of `shape` (height, width): 1 where the evidence for the decision is
    strongest, 0 where there is none (and outside the region the network sees)."""
    evidence = np.maximum(np.asarray(cam, dtype=np.float32) * (1.0 if towards_pneumonia else -1.0), 0.0)
    peak = float(evidence.max())
    height, width = int(shape[0]), int(shape[1])
    inner_height, inner_width = max(1, round(height * crop)), max(1, round(width * crop))
    resized = Image.fromarray(evidence / peak if peak > 0 else evidence).resize(
        (inner_width, inner_height), Image.Resampling.BILINEAR)
    inner = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    inner_peak = float(inner.max())
    # Interpolation between cell centres shaves an isolated peak: rescale so the strongest region is 1.
    inner = inner / inner_peak if inner_peak > 0 else inner
    heat = np.zeros((height, width), dtype=np.float32)
    top, left = (height - inner_height) // 2, (width - inner_width) // 2
    heat[top:top + inner_height, left:left + inner_width] = inner
    return heat


def _colour_table(levels: int = 256) -> np.ndarray:
    steps = np.linspace(0.0, 1.0, levels)
    channels = [np.interp(steps, [p for p, _ in points], [v for _, v in points]) for points in _JET.values()]
    return (np.stack(channels, axis=-1) * 255.0).astype(np.float32)


_COLOURS = _colour_table()
_PALETTE = np.round(_COLOURS).astype(np.uint8).ravel().tolist()


def colourise(heat: np.ndarray) -> np.ndarray:
    """float [0, 1] map -> RGB float32 0..255 through the jet colour map (a 256-level table)."""
    return _COLOURS[np.round(np.clip(heat, 0.0, 1.0) * (len(_COLOURS) - 1)).astype(np.intp)]


def overlay(grey: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGB uint8 (H x W x 3): the greyscale image with the heatmap's colours blended in where it is high
    (weight `alpha` x heat), composed by PIL in C: this runs on every request."""
    if grey.ndim != 2 or heat.shape != grey.shape:
        raise ValueError(f"expected a 2-D image and a heatmap of its shape, got {grey.shape} and {heat.shape}")
    levels = np.round(np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    colours = Image.fromarray(levels, mode="L").convert("P")
    colours.putpalette(_PALETTE)
    weight = Image.fromarray(np.round(levels * alpha).astype(np.uint8), mode="L")
    base = Image.fromarray(np.asarray(grey, dtype=np.uint8), mode="L").convert("RGB")
    return np.asarray(Image.composite(colours.convert("RGB"), base, weight))
