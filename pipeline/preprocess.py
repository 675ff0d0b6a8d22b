"""Stage: decode every image to 8-bit greyscale, split by patient, write compact arrays.

- train, val and test are carved by patient from the archive's training folder (test: in-distribution
  figures);
- external is the separate external set (`data.external`, or a local one in data/sources), else the
  archive's own test folder (the official test split in the public archive), else absent.
Outputs: `data/prepared/{train,val,test[,external]}.npz` (images, labels, patients), a manifest CSV
(file, patient, label, split) and `reports/data_summary.json` (counts, skipped files, overlap check).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.arrays import BACTERIAL, NO_SUBTYPE, VIRAL, Split, save_split
from pipeline.common import setup_logging, stage_errors, write_json
from pipeline.params import PreprocessParams, stage_params
from pipeline.paths import DATA_SUMMARY_FILE, MANIFEST_FILE, RAW_DIR, RAW_EXTERNAL_DIR, split_file
from scoring.decision import CLASS_NAMES
from scoring.imaging import ImageDecodeError, decode_greyscale, read_bytes, resize_grey
from scoring.pixels import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

CARVED_SPLITS = ("train", "val", "test")
EXTERNAL = "external"
# personN_bacteria_M / personN_virus_M: child N. IM-XXXX-YYYY (and IM-XXXX-YYYY-ZZZZ in the test folder),
# NORMAL2-IM-XXXX-YYYY: study IM-XXXX (the NORMAL2 prefix is folded in, so a study that appears under
# both names stays on one side).
_PNEUMONIA_PATIENT = re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+$", re.IGNORECASE)
_SUBTYPE = re.compile(r"^person\d+_(bacteria|virus)_\d+$", re.IGNORECASE)
_NORMAL_PATIENT = re.compile(r"^(?:NORMAL2-)?(IM-\d+)(?:-\d+)+$", re.IGNORECASE)


@dataclass(frozen=True)
class Record:
    file: str  # relative to the raw data folder
    patient: str
    label: int
    split: str = ""


def patient_id(file_name: str) -> str:
    """The patient a file belongs to, from the dataset's naming scheme; the file stem if it has none."""
    stem = Path(file_name).stem
    for pattern in (_PNEUMONIA_PATIENT, _NORMAL_PATIENT):
        match = pattern.match(stem)
        if match:
            return match.group(1).lower()
    return f"file:{stem.lower()}"


def subtype(file_name: str, label: int) -> int:
    """BACTERIAL or VIRAL for a pneumonia file named by the dataset's scheme, else NO_SUBTYPE."""
    match = _SUBTYPE.match(Path(file_name).stem)
    if label != 1 or match is None:
        return NO_SUBTYPE
    return VIRAL if match.group(1).lower() == "virus" else BACTERIAL


def find_class_root(folder: Path) -> Path | None:
    """`folder`, or the first folder under it, holding NORMAL and PNEUMONIA folders."""
    candidates = [folder, *sorted(path for path in folder.rglob("*") if path.is_dir())]
    return next((path for path in candidates if _has_class_folders(path)), None)


def _has_class_folders(folder: Path) -> bool:
    return all((folder / class_name).is_dir() for class_name in CLASS_NAMES)


def list_records(class_root: Path, raw_dir: Path, namespace: str = "") -> list[Record]:
    """Images under class_root/{NORMAL,PNEUMONIA}. `namespace` prefixes patient ids: the dataset numbers
    the patients of its training and test folders independently, so IM-0129 in one is not IM-0129 in
    the other."""
    records = []
    for label, class_name in enumerate(CLASS_NAMES):
        for path in sorted((class_root / class_name).rglob("*")):
            suffix = path.suffix.lower().removeprefix(".")
            if path.is_file() and suffix in IMAGE_SUFFIXES and not path.name.startswith("."):
                patient = f"{namespace}{patient_id(path.name)}"
                records.append(Record(path.relative_to(raw_dir).as_posix(), patient, label))
    return records


