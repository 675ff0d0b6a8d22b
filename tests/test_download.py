"""Tests for pipeline.download against a local HTTP server on 127.0.0.1 (no internet needed)."""

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

import pytest
import requests

from pipeline import download
from pipeline.download import (
    ChecksumError,
    DatasetLayoutError,
    DownloadError,
    ExtractionLimits,
    UnsafeArchiveError,
    cache_file_name,
    copy_member,
    prepare_raw_data,
    safe_member_path,
)

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


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(out_dir, download_dir) as the stage uses them, inside tmp_path."""
    return tmp_path / "data" / "raw", tmp_path / "cache" / "downloads"


def run(source: str | Path, sha256: str | None, dirs: tuple[Path, Path], **kwargs: object) -> Path:
    out_dir, download_dir = dirs
    options = {"root": out_dir.parent.parent, "attempts": 3, "backoff_s": 0.0, "timeout_s": 5.0}
    options.update(kwargs)
    return prepare_raw_data(source, sha256, out_dir, download_dir, **options)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# HTTP sources


def test_http_zip_is_downloaded_verified_and_extracted(server: FakeServer, dirs: tuple[Path, Path]) -> None:
    archive = zip_bytes(FILES)
    url = server.serve("/files/abc/file_downloaded", ("ok", archive))

    out_dir = run(url, sha(archive).upper(), dirs)

    assert_extracted(out_dir)
    cached = dirs[1] / cache_file_name(url)
    assert cached.read_bytes() == archive
    assert [p.name for p in dirs[1].iterdir()] == [cached.name]  # no .partial left
    assert not out_dir.with_name("raw.partial").exists()
    assert "Mozilla" in server.user_agents[0]  # Mendeley refuses non-browser clients


def test_http_tar_gz_is_extracted(server: FakeServer, dirs: tuple[Path, Path]) -> None:
    archive = tar_bytes(FILES)
    url = server.serve("/data.tar.gz", ("ok", archive))
    assert_extracted(run(url, sha(archive), dirs))


def test_rerun_with_same_source_and_hash_makes_no_request(
    server: FakeServer, dirs: tuple[Path, Path]
) -> None:
    archive = zip_bytes(FILES)
    url = server.serve("/a.zip", ("ok", archive))
    out_dir = run(url, sha(archive), dirs)
    download._remove(out_dir)  # DVC deletes the output before rerunning the stage

    run(url, sha(archive), dirs)

    assert server.hits["/a.zip"] == 1
    assert_extracted(out_dir)


def test_cached_file_without_hash_is_reused_with_warning(
    server: FakeServer, dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    url = server.serve("/a.zip", ("ok", zip_bytes(FILES)))
    run(url, None, dirs)
    with caplog.at_level(logging.WARNING, logger="pipeline.download"):
        run(url, None, dirs)
    assert server.hits["/a.zip"] == 1
    assert "WITHOUT verification" in caplog.text


def test_cached_file_with_wrong_hash_is_downloaded_again(server: FakeServer, dirs: tuple[Path, Path]) -> None:
    archive = zip_bytes(FILES)
    url = server.serve("/a.zip", ("ok", archive))
    write(dirs[1] / cache_file_name(url), b"stale or corrupt")

    assert_extracted(run(url, sha(archive), dirs))
    assert server.hits["/a.zip"] == 1
    assert (dirs[1] / cache_file_name(url)).read_bytes() == archive


def test_checksum_mismatch_leaves_nothing_behind(server: FakeServer, dirs: tuple[Path, Path]) -> None:
    archive = zip_bytes(FILES)
    url = server.serve("/a.zip", ("ok", archive))
    wrong = "0" * 64

    with pytest.raises(ChecksumError) as caught:
        run(url, wrong, dirs)

    message = str(caught.value)
    assert wrong in message and sha(archive) in message and "data.sha256" in message
    assert list(dirs[1].iterdir()) == []  # neither the final file nor the .partial
    assert not dirs[0].exists()


def test_truncated_transfer_is_retried_then_fails(server: FakeServer, dirs: tuple[Path, Path]) -> None:
    url = server.serve("/a.zip", ("cut", zip_bytes(FILES)))

    with pytest.raises(DownloadError, match="failed after 3 attempts") as caught:
        run(url, None, dirs)

    assert server.hits["/a.zip"] == 3
    assert "data.source" in str(caught.value)
    assert list(dirs[1].iterdir()) == []
    assert not dirs[0].exists()


def test_truncated_then_whole_transfer_succeeds(server: FakeServer, dirs: tuple[Path, Path]) -> None:
    archive = zip_bytes(FILES)
    url = server.serve("/a.zip", ("cut", archive), ("ok", archive))
    assert_extracted(run(url, sha(archive), dirs))
    assert server.hits["/a.zip"] == 2


def test_short_body_is_a_failed_transfer_even_without_a_protocol_error(
    server: FakeServer, dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
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
        run(url, None, dirs)

    assert server.hits["/a.zip"] == 3
    assert list(dirs[1].iterdir()) == []


def test_server_error_then_success_is_retried(server: FakeServer, dirs: tuple[Path, Path]) -> None:
    archive = zip_bytes(FILES)
    url = server.serve("/a.zip", ("status", 500), ("status", 429), ("ok", archive))
    assert_extracted(run(url, sha(archive), dirs))
    assert server.hits["/a.zip"] == 3


@pytest.mark.parametrize("status", [404, 403])
def test_client_error_is_not_retried(server: FakeServer, dirs: tuple[Path, Path], status: int) -> None:
    url = server.serve("/missing.zip", ("status", status))

    with pytest.raises(DownloadError) as caught:
        run(url, None, dirs)

    assert server.hits["/missing.zip"] == 1
    assert url in str(caught.value) and str(status) in str(caught.value)
    assert not dirs[0].exists()


def test_unreachable_url_says_how_to_use_a_local_copy(dirs: tuple[Path, Path]) -> None:
    url = f"http://127.0.0.1:{closed_port()}/x.zip"

    with pytest.raises(DownloadError) as caught:
        run(url, None, dirs)

    message = str(caught.value)
    assert "Could not reach" in message and url in message
    assert "data.source" in message
    assert "dvc exp run -S data.source=" in message
    assert "make repro DATA=" in message


def test_html_page_is_not_cached_as_an_archive(server: FakeServer, dirs: tuple[Path, Path]) -> None:
    url = server.serve("/a.zip", ("ok", b"<!DOCTYPE html><html>Please log in</html>"))
    with pytest.raises(DownloadError, match="HTML"):
        run(url, None, dirs)
    assert list(dirs[1].iterdir()) == []


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
def test_parent_traversal_member_is_refused(tmp_path: Path, dirs: tuple[Path, Path], kind: str) -> None:
    archive = evil_archive(tmp_path, kind, "chest_xray/../../evil.txt")

    with pytest.raises(UnsafeArchiveError, match="escape"):
        run(archive, None, dirs)

    assert not dirs[0].exists()
    assert not dirs[0].with_name("raw.partial").exists()
    assert [p for p in tmp_path.rglob("evil.txt")] == []


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_absolute_member_is_refused(tmp_path: Path, dirs: tuple[Path, Path], kind: str) -> None:
    target = tmp_path / "outside" / "evil.txt"
    archive = evil_archive(tmp_path, kind, target.as_posix())

    with pytest.raises(UnsafeArchiveError, match="absolute"):
        run(archive, None, dirs)

    assert not target.exists()
    assert not dirs[0].exists()


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
def test_tar_links_and_devices_are_refused(tmp_path: Path, dirs: tuple[Path, Path], link_type: bytes) -> None:
    link = tarfile.TarInfo("chest_xray/train/NORMAL/link.jpeg")
    link.type = link_type
    link.linkname = "/etc/passwd"
    archive = write(tmp_path / "links.tar.gz", tar_bytes(FILES, [link]))

    with pytest.raises(UnsafeArchiveError, match="link, device"):
        run(archive, None, dirs)

    assert not dirs[0].exists()


def test_zip_symlink_is_refused(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
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
        run(archive, None, dirs)

    assert not dirs[0].exists()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_macosx_and_dotfiles_are_skipped(tmp_path: Path, dirs: tuple[Path, Path], kind: str) -> None:
    junk = {
        "__MACOSX/chest_xray/train/NORMAL/._n1.jpeg": b"resource fork",
        "chest_xray/.DS_Store": b"finder",
        "chest_xray/train/NORMAL/._n1.jpeg": b"apple double",
        ".git/config": b"x",
    }
    data = zip_bytes({**FILES, **junk}) if kind == "zip" else tar_bytes({**FILES, **junk})
    archive = write(tmp_path / f"junk.{'zip' if kind == 'zip' else 'tgz'}", data)

    assert_extracted(run(archive, None, dirs))


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_size_limit_refuses_archive(tmp_path: Path, dirs: tuple[Path, Path], kind: str) -> None:
    big = {**FILES, "chest_xray/train/NORMAL/big.jpeg": b"\0" * 10_000}
    archive = write(tmp_path / "big.bin", zip_bytes(big) if kind == "zip" else tar_bytes(big))

    # Refused from the declared sizes, before a byte is written.
    with pytest.raises(UnsafeArchiveError, match=r"declares more than data\.max_extracted_bytes"):
        run(archive, None, dirs, limits=ExtractionLimits(max_bytes=5_000))

    assert not dirs[0].exists()
    # The same archive passes with a limit above its size: the limit, not the archive, decided.
    assert_extracted(run(archive, None, dirs, limits=ExtractionLimits(max_bytes=20_000)), big)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_member_count_limit_refuses_archive(tmp_path: Path, dirs: tuple[Path, Path], kind: str) -> None:
    archive = write(tmp_path / "many.bin", zip_bytes(FILES) if kind == "zip" else tar_bytes(FILES))

    with pytest.raises(UnsafeArchiveError, match="max_members"):
        run(archive, None, dirs, limits=ExtractionLimits(max_members=len(FILES) - 1))

    assert not dirs[0].exists()


def test_copy_member_stops_when_bytes_exceed_the_header() -> None:
    target = io.BytesIO()
    with pytest.raises(UnsafeArchiveError, match="larger than its header"):
        copy_member(io.BytesIO(b"x" * 100), target, declared=10, budget=1_000, name="liar")
    with pytest.raises(UnsafeArchiveError, match="max_extracted_bytes"):
        copy_member(io.BytesIO(b"x" * 100), io.BytesIO(), declared=100, budget=50, name="bomb")
    assert copy_member(io.BytesIO(b"x" * 100), io.BytesIO(), declared=100, budget=100, name="ok") == 100


def test_unknown_archive_type_is_a_clear_error(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    archive = write(tmp_path / "data.rar", b"Rar!\x1a\x07\x00 not supported")
    with pytest.raises(DownloadError, match="not a .zip or .tar.gz"):
        run(archive, None, dirs)
    assert not dirs[0].exists()


def test_corrupt_zip_is_a_clear_error(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    archive = write(tmp_path / "bad.zip", zip_bytes(FILES)[:-30])
    with pytest.raises(DownloadError, match="corrupt"):
        run(archive, None, dirs)
    assert not dirs[0].exists()


# --------------------------------------------------------------------------------------------------
# Local sources and layout


def test_local_zip_with_hash(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    data = zip_bytes(FILES)
    archive = write(tmp_path / "archives" / "ChestXRay2017.zip", data)
    assert_extracted(run(archive, sha(data), dirs))


def test_local_tar_gz_relative_to_root(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    data = tar_bytes(FILES)
    write(tmp_path / "archives" / "chest.tgz", data)
    # Relative paths resolve against `root` (the persistent project root), not the cwd.
    assert_extracted(run("archives/chest.tgz", sha(data), dirs, root=tmp_path))


def test_local_archive_hash_mismatch(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    archive = write(tmp_path / "a.zip", zip_bytes(FILES))
    with pytest.raises(ChecksumError, match="data.sha256"):
        run(archive, "f" * 64, dirs)
    assert not dirs[0].exists()


def test_local_folder_is_copied_without_junk(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    source = tmp_path / "extracted"
    for name, data in FILES.items():
        write(source / name, data)
    write(source / "__MACOSX" / "x", b"junk")
    write(source / "chest_xray" / ".DS_Store", b"junk")

    assert_extracted(run(source, None, dirs))


def test_local_dataset_root_folder_keeps_its_name(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    source = tmp_path / "somewhere"
    for name, data in FILES.items():
        write(source / name, data)

    assert_extracted(run(source / "chest_xray", None, dirs))


def test_missing_local_path_names_the_param(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    with pytest.raises(DownloadError) as caught:
        run("no/such/archive.zip", None, dirs, root=tmp_path)
    assert str(tmp_path / "no/such/archive.zip") in str(caught.value)
    assert "data.source" in str(caught.value)


def test_wrong_layout_is_refused(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    archive = write(
        tmp_path / "other.zip", zip_bytes({"images/cat.jpeg": b"meow", "train/dogs/d.jpeg": b"woof"})
    )

    with pytest.raises(DatasetLayoutError, match=r"train/NORMAL.*PNEUMONIA") as caught:
        run(archive, None, dirs)

    assert "images" in str(caught.value)
    assert not dirs[0].exists()
    assert not dirs[0].with_name("raw.partial").exists()


def test_invalid_sha256_param(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    archive = write(tmp_path / "a.zip", zip_bytes(FILES))
    with pytest.raises(DownloadError, match="data.sha256"):
        run(archive, "not-a-digest", dirs)


def test_stale_output_and_partial_are_replaced(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    out_dir = dirs[0]
    write(out_dir / "old.txt", b"stale")
    write(out_dir.with_name("raw.partial") / "half.txt", b"killed run")
    archive = write(tmp_path / "a.zip", zip_bytes(FILES))

    assert_extracted(run(archive, None, dirs))
    assert not out_dir.with_name("raw.partial").exists()


# --------------------------------------------------------------------------------------------------
# The stage entry point


def test_main_builds_data_raw_from_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = zip_bytes(FILES)
    write(tmp_path / "archives" / "chest.zip", data)
    (tmp_path / "params.yaml").write_text(
        f"seed: 1\ndata:\n  source: archives/chest.zip\n  sha256: '{sha(data)}'\n  max_members: 100\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)

    download.main()

    assert_extracted(tmp_path / "data" / "raw")


def test_main_exits_1_with_message_on_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "params.yaml").write_text("data:\n  source: missing.zip\n  sha256: null\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as caught:
        download.main()

    assert caught.value.code == 1
    assert "data.source" in caplog.text and "missing.zip" in caplog.text
    assert not (tmp_path / "data" / "raw").exists()
