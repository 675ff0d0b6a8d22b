"""Tests for pipeline.download against a local HTTP server on 127.0.0.1 (no internet needed).

The stage writes the training archive to data/raw/archive and the external set to data/raw/external,
relative to the project root: the stage-level tests run in tmp_path (monkeypatch.chdir)."""

from __future__ import annotations

import hashlib
import io
import logging
import socket
import stat
import tarfile
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import pytest
import requests
import yaml

from pipeline import download
from pipeline.download import (
    ChecksumError,
    DatasetLayoutError,
    DownloadError,
    ExtractionLimits,
    UnsafeArchiveError,
    cache_file_name,
    check_external_layout,
    copy_member,
    local_override,
    prepare_raw_data,
    safe_member_path,
)
from pipeline.params import DataParams, ParamsError, SourceParams
from pipeline.paths import DOWNLOAD_DIR, EXTERNAL_SOURCE, RAW_EXTERNAL_DIR, RAW_TRAIN_DIR, TRAIN_SOURCE
from tests.helpers import PROJECT

FILES = {
    "chest_xray/train/NORMAL/n1.jpeg": b"normal-one",
    "chest_xray/train/PNEUMONIA/p1.jpeg": b"pneumonia-one",
    "chest_xray/test/NORMAL/n2.jpeg": b"normal-two",
    "chest_xray/test/PNEUMONIA/p2.jpeg": b"pneumonia-two",
}


# --------------------------------------------------------------------------------------------------
# Archive builders


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in files.items():
            bundle.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


