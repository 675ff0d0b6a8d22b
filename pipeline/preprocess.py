"""Stage 2: decode every image to 8-bit greyscale, split by patient, write compact arrays.

Outputs: `data/prepared/{train,val,test}.npz` (uint8 images N x S x S, uint8 labels), a manifest CSV
(file, patient, label, split) and `reports/data_summary.json` (counts, skipped files).
"""

from __future__ import annotations

import csv
import logging
import re
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.common import (
    CLASS_NAMES,
    PREPARED_DIR,
    RAW_DIR,
    REPORTS_DIR,
    setup_logging,
    stage_params,
    write_json,
)
from pipeline.imaging import ImageDecodeError, decode_greyscale, read_bytes, resize_grey

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
# personN_bacteria_M / personN_virus_M: child N. IM-XXXX-YYYY and NORMAL2-IM-XXXX-YYYY: study IM-XXXX
# (the NORMAL2 prefix is folded in, so a study that appears under both names stays on one side).
_PNEUMONIA_PATIENT = re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+$", re.IGNORECASE)
_NORMAL_PATIENT = re.compile(r"^(?:NORMAL2-)?(IM-\d+)-\d+$", re.IGNORECASE)


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


def find_split_dirs(raw_dir: Path) -> dict[str, Path]:
    """Locate `<root>/train` (required) and `<root>/test` (optional) holding NORMAL and PNEUMONIA folders."""
    for candidate in sorted(raw_dir.rglob("train")):
        if _has_class_folders(candidate):
            found = {"train": candidate}
            test_dir = candidate.parent / "test"
            if _has_class_folders(test_dir):
                found["test"] = test_dir
            return found
    raise ValueError(f"no train/NORMAL and train/PNEUMONIA folders under {raw_dir}")


def _has_class_folders(folder: Path) -> bool:
    return all((folder / name).is_dir() for name in CLASS_NAMES)


def list_records(split_dir: Path, raw_dir: Path) -> list[Record]:
    records = []
    for label, class_name in enumerate(CLASS_NAMES):
        for path in sorted((split_dir / class_name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                records.append(Record(path.relative_to(raw_dir).as_posix(), patient_id(path.name), label))
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
    """All records with their split: the archive's own test split when present, else one carved by patient."""
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions: val={val_fraction}, test={test_fraction}")
    split_dirs = find_split_dirs(raw_dir)
    pool = list_records(split_dirs["train"], raw_dir)
    fractions = {"val": val_fraction}
    records: list[Record] = []
    if "test" in split_dirs:
        records += [_with_split(r, "test") for r in list_records(split_dirs["test"], raw_dir)]
        log.info("using the archive's own test split (%d images)", len(records))
    else:
        fractions = {"test": test_fraction, "val": val_fraction}
        log.info("archive has no test split: carving %.0f%% of patients for test", 100 * test_fraction)
    assignment = split_by_patient(pool, fractions, seed)
    records += [_with_split(r, assignment[r.patient]) for r in pool]
    return records


def _with_split(record: Record, split: str) -> Record:
    return Record(record.file, record.patient, record.label, split)


def decode_all(records: list[Record], raw_dir: Path, size: int, workers: int) -> tuple[dict, list[dict]]:
    """Decode images in parallel (PIL releases the GIL); unreadable files are skipped with a reason."""

    def load(record: Record) -> np.ndarray | str:
        try:
            return resize_grey(decode_greyscale(read_bytes(raw_dir / record.file)), size)
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


def write_outputs(records: list[Record], images: dict, skipped: list[dict], out_dir: Path,
                  summary_path: Path, size: int) -> dict:
    kept = [record for record in records if record.file in images]
    summary: dict = {"image_size": size, "skipped": skipped, "splits": {}}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        chosen = [record for record in kept if record.split == split]
        counts = Counter(CLASS_NAMES[record.label] for record in chosen)
        empty = [name for name in CLASS_NAMES if counts[name] == 0]
        if empty:
            raise ValueError(f"split '{split}' has no {', '.join(empty)} images left after decoding")
        stack = np.stack([images[record.file] for record in chosen])
        labels = np.array([record.label for record in chosen], dtype=np.uint8)
        save_arrays(out_dir / f"{split}.npz", images=stack, labels=labels)
        summary["splits"][split] = {
            "images": len(chosen),
            "patients": len({record.patient for record in chosen}),
            **{name.lower(): counts[name] for name in CLASS_NAMES},
        }
    _write_manifest(out_dir / "manifest.csv", kept)
    write_json(summary_path, summary)
    return summary


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """An .npz that np.load reads, byte-identical for identical arrays: np.savez stamps the current
    time into the zip, which would make DVC see new data (and retrain) after every rerun."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(array))


def _write_manifest(path: Path, records: list[Record]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "patient", "label", "split"])
        for record in records:
            writer.writerow([record.file, record.patient, CLASS_NAMES[record.label], record.split])


def load_split(split: str, prepared_dir: Path = PREPARED_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x S x S, labels uint8 N) of one prepared split."""
    with np.load(prepared_dir / f"{split}.npz") as arrays:
        return arrays["images"], arrays["labels"]


def main() -> None:
    from pipeline.common import stage_errors

    setup_logging()
    with stage_errors(log):  # SIGTERM: a clear line and exit status 143, not a traceback
        params = stage_params("preprocess")
        records = assign_splits(RAW_DIR, params["val_fraction"], params["test_fraction"], params["seed"])
        images, skipped = decode_all(records, RAW_DIR, params["image_size"], params.get("workers", 2))
        summary = write_outputs(records, images, skipped, PREPARED_DIR, REPORTS_DIR / "data_summary.json",
                                params["image_size"])
    log.info("prepared %s; skipped %d files", summary["splits"], len(skipped))


if __name__ == "__main__":
    main()
