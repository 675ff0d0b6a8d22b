"""A corpus of hostile and odd inputs, generated in code, each with the outcome it must get.

`build_corpus(folder)` writes the files into `folder` and returns one `Case` per file: "prediction"
(scored, a probability in [0, 1]) or "error" (refused, with a fragment its message must contain).
`damaged(seeds, ...)` is the fuzzers' strategy: good files with a few bytes damaged.
Every surface (the app, the predict CLI, the MLflow model) shares one path, `scoring.runtime.Predictor`:
the decoder (`scoring.imaging`), then the plausibility checks (`scoring.checks`: elongated, uniform,
coloured images are not scored), so every case expects the same outcome everywhere. `Case.by_checks`
marks the files that decode but are refused by those checks.

Everything is built from `tests/image_factory.py` generators and, where a prediction is expected,
from the real X-rays in `tests/fixtures/chest_xray/train/*/*.jpeg`. Nothing here allocates a huge
image: the bombs are headers that claim one.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from scoring.imaging import MAX_FILE_BYTES
from tests import image_factory as factory

PREDICTION, ERROR = "prediction", "error"
FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "chest_xray" / "train"

# Names that are hostile to paths, shells, CSV, Markdown or HTML; each file holds a real X-ray.
HOSTILE_NAMES = (
    "röntgen 胸部 ..%2Fetc%2Fpasswd.png",
    "..\\..\\windows\\win.ini.png",
    "-rf --output=pwned.png",
    "name with  spaces.jpeg",
    "line\nbreak.png",
    "quote's \"double\".png",
    "<img src=x onerror=alert(1)>.png",
    "tick`code`|pipe;$(id).png",
    "x" * 240 + ".png",
)


# Active content in formats that are not images: each must be refused unread, never rendered or run.
SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="512" height="512">'
       b'<script>alert(1)</script><rect width="512" height="512"/></svg>')
PDF = (b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog /OpenAction << /S /JavaScript /JS (app.alert(1)) >> >>\n"
       b"endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")
HTML = b"<!doctype html><html><script>fetch('/etc/passwd')</script></html>\n" * 8
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n(/etc/passwd) run\n%%EOF\n"


@dataclass(frozen=True)
class Case:
    path: Path
    outcome: str  # PREDICTION or ERROR, on every surface
    message: str = ""  # for errors: a fragment of the message, compared case-insensitively
    by_checks: bool = False  # decodes, but refused by scoring.checks' plausibility checks
    what: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    def check(self, probability: float | None, message: str | None) -> None:
        """Assert that a surface's answer (a probability, or an error message) is the expected one."""
        label = f"{self.what or self.name!r}: got probability {probability!r}, message {message!r}"
        if self.outcome == PREDICTION:
            assert probability is not None and not message, label
            assert 0.0 <= probability <= 1.0, label
        else:
            assert probability is None and message, label
            assert self.message.lower() in message.lower(), f"{label}; expected {self.message!r}"


@lru_cache(maxsize=8)
def fixture_xray(index: int) -> np.ndarray:
    """Real X-rays from both classes of the fixtures, as 2-D uint8 arrays (cycled by index)."""
    paths = sorted(FIXTURE_ROOT.glob("*/*.jpeg"))
    with Image.open(paths[(index * 7) % len(paths)]) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.uint8)
    pixels.setflags(write=False)  # cached: shared by every caller
    return pixels


def _fixture_bytes(index: int) -> bytes:
    paths = sorted(FIXTURE_ROOT.glob("*/*.jpeg"))
    return paths[(index * 7) % len(paths)].read_bytes()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _frames(pixels: np.ndarray, count: int = 3) -> tuple[Image.Image, list[Image.Image]]:
    first, *rest = [Image.fromarray(np.roll(pixels, 9 * i, axis=1)) for i in range(count)]
    return first, rest