def tar_bytes(files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
        for info in extra:
            bundle.addfile(info)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_extracted(out_dir: Path, files: dict[str, bytes] = FILES) -> None:
    for name, data in files.items():
        assert (out_dir / name).read_bytes() == data
    written = {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()}
    assert written == set(files)


# --------------------------------------------------------------------------------------------------
# Local HTTP server: each path plays a script of steps, the last step repeating.


class FakeServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.scripts: dict[str, list[tuple[str, object]]] = {}
        self.hits: Counter[str] = Counter()
        self.user_agents: list[str] = []
        self._lock = threading.Lock()

    def serve(self, path: str, *steps: tuple[str, object]) -> str:
        self.scripts[path] = list(steps)
        return f"http://127.0.0.1:{self.port}{path}"

    def next_step(self, path: str, user_agent: str) -> tuple[str, object]:
        with self._lock:
            self.hits[path] += 1
            self.user_agents.append(user_agent)
            script = self.scripts.get(path, [("status", 404)])
            return script.pop(0) if len(script) > 1 else script[0]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        kind, payload = self.server.fake.next_step(self.path, self.headers.get("User-Agent", ""))
        if kind == "status":
            self.send_response(int(payload))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = bytes(payload)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "cut":  # promise the whole body, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FakeServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.fake = FakeServer(httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.fake
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would swallow requests meant for 127.0.0.1.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class Dirs(NamedTuple):
    out: Path  # where the stage puts the training archive: data/raw/archive
    downloads: Path  # the download cache
    root: Path  # the project root, against which relative local sources resolve


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    return Dirs(tmp_path / RAW_TRAIN_DIR, tmp_path / "cache" / "downloads", tmp_path)


def partial_of(out_dir: Path) -> Path:
    """The staging folder an output is assembled in before it is renamed into place."""
    return out_dir.with_name(out_dir.name + ".partial")


def prepare(source: str | Path, sha256: str | None, dirs: Dirs, **kwargs: object) -> Path:
    options = {"root": dirs.root, "attempts": 3, "backoff_s": 0.0, "timeout_s": 5.0, **kwargs}
    return prepare_raw_data(source, sha256, dirs.out, dirs.downloads, **options)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# HTTP sources


def test_http_zip_is_downloaded_verified_and_extracted(server: FakeServer, dirs: Dirs) -> None:
    archive = zip_bytes(FILES)
    url = server.serve("/files/abc/file_downloaded", ("ok", archive))

    out_dir = prepare(url, sha(archive).upper(), dirs)

    assert_extracted(out_dir)
    cached = dirs.downloads / cache_file_name(url)
    assert cached.read_bytes() == archive
    assert [p.name for p in dirs.downloads.iterdir()] == [cached.name]  # no .partial left
    assert not partial_of(out_dir).exists()
    assert "Mozilla" in server.user_agents[0]  # Mendeley refuses non-browser clients


def test_http_tar_gz_is_extracted(server: FakeServer, dirs: Dirs) -> None:
    archive = tar_bytes(FILES)
    url = server.serve("/data.tar.gz", ("ok", archive))
    assert_extracted(prepare(url, sha(archive), dirs))


def test_rerun_with_same_source_and_hash_makes_no_request(
    server: FakeServer, dirs: Dirs
) -> None:
    archive = zip_bytes(FILES)
    url = server.serve("/a.zip", ("ok", archive))
    out_dir = prepare(url, sha(archive), dirs)
    download._remove(out_dir)  # DVC deletes the output before rerunning the stage

    prepare(url, sha(archive), dirs)

    assert server.hits["/a.zip"] == 1
    assert_extracted(out_dir)


def test_cached_file_without_hash_is_reused_with_warning(
    server: FakeServer, dirs: Dirs, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.serve("/a.zip", ("ok", zip_bytes(FILES)))
    prepare(url, None, dirs)
    with caplog.at_level(logging.WARNING, logger="pipeline.download"):
        prepare(url, None, dirs)
    assert server.hits["/a.zip"] == 1
    assert "WITHOUT verification" in caplog.text


def test_cached_file_with_wrong_hash_is_downloaded_again(server: FakeServer, dirs: Dirs) -> None:
    archive = zip_bytes(FILES)
    url = server.serve("/a.zip", ("ok", archive))
    write(dirs.downloads / cache_file_name(url), b"stale or corrupt")

    assert_extracted(prepare(url, sha(archive), dirs))
    assert server.hits["/a.zip"] == 1
    assert (dirs.downloads / cache_file_name(url)).read_bytes() == archive


def test_checksum_mismatch_leaves_nothing_behind(server: FakeServer, dirs: Dirs) -> None:
    archive = zip_bytes(FILES)
    url = server.serve("/a.zip", ("ok", archive))
    wrong = "0" * 64

    with pytest.raises(ChecksumError) as caught:
        prepare(url, wrong, dirs)

    message = str(caught.value)
    assert wrong in message and sha(archive) in message and "data.sha256" in message
    assert list(dirs.downloads.iterdir()) == []  # neither the final file nor the .partial
    assert not dirs.out.exists()


def test_truncated_transfer_is_retried_then_fails(server: FakeServer, dirs: Dirs) -> None:
    url = server.serve("/a.zip", ("cut", zip_bytes(FILES)))

    with pytest.raises(DownloadError, match="failed after 3 attempts") as caught:
        prepare(url, None, dirs)

    assert server.hits["/a.zip"] == 3
    assert "data.source" in str(caught.value)
    assert list(dirs.downloads.iterdir()) == []
    assert not dirs.out.exists()


def test_truncated_then_whole_transfer_succeeds(server: FakeServer, dirs: Dirs) -> None:
    archive = zip_bytes(FILES)
    url = server.serve("/a.zip", ("cut", archive), ("ok", archive))
    assert_extracted(prepare(url, sha(archive), dirs))
    assert server.hits["/a.zip"] == 2


def test_short_body_is_a_failed_transfer_even_without_a_protocol_error(
    server: FakeServer, dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # urllib3 2 already refuses short bodies; the stage's own Content-Length check must not rely on it.
    real_iter_content = requests.Response.iter_content

    def half_body(
        self: requests.Response, chunk_size: int = 1, decode_unicode: bool = False
    ) -> Iterator[bytes]:
        body = b"".join(real_iter_content(self, chunk_size=chunk_size))
        yield body[: len(body) // 2]

    monkeypatch.setattr(requests.Response, "iter_content", half_body)
    url = server.serve("/a.zip", ("ok", zip_bytes(FILES)))

    with pytest.raises(DownloadError, match="incomplete"):
        prepare(url, None, dirs)

    assert server.hits["/a.zip"] == 3
    assert list(dirs.downloads.iterdir()) == []


def test_server_error_then_success_is_retried(server: FakeServer, dirs: Dirs) -> None:
    archive = zip_bytes(FILES)
    url = server.serve("/a.zip", ("status", 500), ("status", 429), ("ok", archive))
    assert_extracted(prepare(url, sha(archive), dirs))
    assert server.hits["/a.zip"] == 3


@pytest.mark.parametrize("status", [404, 403])
def test_client_error_is_not_retried(server: FakeServer, dirs: Dirs, status: int) -> None:
    url = server.serve("/missing.zip", ("status", status))

    with pytest.raises(DownloadError) as caught:
        prepare(url, None, dirs)

    assert server.hits["/missing.zip"] == 1
    assert url in str(caught.value) and str(status) in str(caught.value)
    assert not dirs.out.exists()


def test_unreachable_url_says_how_to_use_a_local_copy(dirs: Dirs) -> None:
    url = f"http://127.0.0.1:{closed_port()}/x.zip"

    with pytest.raises(DownloadError) as caught:
        prepare(url, None, dirs)

    message = str(caught.value)
    assert "Could not reach" in message and url in message
    assert "data.source" in message  # edit params.yaml, or
    assert "make repro DATA=" in message  # link a local archive into data/sources/


def test_html_page_is_not_cached_as_an_archive(server: FakeServer, dirs: Dirs) -> None:
    url = server.serve("/a.zip", ("ok", b"<!DOCTYPE html><html>Please log in</html>"))
    with pytest.raises(DownloadError, match="HTML"):
        prepare(url, None, dirs)
    assert list(dirs.downloads.iterdir()) == []


def test_cache_file_name_is_deterministic_and_safe() -> None:
    mendeley = "https://data.mendeley.com/public-files/datasets/x/files/f12e/file_downloaded"
    name = cache_file_name(mendeley)
    assert name == cache_file_name(mendeley)
    assert name.endswith("-file_downloaded") and len(name) == len("-file_downloaded") + 12
    assert cache_file_name(mendeley.replace("f12e", "f13e")) != name
    assert cache_file_name("https://host/a%20b/..%2F..%2Fetc?q=1").count("/") == 0
    assert cache_file_name("https://host/").endswith("-download")


# --------------------------------------------------------------------------------------------------
# Safe extraction


def evil_archive(tmp_path: Path, kind: str, name: str) -> Path:
    files = {**FILES, name: b"evil"}
    if kind == "zip":
        return write(tmp_path / "evil.zip", zip_bytes(files))
    return write(tmp_path / "evil.tar.gz", tar_bytes(files))


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_parent_traversal_member_is_refused(tmp_path: Path, dirs: Dirs, kind: str) -> None:
    archive = evil_archive(tmp_path, kind, "chest_xray/../../evil.txt")

    with pytest.raises(UnsafeArchiveError, match="escape"):
        prepare(archive, None, dirs)

    assert not dirs.out.exists()
    assert not partial_of(dirs.out).exists()
    assert [p for p in tmp_path.rglob("evil.txt")] == []


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_absolute_member_is_refused(tmp_path: Path, dirs: Dirs, kind: str) -> None:
    target = tmp_path / "outside" / "evil.txt"
    archive = evil_archive(tmp_path, kind, target.as_posix())

    with pytest.raises(UnsafeArchiveError, match="absolute"):
        prepare(archive, None, dirs)

    assert not target.exists()
    assert not dirs.out.exists()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chest_xray/train/NORMAL/a.jpeg", PurePosixPath("chest_xray/train/NORMAL/a.jpeg")),
        ("./chest_xray//train/", PurePosixPath("chest_xray/train")),
        ("__MACOSX/chest_xray/._a.jpeg", None),
        ("chest_xray/.DS_Store", None),
        ("chest_xray/.hidden/a.jpeg", None),
        ("", None),
    ],
)
def test_safe_member_path_maps_or_skips(name: str, expected: PurePosixPath | None) -> None:
    assert safe_member_path(name) == expected


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "C:/evil", "c:evil", "a\\..\\..\\evil", "a/../b", "\\\\server\\x"]
)
def test_safe_member_path_refuses_escapes(name: str) -> None:
    with pytest.raises(UnsafeArchiveError):
        safe_member_path(name)


