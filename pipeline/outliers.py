"""Outlier sets for the input gate, from what installed packages ship (no downloads), as files.

Far: natural images of scikit-image, scikit-learn and matplotlib (in colour and in grey), and synthetic noise,
gradients, text and checkerboards. Near: pydicom's other-modality test files, and validation X-rays
inverted or cropped to a quarter. The ood stage fits and compares gate candidates on them; the assemble
stage measures what the whole serving path does with them.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from scoring import checks
from scoring.imaging import ImageDecodeError, decode_greyscale


@dataclass(frozen=True)
class Outlier:
    name: str
    source: str  # where it comes from: tune on some sources, report on the others
    kind: str  # far or near
    data: bytes


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pictures(source: str, pictures: Iterator[tuple[str, np.ndarray]]) -> Iterator[Outlier]:
    """Each picture as a file, in colour (as shipped) and as a greyscale copy, which the colour check
    cannot catch."""
    for name, pixels in pictures:
        image = Image.fromarray(np.asarray(pixels))
        image = image.convert("RGB") if image.mode not in ("L", "RGB") else image
        yield Outlier(f"{source}/{name}", source, "far", _png(image))
        if image.mode != "L":
            yield Outlier(f"{source}/{name} (grey)", source, "far", _png(image.convert("L")))


def scikit_image_pictures() -> Iterator[tuple[str, np.ndarray]]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    for path in sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg")):
        with Image.open(path) as image:
            yield path.stem, np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)


def scikit_learn_pictures() -> Iterator[tuple[str, np.ndarray]]:
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    for name, pixels in zip(sample.filenames, sample.images):
        yield Path(name).stem, pixels


def matplotlib_pictures() -> Iterator[tuple[str, np.ndarray]]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    for path in sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg")):
        with Image.open(path) as image:
            yield path.stem, np.asarray(image.convert("RGB"))


def synthetic_pictures(seed: int) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    size = 256
    ramp = np.linspace(0, 255, size)
    y, x = np.mgrid[0:size, 0:size]
    yield "uniform noise", rng.integers(0, 256, (size, size), dtype=np.uint8)
    yield "gaussian noise", np.clip(rng.normal(128, 40, (size, size)), 0, 255).astype(np.uint8)
    yield "horizontal gradient", np.tile(ramp, (size, 1)).astype(np.uint8)
    yield "radial gradient", np.clip(255 - np.hypot(x - size / 2, y - size / 2) * 1.6, 0, 255).astype(np.uint8)
    for cells in (4, 16, 64):
        yield f"checkerboard {cells}", (((x // (size // cells)) + (y // (size // cells))) % 2 * 255).astype(np.uint8)
    for lines in (6, 20):
        page = Image.new("L", (size, size), 245)
        draw = ImageDraw.Draw(page)
        for line in range(lines):
            draw.text((8, 4 + line * (size // lines)), "Patient report: findings within normal limits " * 2, fill=20)
        yield f"text page {lines} lines", np.asarray(page)
    shapes = Image.new("L", (size, size), 30)
    draw = ImageDraw.Draw(shapes)
    for _ in range(12):
        box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
        draw.ellipse([box[0][0], box[1][0], box[0][1], box[1][1]], fill=int(rng.integers(60, 255)))
    yield "random ellipses", np.asarray(shapes)


def pydicom_files() -> Iterator[Outlier]:
    """pydicom's own test files that hold an image of another modality than a chest radiograph."""
    import pydicom
    from pydicom.data import get_testdata_files

    for path in sorted(get_testdata_files(), key=lambda p: Path(p).name):
        try:
            modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", ""))
        except Exception:  # noqa: BLE001, S112 (malformed test files are the decoder's tests, not ours)
            continue
        if modality and modality not in ("CR", "DX"):
            yield Outlier(f"pydicom/{Path(path).name} ({modality})", "pydicom", "near", Path(path).read_bytes())


def transformed_xrays(images: np.ndarray, count: int = 60) -> Iterator[Outlier]:
    """Validation X-rays made into what is no longer a usable X-ray: inverted, or a quarter of one. (Turned
    and mirrored X-rays are not outliers: serving puts them back upright; `pipeline.robustness` reports
    them.)"""
    step = max(1, len(images) // count)
    transforms: dict[str, Callable[[Image.Image], Image.Image]] = {
        "inverted": ImageOps.invert,
        "quarter": lambda image: image.crop((0, 0, image.width // 2, image.height // 2)),
    }
    for index in range(0, len(images), step)[:count]:
        image = Image.fromarray(images[index])
        for name, transform in transforms.items():
            yield Outlier(f"x-ray {index} {name}", f"x-ray {name}", "near", _png(transform(image)))


def outlier_sets(seed: int, val_images: np.ndarray) -> list[Outlier]:
    outliers = list(_pictures("synthetic", synthetic_pictures(seed)))
    outliers += _pictures("scikit-learn", scikit_learn_pictures())
    outliers += _pictures("scikit-image", scikit_image_pictures())
    outliers += _pictures("matplotlib", matplotlib_pictures())
    outliers += pydicom_files()
    outliers += transformed_xrays(val_images)
    return outliers


def decode_for_gate(outliers: list[Outlier]) -> tuple[list[Outlier], np.ndarray, dict[str, int]]:
    """(the outliers that reach the model, their decoded images, counts of those refused before it)."""
    reached, images, refused = [], [], {"undecodable": 0, "plausibility checks": 0}
    for outlier in outliers:
        try:
            grey = decode_greyscale(outlier.data)
        except ImageDecodeError:
            refused["undecodable"] += 1
            continue
        if checks.implausibility(outlier.data, grey):
            refused["plausibility checks"] += 1
            continue
        reached.append(outlier)
        images.append(grey)
    return reached, images, refused


def rate(flags: list[bool]) -> float | None:
    return round(float(np.mean(flags)), 4) if flags else None
