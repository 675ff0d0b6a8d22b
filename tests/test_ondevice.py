"""On-device screening (serving/ondevice.py, serving/web/): the model in the browser, the image never sent.

- Fast, no browser: the page's routes (decision JSON, model bytes, the fixed list of assets, refusals), what
  the page contains, and the page's JavaScript run in Node against the server's own code: Pillow's
  bilinear resize, RGB -> L, the min..max stretch, DICOM decoding (pydicom), 16-bit PNG decoding, the checks'
  messages and the heatmap. Node tests skip without `node`; those that need dicom-parser skip until
  `make web` has built serving/web/vendor/.
- Browser (Debian's Chromium through Playwright): parity with the server (every field of the prediction
  record) on every fixture X-ray and on X-rays turned and mirrored (models whose orientation head is sure, or
  unsure), the hostile-input corpus, no image bytes in any request (also with the network cut after the page
  loaded), the one-line failures (no WebAssembly, a model that does not load, an unsupported file), and the
  page at a phone's width (issue #21; `ONDEVICE_SCREENSHOTS=docs/images` keeps its screenshots).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from scoring.decision import Decision
from serving import ondevice
from serving.settings import MAX_FILES
from tests import image_factory as factory
from tests.helpers import CHROMIUM, EXAMPLES, FIXTURE_DATASET, KERAS_SAVE_WARNING, PROJECT, launched, raw_get

NODE = shutil.which("node")
WEB = PROJECT / "serving" / "web"
TIMEOUT_MS = 90_000  # generous: two busy cores
MAX_FILE_BYTES = 3_000_000  # the launched app's upload limit (small: the corpus's oversize file stays cheap)
PROBABILITY_TOLERANCE = 0.01

pytestmark = [pytest.mark.filterwarnings(KERAS_SAVE_WARNING),
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]  # Gradio's own pandas deprecations
needs_node = pytest.mark.skipif(NODE is None, reason="needs Node.js to run the page's modules (apt-get install nodejs)")
needs_assets = pytest.mark.skipif(not ondevice.assets_built(),
                                  reason="needs the on-device runtime: run `make web` (npm ci into serving/web/vendor)")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")


# --------------------------------------------------------------------------------------------------
# The page's JavaScript, in Node

JS_PRELUDE = """
import { pathToFileURL } from "node:url";
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
const web = %(web)s + "/";
const imaging = await import(pathToFileURL(web + "imaging.js"));
const decode = await import(pathToFileURL(web + "decode.js"));
const dicom = await import(pathToFileURL(web + "dicom.js"));
const rules = await import(pathToFileURL(web + "decision.js"));
const require = createRequire(pathToFileURL(web));
const bytes = (text) => new Uint8Array(Buffer.from(text, "base64"));
let dicomParser = null;
const parser = () => {  // the UMD bundle as CommonJS (serving/web is "type": "module")
  if (!dicomParser) {
    const module = { exports: {} };
    new Function("module", "exports", "require", readFileSync(web + "vendor/dicomParser.min.js", "utf8"))(
      module, module.exports, require);
    dicomParser = module.exports;
  }
  return dicomParser;
};
const input = JSON.parse(readFileSync(0, "utf8"));
const run = async (input) => { %(body)s };
process.stdout.write(JSON.stringify(await run(input)));
"""


def run_js(body: str, data: Any) -> Any:
    """Run `body` (an async function of `input`, with the page's modules imported) in Node; JSON in and out."""
    script = JS_PRELUDE % {"web": json.dumps(str(WEB)), "body": body}
    result = subprocess.run([NODE, "--input-type=module", "-e", script], input=json.dumps(data), capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


RESIZE_JS = """
return input.cases.map(({pixels, width, height, outWidth, outHeight, float}) => {
  const src = float ? Float32Array.from(pixels) : Uint8Array.from(pixels);
  const out = float ? imaging.resizeFloat32(src, width, height, outWidth, outHeight)
                    : imaging.resizeUint8(src, width, height, outWidth, outHeight);
  return Array.from(out);
});
"""

# (height, width) -> (height, width): shrinking by whole and odd factors, enlarging, one axis only, identity.
RESIZE_SHAPES = [((300, 400), (224, 224)), ((1024, 768), (224, 224)), ((97, 131), (224, 224)),
                 ((224, 224), (224, 224)), ((500, 224), (224, 224)), ((224, 913), (224, 224)),
                 ((61, 37), (64, 64)), ((2000, 1500), (64, 64)), ((8, 8), (154, 131)), ((33, 1), (7, 3))]


@needs_node
def test_js_resize_is_pillows_bilinear_resize_bit_for_bit():
    from scoring.imaging import resize_to

    rng = np.random.default_rng(7)
    xray = factory.xray()
    cases, expected = [], []
    for (height, width), (out_height, out_width) in RESIZE_SHAPES:
        pixels = (np.asarray(Image.fromarray(xray).resize((width, height))) if height * width > 64 * 64
                  else rng.integers(0, 256, (height, width), dtype=np.uint8))
        cases.append({"pixels": pixels.ravel().tolist(), "width": width, "height": height, "outWidth": out_width,
                      "outHeight": out_height, "float": False})
        expected.append(resize_to(pixels, (out_height, out_width)))
    got = run_js(RESIZE_JS, {"cases": cases})
    for (shapes, want), have in zip(zip(RESIZE_SHAPES, expected), got):
        have = np.asarray(have, dtype=np.uint8).reshape(want.shape)
        assert np.array_equal(have, want), f"{shapes}: {int(np.abs(have.astype(int) - want).max())} levels off"


@needs_node
def test_js_float_resize_matches_pillow_on_class_activation_maps():
    rng = np.random.default_rng(3)
    cases, expected = [], []
    for (height, width), (out_height, out_width) in [((8, 8), (190, 190)), ((4, 4), (435, 366)), ((7, 5), (3, 2))]:
        cam = rng.random((height, width), dtype=np.float32)
        cases.append({"pixels": cam.ravel().tolist(), "width": width, "height": height, "outWidth": out_width,
                      "outHeight": out_height, "float": True})
        expected.append(np.asarray(Image.fromarray(cam).resize((out_width, out_height), Image.Resampling.BILINEAR)))
    for want, have in zip(expected, run_js(RESIZE_JS, {"cases": cases})):
        assert np.array_equal(np.asarray(have, dtype=np.float32).reshape(want.shape), want)


@needs_node
def test_js_rgb_to_grey_is_pillows_convert_l():
    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, :8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [1, 2, 3],
                  [254, 253, 252]]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, dtype=np.uint8)])
    got = run_js("return Array.from(imaging.rgbaToGrey(Uint8Array.from(input)));", rgba.ravel().tolist())
    assert np.array_equal(np.asarray(got, dtype=np.uint8), np.asarray(Image.fromarray(rgb).convert("L")).ravel())


