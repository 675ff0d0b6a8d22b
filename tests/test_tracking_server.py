"""A shared MLflow tracking server (`make mlflow-server`): `dvc repro` logs, registers and promotes there,
the predict CLI and the app load `production` from it, and a server that goes away mid-run costs one
clear line and a non-zero exit within seconds, not a hang or a traceback.

The server runs with a PostgreSQL backend when this machine has Debian's PostgreSQL (its own throwaway
cluster, started here), else with SQLite; artifacts are proxied by the server (`--artifacts-destination`).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.helpers import EXAMPLES, PROJECT, create_project, free_port, project_env, run, update_params

MODEL_NAME = "pneumonia-cnn"
EXPERIMENT = "pneumonia-screening"
SERVER_START_S = 120
# After the server dies: MLflow's client, bounded by scoring/locations.py, gives up in about 3 s per
# call; a few calls (the failing one, ending the run, MLflow's exit handler) and DVC's own exit.
BOUNDED_FAILURE_S = 60


# --------------------------------------------------------------------------------------------------
# A PostgreSQL cluster of its own, when Debian's PostgreSQL is installed


def postgres_binaries() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def as_cluster_owner(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: there, run it as Debian's `postgres` user."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def postgres_usable() -> str | None:
    """Why PostgreSQL cannot back the server here, or None when it can."""
    if postgres_binaries() is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401  (the `postgres` extra)
    except ImportError:
        return "the psycopg driver is not installed (make setup-scale)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a `postgres` user to run the cluster as"
        if shutil.which("runuser") is None:
            return "running as root without runuser"
    return None


@pytest.fixture(scope="module")
def backend_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    problem = postgres_usable()
    if problem is not None:
        print(f"tracking server on SQLite: {problem}")
        yield f"sqlite:///{tmp_path_factory.mktemp('server-db') / 'mlflow.db'}"
        return
    binaries = postgres_binaries()
    folder = Path(tempfile.mkdtemp(prefix="pneumonia-pg-"))  # outside pytest's root-only tmp tree
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    subprocess.run(as_cluster_owner([str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "mlflow",
                                     "-E", "UTF8", "--no-sync"]), check=True, capture_output=True, timeout=120)
    options = f"-k {folder} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(as_cluster_owner([str(binaries / "pg_ctl"), "-D", str(data), "-o", options,
                                     "-l", str(folder / "postgres.log"), "-w", "start"]),
                   check=True, capture_output=True, timeout=120)
    try:
        subprocess.run([str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(as_cluster_owner([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The server, started as a user starts it: `make mlflow-server`


class Server:
    def __init__(self, process: subprocess.Popen, url: str, artifacts: Path, log: Path) -> None:
        self.process, self.url, self.artifacts, self.log = process, url, artifacts, log

    def api(self, method: str, endpoint: str, **kwargs) -> dict:
        response = requests.request(method, f"{self.url}/api/2.0/mlflow/{endpoint}", timeout=10, **kwargs)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        """The whole process group (make, mlflow, uvicorn), as a crash or `kill` of the host would."""
        if self.process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=15)
                return
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def server(backend_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("server")
    port, log = free_port(), folder / "server.log"
    # `-o setup`: the test environment is set up already; the target itself is what is under test.
    command = ["make", "-s", "-o", "setup", "mlflow-server", f"MLFLOW_PORT={port}",
               f"MLFLOW_SERVER_DIR={folder}", f"MLFLOW_BACKEND={backend_uri}",
               f"MLFLOW_ARTIFACTS={folder / 'artifacts'}"]
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=PROJECT, env=project_env(), stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    running = Server(process, f"http://127.0.0.1:{port}", folder / "artifacts", log)
    deadline = time.monotonic() + SERVER_START_S
    try:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the tracking server exited {process.returncode}:\n{log.read_text()}")
            try:
                if requests.get(f"{running.url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no tracking server after {SERVER_START_S} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def served_project(server: Server, tmp_path_factory: pytest.TempPathFactory,
                   fixture_zip: Path) -> tuple[Path, dict[str, str]]:
    """A project reproduced with MLFLOW_TRACKING_URI pointing at the server."""
    root = tmp_path_factory.mktemp("served") / "project"
    create_project(root, fixture_zip)
    env = project_env(MLFLOW_TRACKING_URI=server.url)
    run(["git", "clean", "-fdXq"], root, env)  # a clean checkout: nothing git-ignored
    run(["dvc", "repro"], root, env)
    return root, env


# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_repro_logs_registers_and_promotes_on_the_server_and_serving_loads_production_from_it(
        served_project, server: Server, monkeypatch: pytest.MonkeyPatch):
    root, env = served_project
    alias = server.api("GET", "registered-models/alias", params={"name": MODEL_NAME, "alias": "production"})
    assert alias["model_version"]["version"] == "1"
    experiment = server.api("GET", "experiments/get-by-name", params={"experiment_name": EXPERIMENT})["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:"), "artifacts are not proxied"
    runs = server.api("POST", "runs/search", json={"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert any(r["info"]["status"] == "FINISHED" for r in runs)
    # Everything went to the server: no local store in the project, the files under the server's folder.
    assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists()
    assert any(p.name == "model.onnx" for p in server.artifacts.rglob("*"))

    # The predict CLI, on the production alias, through the server.
    result = run(["python", "-m", "pipeline.predict", str(EXAMPLES[0])], root, env)
    assert "version 1" in result.stderr and result.stdout.splitlines()[1].split(",")[2] in ("NORMAL", "PNEUMONIA")

    # The app's model service, on models:/pneumonia-cnn@production, through the server.
    import mlflow

    import app

    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # set by configure_tracking; undone after the test
    try:
        service = app.ModelService(f"models:/{MODEL_NAME}@production").load()
        assert service.ready, service.problem
        assert (service.predictor.decision.model_name, service.predictor.decision.model_version) == (MODEL_NAME, "1")
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.slow
def test_a_server_that_goes_away_mid_training_is_one_clear_line_and_a_prompt_failure(
        served_project, server: Server):
    """Runs last in this module: it kills the module's server."""
    root, env = served_project
    update_params(root, train={"epochs": 3})  # the train stage runs again, long enough to be caught running
    experiment = server.api("GET", "experiments/get-by-name", params={"experiment_name": EXPERIMENT})["experiment"]
    before = {r["info"]["run_id"] for r in server.api(
        "POST", "runs/search", json={"experiment_ids": [experiment["experiment_id"]]})["runs"]}
    output = root / "repro.log"
    with output.open("wb") as handle:
        repro = subprocess.Popen(["dvc", "repro", "train"], cwd=root, env=env, stdout=handle,
                                 stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:  # wait for the train stage's run to be RUNNING on the server, then kill the server
            assert repro.poll() is None, f"train ended before the server could be stopped:\n{output.read_text()}"
            assert time.monotonic() < deadline, f"no training run appeared:\n{output.read_text()}"
            runs = server.api("POST", "runs/search", json={
                "experiment_ids": [experiment["experiment_id"]], "filter": "attributes.status = 'RUNNING'"})
            if any(r["info"]["run_id"] not in before for r in runs.get("runs", [])):
                break
            time.sleep(0.2)
        server.stop()
        killed = time.monotonic()
        repro.wait(timeout=BOUNDED_FAILURE_S * 3)
        took = time.monotonic() - killed
    finally:
        if repro.poll() is None:
            repro.kill()
    text = output.read_text()
    assert repro.returncode != 0, text
    assert took < BOUNDED_FAILURE_S, f"{took:.0f} s from the server's death to the failure:\n{text}"
    assert "Traceback" not in text, text
    # The stage's own log lines ("<time> ERROR <logger>: ..."), not DVC's "ERROR: failed to reproduce ...".
    stage_errors = [line for line in text.splitlines() if re.search(r"\d ERROR \S+: ", line)]
    assert len(stage_errors) == 1, text
    assert f"MLflow tracking server {server.url} stopped answering" in stage_errors[0]
    assert "Retrying" not in text  # urllib3's per-retry warnings stay quiet


# --------------------------------------------------------------------------------------------------
# The client side, without a server: bounded retries, and what counts as "the server went away"


HTTP_BOUNDS = ["MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT"]


def test_an_http_tracking_uri_bounds_mlflows_retries_unless_the_user_set_them(monkeypatch):
    from scoring.locations import HTTP_CLIENT_BOUNDS, bound_http_client

    for name in HTTP_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    bound_http_client("sqlite:///somewhere/mlflow.db")
    assert not any(name in os.environ for name in HTTP_BOUNDS)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")
    bound_http_client("https://mlflow.example.org")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "600"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_CLIENT_BOUNDS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    retries, backoff = (int(os.environ[n]) for n in HTTP_BOUNDS[:2])
    assert retries <= 3 and backoff <= 2  # seconds of retrying, not MLflow's default minutes


def failed_call(cause: requests.RequestException, url: str = "http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch"):
    """An MlflowException as MLflow's REST client raises it: while handling the HTTP library's error."""
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise cause
        except requests.RequestException as error:
            raise MlflowException(f"API request to {url} failed with exception {error}")
    except MlflowException as raised:
        return raised


def test_a_refused_or_dropped_connection_is_an_unreachable_server_and_other_errors_are_not(monkeypatch):
    from mlflow.exceptions import MlflowException

    from scoring.locations import TrackingUnavailableError, unreachable_server

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    refused = requests.ConnectionError(
        "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: /api (Caused by "
        "NewConnectionError('Failed to establish a new connection: [Errno 111] Connection refused'))")
    found = unreachable_server(failed_call(refused))
    assert isinstance(found, TrackingUnavailableError)
    assert "http://127.0.0.1:5000 stopped answering (connection refused)" in str(found)
    dropped = requests.ConnectionError("('Connection aborted.', RemoteDisconnected('Remote end closed connection'))")
    assert "connection dropped" in str(unreachable_server(failed_call(dropped)))
    assert unreachable_server(refused) is not None  # the HTTP library's own error, unwrapped
    # The server answered: a missing model is not an outage.
    assert unreachable_server(MlflowException("RESOURCE_DOES_NOT_EXIST: Registered Model not found")) is None
    assert unreachable_server(ValueError("Connection refused by the user")) is None


def test_a_stage_that_loses_the_server_ends_with_one_line_and_status_1(caplog):
    import logging

    from pipeline.common import stage_errors

    logger = logging.getLogger("stage-under-test")
    refused = requests.ConnectionError("Max retries exceeded (Caused by NewConnectionError('Connection refused'))")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stopped, stage_errors(logger):
        raise failed_call(refused)
    assert stopped.value.code == 1
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert "stopped answering" in caplog.records[0].getMessage()
    with pytest.raises(KeyError), stage_errors(logger):  # anything else is a bug: its traceback stays
        raise KeyError("not an outage")
