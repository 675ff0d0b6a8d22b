"""Data tests: patient ids, patient-level stratified splits, skipped files, output arrays."""

from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from pipeline.preprocess import (
    Record,
    assign_splits,
    decode_all,
    load_split,
    patient_id,
    split_by_patient,
    write_outputs,
)

from .conftest import FIXTURE_DATASET


@pytest.mark.parametrize(
    ("file_name", "patient"),
    [
        ("person1_bacteria_1.jpeg", "person1"),
        ("person1_virus_7.jpeg", "person1"),
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "im-0115"),
        ("NORMAL2-IM-0115-0002.jpeg", "im-0115"),
        ("scan.png", "file:scan"),
    ],
)
def test_patient_id_follows_the_dataset_naming(file_name, patient):
    assert patient_id(file_name) == patient


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
    records = assign_splits(FIXTURE_DATASET.parent, val_fraction=0.25, test_fraction=0.25, seed=42)
    splits_of = defaultdict(set)
    for record in records:
        splits_of[record.patient].add(record.split)
    assert all(len(splits) == 1 for splits in splits_of.values())
    assert {record.split for record in records} == {"train", "val", "test"}
    # NORMAL2-IM-0385 and IM-0385 are one study, so one split.
    assert splits_of["im-0385"] and len(splits_of["im-0385"]) == 1


def test_archive_test_split_is_used_when_present(tmp_path):
    shutil.copytree(FIXTURE_DATASET / "train", tmp_path / "chest_xray" / "train")
    test_dir = tmp_path / "chest_xray" / "test"
    for class_name in ("NORMAL", "PNEUMONIA"):
        (test_dir / class_name).mkdir(parents=True)
        source = min((FIXTURE_DATASET / "train" / class_name).glob("*.jpeg"))
        shutil.copy(source, test_dir / class_name / f"test-{source.name}")
    records = assign_splits(tmp_path, val_fraction=0.25, test_fraction=0.25, seed=0)
    test_files = sorted(record.file for record in records if record.split == "test")
    assert len(test_files) == 2 and all("/test/" in name for name in test_files)


def test_corrupt_files_are_skipped_and_reported_and_arrays_written(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(FIXTURE_DATASET, raw / "chest_xray")
    bad = raw / "chest_xray" / "train" / "PNEUMONIA" / "person999_bacteria_1.jpeg"
    bad.write_bytes(b"\xff\xd8\xff truncated")
    records = assign_splits(raw, val_fraction=0.25, test_fraction=0.25, seed=42)
    images, skipped = decode_all(records, raw, size=64, workers=2)
    assert [entry["file"] for entry in skipped] == ["chest_xray/train/PNEUMONIA/person999_bacteria_1.jpeg"]
    out, summary_path = tmp_path / "prepared", tmp_path / "summary.json"
    summary = write_outputs(records, images, skipped, out, summary_path, 64)
    assert json.loads(summary_path.read_text()) == summary
    assert sum(split["images"] for split in summary["splits"].values()) == 48
    train_images, train_labels = load_split("train", out)
    assert train_images.dtype == np.uint8 and train_images.shape[1:] == (64, 64)
    assert set(np.unique(train_labels)) == {0, 1}
    with (out / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 48 and set(rows[0]) == {"file", "patient", "label", "split"}


def test_a_class_left_empty_is_fatal(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(FIXTURE_DATASET, raw / "chest_xray")
    for path in (raw / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"):
        path.write_bytes(b"garbage")
    records = assign_splits(raw, val_fraction=0.25, test_fraction=0.25, seed=42)
    images, skipped = decode_all(records, raw, size=32, workers=1)
    with pytest.raises(ValueError, match="no NORMAL images"):
        write_outputs(records, images, skipped, tmp_path / "out", tmp_path / "summary.json", 32)


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.2), (0.6, 0.5), (1.2, 0.0)])
def test_bad_fractions_are_rejected(val, test):
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(Path("unused"), val, test, seed=0)