@needs_node
def test_js_stretch_and_number_formats_match_python():
    from scoring.pixels import stretch_to_uint8

    values = [0.0, 0.5, 1.5, 2.5, 3.0, 255 / 2, 1000.25, -7.0, 12.0]
    got = run_js("""
      return {stretch: Array.from(imaging.stretchToUint8(Float64Array.from(input.values))),
              flat: Array.from(imaging.stretchToUint8(Float64Array.from([3, 3, 3]))),
              g: input.numbers.map((n) => imaging.formatG(n, 3)),
              rounded: input.halves.map(imaging.roundHalfEven)};
    """, {"values": values, "numbers": [452.9683, 3.880796, 0.000123456, 123456.0, 1.0, 99.95, 1e-5],
          "halves": [0.5, 1.5, 2.5, -0.5, 3.49, 3.51]})
    assert got["stretch"] == stretch_to_uint8(np.asarray(values)).tolist()
    assert got["flat"] == [0, 0, 0]
    assert got["g"] == [format(n, ".3g") for n in [452.9683, 3.880796, 0.000123456, 123456.0, 1.0, 99.95, 1e-5]]
    assert got["rounded"] == [round(n) for n in [0.5, 1.5, 2.5, -0.5, 3.49, 3.51]]


@needs_node
def test_js_checks_refuse_with_the_servers_messages():
    from scoring import checks

    xray = factory.xray()
    cases = {
        "elongated": factory.ramp(700, 200),
        "uniform": np.full((256, 256), 128, dtype=np.uint8),
        "plausible": xray,
    }
    got = run_js("""
      const out = {};
      for (const [name, c] of Object.entries(input.cases)) {
        out[name] = imaging.implausibility(Uint8Array.from(c.grey), c.width, c.height, c.spread, input.checks);
      }
      out.coloured = imaging.implausibility(Uint8Array.from(input.cases.plausible.grey), input.cases.plausible.width,
                                            input.cases.plausible.height, 47.6, input.checks);
      return out;
    """, {"cases": {name: {"grey": grey.ravel().tolist(), "width": grey.shape[1], "height": grey.shape[0],
                           "spread": 0.0} for name, grey in cases.items()},
          "checks": {"max_aspect": checks.MAX_ASPECT, "min_pixel_std": checks.MIN_PIXEL_STD,
                     "colour_spread_limit": checks.COLOUR_SPREAD_LIMIT}})
    for name, grey in cases.items():
        assert got[name] == checks.implausibility(factory.png(grey), grey), name
    assert got["coloured"] == "not scored: strongly coloured (channel spread 48 of 255); X-rays are greyscale"


@needs_node
def test_js_colour_statistic_matches_the_servers_on_colour_png():
    from scoring.checks import colour_spread

    rng = np.random.default_rng(2)
    xray = np.asarray(Image.fromarray(factory.xray()).resize((300, 200)), dtype=np.int16)
    tint = np.clip(np.dstack([xray + 40, xray, xray - 30]), 0, 255).astype(np.uint8)
    cases = {"noise-256": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), "tinted-300x200": tint,
             "noise-100": rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)}
    got = run_js("""
      const out = {};
      for (const [name, c] of Object.entries(input)) {
        out[name] = imaging.thumbnailColourSpread(Uint8Array.from(c.rgba), c.width, c.height, 128);
      }
      return out;
    """, {name: {"rgba": np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]).ravel().tolist(),
                 "width": rgb.shape[1], "height": rgb.shape[0]} for name, rgb in cases.items()})
    for name, rgb in cases.items():
        assert got[name] == pytest.approx(colour_spread(factory.png(rgb)), abs=1e-9), name


@needs_node
def test_js_heatmap_and_overlay_match_serving_overlay():
    from serving.overlay import heatmap, overlay

    rng = np.random.default_rng(5)
    cam = (rng.standard_normal((8, 8)) * 2).astype(np.float32)
    grey = np.asarray(Image.fromarray(factory.xray()).resize((300, 256)))
    got = run_js("""
      const heat = imaging.heatmap(Float32Array.from(input.cam), 8, 8, input.height, input.width, input.towards, 0.85);
      return {heat: Array.from(heat),
              rgba: Array.from(imaging.overlay(Uint8Array.from(input.grey), heat, input.palette, 0.6))};
    """, {"cam": cam.ravel().tolist(), "height": 256, "width": 300, "towards": True, "grey": grey.ravel().tolist(),
          "palette": ondevice.overlay_palette()})
    want_heat = heatmap(cam, (256, 300), True, 0.85)
    assert np.array_equal(np.asarray(got["heat"], dtype=np.float32).reshape(want_heat.shape), want_heat)
    rgba = np.asarray(got["rgba"], dtype=np.uint8).reshape(256, 300, 4)
    assert np.array_equal(rgba[..., :3], overlay(grey, want_heat))


@needs_node
def test_js_puts_every_orientation_upright_as_serving_orientation():
    from scoring.orientation import ORIENTATIONS, orient, upright

    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (5, 7), dtype=np.uint8)  # not square: a quarter turn swaps the sides
    found = [orient(image, index) for index in range(len(ORIENTATIONS))]
    got = run_js("""
      return input.images.map(({grey, width, height}, index) => {
        const u = rules.upright(Uint8Array.from(grey), width, height, index, 4);
        return {grey: Array.from(u.grey), width: u.width, height: u.height};
      });
    """, {"images": [{"grey": f.ravel().tolist(), "width": f.shape[1], "height": f.shape[0]} for f in found]})
    for index, (turned, have) in enumerate(zip(found, got)):
        want = upright(turned, index)
        assert np.array_equal(np.asarray(have["grey"], dtype=np.uint8).reshape(have["height"], have["width"]), want), \
            ORIENTATIONS[index]
        assert np.array_equal(want, image)


@needs_node
def test_js_decision_rules_are_serving_decisions():
    """Orientation (sure, unsure, mirrored, ties), label, triage, subtype and the gate, on the same numbers."""
    from scoring.decision import REVIEW, SUBTYPE_NAMES

    rng = np.random.default_rng(8)
    decisions = [Decision(0.4, "youden", 64, triage={"normal_below": 0.2, "pneumonia_from": 0.7, "rule": "t"},
                          subtype_threshold=0.35, orientation_confidence=0.9, ood={"score": "m", "limit": 3.5}),
                 Decision(0.5, "youden", 64, orientation_confidence=0.75)]
    orientations = [np.eye(8)[k] for k in range(8)] + [np.full(8, 1 / 8), np.array([.45, 0, 0, 0, .5, 0, 0, .05]),
                                                       np.array([.5, 0, .5, 0, 0, 0, 0, 0])]
    orientations += list(rng.dirichlet(np.full(8, 0.2), 40).astype(np.float32))
    probabilities = [0.0, 0.1999, 0.2, 0.3999, 0.4, 0.5, 0.6999, 0.7, 1.0] + rng.random(20).tolist()
    oods = [None, 3.5, 3.5001, -1.0]
    got = run_js("""
      return input.decisions.map((d) => ({
        orientation: input.orientations.map((o) => rules.orientation(d, o)),
        scored: input.probabilities.map((p, i) => [rules.label(d, p), rules.triaged(d, p, input.review),
                                                    rules.subtype(d, p, input.probabilities[(i + 3) % input.probabilities.length], input.subtypes)]),
        refusal: input.oods.map((s) => rules.refusal(d, s, "refused")),
      }));
    """, {"decisions": [json.loads(d.to_json()) for d in decisions], "orientations": [o.tolist() for o in orientations],
          "probabilities": probabilities, "oods": oods, "review": REVIEW, "subtypes": list(SUBTYPE_NAMES)})
    for decision, have in zip(decisions, got):
        assert have["orientation"] == [decision.orientation(o) for o in orientations]
        assert have["scored"] == [[decision.label(p), decision.triaged(p),
                                   decision.subtype(p, probabilities[(i + 3) % len(probabilities)])]
                                  for i, p in enumerate(probabilities)]
        assert have["refusal"] == [None if s is None or decision.refusal(s) is None else "refused" for s in oods]