def _jpeg_claiming(width: int, height: int) -> bytes:
    """The real JPEG fixture with its frame header (SOF0) claiming other dimensions."""
    data = bytearray(factory.xray_jpeg_bytes())
    sof = data.find(b"\xff\xc0")
    assert sof > 0, "the fixture is expected to be a baseline JPEG"
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _ztxt_bomb(pixels: np.ndarray) -> bytes:
    """A PNG whose compressed text chunk inflates to 50 MB (it is about 50 kB)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "A" * (50 * 1024 * 1024), zip=True)
    return factory.encode(Image.fromarray(pixels), pnginfo=info)


def _dicom_with_tiff_preamble(pixels: np.ndarray) -> bytes:
    """A dual-personality file: a DICOM whose 128-byte preamble starts like a TIFF."""
    data = factory.dicom(pixels.astype(np.uint16) * 16)
    preamble = (b"II*\x00\x08\x00\x00\x00" + b"\x00" * 120)[:128]
    return preamble + data[128:]


def _hostile_bytes(xray: np.ndarray) -> dict[str, tuple[bytes, str, str, bool]]:
    """name -> (bytes, outcome, message fragment, refused by the plausibility checks rather than the decoder)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless

    rng = np.random.default_rng(2024)
    good_png = factory.png(xray)
    jpeg = factory.xray_jpeg_bytes()
    rgb = Image.fromarray(xray).convert("RGB")
    twelve_bit = xray.astype(np.uint16) * 16
    alpha = np.full(xray.shape, 255, dtype=np.uint8)
    alpha[:, : xray.shape[1] // 4] = 0  # a transparent band, which becomes black
    wide = factory.ramp(10_000, 40)
    noise_rgb = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    nan_float = xray.astype(np.float32)
    nan_float[5, 5] = np.nan
    gif_first, gif_rest = _frames(xray)
    tiff_first, tiff_rest = _frames(xray)
    apng_first, apng_rest = _frames(xray)
    palette = Image.fromarray(xray).convert("P")
    e = ERROR
    p = PREDICTION
    checked = True  # decodes, then refused by scoring.checks
    return {
        # Not images at all, or broken ones
        "empty.png": (b"", e, "empty file", False),
        "random.png": (rng.bytes(4096), e, "not a recognised image", False),
        "random.jpg": (rng.bytes(4096), e, "not a recognised image", False),
        "truncated.jpeg": (jpeg[: len(jpeg) // 2], e, "truncated", False),
        "truncated.png": (good_png[: len(good_png) // 2], e, "truncated", False),
        "drawing.svg": (SVG, e, "not a recognised image", False),
        "report.pdf": (PDF, e, "not a recognised image", False),
        "archive.zip": (_zip({"scan.png": good_png}), e, "not a recognised image", False),
        "html-as-image.png": (HTML, e, "not a recognised image", False),
        "postscript.eps": (EPS, e, "not a recognised image", False),  # PIL's EPS plugin would run Ghostscript
        "text.dcm": (b"not a DICOM file, whatever the extension says\n" * 10, e, "not a recognised image",
                     False),
        # Sizes and shapes
        "bomb-20000x20000.png": (factory.blank_png(20_000, 20_000), e, "megapixel limit", False),
        "jpeg-header-claims-60000x60000.jpg": (_jpeg_claiming(60_000, 60_000), e, "megapixel limit", False),
        "ztxt-bomb.png": (_ztxt_bomb(xray), e, "too large", False),
        "one-pixel.png": (factory.png(np.full((1, 1), 128, dtype=np.uint8)), e, "too small", False),
        "strip-10x500.png": (factory.png(factory.ramp(500, 10)), e, "too small", False),
        "wide-10000x40.png": (factory.png(wide), e, "too elongated", checked),
        "uniform-grey.png": (factory.png(np.full((256, 256), 128, dtype=np.uint8)), e, "almost uniform", checked),
        "colour-noise.png": (factory.png(noise_rgb), e, "strongly coloured", checked),
        # Several frames
        "animated.gif": (factory.encode(gif_first, "GIF", save_all=True, append_images=gif_rest),
                         e, "GIF with 3 frames", False),
        "multipage.tiff": (factory.encode(tiff_first, "TIFF", save_all=True, append_images=tiff_rest),
                           e, "TIFF with 3 frames", False),
        "animated-apng.png": (factory.encode(apng_first, "PNG", save_all=True, append_images=apng_rest),
                              e, "PNG with 3 frames", False),
        "nan-float.tiff": (factory.encode(Image.fromarray(nan_float), "TIFF"), e, "non-finite", False),
        # Supported modes and formats, with real X-ray content
        "sixteen-bit-full-range.png": (factory.png(_full_range_16_bit(xray)), p, "", False),
        "twelve-bit.png": (factory.png(twelve_bit + 7), p, "", False),
        "sixteen-bit.tif": (factory.encode(Image.fromarray(xray.astype(np.uint16) * 257), "TIFF"), p, "", False),
        "cmyk.jpg": (factory.encode(rgb.convert("CMYK"), "JPEG", quality=95), p, "", False),
        "exif-rotated.jpg": (factory.jpeg_with_orientation(np.rot90(xray), 6), p, "", False),
        "exif-orientation-9.jpg": (factory.jpeg_with_orientation(xray, 9), p, "", False),  # out of range
        "palette-transparent.png": (factory.encode(palette, transparency=0), p, "", False),
        "rgba.png": (factory.encode(Image.fromarray(np.dstack([xray, xray, xray, alpha]), "RGBA")), p, "", False),
        "la.png": (factory.encode(Image.fromarray(np.dstack([xray, alpha]), "LA")), p, "", False),
        "mode-1.png": (factory.encode(Image.fromarray(xray).convert("1")), p, "", False),
        "xray.bmp": (factory.encode(Image.fromarray(xray), "BMP"), p, "", False),
        "xray.webp": (factory.encode(Image.fromarray(xray), "WEBP", lossless=True), p, "", False),
        "single-frame.gif": (factory.encode(Image.fromarray(xray), "GIF"), p, "", False),
        "jpeg-named.png": (jpeg, p, "", False),
        "trailing-garbage.png": (good_png + rng.bytes(3000), p, "", False),
        "polyglot-png-zip.png": (good_png + _zip({"payload.sh": b"#!/bin/sh\nid\n"}), p, "", False),
        "jpeg-html-comment.jpg": (factory.encode(Image.fromarray(xray), "JPEG", quality=90,
                                                 comment=b"<script>alert(document.cookie)</script>"), p, "", False),
        # DICOM
        "mono2-patient.dcm": (factory.dicom(twelve_bit, patient_name="Doe^Jane", rescale=(2.0, -1024.0),
                                            window=(3000.0, 6000.0)), p, "", False),
        "mono1.dcm": (factory.dicom(4095 - twelve_bit, photometric="MONOCHROME1"), p, "", False),
        "dicom-without-extension": (factory.dicom(twelve_bit), p, "", False),
        "polyglot-tiff-preamble.dcm": (_dicom_with_tiff_preamble(xray), p, "", False),
        "no-pixel-data.dcm": (factory.dicom(twelve_bit, with_pixels=False), e, "no pixel data", False),
        "jpeg2000-compressed.dcm": (
            factory.dicom(twelve_bit, transfer_syntax=JPEG2000Lossless,
                          pixel_data=encapsulate([b"\xff\x4f\xff\x51" + b"\x00\x13" * 40])),
            e, "cannot be decoded", False),
        # The header claims 20000 x 20000; the array is a broadcast view, so nothing is allocated.
        "huge-header.dcm": (factory.dicom(np.broadcast_to(np.uint16(0), (20_000, 20_000)),
                                          pixel_data=b"\x00" * 4096), e, "size limit", False),
        "multi-frame.dcm": (factory.dicom(np.stack([twelve_bit] * 3), frames=3), e, "3 frames", False),
        "deflate-bomb.dcm": (factory.dicom(twelve_bit, transfer_syntax=DeflatedExplicitVRLittleEndian,
                                           padding=20 * 1024 * 1024), e, "deflate", False),
        "dicm-then-garbage.dcm": (b"\x00" * 128 + b"DICM" + rng.bytes(512), e, "dicom", False),
    }


def _full_range_16_bit(xray: np.ndarray) -> np.ndarray:
    pixels = xray.astype(np.uint16) * 257
    pixels[0, 0], pixels[0, 1] = 0, 65535  # the whole 16-bit range is used
    return pixels


def build_corpus(folder: Path, oversize_bytes: int = 2 * MAX_FILE_BYTES) -> list[Case]:
    """Write the corpus into `folder` (created if needed) and return its cases, in a fixed order.

    The over-the-cap file is sparse: `oversize_bytes` long (over every cap: the decoder's, the app's
    default and any test server's) but costing no disk or read time, since sizes are checked first.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    for name, (data, outcome, message, by_checks) in _hostile_bytes(fixture_xray(0)).items():
        path = folder / name
        path.write_bytes(data)
        cases.append(Case(path, outcome, message, by_checks, what=name))
    for index, name in enumerate(HOSTILE_NAMES, start=1):
        path = folder / name
        data = _fixture_bytes(index) if name.endswith(".jpeg") else factory.png(fixture_xray(index))
        path.write_bytes(data)
        cases.append(Case(path, PREDICTION, what=f"hostile name {name!r}"))
    oversize = folder / "oversize.png"
    with oversize.open("wb") as handle:
        handle.write(factory.png(fixture_xray(0)))
        handle.truncate(oversize_bytes)
    cases.append(Case(oversize, ERROR, "MB limit", what=f"sparse file of {oversize_bytes} bytes"))
    assert len({case.name for case in cases}) == len(cases), "corpus names must be unique"
    return cases


# --------------------------------------------------------------------------------------------------
# Fuzzing: good files, damaged

DAMAGE = ("flip", "byte", "insert", "delete", "cut")


def damaged(seeds: dict[str, bytes], edits: int, skip: int = 0, insert: int = 16, delete: int = 16):
    """A Hypothesis strategy: one of `seeds` with 1 to `edits` bytes flipped, overwritten, inserted (up to
    `insert`), deleted (up to `delete`) or cut off, past its first `skip` bytes. Positions count from
    either end, since Hypothesis favours small numbers."""

    @st.composite
    def strategy(draw) -> bytes:
        data = bytearray(seeds[draw(st.sampled_from(sorted(seeds)))])
        for _ in range(draw(st.integers(1, edits))):
            if len(data) <= skip + 1:  # an earlier cut left nothing past the kept bytes to damage
                break
            offset = draw(st.integers(0, len(data) - 1 - skip))
            position = skip + offset if draw(st.booleans()) else len(data) - 1 - offset
            action = draw(st.sampled_from(DAMAGE))
            if action == "flip":
                data[position] ^= 1 << draw(st.integers(0, 7))
            elif action == "byte":
                data[position] = draw(st.integers(0, 255))
            elif action == "insert":
                data[position:position] = draw(st.binary(min_size=1, max_size=insert))
            elif action == "delete":
                del data[position:position + draw(st.integers(1, delete))]
            else:
                del data[max(position, 1):]
        return bytes(data)

    return strategy()
