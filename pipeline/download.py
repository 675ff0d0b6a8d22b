"""Stage: fetch the chest X-ray archive and the external set (or take local copies) and extract them.

`data.source` in params.yaml is an http(s) URL, or a local path to a .zip, a .tar.gz/.tgz, or an
already-extracted folder in the public layout `chest_xray/{train,test}/{NORMAL,PNEUMONIA}/`; it goes to
`data/raw/archive`. `data.external` (or the archive's own test split, found by the preprocess stage) goes
to `data/raw/external`: any folder holding NORMAL and PNEUMONIA folders. A local archive linked as
`data/sources/train` or `data/sources/external` (what `make repro DATA=... EXTERNAL=...` does) replaces
the configured source; a `.sha256` file beside it is checked like `data.sha256`.
Downloads are cached under `<persistent root>/data/downloads/` so reruns (and `dvc exp run --temp`
workspaces) never fetch the same archive twice. Archives are extracted defensively: no path escapes,
no links or devices, bounded member count and size, and `data/raw` only appears once complete.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from pipeline.common import setup_logging, sha256_file, stage_errors
from pipeline.params import DataParams, stage_params
from pipeline.paths import DOWNLOAD_DIR, EXTERNAL_SOURCE, RAW_EXTERNAL_DIR, RAW_TRAIN_DIR, TRAIN_SOURCE
from scoring.locations import persistent_root

log = logging.getLogger(__name__)

DEFAULT_MAX_EXTRACTED_BYTES = 20 * 1024**3
DEFAULT_MAX_MEMBERS = 200_000

# Retries cover flaky networks, not outages: 4 tries over ~14 s. Tests pass backoff_s=0.
RETRY_ATTEMPTS = 4
RETRY_BACKOFF_S = 2.0
TIMEOUT_S = 60.0
CHUNK_SIZE = 1 << 20

# Mendeley Data answers 403 to clients that do not look like a browser.
USER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
)
# Ask for the bytes as stored: a transparently gunzipped .tar.gz would break Content-Length and sha256.
REQUEST_HEADERS = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}

SKIPPED_DIR_NAMES = frozenset({"__MACOSX"})
CLASS_DIRS = ("NORMAL", "PNEUMONIA")
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

ArchiveKind = Literal["zip", "tar"]
TarOrZipInfo = zipfile.ZipInfo | tarfile.TarInfo


class DownloadError(RuntimeError):
    """The raw data could not be fetched or prepared; the message says what to change."""


class ChecksumError(DownloadError):
    """An archive's sha256 differs from `data.sha256`."""


class UnsafeArchiveError(DownloadError):
    """An archive member would escape the output folder, is a link/device, or breaks the size limits."""


class DatasetLayoutError(DownloadError):
    """The extracted data has no `train/NORMAL` and `train/PNEUMONIA` folders."""


class _TransientError(DownloadError):
    """A failure worth retrying; `reachable` is False when no HTTP response came back at all."""

    def __init__(self, message: str, *, reachable: bool) -> None:
        super().__init__(message)
        self.reachable = reachable


@dataclass(frozen=True)
class ExtractionLimits:
    """Zip-bomb guards, checked on the declared sizes and again on the bytes actually written."""

    max_members: int = DEFAULT_MAX_MEMBERS
    max_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES


@dataclass(frozen=True)
class _Member:
    """One archive entry that passed the checks and will be written, at `target` inside the output."""

    target: PurePosixPath
    is_dir: bool
    size: int
    ref: TarOrZipInfo


# ---------------------------------------------------------------------------------------------------
# Messages and parameters


def offline_hint() -> str:
    """What to do when the URL cannot be used: use a local copy."""
    return (
        "To use a local copy of the archive instead (a .zip, a .tar.gz or an extracted chest_xray folder):\n"
        "  - run: make repro DATA=/path/to/archive.zip (it links the archive into data/sources/), or\n"
        "  - edit data.source in params.yaml to its path (and data.sha256 to its sha256, or null)"
    )


def normalise_sha256(value: object) -> str | None:
    """`data.sha256` as lowercase hex, or None when verification is switched off (null or empty)."""
    if value is None:
        return None
    if not isinstance(value, str):
        # YAML turns unquoted all-digit (or digits-e-digits) values into numbers, losing the digest.
        raise DownloadError(f"data.sha256 must be a quoted hex string in params.yaml, got {value!r}")
    digest = value.strip().lower()
    if not digest:
        return None
    if not _SHA256_HEX.match(digest):
        raise DownloadError(f"data.sha256 must be 64 hex characters (or null), got {value!r}")
    return digest


