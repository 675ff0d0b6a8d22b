"""What every stage shares: project paths, params, seeding, logging, git facts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml

PARAMS_FILE = "params.yaml"
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
DEFAULT_MODEL_NAME = "pneumonia-cnn"

# Paths are relative to the project root (DVC runs every stage from there).
RAW_DIR = Path("data/raw")
DOWNLOAD_DIR = Path("data/downloads")
PREPARED_DIR = Path("data/prepared")
MODEL_DIR = Path("models")
REPORTS_DIR = Path("reports")

# `dvc exp run --temp` and queued experiments run in a copy under this folder of the real project.
_DVC_TEMP_WORKSPACE = (".dvc", "tmp", "exps")

log = logging.getLogger(__name__)


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding params.yaml; cwd if none does."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder
    return here


def persistent_root(start: Path | None = None) -> Path:
    """The real project folder, even from inside a DVC temporary experiment workspace.

    Anything that must outlive the run (the MLflow store, the download cache) belongs here, or a
    `dvc exp run --temp` would write it into a workspace that is deleted afterwards.
    """
    root = project_root(start)
    parts = root.parts
    marker_len = len(_DVC_TEMP_WORKSPACE)
    for index in range(len(parts) - marker_len):
        if parts[index : index + marker_len] == _DVC_TEMP_WORKSPACE:
            return Path(*parts[:index])
    return root


def load_params(root: Path | None = None) -> dict[str, Any]:
    path = (root or project_root()) / PARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run from the project folder")
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def stage_params(section: str, root: Path | None = None) -> dict[str, Any]:
    """One stage's own params.yaml section, plus the project-wide `seed`."""
    params = load_params(root)
    if section not in params:
        raise KeyError(f"params.yaml has no '{section}' section")
    own = dict(params[section] or {})
    own.setdefault("seed", params.get("seed", 0))
    return own


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and (if imported) TensorFlow/Keras from the one project seed."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit(root: Path | None = None) -> str:
    """The checked-out commit, with '-dirty' when tracked files differ from it; 'unknown' outside git."""
    cwd = root or project_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically, so a killed stage never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    partial.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class Terminated(KeyboardInterrupt):
    """SIGTERM (as sent by `kill`, or to a stopped `dvc repro`'s process group), raised in the main thread.

    A KeyboardInterrupt, so `except Exception` never swallows it, while `with` blocks and `finally` clauses
    still run: an MLflow run is ended instead of being left RUNNING, partial files are removed.
    """


def raise_on_sigterm() -> Any:
    """Turn the first SIGTERM into `Terminated`; a second one kills the process at once, as by default.

    Returns the previous handler (None outside the main thread, where handlers cannot be set).
    """

    def handler(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def one_line(error: BaseException) -> str:
    """An error's message on one line (library messages often span several), for a log line."""
    return " ".join(str(error).split()) or type(error).__name__


@contextmanager
def stage_errors(logger: logging.Logger, *expected: type[BaseException]) -> Iterator[None]:
    """How a stage's `main()` ends on the failures it expects: one clear log line and exit status 1 for
    `expected` (e.g. an unreachable MLflow store), 143 for SIGTERM, never a traceback. Anything else is
    a bug and keeps its traceback. The previous SIGTERM handler is restored on the way out.

        with stage_errors(log, TrackingUnavailableError):
            ...
    """
    previous = raise_on_sigterm()
    try:
        yield
    except Terminated as error:
        logger.error("%s; outputs of this stage are incomplete: run it again", error)
        raise SystemExit(128 + signal.SIGTERM) from None
    except expected as error:
        logger.error("%s", one_line(error))
        raise SystemExit(1) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