def split_by_patient(records: list[Record], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Assign every patient to one split, stratified by the patient's label.

    Within each class, patients are shuffled with `seed` and handed to the splits in `fractions`
    (in order) until each holds its share of that class's images; the rest go to train.
    """
    images_per_patient = Counter(record.patient for record in records)
    labels_per_patient: dict[str, list[int]] = defaultdict(list)
    for record in records:
        labels_per_patient[record.patient].append(record.label)
    rng = np.random.default_rng(seed)
    assignment = {}
    for label in range(len(CLASS_NAMES)):
        patients = sorted(p for p, labels in labels_per_patient.items() if _majority(labels) == label)
        rng.shuffle(patients)
        class_total = sum(images_per_patient[p] for p in patients)
        cursor = 0
        for split, fraction in fractions.items():
            taken = 0
            while cursor < len(patients) and taken < fraction * class_total:
                assignment[patients[cursor]] = split
                taken += images_per_patient[patients[cursor]]
                cursor += 1
        for patient in patients[cursor:]:
            assignment[patient] = "train"
    return assignment


def _majority(labels: list[int]) -> int:
    counts = Counter(labels)
    return max(counts, key=lambda label: (counts[label], label))  # ties go to PNEUMONIA


def assign_splits(raw_dir: Path, val_fraction: float, test_fraction: float, seed: int) -> list[Record]:
    """All records (files relative to `raw_dir`) with their split: train, val and test carved by patient
    from the training folder; external from `raw_dir/external` when present, else from the archive's own
    test folder."""
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions: val={val_fraction}, test={test_fraction}")
    external_dir = raw_dir / RAW_EXTERNAL_DIR.name
    train_root = next((path for path in sorted(raw_dir.rglob("train"))
                       if _has_class_folders(path) and external_dir not in path.parents), None)
    if train_root is None:
        raise ValueError(f"no train/NORMAL and train/PNEUMONIA folders under {raw_dir}")
    pool = list_records(train_root, raw_dir)
    fractions = {"test": test_fraction, "val": val_fraction} if test_fraction else {"val": val_fraction}
    assignment = split_by_patient(pool, fractions, seed)
    records = [replace(record, split=assignment[record.patient]) for record in pool]
    external_root = _external_root(external_dir, train_root)
    if external_root is not None:
        external = list_records(external_root, raw_dir, namespace=f"{EXTERNAL}:")
        log.info("external set: %d images from %s", len(external), external_root.relative_to(raw_dir))
        records += [replace(record, split=EXTERNAL) for record in external]
    return records


def _external_root(external_dir: Path, train_root: Path) -> Path | None:
    if external_dir.is_dir():
        found = find_class_root(external_dir)
        if found is None:
            raise ValueError(f"the external set in {external_dir} has no NORMAL and PNEUMONIA folders")
        return found
    archive_test = train_root.parent / "test"
    return archive_test if _has_class_folders(archive_test) else None


def decode_all(records: list[Record], base_dir: Path, size: int, workers: int) -> tuple[dict, list[dict]]:
    """Decode images in parallel (PIL releases the GIL); unreadable files are skipped with a reason."""

    def load(record: Record) -> np.ndarray | str:
        try:
            return resize_grey(decode_greyscale(read_bytes(base_dir / record.file)), size)
        except ImageDecodeError as error:
            return str(error)

    images, skipped = {}, []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(load, records)
        for record, result in tqdm(zip(records, results), total=len(records), desc="decode", unit="img"):
            if isinstance(result, str):
                skipped.append({"file": record.file, "reason": result})
                log.warning("skipped %s: %s", record.file, result)
            else:
                images[record.file] = result
    return images, skipped


def shared_images(images: dict[str, np.ndarray], records: list[Record]) -> list[str]:
    """External files whose decoded pixels are identical to an image of train, val or test: the same
    X-ray on both sides would make external figures in-distribution ones."""
    carved = {_digest(images[r.file]) for r in records if r.split in CARVED_SPLITS and r.file in images}
    return [r.file for r in records if r.split == EXTERNAL and r.file in images and _digest(images[r.file]) in carved]


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def write_outputs(records: list[Record], images: dict, skipped: list[dict], size: int) -> dict:
    kept = [record for record in records if record.file in images]
    duplicates = shared_images(images, kept)
    if duplicates:
        raise ValueError(f"{len(duplicates)} external images are also in the training data "
                         f"(e.g. {duplicates[0]}): the external set must be other patients' images")
    summary: dict = {"image_size": size, "skipped": skipped, "splits": {}}
    present = [split for split in (*CARVED_SPLITS, EXTERNAL) if any(r.split == split for r in kept)]
    for split in present:
        chosen = [record for record in kept if record.split == split]
        counts = Counter(CLASS_NAMES[record.label] for record in chosen)
        empty = [name for name in CLASS_NAMES if counts[name] == 0]
        if empty:
            raise ValueError(f"split '{split}' has no {', '.join(empty)} images left after decoding")
        save_split(split_file(split), Split(
            np.stack([images[record.file] for record in chosen]),
            np.array([record.label for record in chosen], dtype=np.uint8),
            np.array([record.patient for record in chosen]),
            np.array([subtype(record.file, record.label) for record in chosen], dtype=np.int8)))
        kinds = Counter(subtype(record.file, record.label) for record in chosen)
        summary["splits"][split] = {
            "images": len(chosen), "patients": len({record.patient for record in chosen}),
            **{name.lower(): counts[name] for name in CLASS_NAMES},
            "bacterial": kinds[BACTERIAL], "viral": kinds[VIRAL],
        }
    summary["external_images_also_in_training_data"] = 0 if EXTERNAL in present else None
    _write_manifest(MANIFEST_FILE, kept)
    write_json(DATA_SUMMARY_FILE, summary)
    return summary


def _write_manifest(path: Path, records: list[Record]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "patient", "label", "split"])
        for record in records:
            writer.writerow([record.file, record.patient, CLASS_NAMES[record.label], record.split])


def run(seed: int, params: PreprocessParams) -> dict:
    for stale in (*CARVED_SPLITS, EXTERNAL):
        split_file(stale).unlink(missing_ok=True)  # an external set removed from params must not linger
    records = assign_splits(RAW_DIR, params.val_fraction, params.test_fraction, seed)
    images, skipped = decode_all(records, RAW_DIR, params.image_size, params.workers)
    return write_outputs(records, images, skipped, params.image_size)


def main() -> None:
    setup_logging()
    with stage_errors(log):  # SIGTERM: a clear line and exit status 143, not a traceback
        summary = run(*stage_params("preprocess"))
    log.info("prepared %s; skipped %d files", summary["splits"], len(summary["skipped"]))


if __name__ == "__main__":
    main()