@pytest.mark.parametrize("link_type", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_tar_links_and_devices_are_refused(tmp_path: Path, dirs: Dirs, link_type: bytes) -> None:
    link = tarfile.TarInfo("chest_xray/train/NORMAL/link.jpeg")
    link.type = link_type
    link.linkname = "/etc/passwd"
    archive = write(tmp_path / "links.tar.gz", tar_bytes(FILES, [link]))

    with pytest.raises(UnsafeArchiveError, match="link, device"):
        prepare(archive, None, dirs)

    assert not dirs.out.exists()


def test_zip_symlink_is_refused(tmp_path: Path, dirs: Dirs) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in FILES.items():
            bundle.writestr(name, data)
        link = zipfile.ZipInfo("chest_xray/train/NORMAL/link.jpeg")
        link.create_system = 3  # unix, so external_attr carries the file mode
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        bundle.writestr(link, "/etc/passwd")
    archive = write(tmp_path / "link.zip", buffer.getvalue())

    with pytest.raises(UnsafeArchiveError, match="symlink"):
        prepare(archive, None, dirs)

    assert not dirs.out.exists()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_macosx_and_dotfiles_are_skipped(tmp_path: Path, dirs: Dirs, kind: str) -> None:
    junk = {
        "__MACOSX/chest_xray/train/NORMAL/._n1.jpeg": b"resource fork",
        "chest_xray/.DS_Store": b"finder",
        "chest_xray/train/NORMAL/._n1.jpeg": b"apple double",
        ".git/config": b"x",
    }
    data = zip_bytes({**FILES, **junk}) if kind == "zip" else tar_bytes({**FILES, **junk})
    archive = write(tmp_path / f"junk.{'zip' if kind == 'zip' else 'tgz'}", data)

    assert_extracted(prepare(archive, None, dirs))


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_size_limit_refuses_archive(tmp_path: Path, dirs: Dirs, kind: str) -> None:
    big = {**FILES, "chest_xray/train/NORMAL/big.jpeg": b"\0" * 10_000}
    archive = write(tmp_path / "big.bin", zip_bytes(big) if kind == "zip" else tar_bytes(big))

    # Refused from the declared sizes, before a byte is written.
    with pytest.raises(UnsafeArchiveError, match=r"declares more than\b.*\b5000\b"):
        prepare(archive, None, dirs, limits=ExtractionLimits(max_bytes=5_000))

    assert not dirs.out.exists()
    # The same archive passes with a limit above its size: the limit, not the archive, decided.
    assert_extracted(prepare(archive, None, dirs, limits=ExtractionLimits(max_bytes=20_000)), big)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_member_count_limit_refuses_archive(tmp_path: Path, dirs: Dirs, kind: str) -> None:
    archive = write(tmp_path / "many.bin", zip_bytes(FILES) if kind == "zip" else tar_bytes(FILES))

    with pytest.raises(UnsafeArchiveError, match=rf"members\b.*\b{len(FILES) - 1}\b"):
        prepare(archive, None, dirs, limits=ExtractionLimits(max_members=len(FILES) - 1))

    assert not dirs.out.exists()
    assert_extracted(prepare(archive, None, dirs, limits=ExtractionLimits(max_members=len(FILES))))


def test_default_limits_are_generous_for_the_public_archive() -> None:
    # The params data.max_members / data.max_extracted_bytes are gone: these defaults always apply.
    limits = ExtractionLimits()
    assert limits.max_members >= 20_000  # the public archive holds ~5,900 images
    assert 2 * 1024**3 <= limits.max_bytes <= 100 * 1024**3  # ~1.2 GB extracted; bounded


def test_copy_member_stops_when_bytes_exceed_the_header() -> None:
    target = io.BytesIO()
    with pytest.raises(UnsafeArchiveError, match="larger than its header"):
        copy_member(io.BytesIO(b"x" * 100), target, declared=10, budget=1_000, name="liar")
    with pytest.raises(UnsafeArchiveError, match="exceeds"):
        copy_member(io.BytesIO(b"x" * 100), io.BytesIO(), declared=100, budget=50, name="bomb")
    assert copy_member(io.BytesIO(b"x" * 100), io.BytesIO(), declared=100, budget=100, name="ok") == 100


def test_unknown_archive_type_is_a_clear_error(tmp_path: Path, dirs: Dirs) -> None:
    archive = write(tmp_path / "data.rar", b"Rar!\x1a\x07\x00 not supported")
    with pytest.raises(DownloadError, match="not a .zip or .tar.gz"):
        prepare(archive, None, dirs)
    assert not dirs.out.exists()


def test_corrupt_zip_is_a_clear_error(tmp_path: Path, dirs: Dirs) -> None:
    archive = write(tmp_path / "bad.zip", zip_bytes(FILES)[:-30])
    with pytest.raises(DownloadError, match="corrupt"):
        prepare(archive, None, dirs)
    assert not dirs.out.exists()


# --------------------------------------------------------------------------------------------------
# Local sources and layout


def test_local_zip_with_hash(tmp_path: Path, dirs: Dirs) -> None:
    data = zip_bytes(FILES)
    archive = write(tmp_path / "archives" / "ChestXRay2017.zip", data)
    assert_extracted(prepare(archive, sha(data), dirs))


def test_local_tar_gz_relative_to_root(tmp_path: Path, dirs: Dirs) -> None:
    data = tar_bytes(FILES)
    write(tmp_path / "archives" / "chest.tgz", data)
    # Relative paths resolve against `root` (the persistent project root), not the cwd.
    assert_extracted(prepare("archives/chest.tgz", sha(data), dirs, root=tmp_path))


def test_local_archive_hash_mismatch(tmp_path: Path, dirs: Dirs) -> None:
    archive = write(tmp_path / "a.zip", zip_bytes(FILES))
    with pytest.raises(ChecksumError, match="data.sha256"):
        prepare(archive, "f" * 64, dirs)
    assert not dirs.out.exists()


def test_local_folder_is_copied_without_junk(tmp_path: Path, dirs: Dirs) -> None:
    source = tmp_path / "extracted"
    for name, data in FILES.items():
        write(source / name, data)
    write(source / "__MACOSX" / "x", b"junk")
    write(source / "chest_xray" / ".DS_Store", b"junk")

    assert_extracted(prepare(source, None, dirs))


def test_local_dataset_root_folder_keeps_its_name(tmp_path: Path, dirs: Dirs) -> None:
    source = tmp_path / "somewhere"
    for name, data in FILES.items():
        write(source / name, data)

    assert_extracted(prepare(source / "chest_xray", None, dirs))


def test_missing_local_path_names_the_param(tmp_path: Path, dirs: Dirs) -> None:
    with pytest.raises(DownloadError) as caught:
        prepare("no/such/archive.zip", None, dirs, root=tmp_path)
    assert str(tmp_path / "no/such/archive.zip") in str(caught.value)
    assert "data.source" in str(caught.value)


def test_wrong_layout_is_refused(tmp_path: Path, dirs: Dirs) -> None:
    archive = write(
        tmp_path / "other.zip", zip_bytes({"images/cat.jpeg": b"meow", "train/dogs/d.jpeg": b"woof"})
    )

    with pytest.raises(DatasetLayoutError, match=r"train/NORMAL.*PNEUMONIA") as caught:
        prepare(archive, None, dirs)

    assert "images" in str(caught.value)
    assert not dirs.out.exists()
    assert not partial_of(dirs.out).exists()


def test_invalid_sha256_param(tmp_path: Path, dirs: Dirs) -> None:
    archive = write(tmp_path / "a.zip", zip_bytes(FILES))
    with pytest.raises(DownloadError, match="data.sha256"):
        prepare(archive, "not-a-digest", dirs)


def test_stale_output_and_partial_are_replaced(tmp_path: Path, dirs: Dirs) -> None:
    out_dir = dirs.out
    write(out_dir / "old.txt", b"stale")
    write(partial_of(out_dir) / "half.txt", b"killed run")
    archive = write(tmp_path / "a.zip", zip_bytes(FILES))

    assert_extracted(prepare(archive, None, dirs))
    assert not partial_of(out_dir).exists()


# --------------------------------------------------------------------------------------------------
# The stage: training archive and external set, configured or linked into data/sources/

EXTERNAL_FILES = {
    "site-b/NORMAL/a.png": b"external-normal",
    "site-b/PNEUMONIA/b.png": b"external-pneumonia",
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the project root and working folder: the stage's output paths are relative to it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def link_source(root: Path, link: Path, target: Path, checksum: str | None = None) -> Path:
    """What `make repro DATA=... [DATA_SHA256=...]` does: link `target` at root/link, and its sha256 beside it."""
    path = root / link
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    if checksum is not None:
        path.with_name(path.name + ".sha256").write_text(checksum, encoding="utf-8")
    return path


def assert_no_leftovers(out_dir: Path) -> None:
    assert not out_dir.exists()
    assert not partial_of(out_dir).exists()


@pytest.mark.parametrize(
    "checksum_file",
    [None, "{digest}\n", "{digest}  chest.zip\n", "{upper}\n"],
    ids=["no-checksum-file", "make-echo", "sha256sum-format", "upper-case"],
)
def test_local_override_reads_the_link_and_its_checksum(tmp_path: Path, checksum_file: str | None) -> None:
    data = zip_bytes(FILES)
    target = write(tmp_path / "elsewhere" / "chest.zip", data)
    content = None if checksum_file is None else checksum_file.format(digest=sha(data), upper=sha(data).upper())
    link = link_source(tmp_path, TRAIN_SOURCE, target, content)

    path, digest = local_override(link)

    assert path == str(target.resolve())
    assert digest is None if checksum_file is None else digest.lower() == sha(data)


def test_local_override_is_none_without_a_link(tmp_path: Path) -> None:
    assert local_override(tmp_path / TRAIN_SOURCE) is None
    assert local_override(tmp_path / EXTERNAL_SOURCE) is None


@pytest.mark.parametrize("with_checksum", [False, True], ids=["without-sha256-file", "with-sha256-file"])
def test_linked_train_archive_replaces_the_configured_source(
    server: FakeServer, project: Path, with_checksum: bool
) -> None:
    data = zip_bytes(FILES)
    target = write(project / "elsewhere" / "ChestXRay2017.zip", data)
    link_source(project, TRAIN_SOURCE, target, sha(data) if with_checksum else None)
    url = server.serve("/configured.zip", ("status", 404))

    download.run(DataParams(source=url, sha256="0" * 64, external=None), project)

    assert server.hits["/configured.zip"] == 0  # the configured URL (and its sha256) are not used
    assert_extracted(project / RAW_TRAIN_DIR)
    assert_no_leftovers(project / RAW_EXTERNAL_DIR)


def test_linked_train_archive_with_a_wrong_checksum_file_fails(project: Path) -> None:
    data = zip_bytes(FILES)
    target = write(project / "elsewhere" / "chest.zip", data)
    wrong = "e" * 64
    link_source(project, TRAIN_SOURCE, target, f"{wrong}\n")

    with pytest.raises(ChecksumError) as caught:
        download.run(DataParams(source="unused.zip", sha256=None, external=None), project)

    assert wrong in str(caught.value) and sha(data) in str(caught.value)
    assert_no_leftovers(project / RAW_TRAIN_DIR)


def test_linked_extracted_folder_is_copied(project: Path) -> None:
    source = project / "elsewhere" / "extracted"
    for name, data in FILES.items():
        write(source / name, data)
    link_source(project, TRAIN_SOURCE, source)

    download.run(DataParams(source="unused.zip", sha256=None, external=None), project)

    assert_extracted(project / RAW_TRAIN_DIR)


def test_external_set_is_extracted_to_its_own_folder(server: FakeServer, project: Path) -> None:
    train = zip_bytes(FILES)
    write(project / "archives" / "chest.zip", train)
    external = tar_bytes(EXTERNAL_FILES)
    url = server.serve("/external.tgz", ("ok", external))
    params = DataParams(source="archives/chest.zip", sha256=sha(train),  # relative to the project root
                        external=SourceParams(source=url, sha256=sha(external)))

    download.run(params, project)

    assert_extracted(project / RAW_TRAIN_DIR)
    assert_extracted(project / RAW_EXTERNAL_DIR, EXTERNAL_FILES)
    assert (project / DOWNLOAD_DIR / cache_file_name(url)).read_bytes() == external  # cached like the archive
    assert not partial_of(project / RAW_EXTERNAL_DIR).exists()


def test_external_set_with_a_wrong_checksum_fails(server: FakeServer, project: Path) -> None:
    write(project / "chest.zip", zip_bytes(FILES))
    url = server.serve("/external.zip", ("ok", zip_bytes(EXTERNAL_FILES)))
    params = DataParams(source="chest.zip", sha256=None, external=SourceParams(source=url, sha256="1" * 64))

    with pytest.raises(ChecksumError):
        download.run(params, project)

    assert_no_leftovers(project / RAW_EXTERNAL_DIR)


def test_linked_external_set_replaces_the_configured_one(server: FakeServer, project: Path) -> None:
    write(project / "chest.zip", zip_bytes(FILES))
    external = zip_bytes(EXTERNAL_FILES)
    link_source(project, EXTERNAL_SOURCE, write(project / "elsewhere" / "site-b.zip", external), sha(external))
    url = server.serve("/configured-external.zip", ("status", 404))

    download.run(DataParams(source="chest.zip", sha256=None, external=SourceParams(source=url, sha256=None)), project)

    assert server.hits["/configured-external.zip"] == 0
    assert_extracted(project / RAW_EXTERNAL_DIR, EXTERNAL_FILES)


def test_linked_external_set_is_used_when_none_is_configured(project: Path) -> None:
    write(project / "chest.zip", zip_bytes(FILES))
    link_source(project, EXTERNAL_SOURCE, write(project / "elsewhere" / "site-b.zip", zip_bytes(EXTERNAL_FILES)))

    download.run(DataParams(source="chest.zip", sha256=None, external=None), project)

    assert_extracted(project / RAW_EXTERNAL_DIR, EXTERNAL_FILES)


def test_without_an_external_set_a_stale_external_folder_is_removed(project: Path) -> None:
    write(project / "chest.zip", zip_bytes(FILES))
    write(project / RAW_EXTERNAL_DIR / "site-b" / "NORMAL" / "old.png", b"from a run with an external set")
    write(project / RAW_TRAIN_DIR / "stale.txt", b"from an earlier archive")

    download.run(DataParams(source="chest.zip", sha256=None, external=None), project)

    # Otherwise preprocess would take the stale folder as the external set.
    assert not (project / RAW_EXTERNAL_DIR).exists()
    assert_extracted(project / RAW_TRAIN_DIR)


def test_external_archive_without_class_folders_fails_clearly(project: Path) -> None:
    write(project / "chest.zip", zip_bytes(FILES))
    write(project / "external.zip", zip_bytes({"images/a.png": b"x", "labels.csv": b"file,label\n"}))
    params = DataParams(source="chest.zip", sha256=None, external=SourceParams(source="external.zip", sha256=None))

    with pytest.raises(DatasetLayoutError) as caught:
        download.run(params, project)

    message = str(caught.value)
    assert "external set has no NORMAL and PNEUMONIA folders" in message
    assert "data.external" in message  # the param to fix
    assert "'images'" in message and "'labels.csv'" in message  # what it holds instead
    assert_no_leftovers(project / RAW_EXTERNAL_DIR)


@pytest.mark.parametrize(
    ("folders", "root"),
    [
        (["NORMAL", "PNEUMONIA"], "."),
        (["site-b/2021/NORMAL", "site-b/2021/PNEUMONIA", "site-b/README"], "site-b/2021"),
        (["chest_xray/test/NORMAL", "chest_xray/test/PNEUMONIA"], "chest_xray/test"),
    ],
)
def test_external_layout_is_any_folder_holding_both_classes(tmp_path: Path, folders: list[str], root: str) -> None:
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True)
    assert check_external_layout(tmp_path) == [tmp_path / root]


@pytest.mark.parametrize("folders", [[], ["NORMAL"], ["a/NORMAL", "b/PNEUMONIA"], ["normal", "pneumonia"]])
def test_external_layout_needs_both_classes_in_one_folder(tmp_path: Path, folders: list[str]) -> None:
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="NORMAL and PNEUMONIA"):
        check_external_layout(tmp_path)


