"""DICOM pixels to 8-bit greyscale: modality rescale, VOI LUT/window, MONOCHROME1 inversion.

Only pixel data and the attributes needed to display it are read; patient fields are never
returned, logged or stored.
"""

from __future__ import annotations

import io
import logging

import numpy as np

from scoring.pixels import DICOM_MAGIC_OFFSET, MAX_PIXELS, ImageDecodeError, describe, stretch_to_uint8

COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422")
# pydicom logs each decoding plugin that fails on a frame as an ERROR with a full traceback, then raises
# the RuntimeError that `_pixel_array` turns into a clear message: that traceback is noise in the
# app's and the predict CLI's logs (a compressed upload is bad input, not a server fault).
PYDICOM_DECODER_LOGGER = "pydicom.pixels.decoders.base"


def _without_plugin_traceback(record: logging.LogRecord) -> bool:
    return record.exc_info is None


logging.getLogger(PYDICOM_DECODER_LOGGER).addFilter(_without_plugin_traceback)  # (added once: same object)


def decode_dicom(data: bytes) -> np.ndarray:
    try:
        _refuse_deflated(data)
        return _to_grey(_read_dataset(data))
    except ImageDecodeError:
        raise
    except Exception as error:
        # pydicom parses elements lazily, so a malformed file can fail anywhere from reading to
        # windowing, as ValueError, KeyError, TypeError, struct.error, RecursionError...
        raise ImageDecodeError(f"corrupt DICOM file: {describe(error)}") from error


def _refuse_deflated(data: bytes) -> None:
    """pydicom inflates a deflated dataset in one unbounded zlib call: a few kB could claim gigabytes."""
    from pydicom.filereader import read_dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    # The file meta group is always explicit VR little endian, read here the way pydicom reads it.
    meta = read_dataset(
        io.BytesIO(data[DICOM_MAGIC_OFFSET + 4 :]),
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=lambda tag, vr, length: tag.group != 0x0002,
    )
    first = next(iter(meta.keys()), None)
    if first is not None:
        meta[first]  # pydicom re-reads the group as implicit VR if this fails: refuse such a file instead
    if str(meta.get("TransferSyntaxUID", "")).strip("\x00 ") == DeflatedExplicitVRLittleEndian:
        raise ImageDecodeError(
            "DICOM with a deflate-compressed dataset cannot be decoded here: export it uncompressed or as PNG"
        )


def _read_dataset(data: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(data))


def _to_grey(dataset) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in dataset:
        raise ImageDecodeError("DICOM file holds no image (no pixel data)")
    _check_geometry(dataset)
    pixels = _pixel_array(dataset)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3 and photometric not in COLOUR_PHOTOMETRICS:
        raise ImageDecodeError(f"DICOM pixel array of shape {pixels.shape} is not a single image")
    if pixels.ndim == 3:
        pixels = pixels.astype(np.float64).mean(axis=-1)
    else:
        pixels = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
    grey = stretch_to_uint8(pixels)
    if photometric == "MONOCHROME1":
        grey = 255 - grey  # MONOCHROME1 stores bright bone as low values
    return grey


def _check_geometry(dataset) -> None:
    """Refuse huge or multi-frame images from their header, before any pixel is decoded."""
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    if rows * columns > MAX_PIXELS:
        raise ImageDecodeError(f"DICOM image is {columns} x {rows} pixels, over the size limit")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageDecodeError(f"DICOM with {frames} frames: upload a single still image")


def _pixel_array(dataset) -> np.ndarray:
    try:
        return dataset.pixel_array
    except (NotImplementedError, RuntimeError) as error:
        # pydicom's way of saying no installed plugin handles this transfer syntax.
        syntax = getattr(dataset.file_meta, "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise ImageDecodeError(
            f"DICOM compressed as '{name}' cannot be decoded here: export it uncompressed or as PNG"
        ) from error
    except (ValueError, AttributeError, KeyError) as error:
        raise ImageDecodeError(f"DICOM pixel data is unreadable: {describe(error)}") from error
