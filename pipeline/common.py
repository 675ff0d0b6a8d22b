"""What every stage shares: logging, git facts, atomic JSON, clean stops on SIGTERM.

Paths live in `pipeline.paths`, params in `pipeline.params`."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from scoring.locations import brief, project_root, unreachable_server
from scoring.logs import setup_logging

__all__ = ["git_commit", "read_json", "setup_logging", "sha256_file", "stage_errors", "write_atomically",
           "write_json"]

log = logging.getLogger(__name__)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit(root: Path | None = None) -> str:
    """The checked-out commit, with '-dirty' when tracked source differs from it; 'unknown' outside git.

    What DVC itself writes while `dvc repro` runs (dvc.lock, the stages' git-tracked outputs such as
    reports/) is not source: a model trained from a clean clone is not dirty because its own run updated
    them."""
    cwd = root or project_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--no-renames"],
            cwd=cwd, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    written = pipeline_outputs(cwd)
    dirty = [line[3:] for line in changed if not _under_any(line[3:].strip('"'), written)]
    return f"{commit}-dirty" if dirty else commit


def pipeline_outputs(root: Path) -> list[str]:
    """dvc.lock and every path dvc.yaml declares as a stage's output or metric (relative to `root`)."""
    try:
        stages = (yaml.safe_load((Path(root) / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return ["dvc.lock"]
    paths = ["dvc.lock"]
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return paths


def _under_any(path: str, folders_or_files: list[str]) -> bool:
    return any(path == item or path.startswith(item.rstrip("/") + "/") for item in folders_or_files)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically, so a killed stage never leaves a half-written file behind."""
    write_atomically(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_atomically(path: Path, data: bytes) -> None:
    """`data` at `path`, or the old file there if the stage is killed on the way: never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
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


@contextmanager
def stage_errors(logger: logging.Logger, *expected: type[BaseException]) -> Iterator[None]:
    """How a stage's `main()` ends on the failures it expects: one clear log line and exit status 1 for
    `expected` (e.g. an unreachable MLflow store) and for an MLflow tracking server that stops answering
    mid-stage, 143 for SIGTERM, never a traceback. Anything else is a bug and keeps its traceback. The
    previous SIGTERM handler is restored on the way out.

        with stage_errors(log, TrackingUnavailableError):
            ...
    """
    previous = raise_on_sigterm()
    try:
        yield
    except Terminated as error:
        logger.error("%s; outputs of this stage are incomplete: run it again", error)
        raise SystemExit(128 + signal.SIGTERM) from None
    except expected as error:  # the server going away is the cause to report, whatever it surfaced as
        logger.error("%s", brief(unreachable_server(error) or error, limit=None))
        raise SystemExit(1) from None
    except Exception as error:
        unreachable = unreachable_server(error)
        if unreachable is None:
            raise
        logger.error("%s", brief(unreachable, limit=None))
        raise SystemExit(1) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