def test_empty_checksum_file_is_a_clear_error(tmp_path: Path) -> None:
    link = link_source(tmp_path, TRAIN_SOURCE, write(tmp_path / "chest.zip", zip_bytes(FILES)), "")
    with pytest.raises(DownloadError, match="sha256"):
        local_override(link)


def test_dangling_source_link_is_an_error_not_a_silent_download(server: FakeServer, project: Path) -> None:
    url = server.serve("/configured.zip", ("ok", zip_bytes(FILES)))
    link_source(project, TRAIN_SOURCE, project / "moved-away.zip")  # the archive was moved or deleted

    with pytest.raises(DownloadError, match="data/sources/train"):
        download.run(DataParams(source=url, sha256=None, external=None), project)
    assert server.hits["/configured.zip"] == 0


# --------------------------------------------------------------------------------------------------
# The stage entry point


def write_params(root: Path, **data: object) -> None:
    """The project's params.yaml with its data section replaced: every other section must be valid too."""
    values = yaml.safe_load((PROJECT / "params.yaml").read_text(encoding="utf-8"))
    values["data"] = data
    (root / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def test_main_builds_data_raw_from_params(project: Path) -> None:
    data = zip_bytes(FILES)
    write(project / "archives" / "chest.zip", data)
    write_params(project, source="archives/chest.zip", sha256=sha(data), external=None)

    download.main()

    assert_extracted(project / RAW_TRAIN_DIR)
    assert not (project / RAW_EXTERNAL_DIR).exists()


def test_main_exits_1_with_message_on_error(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_params(project, source="missing.zip", sha256=None, external=None)

    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as caught:
        download.main()

    assert caught.value.code == 1
    assert "data.source" in caplog.text and "missing.zip" in caplog.text
    assert not (project / "data" / "raw").exists()


def test_main_refuses_the_removed_extraction_limit_params(project: Path) -> None:
    write(project / "chest.zip", zip_bytes(FILES))
    write_params(project, source="chest.zip", sha256=None, external=None, max_members=100)

    with pytest.raises(ParamsError, match="data.max_members"):
        download.main()

    assert not (project / "data" / "raw").exists()
