"""The predict CLI's folder scan: images by extension or, for files without one, by the DICOM marker."""

from __future__ import annotations

from pipeline.predict import expand_paths

from . import image_factory as factory


def test_folders_yield_images_by_extension_and_extensionless_dicom(tmp_path):
    folder = tmp_path / "study"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.png").write_bytes(factory.png(factory.xray()))
    (folder / "nested" / "b.TIFF").write_bytes(b"tiff bytes are judged by the decoder, not here")
    (folder / "IM000001").write_bytes(factory.dicom(factory.xray().astype("uint16")))
    (folder / "notes.txt").write_text("not an image")
    (folder / "README").write_text("no extension, no DICOM marker")
    (folder / ".DS_Store").write_bytes(b"\0" * 200)
    single = tmp_path / "given-explicitly.txt"
    single.write_text("files named on the command line are always passed on")
    found = expand_paths([str(folder), str(single)])
    assert [path.relative_to(tmp_path).as_posix() for path in found] == [
        "study/IM000001", "study/a.png", "study/nested/b.TIFF", "given-explicitly.txt",
    ]
