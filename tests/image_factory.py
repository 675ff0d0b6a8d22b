"""Builds test inputs for scoring.imaging and scoring.dicom in code, so no binary test images are committed."""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures" / "chest_xray" / "train" / "NORMAL"


@lru_cache(maxsize=1)
def xray() -> np.ndarray:
    """A real chest X-ray from the fixtures as a 2-D uint8 array (read-only, cached)."""
    path = min(FIXTURES.glob("*.jpeg"))
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.uint8)
    pixels.setflags(write=False)
    return pixels


def xray_jpeg_bytes() -> bytes:
    return min(FIXTURES.glob("*.jpeg")).read_bytes()


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels))


def ramp(width: int, height: int) -> np.ndarray:
    """A diagonal uint8 gradient covering 0..255, with every pixel's value known."""
    x = np.linspace(0, 1, width)[np.newaxis, :]
    y = np.linspace(0, 1, height)[:, np.newaxis]
    return np.round((x + y) / 2 * 255).astype(np.uint8)


def with_marker(width: int, height: int) -> np.ndarray:
    """Black image with a white block in the top-left quadrant only."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[: height // 4, : width // 4] = 255
    return pixels


def jpeg_with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation tag
    return encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


@lru_cache(maxsize=4)
def blank_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, built chunk by chunk in a fraction of a second.

    A huge one is a decompression bomb: a few tens of kB that would inflate to width*height pixels.
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    patient_name: str | None = None,
    frames: int = 1,
    transfer_syntax: str | None = None,
    pixel_data: bytes | None = None,
    with_pixels: bool = True,
    padding: int = 0,
    extra: dict[str, object] | None = None,
) -> bytes:
    """A DICOM Part 10 file (preamble + DICM + file meta) holding unsigned 16-bit `pixels`.

    `rescale` is (slope, intercept); `window` is (center, width). `transfer_syntax` and
    `pixel_data` let a test declare a compressed syntax with encapsulated bytes of its choosing.
    `padding` adds that many zero bytes in a private element: with the deflated transfer syntax the
    file is then a zip bomb of a few kB. `extra` sets further attributes by keyword.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    dataset = FileDataset(None, {}, file_meta=meta, preamble=b"\x00" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    if patient_name is not None:
        dataset.PatientName = patient_name
        dataset.PatientID = "PID-" + patient_name.split("^")[0]
    dataset.Rows, dataset.Columns = pixels.shape[-2:]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 16
    dataset.BitsStored = bits_stored
    dataset.HighBit = bits_stored - 1
    dataset.PixelRepresentation = 0
    if frames > 1:
        dataset.NumberOfFrames = frames
    if rescale is not None:
        dataset.RescaleSlope, dataset.RescaleIntercept = rescale
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    if with_pixels:
        data = pixel_data if pixel_data is not None else pixels.astype("<u2").tobytes()
        dataset.add_new(0x7FE00010, "OB" if pixel_data is not None else "OW", data)
    for keyword, value in (extra or {}).items():
        setattr(dataset, keyword, value)
    if padding:
        dataset.add_new(0x00091010, "OB", b"\x00" * padding)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def with_implicit_vr_meta(data: bytes) -> bytes:
    """Re-encode a DICOM file's meta group as implicit VR, which the standard forbids but pydicom reads."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_dataset

    source = io.BytesIO(data[132:])
    meta = read_dataset(source, False, True, stop_when=lambda tag, vr, length: tag.group != 0x0002)
    del meta[0x00020000]  # the group length would no longer match
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, meta)
    return data[:132] + out.getvalue() + data[132 + source.tell() :]