@needs_node
def test_js_percent_is_the_server_pages_display():
    from scoring.wording import PERCENT_CEILING, PERCENT_FLOOR, percent

    values = [None, 0.0, 0.0004, 0.000999, 0.001, 0.0123, 0.5, 0.98765, 0.999, 0.9991, 1.0]
    values += np.random.default_rng(6).random(200).tolist()
    got = run_js("return input.values.map((v) => rules.percent(v, ...input.shown));",
                 {"values": values, "shown": [PERCENT_FLOOR, PERCENT_CEILING]})
    assert got[:11] == ["", "< 0.1%", "< 0.1%", "< 0.1%", "0.1%", "1.2%", "50.0%", "98.8%", "99.9%", "> 99.9%",
                        "> 99.9%"]
    assert got == [percent(v) for v in values]


DICOM_JS = """
const limits = {max_pixels: 50000000, min_side: 32, max_file_bytes: 50 * 1024 * 1024};
const out = {};
for (const [name, data] of Object.entries(input)) {
  try {
    const d = dicom.decodeDicom(bytes(data), parser(), limits);
    out[name] = {grey: Array.from(d.grey), width: d.width, height: d.height};
  } catch (error) {
    out[name] = {error: error.message, type: error.name};
  }
}
return out;
"""


def dicom_cases() -> dict[str, bytes]:
    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless

    rng = np.random.default_rng(9)
    xray = np.asarray(Image.fromarray(factory.xray()).resize((96, 80)))
    twelve = xray.astype(np.uint16) * 16 + rng.integers(0, 16, xray.shape, dtype=np.uint16)
    signed = (twelve.astype(np.int32) - 2048).astype(np.int16).view(np.uint16) & 0x0FFF
    return {
        "mono2": factory.dicom(twelve),
        "mono2-rescale-window": factory.dicom(twelve, rescale=(2.0, -1024.0), window=(3000.0, 6000.0)),
        "mono2-narrow-window": factory.dicom(twelve, window=(1500.0, 800.0)),
        "mono2-linear-exact": factory.dicom(twelve, window=(2000.0, 1000.0), extra={"VOILUTFunction": "LINEAR_EXACT"}),
        "mono2-sigmoid": factory.dicom(twelve, window=(2000.0, 1000.0), extra={"VOILUTFunction": "SIGMOID"}),
        "mono2-two-windows": factory.dicom(twelve, extra={"WindowCenter": [1800.0, 40.0], "WindowWidth": [900.0, 400.0]}),
        "mono1": factory.dicom(4095 - twelve, photometric="MONOCHROME1"),
        "mono1-window": factory.dicom(4095 - twelve, photometric="MONOCHROME1", window=(2000.0, 3000.0)),
        "signed-12-bit": factory.dicom(signed, extra={"PixelRepresentation": 1}, window=(0.0, 2000.0)),
        "garbage-high-bits": factory.dicom(twelve | 0xF000),
        "implicit-vr": factory.with_implicit_vr_meta(factory.dicom(twelve)),
        "implicit-vr-dataset": factory.dicom(twelve, transfer_syntax="1.2.840.10008.1.2"),
        "no-pixel-data": factory.dicom(twelve, with_pixels=False),
        "multi-frame": factory.dicom(np.stack([twelve] * 2), frames=2),
        "deflated": factory.dicom(twelve, transfer_syntax=DeflatedExplicitVRLittleEndian),
        "jpeg2000": factory.dicom(twelve, transfer_syntax=JPEG2000Lossless,
                                  pixel_data=_encapsulated(b"\xff\x4f\xff\x51" + b"\x00\x13" * 40)),
    }


def _encapsulated(frame: bytes) -> bytes:
    from pydicom.encaps import encapsulate

    return encapsulate([frame])


@needs_node
@needs_assets
def test_js_dicom_decoding_matches_the_server():
    from scoring.imaging import ImageDecodeError, decode_greyscale

    cases = dicom_cases()
    got = run_js(DICOM_JS, {name: b64(data) for name, data in cases.items()})
    # A file meta group in implicit VR breaks the standard; pydicom reads it, dicom-parser refuses it.
    assert got.pop("implicit-vr")["error"].startswith("corrupt DICOM file: ")
    for name, data in cases.items():
        if name not in got:
            continue
        try:
            want = decode_greyscale(data)
        except ImageDecodeError as error:
            assert "error" in got[name], f"{name}: the server refuses ({error}), the page decoded it"
            if name == "jpeg2000":  # the page names the compression and points to the server
                assert "JPEG 2000 Image Compression (Lossless Only)" in got[name]["error"]
                assert "On the server" in got[name]["error"]
            else:
                assert got[name]["error"] == str(error), name
            continue
        assert "error" not in got[name], f"{name}: {got[name]}"
        have = np.asarray(got[name]["grey"], dtype=np.uint8).reshape(got[name]["height"], got[name]["width"])
        assert have.shape == want.shape and np.array_equal(have, want), \
            f"{name}: up to {int(np.abs(have.astype(int) - want).max())} levels off"


def _png16(values: np.ndarray, interlaced: bool = False, bits: int = 16) -> bytes:
    """A 16-bit (or 8-bit) greyscale PNG (written here: Pillow cannot write Adam7), filters varied by row."""
    height, width = values.shape
    big = values.astype(">u2" if bits == 16 else np.uint8)
    step = bits // 8

    def rows(block: np.ndarray) -> bytes:
        out = b""
        for y, row in enumerate(block):
            raw = row.tobytes()
            kind = y % 3  # None, Sub, Up: enough to exercise the unfiltering
            if kind == 1:
                raw = bytes((raw[i] - (raw[i - step] if i >= step else 0)) & 0xFF for i in range(len(raw)))
            elif kind == 2 and y > 0:
                above = block[y - 1].tobytes()
                raw = bytes((raw[i] - above[i]) & 0xFF for i in range(len(raw)))
            else:
                kind = 0
            out += bytes([kind]) + raw
        return out

    if interlaced:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        data = b"".join(rows(big[y0::dy, x0::dx]) for x0, y0, dx, dy in passes if x0 < width and y0 < height)
    else:
        data = rows(big)
    chunk = factory._png_chunk
    header = struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, int(interlaced))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data))
            + chunk(b"IEND", b""))


@needs_node
def test_js_decodes_greyscale_png_as_the_server_does():
    from scoring.imaging import decode_greyscale

    xray = np.asarray(Image.fromarray(factory.xray()).resize((77, 61)))
    cases = {
        "twelve-bit": xray.astype(np.uint16) * 16 + 7,
        "full-range": xray.astype(np.uint16) * 257,
        "narrow": xray.astype(np.uint16) // 16 + 30000,
    }
    files = {name: _png16(values) for name, values in cases.items()}
    files["twelve-bit-interlaced"] = _png16(cases["twelve-bit"], interlaced=True)
    files["eight-bit-interlaced"] = _png16(xray, interlaced=True, bits=8)
    got = run_js("""
      const out = {};
      for (const [name, data] of Object.entries(input)) {
        const png = await decode.readPng(bytes(data));
        out[name] = {grey: Array.from(await decode.decodePngGrey(png)), width: png.width, height: png.height};
      }
      return out;
    """, {name: b64(data) for name, data in files.items()})
    for name, data in files.items():
        if name == "twelve-bit-interlaced":
            want = decode_greyscale(files["twelve-bit"])  # Pillow reads Adam7 too; same pixels
        elif name == "eight-bit-interlaced":
            want = decode_greyscale(factory.png(xray))
        else:
            want = decode_greyscale(data)
        have = np.asarray(got[name]["grey"], dtype=np.uint8).reshape(got[name]["height"], got[name]["width"])
        assert np.array_equal(have, want), name