def is_url(source: str) -> bool:
    return urlparse(source).scheme.lower() in ("http", "https")


def resolve_local_source(source: str | Path, root: Path) -> Path:
    """A local `data.source` as an existing path; relative paths are taken from the real project root."""
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = root / path
    if not path.exists():
        raise DownloadError(
            f"data.source points to {path}, which does not exist. Fix data.source in params.yaml "
            f"(relative paths are resolved against {root}), or link a local archive: "
            "make repro DATA=/path/to/archive.zip"
        )
    return path


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raise ChecksumError naming the param to fix when `path` does not hash to `expected`."""
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"sha256 mismatch for {what}: expected {expected} (data.sha256 in params.yaml), got {actual}. "
            "If this archive is the one you want, set data.sha256 to the value above "
            "(or null to skip the check); otherwise fix data.source."
        )
    log.info("sha256 verified for %s", what)


# ---------------------------------------------------------------------------------------------------
# Download


def cache_file_name(url: str) -> str:
    """Deterministic, filesystem-safe cache name: a short hash of the URL plus its sanitised last segment.

    The hash keeps different URLs with the same last segment apart (Mendeley's all end in
    `file_downloaded`); the archive type is sniffed from the content, not the name.
    """
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    last = PurePosixPath(unquote(urlparse(url).path)).name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", last).strip("._")[:80] or "download"
    return f"{digest}-{safe}"


def download_file(
    url: str,
    download_dir: Path,
    sha256: str | None = None,
    *,
    attempts: int = RETRY_ATTEMPTS,
    backoff_s: float = RETRY_BACKOFF_S,
    timeout_s: float = TIMEOUT_S,
) -> Path:
    """The archive at `url`, from the cache in `download_dir` when valid, otherwise downloaded there.

    The body goes to `<name>.partial` and is only renamed to its final name once complete, its
    sha256 (when given) matches, and it looks like a zip or tar archive.
    """
    download_dir.mkdir(parents=True, exist_ok=True)
    final = download_dir / cache_file_name(url)
    if _usable_cached_file(final, sha256):
        return final

    partial = final.with_name(final.name + ".partial")
    try:
        with requests.Session() as session:
            session.headers.update(REQUEST_HEADERS)
            _fetch_with_retries(
                session, url, partial, attempts=attempts, backoff_s=backoff_s, timeout_s=timeout_s
            )
        if sha256 is not None:
            verify_sha256(partial, sha256, url)
        archive_kind(partial)  # never cache an HTML error page served with status 200
    except BaseException:
        partial.unlink(missing_ok=True)  # a partial body must never be mistaken for an archive
        raise
    partial.replace(final)
    log.info("Saved %s to %s", url, final)
    return final


def _usable_cached_file(final: Path, sha256: str | None) -> bool:
    if not final.is_file():
        return False
    if sha256 is None:
        try:
            archive_kind(final)
        except DownloadError:
            log.warning("Cached %s is not an archive; downloading again", final)
            final.unlink()
            return False
        log.warning("Reusing cached %s WITHOUT verification: data.sha256 is not set", final)
        return True
    actual = sha256_file(final)
    if actual == sha256:
        log.info("Cached %s matches data.sha256; not downloading", final)
        return True
    log.warning("Cached %s has sha256 %s, expected %s; downloading again", final, actual, sha256)
    final.unlink()
    return False


def _fetch_with_retries(
    session: requests.Session, url: str, partial: Path, *, attempts: int, backoff_s: float, timeout_s: float
) -> None:
    last_error: _TransientError | None = None
    for attempt in range(1, attempts + 1):
        try:
            _fetch_once(session, url, partial, timeout_s)
            return
        except _TransientError as error:
            last_error = error
            log.warning("Attempt %d/%d failed: %s", attempt, attempts, error)
            if attempt < attempts:
                time.sleep(backoff_s * 2 ** (attempt - 1))
    if last_error is not None and not last_error.reachable:
        raise DownloadError(
            f"Could not reach {url} after {attempts} attempts ({last_error}). "
            f"Is this machine offline?\n{offline_hint()}"
        )
    raise DownloadError(f"Downloading {url} failed after {attempts} attempts: {last_error}\n{offline_hint()}")


def _fetch_once(session: requests.Session, url: str, partial: Path, timeout_s: float) -> None:
    """One GET of `url` into `partial`; transient failures raise _TransientError, others DownloadError."""
    try:
        response = session.get(url, stream=True, timeout=timeout_s)
    except (requests.ConnectionError, requests.Timeout) as error:
        raise _TransientError(f"cannot connect to {url}: {error}", reachable=False) from error
    with response:
        _check_status(url, response)
        expected = _content_length(response)
        try:
            written = _stream_to_file(response, partial, expected)
        except requests.RequestException as error:
            # Includes ChunkedEncodingError: urllib3 refuses a body shorter than Content-Length.
            raise _TransientError(f"transfer of {url} interrupted: {error}", reachable=True) from error
    if expected is not None and written != expected:
        raise _TransientError(
            f"transfer of {url} incomplete: got {written} of {expected} bytes", reachable=True
        )


def _check_status(url: str, response: requests.Response) -> None:
    status = response.status_code
    if status == 429 or status >= 500:
        raise _TransientError(f"{url} answered HTTP {status} {response.reason}", reachable=True)
    if status >= 400:
        raise DownloadError(
            f"{url} answered HTTP {status} {response.reason}: the URL is wrong, moved or not public. "
            f"Fix data.source in params.yaml.\n{offline_hint()}"
        )


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


def _stream_to_file(response: requests.Response, partial: Path, expected: int | None) -> int:
    started = time.monotonic()
    written = 0
    with (
        partial.open("wb") as handle,
        tqdm(
            total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=partial.stem, disable=None
        ) as progress,
    ):
        for chunk in response.iter_content(chunk_size=CHUNK_SIZE):
            handle.write(chunk)
            written += len(chunk)
            progress.update(len(chunk))
    log.info("Received %.1f MiB in %.1f s", written / 2**20, time.monotonic() - started)
    return written


# ---------------------------------------------------------------------------------------------------
# Safe extraction


def archive_kind(path: Path) -> ArchiveKind:
    """zip or tar, from the file's first bytes (downloads have no trustworthy suffix)."""
    with path.open("rb") as handle:
        head = handle.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    # gzip, bzip2, xz, or an uncompressed tar's "ustar" magic at offset 257.
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    hint = " (it looks like an HTML page: the server sent an error page)" if head.lstrip()[:1] == b"<" else ""
    raise DownloadError(
        f"{path} is not a .zip or .tar.gz archive{hint}. data.source must be a .zip, .tar.gz/.tgz "
        "or an extracted chest_xray folder."
    )


def safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path an archive member may be written to; None to skip it (macOS/hidden files).

    Raises UnsafeArchiveError for absolute paths, drive letters and `..` components.
    """
    posix = name.replace("\\", "/")  # Windows-made zips may use backslashes
    if posix.startswith("/") or _DRIVE_LETTER.match(posix):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r} would escape the output folder")
    if not parts or any(part in SKIPPED_DIR_NAMES or part.startswith(".") for part in parts):
        return None
    return PurePosixPath(*parts)


def extract_archive(archive: Path, dest: Path, limits: ExtractionLimits = ExtractionLimits()) -> None:
    """Extract `archive` into `dest` after checking every member; nothing is written if any is unsafe."""
    kind = archive_kind(archive)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as bundle:
                members = _plan(_zip_members(bundle, limits), limits)
                _write_members(members, dest, limits, bundle.open)
        else:
            with tarfile.open(archive, "r:*") as bundle:
                members = _plan(_tar_members(bundle, limits), limits)
                _write_members(members, dest, limits, functools.partial(_open_tar_member, bundle))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DownloadError(
            f"{archive} is corrupt or truncated ({error}). Delete it and run again, or fix data.source."
        ) from error


def _zip_members(bundle: zipfile.ZipFile, limits: ExtractionLimits) -> Iterator[_Member | None]:
    infos = bundle.infolist()
    if len(infos) > limits.max_members:
        raise UnsafeArchiveError(
            f"archive has {len(infos)} members, above the extraction limit of {limits.max_members}"
        )
    for info in infos:
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeArchiveError(f"archive member {info.filename!r} is a symlink")
        target = safe_member_path(info.filename)
        yield None if target is None else _Member(target, info.is_dir(), info.file_size, info)


def _tar_members(bundle: tarfile.TarFile, limits: ExtractionLimits) -> Iterator[_Member | None]:
    # Iterate lazily so a tar with millions of headers is stopped early.
    for count, info in enumerate(bundle, start=1):
        if count > limits.max_members:
            raise UnsafeArchiveError(f"archive has more members than the extraction limit of {limits.max_members}")
        if not (info.isreg() or info.isdir()):
            raise UnsafeArchiveError(f"archive member {info.name!r} is a link, device or other special file")
        target = safe_member_path(info.name)
        yield None if target is None else _Member(target, info.isdir(), info.size, info)


def _open_tar_member(bundle: tarfile.TarFile, info: TarOrZipInfo) -> IO[bytes]:
    handle = bundle.extractfile(info) if isinstance(info, tarfile.TarInfo) else None
    if handle is None:  # only regular files get here, so this means a malformed member
        raise UnsafeArchiveError(f"archive member {info} has no readable content")
    return handle


def _plan(candidates: Iterator[_Member | None], limits: ExtractionLimits) -> list[_Member]:
    """All members to write, validated up front so a bad member anywhere means nothing is written."""
    members: list[_Member] = []
    skipped = 0
    declared = 0
    for member in candidates:
        if member is None:
            skipped += 1
            continue
        declared += 0 if member.is_dir else member.size
        if declared > limits.max_bytes:
            raise UnsafeArchiveError(
                f"archive declares more than the {limits.max_bytes}-byte extraction limit"
            )
        members.append(member)
    files = sum(not member.is_dir for member in members)
    log.info(
        "Extracting %d files (%.1f MiB); skipping %d macOS/hidden entries", files, declared / 2**20, skipped
    )
    return members


def _write_members(
    members: list[_Member],
    dest: Path,
    limits: ExtractionLimits,
    open_member: Callable[[TarOrZipInfo], IO[bytes]],
) -> None:
    budget = limits.max_bytes
    for member in members:
        path = dest.joinpath(*member.target.parts)
        if member.is_dir:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with open_member(member.ref) as source, path.open("wb") as target:
            budget -= copy_member(
                source, target, declared=member.size, budget=budget, name=str(member.target)
            )


def copy_member(source: IO[bytes], target: IO[bytes], *, declared: int, budget: int, name: str) -> int:
    """Copy one member's bytes, stopping as soon as it outgrows its declared size or the size budget."""
    written = 0
    while chunk := source.read(CHUNK_SIZE):
        written += len(chunk)
        if written > declared:
            raise UnsafeArchiveError(f"archive member {name!r} is larger than its header declares")
        if written > budget:
            raise UnsafeArchiveError(f"extracted data exceeds the extraction limit at {name!r}")
        target.write(chunk)
    return written


