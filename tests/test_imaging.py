"""Behaviour tests for the serving preprocessing in scoring.imaging, scoring.dicom and scoring.pixels.

Every input is generated in code (see tests/image_factory.py); real X-ray content comes from the
committed JPEG fixtures.
"""

from __future__ import annotations

import ast
import io
import logging
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image, ImageFile

from scoring import dicom, imaging, pixels
from scoring.imaging import (
    MAX_PIXELS,
    ImageDecodeError,
    decode_greyscale,
    read_bytes,
    resize_grey,
    resize_to,
    stretch_to_uint8,
)
from tests import image_factory as factory
from tests.helpers import PROJECT
from tests.hostile_corpus import damaged


def assert_grey(pixels: np.ndarray, shape: tuple[int, int] | None = None) -> None:
    assert isinstance(pixels, np.ndarray)
    assert pixels.ndim == 2
    assert pixels.dtype == np.uint8
    if shape is not None:
        assert pixels.shape == shape


def assert_order_preserved(source: np.ndarray, grey: np.ndarray) -> None:
    """Brighter input pixels never come out darker than dimmer ones."""
    order = np.argsort(source.ravel(), kind="stable")
    assert (np.diff(grey.ravel()[order].astype(int)) >= 0).all()


def expect_error(data: bytes, *fragments: str, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as caught:
        decode_greyscale(data, **kwargs)
    message = str(caught.value).lower()
    for fragment in fragments:
        assert fragment.lower() in message, message
    return caught.value


# --------------------------------------------------------------------------------------------------
# 8-bit and colour modes


def test_l_png_round_trips_exactly():
    pixels = factory.xray()
    out = decode_greyscale(factory.png(pixels))
    assert_grey(out, pixels.shape)
    np.testing.assert_array_equal(out, pixels)


def test_l_jpeg_keeps_the_picture():
    pixels = factory.xray()
    out = decode_greyscale(factory.encode(Image.fromarray(pixels), "JPEG", quality=95))
    assert_grey(out, pixels.shape)
    assert np.abs(out.astype(int) - pixels).mean() < 2


def test_real_rgb_jpeg_fixture_decodes_to_its_luminance():
    out = decode_greyscale(factory.xray_jpeg_bytes())
    np.testing.assert_array_equal(out, factory.xray())


def test_rgb_uses_luminance_weights():
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[:32] = (255, 0, 0)
    rgb[32:] = (90, 90, 90)
    out = decode_greyscale(factory.png(rgb))
    assert_grey(out, (64, 64))
    assert set(np.unique(out[:32])) == {76}  # ITU-R 601-2: 0.299 * 255
    assert set(np.unique(out[32:])) == {90}


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_areas_become_black_not_white(mode):
    image = Image.new(mode, (64, 64), (255, 0) if mode == "LA" else (255, 255, 255, 0))
    opaque = (200, 255) if mode == "LA" else (200, 200, 200, 255)
    image.paste(opaque, (0, 0, 64, 32))
    out = decode_greyscale(factory.encode(image))
    assert_grey(out, (64, 64))
    assert set(np.unique(out[:32])) == {200}
    assert set(np.unique(out[32:])) == {0}


def test_half_transparent_pixels_blend_towards_black():
    image = Image.new("LA", (64, 64), (200, 128))
    out = decode_greyscale(factory.encode(image))
    assert 95 <= int(out.mean()) <= 105


def palette_image(transparent_index: int | None) -> bytes:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([255, 255, 255, 100, 100, 100] + [0, 0, 0] * 254)
    image.paste(1, (0, 0, 64, 32))
    if transparent_index is None:
        return factory.encode(image)
    return factory.encode(image, transparency=transparent_index)


def test_palette_without_transparency_maps_through_the_palette():
    out = decode_greyscale(palette_image(None))
    assert_grey(out, (64, 64))
    assert set(np.unique(out[:32])) == {100}
    assert set(np.unique(out[32:])) == {255}


def test_palette_transparent_index_becomes_black():
    out = decode_greyscale(palette_image(transparent_index=0))  # index 0 is white but transparent
    assert set(np.unique(out[:32])) == {100}
    assert set(np.unique(out[32:])) == {0}


def test_cmyk_jpeg():
    image = Image.new("CMYK", (64, 64), (0, 0, 0, 0))  # no ink: white
    image.paste((0, 0, 0, 255), (0, 0, 64, 32))  # full black ink
    out = decode_greyscale(factory.encode(image, "JPEG", quality=95))
    assert_grey(out, (64, 64))
    assert out[:32].mean() < 5
    assert out[32:].mean() > 250


def test_mode_1_png():
    image = Image.new("1", (64, 64), 0)
    image.paste(1, (0, 0, 32, 64))
    out = decode_greyscale(factory.encode(image))
    assert_grey(out, (64, 64))
    assert set(np.unique(out[:, :32])) == {255}
    assert set(np.unique(out[:, 32:])) == {0}


# --------------------------------------------------------------------------------------------------
# High bit depth


def test_16_bit_png_full_range_maps_linearly():
    source = factory.xray().astype(np.uint16) * 257  # 0..255 -> 0..65535 exactly
    source[0, 0], source[0, 1] = 0, 65535
    data = factory.png(source)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_greyscale(data)
    assert_grey(out, source.shape)
    np.testing.assert_array_equal(out, np.round(source / 257).astype(np.uint8))


def test_12_bit_png_is_stretched_to_full_range_with_order_kept():
    source = factory.xray().astype(np.uint16) * 16 + 7  # 12-bit values 7..4087 in a 16-bit PNG
    out = decode_greyscale(factory.png(source))
    assert_grey(out, source.shape)
    assert out.min() == 0 and out.max() == 255  # not squeezed into 0..15 by dropping 8 bits
    assert_order_preserved(source, out)
    assert len(np.unique(out)) == len(np.unique(source))


def test_mode_i_tiff_with_negative_values():
    source = factory.xray().astype(np.int32) * 20 - 1000
    image = Image.fromarray(source)
    assert image.mode == "I"  # PNG cannot hold signed 32-bit pixels, so a single-frame TIFF
    out = decode_greyscale(factory.encode(image, "TIFF"))
    assert_grey(out, source.shape)
    assert out.min() == 0 and out.max() == 255
    assert_order_preserved(source, out)


def test_mode_f_tiff():
    source = factory.xray().astype(np.float32) / 255 - 0.5
    out = decode_greyscale(factory.encode(Image.fromarray(source), "TIFF"))
    assert_grey(out, source.shape)
    assert out.min() == 0 and out.max() == 255
    assert_order_preserved(source, out)


def test_mode_f_with_nan_is_refused():
    source = np.ones((64, 64), dtype=np.float32)
    source[3, 3] = np.nan
    expect_error(factory.encode(Image.fromarray(source), "TIFF"), "non-finite")


def test_flat_16_bit_image_is_black_not_a_crash():
    out = decode_greyscale(factory.png(np.full((40, 40), 1234, dtype=np.uint16)))
    assert_grey(out, (40, 40))
    assert out.max() == 0


# --------------------------------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize(("orientation", "turns"), [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(orientation, turns):
    pixels = factory.with_marker(96, 64)  # wide, marker top-left
    out = decode_greyscale(factory.jpeg_with_orientation(pixels, orientation))
    expected = np.rot90(pixels, k=turns)  # k=-1 is a quarter turn clockwise
    assert_grey(out, expected.shape)
    assert np.abs(out.astype(int) - expected).mean() < 3
    height, width = out.shape
    quadrants = {
        "top-left": out[: height // 2, : width // 2],
        "top-right": out[: height // 2, width // 2 :],
        "bottom-left": out[height // 2 :, : width // 2],
        "bottom-right": out[height // 2 :, width // 2 :],
    }
    brightest = max(quadrants, key=lambda name: quadrants[name].mean())
    assert brightest == {6: "top-right", 8: "bottom-left", 3: "bottom-right"}[orientation]


def test_without_exif_orientation_nothing_turns():
    pixels = factory.with_marker(96, 64)
    out = decode_greyscale(factory.jpeg_with_orientation(pixels, 1))
    assert out.shape == (64, 96)
    assert out[:16, :24].mean() > 200


def test_exif_orientation_on_16_bit_png():
    source = factory.with_marker(96, 64).astype(np.uint16) * 257
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_greyscale(factory.encode(Image.fromarray(source), exif=exif.tobytes()))
    np.testing.assert_array_equal(out, np.rot90(source // 257, k=-1).astype(np.uint8))


# --------------------------------------------------------------------------------------------------
# DICOM


def xray_12_bit() -> np.ndarray:
    return factory.xray().astype(np.uint16) * 16


def test_dicom_monochrome2_with_rescale():
    source = xray_12_bit()
    out = decode_greyscale(factory.dicom(source, rescale=(2.0, -1024.0)))
    assert_grey(out, source.shape)
    # A positive linear rescale followed by min-max stretching gives back the stored picture.
    np.testing.assert_array_equal(out, stretch_to_uint8(source))
    assert out.min() == 0 and out.max() == 255


def test_dicom_window_is_in_rescaled_units():
    # Stored 0..4095 rescaled by -1024: a window at 0 +/- 100 covers stored values 924..1124.
    source = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (64, 1))
    out = decode_greyscale(factory.dicom(source, rescale=(1.0, -1024.0), window=(0.0, 200.0)))
    row = dict(zip(source[0].tolist(), out[0].tolist(), strict=True))
    assert row[896] == 0 and row[1152] == 255
    assert 100 <= row[1024] <= 155  # the window centre is mid-grey
    assert row[0] == 0 and row[4080] == 255


def test_dicom_window_clips_so_output_differs_from_plain_stretch():
    source = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (64, 1))
    plain = decode_greyscale(factory.dicom(source))
    windowed = decode_greyscale(factory.dicom(source, window=(2048.0, 1024.0)))
    assert_grey(windowed, source.shape)
    assert_order_preserved(source, windowed)
    below, above = source[0] < 1536, source[0] >= 2560
    assert (windowed[0][below] == 0).all() and (windowed[0][above] == 255).all()
    assert len(np.unique(plain[0][below])) > 10  # the unwindowed image keeps that detail
    middle = ~below & ~above
    assert np.abs(windowed[0][middle].astype(int) - plain[0][middle]).max() > 50


def test_dicom_monochrome1_is_inverted():
    source = xray_12_bit()
    mono2 = decode_greyscale(factory.dicom(source, photometric="MONOCHROME2"))
    mono1 = decode_greyscale(factory.dicom(source, photometric="MONOCHROME1"))
    assert_grey(mono1, source.shape)
    np.testing.assert_array_equal(mono1, 255 - mono2)
    assert not np.array_equal(mono1, mono2)


def test_dicom_monochrome1_with_window_is_inverted():
    source = xray_12_bit()
    window = (1500.0, 2000.0)
    mono2 = decode_greyscale(factory.dicom(source, window=window))
    mono1 = decode_greyscale(factory.dicom(source, photometric="MONOCHROME1", window=window))
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_dicom_without_pixel_data():
    expect_error(factory.dicom(xray_12_bit(), with_pixels=False), "holds no image (no pixel data)")


def test_dicom_compressed_transfer_syntax_that_cannot_be_decoded():
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    bogus = encapsulate([b"\xff\x4f\xff\x51" + b"\x00\x13" * 40])
    data = factory.dicom(xray_12_bit(), transfer_syntax=JPEG2000Lossless, pixel_data=bogus)
    expect_error(data, "cannot be decoded", "JPEG 2000")


def test_dicom_multi_frame_is_refused():
    frames = np.stack([xray_12_bit()] * 3)
    expect_error(factory.dicom(frames, frames=3), "3 frames", "single")


def test_dicom_with_too_many_declared_pixels_is_refused_before_decoding():
    data = factory.dicom(np.zeros((64, 64), dtype=np.uint16))
    from pydicom import dcmread

    dataset = dcmread(io.BytesIO(data))
    dataset.Rows = dataset.Columns = 20000
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    expect_error(buffer.getvalue(), "size limit")


def test_dicom_too_small():
    expect_error(factory.dicom(np.zeros((10, 10), dtype=np.uint16)), "too small")


def test_dicom_pixel_data_shorter_than_declared():
    data = factory.dicom(np.zeros((64, 64), dtype=np.uint16), pixel_data=b"\x00" * 100)
    expect_error(data, "dicom")


def test_dicom_with_invalid_window_width():
    expect_error(factory.dicom(xray_12_bit(), window=(100.0, 0.0)), "dicom")


def test_truncated_dicom():
    data = factory.dicom(xray_12_bit())
    expect_error(data[: len(data) // 2], "dicom")


def test_dicom_header_followed_by_garbage():
    rng = np.random.default_rng(1)
    expect_error(b"\x00" * 128 + b"DICM" + rng.bytes(2000), "dicom")


@pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")
@pytest.mark.parametrize("implicit_meta", [False, True], ids=["explicit-meta", "implicit-meta"])
def test_deflated_dicom_bomb_is_refused_without_inflating(implicit_meta):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    data = factory.dicom(
        xray_12_bit(), transfer_syntax=DeflatedExplicitVRLittleEndian, padding=20 * 1024 * 1024
    )
    if implicit_meta:  # pydicom falls back to reading such a meta group as implicit VR
        data = factory.with_implicit_vr_meta(data)
    assert len(data) < 200_000  # 20 MB of dataset inside
    started = time.perf_counter()
    expect_error(data, "deflate")
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("valid", [True, False], ids=["valid-patient-fields", "invalid-patient-fields"])
def test_dicom_decode_returns_only_pixels_and_logs_no_patient_data(caplog, valid):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")
    data = factory.dicom(xray_12_bit(), patient_name="Doe^Jane", extra={"PatientBirthDate": "19800101"})
    if not valid:
        # Malformed patient fields: pydicom would quote them in warnings if it ever converted them.
        data = data.replace(b"19800101", b"1980/1/1")
    assert b"Doe^Jane" in data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode_greyscale(data)
    assert type(out) is np.ndarray
    assert_grey(out, xray_12_bit().shape)
    told = caplog.text + " ".join(str(record.args) for record in caplog.records)
    told += " ".join(str(warning.message) for warning in caught)
    for secret in ("Doe", "Jane", "1980"):
        assert secret not in told


# --------------------------------------------------------------------------------------------------
# Inputs that must be refused


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("scan.png", factory.png(factory.xray()))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(np.random.default_rng(0).bytes(4096), id="random"),
        pytest.param(b"Patient chest X-ray report: no findings.\n" * 20, id="text"),
        pytest.param(
            b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="512" height="512">'
            b'<rect width="512" height="512" fill="white"/></svg>',
            id="svg",
        ),
        pytest.param(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", id="pdf"),
        pytest.param(zip_bytes(), id="zip"),
        pytest.param(
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto showpage\n%%EOF\n",
            id="eps-would-run-ghostscript",
        ),
    ],
)
def test_not_an_image(data):
    expect_error(data, "not a recognised image")


def test_empty_bytes():
    expect_error(b"", "empty")


def test_truncated_jpeg():
    data = factory.xray_jpeg_bytes()
    expect_error(data[: len(data) // 2], "truncated")


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_png(keep):
    data = factory.png(factory.xray())
    expect_error(data[: int(len(data) * keep)], "truncated")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    "side",
    [
        pytest.param(8000, id="over-our-limit"),
        pytest.param(10000, id="over-pil-warning-limit"),
        pytest.param(20000, id="over-pil-error-limit"),
    ],
)
def test_png_bomb_is_refused_quickly_without_decoding(side, monkeypatch):
    data = factory.blank_png(side, side)
    assert len(data) < 100_000 and side * side > MAX_PIXELS
    loads = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or original_load(self))
    started = time.perf_counter()
    error = expect_error(data, "megapixel limit")
    assert time.perf_counter() - started < 2
    assert loads == []
    if side <= 10000:  # PIL itself refuses larger ones before their size reaches us
        assert f"{side} x {side}" in str(error)


def test_image_just_under_the_pixel_limit_is_fine():
    out = decode_greyscale(factory.blank_png(4000, 4000))
    assert_grey(out, (4000, 4000))


@pytest.mark.parametrize("side", [1, 10])
def test_too_small(side):
    expect_error(factory.png(np.zeros((side, side), dtype=np.uint8)), "too small")


def test_thin_strip_is_too_small():
    expect_error(factory.png(np.zeros((10, 500), dtype=np.uint8)), "too small")


def frames(n: int) -> list[Image.Image]:
    return [Image.fromarray(np.full((64, 64), 40 * i, dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("GIF", "GIF"), ("TIFF", "TIFF"), ("PNG", "PNG")],  # PNG with several frames is APNG
)
def test_multi_frame_images_are_refused(fmt, name):
    first, *rest = frames(3)
    data = factory.encode(first, fmt, save_all=True, append_images=rest)
    expect_error(data, f"{name} with 3 frames", "single")


def test_single_frame_gif_is_fine():
    out = decode_greyscale(factory.encode(frames(2)[1], "GIF"))
    assert_grey(out, (64, 64))
    assert set(np.unique(out)) == {40}


def test_mpo_from_a_camera_uses_the_primary_picture():
    # Phones save JPEGs with a second preview picture (MPO): not a multi-frame scan.
    first, preview = Image.fromarray(factory.xray()), Image.new("L", (224, 224), 255)
    data = factory.encode(first, "MPO", save_all=True, append_images=[preview])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_greyscale(data)
    assert np.abs(out.astype(int) - factory.xray()).mean() < 3


def test_size_cap():
    data = factory.png(factory.xray())
    expect_error(data, "limit", max_bytes=len(data) - 1)
    assert_grey(decode_greyscale(data, max_bytes=len(data)))


def test_size_cap_message_is_readable_for_small_limits():
    error = expect_error(b"x" * 5000, max_bytes=1000)
    assert "0 MB" not in str(error) and "e-0" not in str(error)
    assert str(error) == "file is 0.005 MB, over the 0.001 MB limit"  # sizes in MB, as every message gives them
    assert "over the 999 bytes limit" in str(expect_error(b"x" * 5000, max_bytes=999))


def test_read_bytes_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"^scan\.png: no such file"):
        read_bytes(tmp_path / "scan.png")


def test_read_bytes_directory(tmp_path):
    (tmp_path / "scans").mkdir()
    with pytest.raises(ImageDecodeError, match=r"^scans: is a folder, not an image file"):
        read_bytes(tmp_path / "scans")


def test_read_bytes_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)  # chmod cannot lock out root, who may run the tests
    with pytest.raises(ImageDecodeError, match="scan.png: cannot be read .Permission denied"):
        read_bytes(path)


def test_read_bytes_limits(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        read_bytes(empty)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x00" * 2048)
    with pytest.raises(ImageDecodeError, match="limit"):
        read_bytes(big, max_bytes=1024)
    assert read_bytes(big, max_bytes=2048) == b"\x00" * 2048


def test_file_on_disk_decodes_like_its_bytes_then_resizes_to_the_stored_size(tmp_path):
    # The preprocess stage's path for every training image: read_bytes -> decode_greyscale -> resize_grey.
    path = tmp_path / "scan.png"
    path.write_bytes(factory.png(factory.xray()))
    grey = decode_greyscale(read_bytes(path))
    np.testing.assert_array_equal(grey, factory.xray())
    stored = resize_grey(grey, 128)
    assert_grey(stored, (128, 128))


# --------------------------------------------------------------------------------------------------
# Resizing


def test_resize_grey():
    pixels = factory.ramp(300, 200)
    out = resize_grey(pixels, 64)
    assert_grey(out, (64, 64))
    assert out[0, 0] < 10 and out[-1, -1] > 245
    assert resize_grey(out, 64) is out


def test_resize_to_takes_height_then_width_and_keeps_raw_0_to_255():
    pixels = np.zeros((200, 300), dtype=np.uint8)
    pixels[:, 150:] = 255
    out = resize_to(pixels, (48, 96))
    assert_grey(out, (48, 96))  # (height, width), not PIL's (width, height)
    assert out.min() == 0 and out.max() == 255  # no rescaling: the model standardises, not this
    assert (out[:, :40] == 0).all() and (out[:, 56:] == 255).all()  # the edge stays in the middle
    assert resize_to(out, (48, 96)) is out


def test_shrinking_averages_fine_detail_instead_of_sampling_it():
    # Antialiased, as the training images were stored and as the browser page reimplements it: one-pixel
    # stripes shrunk four times become grey, where point sampling would keep one colour of the stripes.
    stripes = np.tile(np.array([0, 255], dtype=np.uint8), (128, 64))
    for out in (resize_grey(stripes, 32), resize_to(stripes, (16, 40))):
        assert 100 < out.min() and out.max() < 155


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(np.zeros((64, 64, 3), dtype=np.uint8), id="rgb"),
        pytest.param(np.zeros((64,), dtype=np.uint8), id="1-d"),
        pytest.param(np.zeros((64, 64), dtype=np.float32), id="float"),
        pytest.param(np.zeros((64, 64), dtype=np.uint16), id="uint16"),
    ],
)
@pytest.mark.parametrize(
    "function",
    [pytest.param(resize_grey, id="resize_grey"), pytest.param(lambda grey, size: resize_to(grey, (size, size)),
                                                               id="resize_to")],
)
def test_resize_rejects_anything_but_2d_uint8(function, bad):
    with pytest.raises(ValueError, match="2-D uint8"):
        function(bad, 32)


# --------------------------------------------------------------------------------------------------
# Module structure: one shared base, no import cycle between the decoders


def imported_modules(module) -> set[str]:
    """Every module a source file imports, at any level (function-local imports included)."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module.__name__} uses a relative import"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_imports(module) -> set[str]:
    return {name for name in imported_modules(module) if name.split(".")[0] in ("scoring", "serving", "pipeline", "app")}


def test_dicom_imports_only_the_shared_base_not_imaging():
    names = project_imports(dicom)
    assert not any(name == "scoring.imaging" or name.startswith("scoring.imaging.") for name in names)
    assert "scoring.pixels" in names
    assert all(name == "scoring.pixels" or name.startswith("scoring.pixels.") for name in names), names


def test_pixels_imports_no_other_project_module():
    assert project_imports(pixels) == set()


@pytest.mark.parametrize("module", [pixels, imaging, dicom], ids=lambda module: module.__name__)
def test_decoders_never_import_pipeline_or_tensorflow(module):
    roots = {name.split(".")[0] for name in imported_modules(module)}
    assert not roots & {"pipeline", "tensorflow", "keras"}


def test_importing_dicom_does_not_load_imaging():
    # The AST check sees direct imports; this one also catches an indirect one.
    code = "import sys, scoring.dicom; print(sorted(m for m in sys.modules if m.startswith(('scoring', 'serving', 'pipeline'))))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True,
                            timeout=60).stdout.strip()
    assert loaded == "['scoring', 'scoring.dicom', 'scoring.pixels']"


def test_imaging_re_exports_the_shared_names():
    for name in ("ImageDecodeError", "describe", "is_dicom", "stretch_to_uint8", "MAX_FILE_BYTES", "MAX_PIXELS",
                 "MIN_SIDE", "DICOM_MAGIC_OFFSET", "RASTER_FORMATS"):
        assert getattr(imaging, name) is getattr(pixels, name), name
        assert name in imaging.__all__


def test_dicom_errors_are_the_shared_error_type():
    # Callers catch scoring.imaging.ImageDecodeError; a DICOM failure must be that very class.
    with pytest.raises(imaging.ImageDecodeError):
        dicom.decode_dicom(factory.dicom(xray_12_bit(), with_pixels=False))


# --------------------------------------------------------------------------------------------------
# Fuzzing: malformed input either decodes or is refused with ImageDecodeError, nothing else

SEEDS = {
    "png-l": factory.png(factory.ramp(40, 36)),
    "png-16": factory.png(factory.ramp(40, 36).astype(np.uint16) * 200),
    "png-rgba": factory.encode(Image.new("RGBA", (40, 36), (10, 200, 30, 128))),
    "png-palette": factory.encode(Image.new("P", (40, 36), 3), transparency=3),
    "jpeg": factory.encode(Image.fromarray(factory.ramp(40, 36)), "JPEG", quality=80),
    "jpeg-exif": factory.jpeg_with_orientation(factory.ramp(40, 36), 6),
    "gif": factory.encode(Image.fromarray(factory.ramp(40, 36)), "GIF"),
    "tiff": factory.encode(Image.fromarray(factory.ramp(40, 36)), "TIFF"),
    "dicom": factory.dicom(factory.ramp(40, 36).astype(np.uint16), window=(128.0, 200.0)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL and pydicom warn about the damage they see
@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=damaged(SEEDS, edits=6))
def test_fuzz_decode_only_returns_grey_or_raises_image_decode_error(data):
    started = time.perf_counter()
    try:
        out = decode_greyscale(data)
    except ImageDecodeError as error:
        assert str(error)
    else:
        assert_grey(out)
        assert min(out.shape) >= 32
    assert time.perf_counter() - started < 2