@needs_node
def test_js_applies_exif_orientation_to_greyscale_png_as_pillow():
    from scoring.imaging import decode_greyscale

    pixels = np.asarray(Image.fromarray(factory.xray()).resize((70, 45)))
    files = {}
    for orientation in range(1, 10):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files[str(orientation)] = factory.encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes())
    got = run_js("""
      const out = {};
      for (const [name, data] of Object.entries(input)) {
        const png = await decode.readPng(bytes(data));
        const o = decode.orient(await decode.decodePngGrey(png), png.width, png.height, png.orientation);
        out[name] = {grey: Array.from(o.grey), width: o.width, height: o.height, orientation: png.orientation};
      }
      return out;
    """, {name: b64(data) for name, data in files.items()})
    for name, data in files.items():
        want = decode_greyscale(data)
        have = np.asarray(got[name]["grey"], dtype=np.uint8).reshape(got[name]["height"], got[name]["width"])
        assert got[name]["orientation"] == int(name)
        assert have.shape == want.shape and np.array_equal(have, want), f"orientation {name}"


@needs_node
def test_js_refuses_before_decoding_what_the_server_refuses():
    from scoring.imaging import ImageDecodeError, decode_greyscale
    from tests.hostile_corpus import _hostile_bytes, fixture_xray

    wanted = ["empty.png", "random.png", "truncated.jpeg", "truncated.png", "drawing.svg", "report.pdf",
              "bomb-20000x20000.png", "jpeg-header-claims-60000x60000.jpg", "ztxt-bomb.png", "one-pixel.png",
              "animated-apng.png"]
    corpus = _hostile_bytes(fixture_xray(0))
    got = run_js("""
      const env = {limits: {max_pixels: 50000000, min_side: 32, max_file_bytes: 50 * 1024 * 1024, bomb_pixels: input.bomb},
                   checks: {colour_probe_size: 128},
                   browserDecode: async () => { throw new Error("no browser decoder in Node"); }};
      const out = {};
      for (const [name, data] of Object.entries(input.files)) {
        try { await decode.decodeGreyscale(bytes(data), env); out[name] = null; }
        catch (error) { out[name] = error.name === "ImageDecodeError" ? error.message : "crash: " + error.message; }
      }
      return out;
    """, {"files": {name: b64(corpus[name][0]) for name in wanted}, "bomb": 2 * Image.MAX_IMAGE_PIXELS})
    for name in wanted:
        with pytest.raises(ImageDecodeError) as refused:
            decode_greyscale(corpus[name][0])
        message = got[name]
        assert message and not message.startswith("crash"), f"{name}: {message}"
        if "truncated" in name:  # Pillow's wording varies with where the stream stops
            assert "truncated" in message and "truncated" in str(refused.value).lower(), (name, message)
        else:
            assert message == str(refused.value), name


# --------------------------------------------------------------------------------------------------
# The Python side: routes and the page


@pytest.fixture(scope="module")
def client(service):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    with TestClient(Starlette(routes=ondevice.routes(service, ondevice.PageSettings(max_file_bytes=MAX_FILE_BYTES)))) as c:
        yield c


