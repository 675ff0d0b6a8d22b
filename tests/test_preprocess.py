"""Data tests: patient ids, patient-level stratified splits, the external set, skipped files, output arrays."""

from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import preprocess
from pipeline.arrays import load_split
from pipeline.params import PreprocessParams
from pipeline.paths import DATA_SUMMARY_FILE, MANIFEST_FILE, RAW_EXTERNAL_DIR, RAW_TRAIN_DIR, split_file
from pipeline.preprocess import (
    Record,
    assign_splits,
    decode_all,
    patient_id,
    split_by_patient,
    write_outputs,
)
from tests import image_factory as factory
from tests.helpers import FIXTURE_DATASET

CLASSES = ("NORMAL", "PNEUMONIA")
FIXTURE_COUNT = len(list(FIXTURE_DATASET.rglob("*.jpeg")))  # 24 per class


@pytest.mark.parametrize(
    ("file_name", "patient"),
    [
        ("person1_bacteria_1.jpeg", "person1"),
        ("person1_virus_7.jpeg", "person1"),
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "im-0115"),
        ("NORMAL2-IM-0115-0002.jpeg", "im-0115"),
        # The archive's test folder names its images with one more number: the same study.
        ("IM-0011-0001-0001.jpeg", "im-0011"),
        ("IM-0011-0001-0002.jpeg", "im-0011"),
        ("NORMAL2-IM-0011-0001-0001.jpeg", "im-0011"),
        ("im-0011-0001.JPEG", "im-0011"),
        ("IM-0011.jpeg", "file:im-0011"),
        ("scan.png", "file:scan"),
    ],
)
def test_patient_id_follows_the_dataset_naming(file_name, patient):
    assert patient_id(file_name) == patient


# --------------------------------------------------------------------------------------------------
# Splitting by patient


def synthetic_records(patients_per_class: int = 200) -> list[Record]:
    rng = np.random.default_rng(0)
    records = []
    for label, prefix in enumerate(("im-", "person")):
        for number in range(patients_per_class):
            for image in range(int(rng.integers(1, 4))):
                records.append(Record(f"{prefix}{number}_{image}", f"{prefix}{number}", label))
    return records


def test_split_keeps_every_patient_on_one_side_and_is_stratified():
    records = synthetic_records()
    assignment = split_by_patient(records, {"test": 0.15, "val": 0.15}, seed=3)
    assert set(assignment) == {record.patient for record in records}
    images = defaultdict(lambda: [0, 0])
    for record in records:
        images[assignment[record.patient]][record.label] += 1
    totals = [sum(images[split][label] for split in images) for label in (0, 1)]
    for split in ("val", "test"):
        for label in (0, 1):
            assert 0.13 <= images[split][label] / totals[label] <= 0.19, (split, label)


def test_split_is_reproducible_and_seed_dependent():
    records = synthetic_records()
    first = split_by_patient(records, {"val": 0.2}, seed=1)
    assert first == split_by_patient(records, {"val": 0.2}, seed=1)
    assert first != split_by_patient(records, {"val": 0.2}, seed=2)


def test_fixture_dataset_splits_have_no_patient_in_two_splits():
    raw_dir = FIXTURE_DATASET.parent
    records = assign_splits(raw_dir, val_fraction=0.25, test_fraction=0.25, seed=42)
    assert len(records) == FIXTURE_COUNT
    assert all(record.file.startswith("chest_xray/train/") and (raw_dir / record.file).is_file()
               for record in records)  # relative to raw_dir
    splits_of = defaultdict(set)
    for record in records:
        splits_of[record.patient].add(record.split)
    assert all(len(splits) == 1 for splits in splits_of.values())
    # No archive test folder and no external folder: no external split.
    assert {record.split for record in records} == {"train", "val", "test"}
    # NORMAL2-IM-0385 and IM-0385 are one study, so one split.
    assert sum(record.patient == "im-0385" for record in records) == 2 and len(splits_of["im-0385"]) == 1


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.2), (0.6, 0.5), (1.2, 0.0)])
def test_bad_fractions_are_rejected(val, test):
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(Path("unused"), val, test, seed=0)


# --------------------------------------------------------------------------------------------------
# The external split: an external folder, else the archive's own test folder


def archive(raw_dir: Path, with_test_folder: bool = False) -> Path:
    """The fixture dataset where the download stage puts the archive (data/raw/archive/chest_xray), with a
    third of each class moved to chest_xray/test as the public archive has, if asked."""
    root = raw_dir / RAW_TRAIN_DIR.name / "chest_xray"
    shutil.copytree(FIXTURE_DATASET / "train", root / "train")
    if with_test_folder:
        for path in sorted((root / "train").rglob("*.jpeg")):
            if sum(map(ord, path.name)) % 3 == 0:
                target = root / "test" / path.parent.name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
    return root


