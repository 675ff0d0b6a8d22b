"""The prepared splits on disk: compact, deterministic .npz files of 8-bit greyscale images and labels.

Written by the preprocess stage, read by every later stage (no stage imports another for this).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.paths import split_file

# The kind of pneumonia, from the dataset's file names (`personN_bacteria_M`, `personN_virus_M`).
NO_SUBTYPE, BACTERIAL, VIRAL = -1, 0, 1
SUBTYPE_NAMES = ("BACTERIAL", "VIRAL")


@dataclass(frozen=True)
class Split:
    """One prepared split: uint8 images N x S x S, uint8 labels N, the patient of each image, and the kind
    of each pneumonia (int8: BACTERIAL, VIRAL, or NO_SUBTYPE for normals and unnamed files)."""

    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    subtypes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.subtypes is None:
            object.__setattr__(self, "subtypes", np.full(len(self.labels), NO_SUBTYPE, dtype=np.int8))

    def __len__(self) -> int:
        return len(self.labels)


def save_split(path: Path, split: Split) -> None:
    save_arrays(path, images=split.images, labels=split.labels, patients=split.patients.astype(str),
                subtypes=split.subtypes.astype(np.int8))


def load_split(name: str) -> Split:
    """A prepared split by name (train, val, test or external)."""
    with np.load(split_file(name)) as arrays:
        subtypes = arrays["subtypes"] if "subtypes" in arrays.files else None
        return Split(arrays["images"], arrays["labels"], arrays["patients"], subtypes)


def has_split(name: str) -> bool:
    return split_file(name).is_file()


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """An .npz that np.load reads, byte-identical for identical arrays: np.savez stamps the current
    time into the zip, which would make DVC see new data (and retrain) after every rerun."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(array))