def copy_dataset_folder(source: Path, dest: Path) -> None:
    """Copy an already-extracted dataset folder, leaving out macOS metadata and hidden files."""

    def ignore(_folder: str, names: list[str]) -> set[str]:
        return {name for name in names if name in SKIPPED_DIR_NAMES or name.startswith(".")}

    # A folder that is itself the dataset root (holds train/) keeps its name, so the output always
    # looks like an extracted archive: data/raw/<root>/train/...
    if _is_dataset_root(source):
        dest = dest / source.name
    shutil.copytree(source, dest, ignore=ignore)


# ---------------------------------------------------------------------------------------------------
# Layout check and the stage


def _is_dataset_root(folder: Path) -> bool:
    return all((folder / "train" / name).is_dir() for name in CLASS_DIRS)


def find_dataset_roots(raw_dir: Path) -> list[Path]:
    """Folders under `raw_dir` (itself included) holding train/NORMAL and train/PNEUMONIA."""
    candidates = [raw_dir, *(train.parent for train in raw_dir.rglob("train") if train.is_dir())]
    return sorted({folder for folder in candidates if _is_dataset_root(folder)})


def check_layout(raw_dir: Path) -> list[Path]:
    roots = find_dataset_roots(raw_dir)
    if not roots:
        raise DatasetLayoutError(
            "The data has no train/NORMAL and train/PNEUMONIA folders. Expected the public layout "
            "chest_xray/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg (the chest_xray folder may be nested); "
            f"its top level holds {_top_level(raw_dir)}. Fix data.source in params.yaml."
        )
    return roots


def check_external_layout(raw_dir: Path) -> list[Path]:
    """An external set: any folder (the top one included) holding NORMAL and PNEUMONIA folders."""
    candidates = [raw_dir, *(path for path in raw_dir.rglob("*") if path.is_dir())]
    roots = [folder for folder in candidates if all((folder / name).is_dir() for name in CLASS_DIRS)]
    if not roots:
        raise DatasetLayoutError(
            f"The external set has no NORMAL and PNEUMONIA folders; its top level holds {_top_level(raw_dir)}. "
            "Fix data.external in params.yaml."
        )
    return roots[:1]