@needs_assets
def test_config_is_the_artefacts_decision_and_the_servers_limits(client, service, tiny_bundle):
    from scoring import checks, pixels

    response = client.get("/ondevice/config.json")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    config = response.json()
    decision = service.predictor.decision
    assert Decision.from_json(json.dumps(config["decision"])) == decision
    assert config["decision"]["threshold"] == decision.threshold
    data = (tiny_bundle / "model.onnx").read_bytes()
    assert config["model"]["bytes"] == len(data)
    assert config["model"] == {"url": "model.onnx", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert config["limits"] == {"max_file_bytes": MAX_FILE_BYTES, "max_pixels": pixels.MAX_PIXELS,
                                "min_side": pixels.MIN_SIDE, "max_files": MAX_FILES,
                                "bomb_pixels": 2 * Image.MAX_IMAGE_PIXELS}
    assert config["checks"]["max_aspect"] == checks.MAX_ASPECT
    assert config["checks"]["colour_spread_limit"] == checks.COLOUR_SPREAD_LIMIT
    assert config["tensors"] == {"input": "pixels", "probability": "probability", "cam": "cam", "ood": "ood_score",
                                 "viral": "probability_viral", "orientation": "orientation"}
    # The words the page shows come from the Python modules, not from its script.
    from scoring.orientation import ORIENTATIONS

    words = config["words"]
    assert words["orientations"] == list(ORIENTATIONS) and words["upright"] == 0
    assert words["orientation_unclear"] == Decision.orientation_unclear()
    assert words["gate_refusal"] is None  # the tiny model has no gate
    assert words["review"] == "REVIEW" and words["subtypes"] == ["BACTERIAL", "VIRAL"]
    assert config["api_docs"] == "?view=api"  # no FastAPI docs on this app: Gradio's API page of the server page
    assert len(config["overlay"]["palette"]) == 768
    assert set(config["runtime"]["versions"]) == {"onnxruntime-web", "dicom-parser"}


def test_model_route_sends_exactly_the_served_artefact(client, tiny_bundle):
    data = (tiny_bundle / "model.onnx").read_bytes()
    response = client.get("/ondevice/model.onnx")
    assert response.status_code == 200 and response.content == data
    assert response.headers["content-type"] == "application/octet-stream"
    etag = response.headers["etag"]
    again = client.get("/ondevice/model.onnx", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""


@needs_assets
def test_assets_are_a_fixed_list_with_their_media_types(client):
    for name, media_type in [("ondevice.js", "text/javascript"), (ondevice.ORT_MODULE, "text/javascript"),
                             (ondevice.ORT_WASM[1], "application/wasm"), (ondevice.DICOM_PARSER, "text/javascript")]:
        response = client.get(f"/ondevice/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"].startswith(media_type), name
        assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ondevice/ondevice.js", headers={"If-None-Match": response.headers["etag"]}).status_code == 200
    for name in ["package.json", "package-lock.json", "ondevice.py", "__init__.py", "vendor", ".built",
                 "node_modules", "ort.all.min.mjs", "ort.webgpu.min.mjs", "imaging.js.map"]:
        assert client.get(f"/ondevice/{name}").status_code == 404, name


def test_no_model_or_no_runtime_is_a_one_line_503(service, monkeypatch, tmp_path):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    class NoModel:
        ready, predictor, problem = False, None, "no registered model (run `make repro`)"

    with TestClient(Starlette(routes=ondevice.routes(NoModel()))) as c:
        for path in ("/ondevice/config.json", "/ondevice/model.onnx"):
            response = c.get(path)
            assert response.status_code == 503
            assert response.json()["error"] in (
                "no model is loaded on the server: no registered model (run `make repro`)",
                "the on-device runtime is not built on this server (run `make web`)")
    monkeypatch.setattr(ondevice, "VENDOR_DIR", tmp_path / "not-built")
    with TestClient(Starlette(routes=ondevice.routes(service))) as c:
        response = c.get("/ondevice/config.json")
        assert response.status_code == 503
        assert response.json() == {"error": "the on-device runtime is not built on this server (run `make web`)"}


def test_the_page_is_a_second_page_with_no_server_events(app_module, service):
    import gradio as gr

    demo = app_module.create_demo(service=service)
    assert (ondevice.PAGE_PATH, ondevice.PAGE_NAME, True) in demo.pages
    page_blocks = [block for block in demo.blocks.values() if getattr(block, "page", "") == ondevice.PAGE_PATH]
    html = [block for block in page_blocks if isinstance(block, gr.HTML)]
    assert len(html) == 1 and html[0].elem_id == "ondevice-page"
    assert "ondevice-files" in html[0].value and 'type="file"' in html[0].value
    assert f'"{ondevice.PREFIX}/"' in html[0].js_on_load and "mount(element, base)" in html[0].js_on_load
    assert not any(isinstance(block, (gr.File, gr.Image, gr.UploadButton)) for block in page_blocks)
    # Nothing on this page talks to the Gradio queue: no event can carry a file to the server.
    assert [fn for fn in demo.fns.values() if getattr(fn, "page", "") == ondevice.PAGE_PATH] == []
    navbars = [block for block in demo.blocks.values() if isinstance(block, gr.Navbar)]
    assert {navbar.main_page_name for navbar in navbars} == {ondevice.MAIN_PAGE_NAME}
    options = ondevice.launch_options(demo)
    assert [route.path for route in options["app_kwargs"]["routes"]] == [
        "/ondevice/config.json", "/ondevice/model.onnx", "/ondevice/{name}"]
    assert ondevice.launch_options(gr.Blocks()) == {}




@pytest.fixture(scope="module")
def app_url(app_module, service) -> Iterator[str]:
    demo = app_module.create_demo(service=service, max_file_bytes=MAX_FILE_BYTES)
    try:
        yield launched(demo, **ondevice.launch_options(demo))
    finally:
        demo.close()


def test_launched_app_serves_the_routes_and_nothing_beside_them(app_url, tiny_bundle):
    status, body = raw_get(app_url, "/ondevice/model.onnx")
    assert status == 200 and body == (tiny_bundle / "model.onnx").read_bytes()
    status, _ = raw_get(app_url, "/on-device")
    assert status == 200
    traversal = "/".join([".."] * 8)
    leaks = []
    for path in [f"/ondevice/{traversal}/etc/passwd", "/ondevice/..%2f..%2fapp.py", "/ondevice/%2e%2e%2fondevice.py",
                 "/ondevice/..%2F..%2F..%2Fparams.yaml", "/ondevice/vendor/../../../app.py", "/ondevice/package.json",
                 "/ondevice/node_modules/onnxruntime-web/package.json", "/ondevice/vendor%2fort.all.min.mjs",
                 "/ondevice/..", "/ondevice/", "/ondevice/%00", "/ondevice/ondevice.js%00.py",
                 f"/ondevice/{tiny_bundle}/model.onnx", "/ondevice//etc/passwd", "/ondevice/model.onnx/../../app.py"]:
        status, body = raw_get(app_url, path)
        if status not in (403, 404) or b"import gradio" in body or b"root:" in body:
            leaks.append(f"{path}: {status} {body[:60]!r}")
    assert not leaks, "\n".join(leaks)
    # The model stays out of Gradio's file route (tests/test_security.py): only /ondevice/model.onnx sends it.
    status, _ = raw_get(app_url, f"/gradio_api/file={tiny_bundle}/model.onnx")
    assert status in (403, 404)


# --------------------------------------------------------------------------------------------------
# In Chromium




def open_page(browser, url: str, before=None):
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    if before:
        before(context, page)
    page.goto(f"{url}{ondevice.PAGE_PATH}")
    page.wait_for_function("window.pneumoniaOnDevice && ['ready', 'failed'].includes(window.pneumoniaOnDevice.status)")
    return context, page


@pytest.fixture
def page(browser, app_url):
    context, page = open_page(browser, app_url)
    assert page.evaluate("window.pneumoniaOnDevice.status") == "ready", page.evaluate("window.pneumoniaOnDevice.message")
    yield page
    context.close()


def score_in_page(page, paths: list[Path]) -> list[dict]:
    """Choose `paths` in the page's file input and wait for its results (in order)."""
    done = page.evaluate("window.pneumoniaOnDevice.batches")
    page.locator("#ondevice-files").set_input_files([str(p) for p in paths])
    page.wait_for_function(f"window.pneumoniaOnDevice.batches > {done}")
    return page.evaluate("window.pneumoniaOnDevice.results")


def server_results(service, paths: list[Path]):
    return service.predictor.predict([(p.name, p.read_bytes()) for p in paths], max_bytes=MAX_FILE_BYTES)


PROBABILITY_FIELDS = ("probability_pneumonia", "probability_viral")


def record_mismatches(name: str, device: dict, server) -> tuple[list[str], list[float]]:
    """How the page's result differs from the server's record (scoring.runtime.RECORD_FIELDS): words equal,
    probabilities within PROBABILITY_TOLERANCE; and the probability differences."""
    from scoring.runtime import RECORD_FIELDS

    want = server.record()
    mismatches, differences = [], []
    for key in RECORD_FIELDS:
        have = device[key]
        if key in PROBABILITY_FIELDS and have is not None and want[key] is not None:
            differences.append(abs(have - want[key]))
            if differences[-1] > PROBABILITY_TOLERANCE:
                mismatches.append(f"{name} {key}: server {want[key]}, device {have}")
        elif have != want[key]:
            mismatches.append(f"{name} {key}: server {want[key]!r}, device {have!r}")
    return mismatches, differences


def agree(page, predictor, paths: list[Path]) -> list[float]:
    """Score `paths` in the page and on the server; fail on any field that differs; the probability differences."""
    mismatches, differences = [], []
    for start in range(0, len(paths), MAX_FILES):
        batch = paths[start:start + MAX_FILES]
        server = predictor.predict([(p.name, p.read_bytes()) for p in batch], max_bytes=MAX_FILE_BYTES)
        for path, device, want in zip(batch, score_in_page(page, batch), server):
            assert device["name"] == path.name
            found, diffs = record_mismatches(path.name, device, want)
            mismatches += found
            differences += diffs
    assert not mismatches, "\n".join(mismatches)
    return differences


@pytest.mark.browser
@needs_chromium
@needs_assets
def test_browser_and_server_agree_on_every_fixture_xray(page, service, fixture_images):
    assert len(fixture_images) == 48
    differences = agree(page, service.predictor, fixture_images)
    print(f"largest browser-server probability difference over {len(fixture_images)} fixtures "
          f"(pneumonia and viral): {max(differences):.2e}")
    assert len(differences) == 2 * len(fixture_images)  # all scored, upright: no note
    # The page shows the last batch's first file's decision the way the server page words it, and its map.
    first = server_results(service, fixture_images[32:33])[0]
    assert page.locator("#ondevice-label").inner_text().startswith(f"{first.label}: probability of pneumonia ")
    assert page.locator("#ondevice-heatmap").is_visible()


def serve_model_to_page(context, bundle: Path):
    """Make the page load `bundle`'s model (its config.json and model.onnx answered from here) instead of the
    app's: one launched app, several models. Returns the server's Predictor for that model."""
    from types import SimpleNamespace

    from scoring.runtime import Predictor, ServingArtefact

    predictor = Predictor(ServingArtefact.from_file(bundle / "model.onnx"))
    service = SimpleNamespace(ready=True, predictor=predictor, problem=None)
    config = ondevice.page_config(service, ondevice.PageSettings(max_file_bytes=MAX_FILE_BYTES))
    config["api_docs"] = ondevice.API_PAGE
    data = (bundle / "model.onnx").read_bytes()
    context.route("**/ondevice/config.json*", lambda route: route.fulfill(
        status=200, body=json.dumps(config), content_type="application/json"))
    context.route("**/ondevice/model.onnx*", lambda route: route.fulfill(
        status=200, body=data, content_type="application/octet-stream"))
    return predictor


UPRIGHT_INPUT_JS = """
async ([data, orientation]) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  return (await window.pneumoniaOnDevice.preprocess(bytes, orientation)).input;
}
"""


@pytest.fixture(scope="module")
def turned_fixtures(fixture_images, tmp_path_factory) -> dict[int, list[Path]]:
    """Eight fixture X-rays (both classes) put in each orientation, as PNG: orientation -> files."""
    from scoring.imaging import decode_greyscale
    from scoring.orientation import ORIENTATIONS, orient

    folder = tmp_path_factory.mktemp("turned")
    chosen = fixture_images[::6]
    found: dict[int, list[Path]] = {}
    for index in range(len(ORIENTATIONS)):
        found[index] = []
        for path in chosen:
            target = folder / f"{path.stem}-o{index}.png"
            grey = decode_greyscale(path.read_bytes())
            grey = grey[:, : grey.shape[1] * 3 // 4]  # not square: a quarter turn swaps unequal sides
            Image.fromarray(orient(grey, index)).save(target)
            found[index].append(target)
    return found


@pytest.mark.browser
@needs_chromium
@needs_assets
@pytest.mark.parametrize("orientation", [2, 5, None], ids=["upside-down", "mirrored-quarter-turn", "unsure"])
def test_browser_and_server_agree_on_turned_xrays(browser, app_url, tmp_path, turned_fixtures, orientation):
    """A model sure every X-ray lies in `orientation` (None: sure of none): X-rays turned that way are put back
    upright (the decoded image, then resized, as the server does) and scored, with the server's note, triage,
    subtype and viral probability; with an unsure model each is refused with the server's sentence."""
    from tests.helpers import write_tiny_bundle

    bundle = write_tiny_bundle(tmp_path / "bundle", orientation=orientation,
                               triage={"normal_below": 0.45, "pneumonia_from": 0.55, "rule": "test"})
    holder = {}
    context, page = open_page(browser, app_url,
                              before=lambda context, page: holder.update(predictor=serve_model_to_page(context, bundle)))
    try:
        assert page.evaluate("window.pneumoniaOnDevice.status") == "ready", page.evaluate("window.pneumoniaOnDevice.message")
        paths = turned_fixtures[orientation if orientation is not None else 2] + turned_fixtures[0][:2]
        differences = agree(page, holder["predictor"], paths)
        results = page.evaluate("window.pneumoniaOnDevice.results")
        if orientation is None:
            assert differences == []
            assert {r["error"] for r in results} == {Decision.orientation_unclear()}
            expect_text = "Send it as the X-ray system exports it"
        else:
            print(f"orientation {orientation}: largest browser-server probability difference over {len(paths)} "
                  f"turned X-rays: {max(differences):.2e}")
            assert all(r["note"] and r["note"].startswith("the image was ") for r in results)
            expect_text = results[0]["note"]
        from playwright.sync_api import expect

        expect(page.locator("#ondevice-results")).to_contain_text(expect_text, timeout=TIMEOUT_MS)
        # The untrained model barely tells images apart, so the probabilities alone would not show a wrong
        # turn or order: the model input of each turned X-ray, put upright then resized, equals the server's.
        if orientation is not None:
            from scoring.imaging import decode_greyscale, resize_grey
            from scoring.orientation import upright

            for path in paths[:3]:
                got = page.evaluate(UPRIGHT_INPUT_JS, [b64(path.read_bytes()), orientation])
                want = resize_grey(upright(decode_greyscale(path.read_bytes()), orientation), 64)
                assert np.array_equal(np.asarray(got, dtype=np.uint8).reshape(want.shape), want), path.name
    finally:
        context.close()


PHONE = {"width": 390, "height": 844}
# Set to a folder (docs/images) to keep the page's screenshots at 390 and 1280 px (on-device-390.png, ...).
SCREENSHOTS_ENV = "ONDEVICE_SCREENSHOTS"

LAYOUT_JS = """
() => {
  const width = document.documentElement.clientWidth;
  const out = {width, scrollWidth: document.documentElement.scrollWidth, cells: [], clipped: []};
  for (const cell of document.querySelectorAll("#ondevice-results tbody td, #ondevice-label, #ondevice-summary p")) {
    if (!cell.textContent.trim()) continue;
    const box = cell.getBoundingClientRect();
    out.cells.push({text: cell.textContent.slice(0, 40), left: box.left, right: box.right, visible: box.width > 0});
    if (cell.scrollWidth > cell.clientWidth + 1) out.clipped.push(cell.textContent.slice(0, 40));
  }
  const pick = document.querySelector("#ondevice-files").getBoundingClientRect();
  const drop = document.querySelector("#ondevice-drop").getBoundingClientRect();
  out.picker = {left: pick.left, right: pick.right, boxLeft: drop.left, boxRight: drop.right};
  const label = document.querySelector("#ondevice-label").getBoundingClientRect();
  out.result = {top: label.top, bottom: label.bottom, viewport: window.innerHeight};
  return out;
}
"""


@pytest.mark.browser
@needs_chromium
@needs_assets
def test_phone_width_shows_every_decision_without_scrolling_sideways(browser, app_url, tmp_path, turned_fixtures):
    """Issue #21 at 390 x 844: every file's decision within the screen width, nothing clipped, the result
    brought into view after scoring; the picker inside its box; visible focus; word names; the API link.
    The model: sure every X-ray is upside down, with a triage band, so every column of the table is filled."""
    import os

    from tests.helpers import write_tiny_bundle

    bundle = write_tiny_bundle(tmp_path / "bundle", orientation=2,
                               triage={"normal_below": 0.45, "pneumonia_from": 0.559, "rule": "test"})
    context = browser.new_context(viewport=PHONE)
    serve_model_to_page(context, bundle)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(f"{app_url}{ondevice.PAGE_PATH}")
        page.wait_for_function("window.pneumoniaOnDevice && window.pneumoniaOnDevice.status === 'ready'")
        notes = tmp_path / "a-rather-long-file-name-for-a-phone-screen-notes.txt"
        notes.write_text("not an X-ray")
        paths = [*turned_fixtures[2][:4], notes]
        results = score_in_page(page, paths)
        assert [r["error"] is None for r in results] == [True, True, True, True, False]
        layout = page.evaluate(LAYOUT_JS)
        assert layout["scrollWidth"] <= PHONE["width"], layout["scrollWidth"]
        assert len(layout["cells"]) >= 3 * len(paths)
        outside = [c for c in layout["cells"] if not c["visible"] or c["left"] < 0 or c["right"] > layout["width"]]
        assert outside == [] and layout["clipped"] == []
        rows = page.locator("#ondevice-results tbody tr")
        for index, path in enumerate(paths):
            row = rows.nth(index)
            assert row.is_visible()
            text = row.inner_text()
            assert path.name in text
            assert (results[index]["label"] or "not scored") in text
        # The refusal says what to do next.
        assert "Choose the chest X-ray itself" in rows.nth(4).inner_text()
        # After scoring the result, not the picker, is on the screen.
        assert 0 <= layout["result"]["top"] < layout["result"]["viewport"], layout["result"]
        picker = layout["picker"]
        assert picker["boxLeft"] <= picker["left"] and picker["right"] <= picker["boxRight"], picker

        # Keyboard focus is visible on the page's controls; their names are words.
        for control in (page.locator("#ondevice-files"), page.locator("#ondevice-api-link")):
            control.focus()
            page.keyboard.press("Shift+Tab")
            page.keyboard.press("Tab")
            outline = control.evaluate("(e) => [e === document.activeElement, getComputedStyle(e).outlineStyle,"
                                       " getComputedStyle(e).outlineWidth]")
            assert outline[0] and outline[1] != "none" and outline[2] != "0px", outline
        assert page.get_by_label("Chest X-rays (PNG, JPEG or DICOM), read on this device").count() == 1
        assert page.get_by_role("img", name="Where the model looked (not where a lesion is)").count() == 1
        api = page.get_by_role("link", name="the server's API documentation")
        assert api.get_attribute("href").endswith("/?view=api")

        folder = os.environ.get(SCREENSHOTS_ENV)
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
            page.screenshot(path=str(Path(folder) / "on-device-390.png"), full_page=True)
        page.set_viewport_size({"width": 1280, "height": 900})
        if folder:
            score_in_page(page, paths)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(Path(folder) / "on-device-1280.png"), full_page=True)

        # Gradio's footer link (shown on wide screens) leads to the server page's API documentation, not to
        # this page's empty list ("No API Routes found").
        page.locator("footer").get_by_text("Use via API").click()
        page.wait_for_url(f"{app_url}?view=api")
    finally:
        context.close()


PREPROCESS_JS = """
async (data) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  try { return await window.pneumoniaOnDevice.preprocess(bytes); } catch (error) { return {error: error.message}; }
}
"""


def decoding_cases() -> dict[str, bytes]:
    """Files whose decoding goes through the browser's own decoders (and ours): modes, subsampling, EXIF."""
    xray = factory.xray()
    rgb = Image.fromarray(np.dstack([xray, np.roll(xray, 5, 1), np.clip(xray.astype(int) + 30, 0, 255).astype(np.uint8)]))
    ramp = (np.arange(xray.size).reshape(xray.shape) % 256).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    twelve = np.asarray(Image.fromarray(xray).resize((300, 256))).astype(np.uint16) * 16
    return {
        "fixture.jpeg": factory.xray_jpeg_bytes(),
        "example.png": EXAMPLES[0].read_bytes(),
        "rgb.png": factory.encode(rgb),
        "rgb-420.jpg": factory.encode(rgb, "JPEG", quality=90),
        "rgb-444.jpg": factory.encode(rgb, "JPEG", quality=90, subsampling=0),
        "progressive.jpg": factory.encode(Image.fromarray(xray), "JPEG", quality=90, progressive=True),
        "cmyk.jpg": factory.encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "exif-6.jpg": factory.jpeg_with_orientation(np.rot90(xray), 6),
        "exif-3.jpg": factory.jpeg_with_orientation(xray, 3),
        "exif-8.jpg": factory.jpeg_with_orientation(xray, 8),
        "exif-6.png": factory.encode(Image.fromarray(np.rot90(xray).copy()), "PNG", exif=exif.tobytes()),
        "rgba.png": factory.encode(Image.fromarray(np.dstack([xray, xray, xray, ramp]), "RGBA")),
        "la.png": factory.encode(Image.fromarray(np.dstack([xray, ramp]), "LA")),
        "palette.png": factory.encode(Image.fromarray(xray).convert("P")),
        "palette-transparent.png": factory.encode(Image.fromarray(xray).convert("P"), transparency=0),
        "mode-1.png": factory.encode(Image.fromarray(xray).convert("1")),
        "sixteen-bit.png": _png16(twelve),
        "grey-transparent-level.png": factory.encode(Image.fromarray(xray), "PNG", transparency=0),
        "grey-interlaced.png": _png16(xray, interlaced=True, bits=8),
        "mono2.dcm": factory.dicom(twelve, rescale=(2.0, -1024.0), window=(3000.0, 6000.0)),
        "mono1.dcm": factory.dicom(4095 - twelve, photometric="MONOCHROME1"),
    }


@pytest.mark.browser
@needs_chromium
@needs_assets
def test_page_prepares_the_model_input_exactly_as_the_server(page):
    from scoring.imaging import decode_greyscale, resize_grey

    size = page.evaluate("window.pneumoniaOnDevice.scorer.decision.input_size")
    different = []
    for name, data in decoding_cases().items():
        got = page.evaluate(PREPROCESS_JS, b64(data))
        assert "error" not in got, (name, got)
        grey = decode_greyscale(data)
        have = np.asarray(got["grey"], dtype=np.uint8).reshape(got["height"], got["width"])
        model_input = np.asarray(got["input"], dtype=np.uint8).reshape(size, size)
        if have.shape != grey.shape or not np.array_equal(have, grey) or \
                not np.array_equal(model_input, resize_grey(grey, size)):
            different.append(name)
    assert different == []


@pytest.mark.browser
@needs_chromium
@needs_assets
def test_hostile_corpus_gets_the_servers_outcomes_or_a_pointer_to_the_server(page, service, tmp_path):
    from tests.hostile_corpus import build_corpus

    cases = build_corpus(tmp_path / "corpus", oversize_bytes=MAX_FILE_BYTES + 1)
    # Formats the page leaves to the server (documented in docs/on-device.md), whatever the server says.
    server_only = {"animated.gif", "multipage.tiff", "nan-float.tiff", "sixteen-bit.tif", "xray.bmp", "xray.webp",
                   "single-frame.gif", "jpeg2000-compressed.dcm"}
    # Refused by both, in other words: pydicom reads this garbage as a dataset without pixels.
    other_words = {"dicm-then-garbage.dcm": "corrupt DICOM file: "}
    mismatches = []
    for start in range(0, len(cases), MAX_FILES):
        batch = [case.path for case in cases[start:start + MAX_FILES]]
        for path, device, server in zip(batch, score_in_page(page, batch), server_results(service, batch)):
            name = path.name
            if name in server_only:
                if device["error"] is None or "On the server" not in device["error"]:
                    mismatches.append(f"{name}: expected a pointer to the server, got {device}")
            elif server.scored:
                if device["error"] is not None or device["label"] != server.label or \
                        abs(device["probability"] - server.probability) > PROBABILITY_TOLERANCE:
                    mismatches.append(f"{name}: server {server.probability} {server.label}, device {device}")
            elif device["error"] is None:
                mismatches.append(f"{name}: server refused ({server.error}), device scored {device['probability']}")
            elif name in other_words:
                if not device["error"].startswith(other_words[name]):
                    mismatches.append(f"{name}: device {device['error']!r}")
            elif device["error"] != server.error and not ("truncated" in device["error"] and "truncated" in server.error):
                mismatches.append(f"{name}: server {server.error!r}, device {device['error']!r}")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.browser
@needs_chromium
@needs_assets
def test_no_request_carries_the_image_even_offline(browser, app_url, service, tmp_path):
    context, page = open_page(browser, app_url)
    requests: list[dict] = []
    page.on("request", lambda request: requests.append(
        {"url": request.url, "method": request.method, "body": request.post_data_buffer or b""}))
    try:
        assert page.evaluate("window.pneumoniaOnDevice.status") == "ready"
        # Files with distinctive names and contents: a fixture JPEG, an example PNG, a DICOM with a patient name.
        twelve = np.asarray(Image.fromarray(factory.xray()).resize((256, 256))).astype(np.uint16) * 16
        files = {"secret-scan-4242.jpeg": sorted(FIXTURE_DATASET.rglob("*.jpeg"))[5].read_bytes(),
                 "secret-example-4243.png": EXAMPLES[0].read_bytes(),
                 "secret-dicom-4244.dcm": factory.dicom(twelve, patient_name="Secret^Patient")}
        paths = []
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
            paths.append(tmp_path / name)
        online = score_in_page(page, paths)
        assert all(r["error"] is None for r in online), online

        context.set_offline(True)  # the network cut once the page has loaded
        offline = score_in_page(page, paths)
        assert [(r["name"], r["label"], r["probability"]) for r in offline] == \
               [(r["name"], r["label"], r["probability"]) for r in online]
        context.set_offline(False)

        expected = server_results(service, paths)
        for device, server in zip(online, expected):
            assert device["label"] == server.label
            assert abs(device["probability"] - server.probability) <= PROBABILITY_TOLERANCE
        assert page.locator("#ondevice-label").inner_text().startswith(online[0]["label"])
    finally:
        context.close()
    assert requests_carrying(requests, files, ["Secret^Patient"]) == []
    assert all(r["url"].startswith(app_url) for r in requests), [r["url"] for r in requests]


def requests_carrying(requests: list[dict], files: dict[str, bytes], secrets: list[str]) -> list[str]:
    """The recorded requests that carry any part of a file: a large body, 48-byte pieces of its bytes
    (64 of them, spread over the file) raw or in base64, its name (without extension) or another secret."""
    found = []
    for request in requests:
        body = request["body"]
        text = request["url"] + " " + body.decode("latin-1")
        if len(body) > 2048:
            found.append(f"{request['method']} {request['url']}: a {len(body)}-byte body")
        for name, data in files.items():
            step = max(1, len(data) // 64)
            pieces = [data[i:i + 48] for i in range(0, max(1, len(data) - 48), step)]
            encoded = base64.b64encode(data)
            pieces += [encoded[i:i + 64] for i in range(0, max(1, len(encoded) - 64), 4 * max(1, step // 3))]
            if name.rsplit(".", 1)[0] in text or any(secret in text for secret in secrets) or any(
                    piece in body for piece in pieces):
                found.append(f"{request['method']} {request['url']}: carries {name}")
    return found


def test_the_leak_detector_sees_bytes_names_and_large_bodies():
    data = EXAMPLES[0].read_bytes()
    files = {"secret-scan-1.png": data}
    clean = {"url": "http://127.0.0.1:1/gradio_api/heartbeat/abc", "method": "GET", "body": b""}
    assert requests_carrying([clean], files, ["Doe^Jane"]) == []
    start = (len(data) // 64) * 5
    piece = {"url": "http://127.0.0.1:1/x", "method": "POST", "body": b"k=" + data[start - 7:start + 60]}
    encoded = {"url": "http://127.0.0.1:1/x", "method": "POST", "body": b"k=" + base64.b64encode(data)[:1500]}
    named = {"url": "http://127.0.0.1:1/x?f=secret-scan-1", "method": "GET", "body": b""}
    patient = {"url": "http://127.0.0.1:1/x", "method": "POST", "body": b'{"p": "Doe^Jane"}'}
    large = {"url": "http://127.0.0.1:1/x", "method": "POST", "body": bytes(4096)}
    for request in (piece, encoded, named, patient, large):
        assert requests_carrying([request], files, ["Doe^Jane"]), request["url"]


@pytest.mark.browser
@needs_chromium
@needs_assets
def test_page_load_fetches_only_this_servers_model_and_runtime(browser, app_url):
    urls: list[str] = []

    def record(context, page):
        page.on("request", lambda request: urls.append(request.url))

    context, page = open_page(browser, app_url, before=record)
    try:
        assert page.evaluate("window.pneumoniaOnDevice.status") == "ready"
        fetched = {url.split("/ondevice/", 1)[1].split("?")[0] for url in urls if "/ondevice/" in url}
        assert fetched == {"config.json", "model.onnx", *ondevice.MODULES,
                           *ondevice.VENDOR_FILES}
        assert all(url.startswith(app_url) for url in urls), [u for u in urls if not u.startswith(app_url)]
    finally:
        context.close()


@pytest.mark.browser
@needs_chromium
@needs_assets
def test_failures_are_one_line_and_the_server_page_stays(browser, app_url, tmp_path):
    from playwright.sync_api import expect

    status = "#ondevice-status"

    def no_wasm(context, page):
        context.add_init_script("delete globalThis.WebAssembly;")

    context, page = open_page(browser, app_url, before=no_wasm)
    try:
        message = page.locator(status).inner_text()
        assert message.startswith("This browser cannot run WebAssembly") and "On the server" in message
        assert "\n" not in message and page.locator("#ondevice-files").is_disabled()
    finally:
        context.close()

    no_model = json.dumps({"error": "no model is loaded on the server: nothing registered"})
    faults = {"missing": ("**/ondevice/model.onnx*", {"status": 404, "body": "gone"}),
              "corrupt": ("**/ondevice/model.onnx*", {"status": 200, "body": b"\x08\x01garbage"}),
              "none on the server": ("**/ondevice/config.json*", {"status": 503, "body": no_model,
                                                                   "content_type": "application/json"})}
    for fault, (pattern, answer) in faults.items():
        def broken_model(context, page, pattern=pattern, answer=answer):
            page.route(pattern, lambda route: route.fulfill(**answer))

        context, page = open_page(browser, app_url, before=broken_model)
        try:
            message = page.locator(status).inner_text()
            assert message.startswith("The model could not be loaded on this device"), (fault, message)
            if fault == "none on the server":
                assert "(no model is loaded on the server: nothing registered)" in message
            assert "On the server" in message and "\n" not in message
            # The server page is one click away and still scores.
            page.get_by_text(ondevice.MAIN_PAGE_NAME, exact=True).first.click()
            page.locator("#upload input[type=file]").set_input_files(str(EXAMPLES[0]))
            page.locator("#result-label").get_by_text("probability of pneumonia").first.wait_for()
        finally:
            context.close()

    context, page = open_page(browser, app_url)
    try:
        notes = tmp_path / "notes.txt"
        notes.write_text("not an X-ray")
        tiff = tmp_path / "scan.tiff"
        tiff.write_bytes(factory.encode(Image.fromarray(factory.xray()), "TIFF"))
        results = score_in_page(page, [notes, tiff])
        assert results[0]["error"] == "not a recognised image (expected PNG, JPEG or DICOM)"
        assert results[1]["error"].startswith("TIFF files are not decoded on this device")
        expect(page.locator("#ondevice-summary")).to_contain_text("notes.txt: not a recognised image")
        assert not page.locator("#ondevice-heatmap").is_visible()
    finally:
        context.close()

