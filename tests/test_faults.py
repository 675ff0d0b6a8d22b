"""Faults, with real processes and the real DVC and MLflow: what a killed download or training run, a
registry whose files are gone, two `dvc repro` at once and an unreachable MLflow server leave behind.

Each test checks that the failure is clean (a clear message, no traceback, a telling exit status) and
that nothing half-made is kept or used afterwards: no partial archive, no half-written or registered
model, no run left RUNNING, no corrupted store.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Self

import pytest
import yaml

from pipeline.download import cache_file_name
from scoring.locations import MODEL_NAME, PRODUCTION_ALIAS
from scoring.store import ModelUnavailableError
from serving import results as app_results
from tests.helpers import (
    PROJECT,
    create_project,
    peek_rows,
    project_env,
    registry_rows,
    run,
    update_params,
    write_tiny_bundle,
)

pytestmark = pytest.mark.slow  # real processes: `dvc repro`, training, servers
# An unreachable store must end a stage in seconds, not after MLflow's own HTTP retries (about 250 s) or
# after loading data and training. Measured beyond the imports (TensorFlow alone takes 3-12 s on this
# shared 2-core machine, depending on what else runs), and capped in total.
FAST_FAIL_S = 15.0
FAST_FAIL_TOTAL_S = 60.0
TRAIN_RUNS = ("select r.run_uuid, r.status, count(m.key) from runs r left join metrics m "
              "on m.run_uuid = r.run_uuid where r.name = 'train' group by r.run_uuid")


# --------------------------------------------------------------------------------------------------
# Helpers


def stage_env(**extra: str) -> dict[str, str]:
    """For `python -m pipeline.<stage>` outside a project copy: this checkout's package on the path."""
    return project_env(PYTHONPATH=str(PROJECT), **extra)


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None,
             log: Path | None = None, interval: float = 0.2):
    """Poll `condition` until it returns something truthy; fail (showing the log) on timeout or if
    `process` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            break
        time.sleep(interval)
    output = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
    state = "ended" if process is not None and process.poll() is not None else "timed out"
    raise AssertionError(f"{state} waiting for {what}\n{output}")


def stop_group(process: subprocess.Popen, grace: float = 60.0) -> bool:
    """SIGTERM a process group (the leader was started with start_new_session=True), wait for every
    member to exit, SIGKILL what is left after `grace` seconds. True when SIGTERM alone was enough."""
    pgid = process.pid
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)  # the leader is reaped by wait(): this sees only the other members
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    process.wait(timeout=30)
    return False


def import_seconds(stderr: str) -> float:
    """Seconds a `python -X importtime` process spent importing: the top-level imports' cumulative times."""
    total = 0
    for line in stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if line.startswith("import time:") and len(fields) == 3 and fields[1].strip().isdigit() \
                and not fields[2].startswith("  "):  # nested imports are indented: already counted
            total += int(fields[1])
    return total / 1e6


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def assert_clean_failure(result: subprocess.CompletedProcess, status: int, *fragments: str) -> None:
    """Exit `status`, no traceback, and exactly one ERROR log line holding every fragment."""
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == status, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    errors = error_lines(result.stderr)
    assert len(errors) == 1, shown
    for fragment in fragments:
        assert fragment in errors[0], shown


@pytest.fixture
def fresh_project(tmp_path: Path, fixture_zip: Path) -> tuple[Path, dict[str, str]]:
    """A committed git + DVC copy of the project with tiny params; nothing reproduced yet."""
    root = tmp_path / "project"
    return root, create_project(root, fixture_zip)


# --------------------------------------------------------------------------------------------------
# 1. Download killed mid-transfer


