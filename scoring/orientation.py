"""The eight ways an X-ray can lie: turned by 0, 90, 180 or 270 degrees, mirrored left-right or not.

Training turns and mirrors copies of its images and teaches the network's orientation head which of these
it gave them (`pipeline.model.orient`, in TensorFlow); serving reads that head and puts the image back
upright before scoring it (`upright`). Orientation number i is: mirrored first when i >= 4, then turned
anticlockwise by 90 degrees (i % 4) times.
"""

from __future__ import annotations

import numpy as np

ORIENTATIONS = (
    "upright",
    "turned 90 degrees anticlockwise",
    "upside down",
    "turned 90 degrees clockwise",
    "mirrored left-right",
    "mirrored and turned 90 degrees anticlockwise",
    "mirrored and upside down",
    "mirrored and turned 90 degrees clockwise",
)
TURNS = len(ORIENTATIONS) // 2
UPRIGHT = 0


def is_mirrored(orientation: int) -> bool:
    return orientation >= TURNS


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """An upright image (rows x columns) put in `orientation` (NumPy twin of `pipeline.model.orient`)."""
    if is_mirrored(orientation):
        image = image[:, ::-1]
    return np.ascontiguousarray(np.rot90(image, k=orientation % TURNS))


def upright(image: np.ndarray, orientation: int) -> np.ndarray:
    """An image found in `orientation`, turned and mirrored back upright: `upright(orient(x, i), i) == x`."""
    image = np.rot90(image, k=-(orientation % TURNS))
    if is_mirrored(orientation):
        image = image[:, ::-1]
    return np.ascontiguousarray(image)