def _top_level(folder: Path) -> list[str]:
    return sorted(child.name for child in folder.iterdir())[:20] if folder.is_dir() else []


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def prepare_raw_data(
    source: str | Path | None,
    sha256: str | None,
    out_dir: Path,
    download_dir: Path,
    *,
    root: Path | None = None,
    layout: Callable[[Path], list[Path]] = check_layout,
    limits: ExtractionLimits = ExtractionLimits(),
    attempts: int = RETRY_ATTEMPTS,
    backoff_s: float = RETRY_BACKOFF_S,
    timeout_s: float = TIMEOUT_S,
) -> Path:
    """Fill `out_dir` with the dataset from `source` (URL, archive or folder); return `out_dir`.

    Relative local sources resolve against `root` (default: the persistent project root). The data
    is assembled in `<out_dir>.partial` and renamed into place only after the `layout` check, so a
    failed or killed run never leaves a half-filled `out_dir`.
    """
    if source is None or not str(source).strip():
        raise DownloadError(f"data.source is not set in params.yaml.\n{offline_hint()}")
    digest = normalise_sha256(sha256)
    text = str(source).strip()
    if is_url(text):
        log.info("Source: %s", text)
        local = download_file(
            text, download_dir, digest, attempts=attempts, backoff_s=backoff_s, timeout_s=timeout_s
        )
    elif "://" in text:
        raise DownloadError(f"data.source {text!r}: only http(s) URLs or local paths are supported")
    else:
        local = resolve_local_source(text, root or persistent_root())
        log.info("Source: local %s", local.name)
        if digest is not None and local.is_file():
            verify_sha256(local, digest, str(local))
        elif digest is not None:
            log.warning("data.sha256 is ignored for the folder %s", local)

    staging = out_dir.with_name(out_dir.name + ".partial")
    _remove(staging)  # left over from a killed run
    try:
        if local.is_dir():
            copy_dataset_folder(local, staging)
        else:
            staging.mkdir(parents=True)
            extract_archive(local, staging, limits)
        roots = layout(staging)
        _remove(out_dir)
        staging.rename(out_dir)
    except BaseException:
        _remove(staging)
        raise
    log.info(
        "Raw data ready in %s (dataset roots: %s)", out_dir, [str(r.relative_to(staging)) for r in roots]
    )
    return out_dir


def local_override(link: Path) -> tuple[str, str | None] | None:
    """(path, sha256 or None) of a local source linked at `link` (data/sources/... of the real project, so
    that DVC's temporary experiment workspaces use it too), or None."""
    if link.is_symlink() and not link.exists():
        raise DownloadError(f"{link} links to {os.readlink(link)}, which does not exist: link the archive again "
                            "(make repro DATA=...), or remove the link to use data.source")
    if not link.exists():
        return None
    checksum = link.with_name(link.name + ".sha256")
    digest = None
    if checksum.is_file():
        words = checksum.read_text(encoding="utf-8").split()
        if not words:
            raise DownloadError(f"{checksum} is empty: write the archive's sha256 into it, or delete it")
        digest = words[0]
    return str(link.resolve()), digest


def run(params: DataParams, root: Path) -> None:
    train = local_override(root / TRAIN_SOURCE) or (params.source, params.sha256)
    prepare_raw_data(*train, RAW_TRAIN_DIR, root / DOWNLOAD_DIR, root=root)
    configured = (params.external.source, params.external.sha256) if params.external else None
    external = local_override(root / EXTERNAL_SOURCE) or configured
    if external is None:
        _remove(RAW_EXTERNAL_DIR)  # none configured: the archive's own test split, if any, is external
        return
    try:
        prepare_raw_data(*external, RAW_EXTERNAL_DIR, root / DOWNLOAD_DIR, root=root, layout=check_external_layout)
    except DownloadError as error:  # its messages speak of data.source: say which source this was
        kind = DownloadError if isinstance(error, _TransientError) else type(error)
        raise kind(f"external set (data.external or data/sources/external): {error}") from error


def main() -> None:
    setup_logging()
    _, params = stage_params("data")
    # SIGTERM becomes an exception, so the `.partial` download and staging folder are removed on the way out.
    with stage_errors(log):
        try:
            run(params, persistent_root())
        except DownloadError as error:
            log.error("%s", error)  # several lines on purpose: the offline hint lists the options
            raise SystemExit(1) from None


if __name__ == "__main__":
    main()