class SlowArchiveServer:
    """Serves one archive on 127.0.0.1. The first GET sends a corrupted copy slowly (time to kill the
    client mid-transfer); later GETs send the real bytes at once. A client that resumed from or reused
    its partial file would end up with bytes that fail the sha256 check."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.requests: list[dict[str, str]] = []
        self.bytes_sent_first = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(dict(self.headers))
                first = len(server.requests) == 1
                body = bytes(b ^ 0xFF for b in server.body) if first else server.body
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if not first:
                        self.wfile.write(body)
                        return
                    for start in range(0, len(body), 4096):
                        self.wfile.write(body[start:start + 4096])
                        self.wfile.flush()
                        server.bytes_sent_first = min(start + 4096, len(body))
                        time.sleep(0.1)  # ~8 s for the fixture archive
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed: expected

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/archive/chest-xray.zip"

    def __enter__(self) -> Self:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_killed_mid_transfer_leaves_no_archive_and_rerun_verifies(tmp_path, fixture_zip):
    archive = fixture_zip.read_bytes()
    digest = hashlib.sha256(archive).hexdigest()
    with SlowArchiveServer(archive) as server:
        params = yaml.safe_load((PROJECT / "params.yaml").read_text())  # every section is required
        params["data"] = {"source": server.url, "sha256": digest, "external": None}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        cache = tmp_path / "data" / "downloads"
        final = cache / cache_file_name(server.url)
        partial = final.with_name(final.name + ".partial")
        command = [sys.executable, "-m", "pipeline.download"]
        log = tmp_path / "first.log"
        with log.open("w") as handle:
            first = subprocess.Popen(command, cwd=tmp_path, env=stage_env(), stdout=handle,
                                     stderr=subprocess.STDOUT)
        try:
            # Streaming into the .partial file, a quarter of the body sent (the client may buffer it).
            wait_for(lambda: partial.is_file() and server.bytes_sent_first > len(archive) // 4, 60,
                     "a quarter of the transfer", first, log, interval=0.05)
        finally:
            first.kill()  # SIGKILL: no handler, no cleanup runs
            first.wait(timeout=30)
        assert first.returncode == -signal.SIGKILL
        assert len(server.requests) == 1
        assert server.bytes_sent_first < len(archive), "the transfer finished before the kill"
        if partial.exists():  # may be left behind by SIGKILL, never complete
            assert partial.stat().st_size < len(archive)
        assert not final.exists(), "a killed transfer must not leave a cached archive"
        assert not (tmp_path / "data" / "raw").exists(), "nothing may be extracted from a partial archive"

        second = run(command, tmp_path, stage_env(), timeout=120)
        assert len(server.requests) == 2, "the rerun must fetch the archive again"
        assert "Range" not in server.requests[1], "resuming from the partial file is not supported"

    assert "sha256 verified" in second.stderr, second.stderr
    assert hashlib.sha256(final.read_bytes()).hexdigest() == digest
    assert not partial.exists()
    assert sorted(p.name for p in (tmp_path / "data" / "raw").iterdir()) == ["archive"]  # no .partial left
    extracted = sorted(p.name for p in (tmp_path / "data" / "raw" / "archive").rglob("*.jpeg"))
    assert extracted == sorted(p.name for p in (PROJECT / "tests/fixtures").rglob("*.jpeg"))


# --------------------------------------------------------------------------------------------------
# 2. Training killed mid-run


def test_training_killed_mid_run_registers_nothing_and_repro_recovers(fresh_project, tmp_path):
    root, env = fresh_project
    update_params(root, train={"epochs": 200, "patience": 200})  # far longer than the test waits
    log = tmp_path / "killed-repro.log"
    with log.open("w") as handle:
        repro = subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        # Mid-fit: the train run exists and has logged at least one epoch.
        wait_for(lambda: [r for r in peek_rows(root, TRAIN_RUNS) if r[2] > 0], 240, "a training epoch",
                 repro, log)
    finally:
        terminated_cleanly = stop_group(repro)
    output = log.read_text(errors="replace")
    assert terminated_cleanly, f"training did not stop on SIGTERM\n{output[-3000:]}"
    assert repro.returncode != 0

    train_runs = registry_rows(root, "select run_uuid, status from runs where name = 'train'")
    assert len(train_runs) == 1 and train_runs[0][1] == "KILLED", (train_runs, output[-3000:])  # not RUNNING
    killed_run = train_runs[0][0]
    assert "stopped by signal SIGTERM" in output and "Traceback" not in output, output[-3000:]
    assert registry_rows(root, "select name, version from model_versions") == []
    assert registry_rows(root, "select name from registered_models") == []
    models = root / "models"
    assert not (models / "model.keras").exists(), "train was killed before it finished: no model may be there"
    assert not list(models.glob("partial-*")), "a half-written model was left behind"
    for later in ("serving.onnx", "registered", "registration.json"):
        assert not (models / later).exists(), f"a stage after train ran: {later}"

    update_params(root, train={"epochs": 1, "patience": 1})
    recovered = run(["dvc", "repro"], root, env)
    assert "Running stage 'train'" in recovered.stdout, recovered.stdout
    # Download and preprocess finished before the kill and were recorded: not run again.
    assert "Running stage 'preprocess'" not in recovered.stdout, recovered.stdout
    assert registry_rows(root, "select name, alias, version from registered_model_aliases") == [
        (MODEL_NAME, PRODUCTION_ALIAS, 1)]
    assert json.loads((root / "models/registration.json").read_text())["promoted"] is True
    versions = registry_rows(root, "select version, run_id from model_versions")
    assert len(versions) == 1 and versions[0][1] != killed_run
    assert dict(registry_rows(root, "select run_uuid, status from runs where name = 'train'")) == {
        killed_run: "KILLED", versions[0][1]: "FINISHED"}
    dvc_status = run(["dvc", "status"], root, env)
    assert "up to date" in dvc_status.stdout, dvc_status.stdout


# --------------------------------------------------------------------------------------------------
# 3. The production version's files are missing or corrupt


def register_tiny_pyfunc(store: Path) -> None:
    """A tiny model registered in the current MLflow store (in `store`) as the register stage registers
    one (the pyfunc around the serving artefact, logged as code), with the production alias."""
    import mlflow

    from pipeline.registry import ensure_experiment
    from scoring.pyfunc import ARTEFACT_KEY, SIGNATURE

    bundle = write_tiny_bundle(store.parent / "source", model_name=MODEL_NAME, model_version="1")
    with mlflow.start_run(experiment_id=ensure_experiment()):
        info = mlflow.pyfunc.log_model(
            name="serving-model", python_model=str(PROJECT / "scoring" / "pyfunc_model.py"),
            artifacts={ARTEFACT_KEY: str(bundle / "model.onnx")}, code_paths=[str(PROJECT / "scoring")],
            signature=SIGNATURE, pip_requirements=["onnxruntime"])  # given: inferring them is slow
    version = mlflow.register_model(info.model_uri, MODEL_NAME)
    mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, PRODUCTION_ALIAS, version.version)


DAMAGE = {"missing": "serving artefact", "truncated": "missing or corrupt"}  # what the message says


@pytest.fixture
def broken_store(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """A temporary store whose production version's serving artefact was deleted or truncated on disk.
    Yields (the store's tracking URI, also set as MLFLOW_TRACKING_URI for this test; what the damage is
    called in the error message)."""
    import mlflow

    from scoring.store import artefact_path

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{(store / 'mlflow.db').as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # MLflow sets it: restored afterwards
    monkeypatch.delenv("PNEUMONIA_MODEL_URI", raising=False)
    register_tiny_pyfunc(store)

    stored = artefact_path(f"models:/{MODEL_NAME}@{PRODUCTION_ALIAS}")
    assert stored.is_relative_to(store / "mlruns") and stored.name == "model.onnx", stored
    assert list((store / "mlruns").rglob("model.onnx")) == [stored]  # the one copy: not a download
    if request.param == "missing":
        stored.unlink()
    else:  # half-written: the first half of a valid file
        data = stored.read_bytes()
        stored.write_bytes(data[: len(data) // 2])
    yield uri, DAMAGE[request.param]
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.mark.parametrize("broken_store", list(DAMAGE), indirect=True)
def test_production_model_files_missing_or_corrupt(broken_store, app_module: ModuleType, tmp_path,
                                                    fixture_images):
    uri, damage = broken_store
    production = f"models:/{MODEL_NAME}@{PRODUCTION_ALIAS}"
    service = app_module.ModelService(None).load()  # None: the production alias, as `python app.py` does
    assert not service.ready and service.predictor is None
    problem = service.problem
    # Which model, what is wrong with its files, and what to do: on one line.
    assert problem and production in problem and damage in problem and "make repro" in problem, problem
    assert "Traceback" not in problem and "\n" not in problem, problem
    assert problem in app_results.no_model_message(service)
    assert problem in app_results.model_panel(service)
    assert app_module.create_demo(service) is not None  # the page still comes up, saying why
    with pytest.raises(ModelUnavailableError, match="make repro"):
        app_results.predict_files([str(fixture_images[0])], service)

    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline.predict", str(fixture_images[0])], cwd=tmp_path,
                            env=stage_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
                            timeout=180, check=False)
    assert_clean_failure(result, 2, production, damage, "make repro")
    assert result.stdout == ""  # no CSV header for nothing scored
    assert time.monotonic() - started < 120


# --------------------------------------------------------------------------------------------------
# 4. Two `dvc repro` at once


def test_second_concurrent_repro_is_refused_and_first_completes(fresh_project, tmp_path):
    root, env = fresh_project
    log = tmp_path / "first-repro.log"
    with log.open("w") as handle:
        first = subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        wait_for(lambda: "Running stage 'train'" in log.read_text(errors="replace"), 240, "the train stage",
                 first, log)
        second = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True,
                                timeout=120, check=False)
        first.wait(timeout=480)
    finally:
        if first.poll() is None:
            stop_group(first, grace=10)
    output = log.read_text(errors="replace")
    refusal = second.stdout + second.stderr
    assert second.returncode != 0, refusal
    assert "lock" in refusal.lower() or "is busy" in refusal, refusal
    assert "Traceback" not in refusal, refusal
    assert first.returncode == 0, output[-4000:]

    dvc_status = run(["dvc", "status"], root, env)
    assert "up to date" in dvc_status.stdout, dvc_status.stdout
    assert registry_rows(root, "select name, version, status from model_versions") == [(MODEL_NAME, 1, "READY")]
    assert registry_rows(root, "select alias, version from registered_model_aliases") == [(PRODUCTION_ALIAS, 1)]
    assert {status for (status,) in registry_rows(root, "select status from runs")} == {"FINISHED"}
    assert json.loads((root / "models/registration.json").read_text())["version"] in ("1", 1)
    assert (root / "models/registered/model.onnx").is_file()


# --------------------------------------------------------------------------------------------------
# 5. MLflow server unreachable


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("command", [
    ["-m", "pipeline.train"],
    ["-m", "pipeline.evaluate"],
    ["-m", "pipeline.register"],
    ["-m", "pipeline.predict", "FIXTURE_IMAGE"],
    ["-m", "pipeline.export", "DEST"],
], ids=["train", "evaluate", "register", "predict", "export"])
def test_unreachable_tracking_server_fails_fast_and_clearly(command, closed_port, tmp_path, fixture_images):
    # A folder with only params.yaml: stages must give up on the store before needing data or a model.
    (tmp_path / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    uri = f"http://127.0.0.1:{closed_port}"
    arguments = {"FIXTURE_IMAGE": str(fixture_images[0]), "DEST": str(tmp_path / "exported")}
    argv = [sys.executable, "-X", "importtime", *[arguments.get(part, part) for part in command]]
    started = time.monotonic()
    result = subprocess.run(argv, cwd=tmp_path, env=stage_env(MLFLOW_TRACKING_URI=uri), capture_output=True,
                            text=True, timeout=300, check=False)
    elapsed = time.monotonic() - started
    imports = import_seconds(result.stderr)
    tool = command[1] in ("pipeline.predict", "pipeline.export")  # tools exit 2 without a model; stages 1
    assert_clean_failure(result, 2 if tool else 1, f"MLflow tracking server {uri} is unreachable",
                         "MLFLOW_TRACKING_URI")
    took = f"{' '.join(command)} took {elapsed:.1f} s to fail, {imports:.1f} s of it importing"
    assert 0 < imports < elapsed, took
    assert elapsed - imports < FAST_FAIL_S and elapsed < FAST_FAIL_TOTAL_S, took
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no store, data or export made


def test_app_with_an_unreachable_tracking_server_says_so(app_module: ModuleType, closed_port, monkeypatch):
    uri = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    service = app_module.ModelService(f"models:/{MODEL_NAME}@{PRODUCTION_ALIAS}").load()
    assert time.monotonic() - started < FAST_FAIL_S
    assert not service.ready
    assert f"MLflow tracking server {uri} is unreachable" in service.problem, service.problem
    assert service.problem in app_results.no_model_message(service)