def external_set(folder: Path, names: dict[str, list[str]] | None = None) -> list[str]:
    """An external set under `folder` (nested one level, as extracted archives often are): mirrored fixture
    X-rays saved as PNG, so no pixel equals a training image. Returns the files relative to `folder`."""
    names = names or {"NORMAL": [f"IM-{9000 + i}-0001-0001.png" for i in range(3)],
                      "PNEUMONIA": [f"person{9000 + i}_virus_1.png" for i in range(3)]}
    written = []
    for class_name, files in names.items():
        sources = sorted((FIXTURE_DATASET / "train" / class_name).glob("*.jpeg"))
        for source, name in zip(sources, files, strict=False):
            with Image.open(source) as image:
                pixels = np.fliplr(np.asarray(image.convert("L")))
            target = folder / "site-b" / class_name / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(factory.png(np.ascontiguousarray(pixels)))
            written.append(target.relative_to(folder).as_posix())
    return written


def by_split(records: list[Record]) -> dict[str, list[Record]]:
    grouped = defaultdict(list)
    for record in records:
        grouped[record.split].append(record)
    return grouped


def test_archive_test_folder_becomes_the_external_split(tmp_path):
    raw_dir = tmp_path / "raw"
    root = archive(raw_dir, with_test_folder=True)
    test_files = sorted(path.relative_to(raw_dir).as_posix() for path in (root / "test").rglob("*.jpeg"))
    assert test_files and {Path(name).parent.name for name in test_files} == set(CLASSES)

    splits = by_split(assign_splits(raw_dir, val_fraction=0.25, test_fraction=0.25, seed=0))

    assert set(splits) == {"train", "val", "test", "external"}
    assert sorted(record.file for record in splits["external"]) == test_files
    assert all(record.patient.startswith("external:") for record in splits["external"])
    assert {record.label for record in splits["external"]} == {0, 1}
    # train, val and test are carved from the training folder only.
    for split in ("train", "val", "test"):
        assert all(record.file.startswith("archive/chest_xray/train/") for record in splits[split]), split
    assert sum(map(len, splits.values())) == FIXTURE_COUNT


def test_external_folder_wins_over_the_archive_test_folder(tmp_path):
    raw_dir = tmp_path / "raw"
    root = archive(raw_dir, with_test_folder=True)
    external = external_set(raw_dir / RAW_EXTERNAL_DIR.name)

    records = assign_splits(raw_dir, val_fraction=0.25, test_fraction=0.25, seed=0)

    splits = by_split(records)
    assert sorted(record.file for record in splits["external"]) == sorted(f"external/{name}" for name in external)
    assert [r.label for r in sorted(splits["external"], key=lambda r: r.file)] == [0, 0, 0, 1, 1, 1]
    # The archive's test folder is then in no split at all (not pooled into training either).
    archive_test = {path.relative_to(raw_dir).as_posix() for path in (root / "test").rglob("*.jpeg")}
    assert archive_test and not archive_test & {record.file for record in records}
    assert all("/test/" not in record.file for record in records)


def test_external_patients_are_namespaced_and_never_collide_with_training_ids(tmp_path):
    raw_dir = tmp_path / "raw"
    archive(raw_dir)
    # The same patient numbers as in the training folder: another site numbers its patients independently.
    external_set(raw_dir / "external", {"NORMAL": ["IM-0115-0001-0001.png", "IM-0115-0001-0002.png"],
                                        "PNEUMONIA": ["person1_bacteria_1.png"]})

    records = assign_splits(raw_dir, val_fraction=0.25, test_fraction=0.25, seed=0)

    external = {record.patient for record in records if record.split == "external"}
    carved = {record.patient for record in records if record.split != "external"}
    assert external == {"external:im-0115", "external:person1"}
    assert {"im-0115", "person1"} <= carved
    assert not external & carved


def test_external_folder_without_class_folders_is_an_error(tmp_path):
    raw_dir = tmp_path / "raw"
    archive(raw_dir, with_test_folder=True)
    (raw_dir / "external" / "images").mkdir(parents=True)
    (raw_dir / "external" / "images" / "scan.png").write_bytes(factory.png(factory.xray()))
    with pytest.raises(ValueError, match="external set .* has no NORMAL and PNEUMONIA folders"):
        assign_splits(raw_dir, val_fraction=0.25, test_fraction=0.25, seed=0)


def test_a_train_folder_inside_the_external_set_is_not_training_data(tmp_path):
    raw_dir = tmp_path / "raw"
    for class_name in CLASSES:  # an external set in the archive's layout, and no archive
        (raw_dir / "external" / "other" / "train" / class_name).mkdir(parents=True)
    with pytest.raises(ValueError, match="no train/NORMAL and train/PNEUMONIA folders"):
        assign_splits(raw_dir, val_fraction=0.25, test_fraction=0.25, seed=0)


# --------------------------------------------------------------------------------------------------
# Decoding and the output arrays (paths are relative to the project root: run in tmp_path)


def prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, external: bool = False, size: int = 32):
    """(raw_dir, records, images, skipped) of the fixture archive, with an external set if asked."""
    monkeypatch.chdir(tmp_path)
    raw_dir = tmp_path / "data" / "raw"
    archive(raw_dir)
    if external:
        external_set(raw_dir / "external")
    records = assign_splits(raw_dir, val_fraction=0.25, test_fraction=0.25, seed=42)
    images, skipped = decode_all(records, raw_dir, size=size, workers=2)
    return raw_dir, records, images, skipped


def test_corrupt_files_are_skipped_and_reported_and_arrays_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw_dir = tmp_path / "data" / "raw"
    root = archive(raw_dir)
    (root / "train" / "PNEUMONIA" / "person999_bacteria_1.jpeg").write_bytes(b"\xff\xd8\xff truncated")
    records = assign_splits(raw_dir, val_fraction=0.25, test_fraction=0.25, seed=42)
    images, skipped = decode_all(records, raw_dir, size=64, workers=2)
    assert [entry["file"] for entry in skipped] == ["archive/chest_xray/train/PNEUMONIA/person999_bacteria_1.jpeg"]
    assert skipped[0]["reason"]

    summary = write_outputs(records, images, skipped, 64)

    assert json.loads(DATA_SUMMARY_FILE.read_text()) == summary
    assert summary["skipped"] == skipped and summary["image_size"] == 64
    assert set(summary["splits"]) == {"train", "val", "test"}
    assert sum(split["images"] for split in summary["splits"].values()) == FIXTURE_COUNT
    assert summary["external_images_also_in_training_data"] is None  # no external set to check
    assert not split_file("external").exists()
    train = load_split("train")
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (64, 64)
    assert train.labels.dtype == np.uint8 and set(np.unique(train.labels)) == {0, 1}
    assert len(train) == summary["splits"]["train"]["images"]
    with MANIFEST_FILE.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == FIXTURE_COUNT and set(rows[0]) == {"file", "patient", "label", "split"}
    assert "archive/chest_xray/train/PNEUMONIA/person999_bacteria_1.jpeg" not in {row["file"] for row in rows}


def test_patients_round_trip_through_load_split(tmp_path, monkeypatch):
    _, records, images, skipped = prepared(tmp_path, monkeypatch, external=True)

    summary = write_outputs(records, images, skipped, 32)

    assert set(summary["splits"]) == {"train", "val", "test", "external"}
    assert summary["external_images_also_in_training_data"] == 0
    for split, chosen in by_split(records).items():
        loaded = load_split(split)
        assert loaded.patients.tolist() == [record.patient for record in chosen], split
        assert loaded.labels.tolist() == [record.label for record in chosen], split
        assert loaded.patients.dtype.kind == "U"  # plain strings: np.load needs no pickle
        for index, record in enumerate(chosen):
            np.testing.assert_array_equal(loaded.images[index], images[record.file])
        assert summary["splits"][split]["patients"] == len(set(loaded.patients.tolist()))
    assert all(patient.startswith("external:") for patient in load_split("external").patients.tolist())


def test_an_external_image_identical_to_a_training_image_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw_dir = tmp_path / "data" / "raw"
    root = archive(raw_dir)
    external_set(raw_dir / "external")
    # The same X-ray under another name (as when an external set was built from the public archive).
    shutil.copy(root / "train" / "NORMAL" / "IM-0117-0001.jpeg", raw_dir / "external" / "site-b" / "NORMAL" / "a.jpeg")
    records = assign_splits(raw_dir, val_fraction=0.25, test_fraction=0.25, seed=42)
    images, skipped = decode_all(records, raw_dir, size=32, workers=2)

    with pytest.raises(ValueError, match="1 external images are also in the training data .*external/site-b/NORMAL/a"):
        write_outputs(records, images, skipped, 32)

    assert not any(split_file(split).exists() for split in ("train", "val", "test", "external"))


def test_a_class_left_empty_is_fatal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw_dir = tmp_path / "data" / "raw"
    root = archive(raw_dir)
    for path in (root / "train" / "NORMAL").glob("*.jpeg"):
        path.write_bytes(b"garbage")
    records = assign_splits(raw_dir, val_fraction=0.25, test_fraction=0.25, seed=42)
    images, skipped = decode_all(records, raw_dir, size=32, workers=1)
    with pytest.raises(ValueError, match="no NORMAL images"):
        write_outputs(records, images, skipped, 32)


def test_run_writes_every_split_and_drops_a_stale_external_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    archive(tmp_path / "data" / "raw")
    params = PreprocessParams(image_size=32, val_fraction=0.25, test_fraction=0.25, workers=2)
    split_file("external").parent.mkdir(parents=True)
    split_file("external").write_bytes(b"from a run that had an external set")

    summary = preprocess.run(42, params)

    assert set(summary["splits"]) == {"train", "val", "test"}
    assert not split_file("external").exists()
    assert load_split("val").images.shape[1:] == (32, 32)
