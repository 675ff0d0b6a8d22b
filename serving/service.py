"""The model the app serves: loaded once, shared by the server page, the REST route and the on-device page.

`Served` is what those clients need of it (a typed protocol: anything with `ready`, `predictor` and
`problem`, such as a stand-in in a test); `ModelService` is the app's own, which loads the artefact behind a
URI on first use and never raises.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Protocol

from scoring.runtime import Predictor
from scoring.store import (
    ModelUnavailableError,
    PendingArtefact,
    TrackingUnavailableError,
    load_artefact,
    production_uri,
)

log = logging.getLogger(__name__)


class Served(Protocol):
    """A model to score with, as the app's clients see it."""

    @property
    def ready(self) -> bool:
        """Whether `predictor` is there (may load the model on first use)."""
        ...

    @property
    def predictor(self) -> Predictor | None: ...

    @property
    def problem(self) -> str | None:
        """Why there is no predictor, in one sentence with its remedy."""
        ...


class ModelService:
    """The model the app serves, loaded once (on first use, or by `load()` before launch).

    Never raises: a failure to load leaves `problem` saying why, which the page shows.
    """

    def __init__(self, uri: str | None, prefetch: PendingArtefact | None = None) -> None:
        self.uri = uri
        self.prefetch = prefetch  # the same URI, already being resolved by a helper process
        self.predictor: Predictor | None = None
        self.problem: str | None = None
        self._loaded = False
        self._lock = threading.Lock()

    def load(self) -> ModelService:
        with self._lock:
            if not self._loaded:
                self._load()
                self._loaded = True
        return self

    @property
    def ready(self) -> bool:
        return self.load().predictor is not None

    @property
    def source(self) -> str:
        """Where the served model came from, as the page names it: a registry URI, or an exported folder's
        name (never a server path)."""
        uri = self.uri or production_uri()
        return uri if uri.startswith("models:/") else f"exported folder {Path(uri).name or uri}"

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.predictor = Predictor(self.prefetch.load() if self.prefetch else load_artefact(self.uri))
        except (ModelUnavailableError, TrackingUnavailableError) as error:
            log.warning("no model to serve: %s", error)
            self.problem = str(error)
            return
        except Exception as error:  # a broken store or model must not stop the page from explaining itself
            log.exception("the model at %s could not be loaded", self.uri)
            self.problem = f"the model at {self.uri or 'the production alias'} could not be loaded: {error}"
            return
        log.info("serving %s version %s (threshold %.4f), loaded in %.2f s", self.predictor.decision.model_name,
                 self.predictor.decision.model_version, self.predictor.threshold, time.perf_counter() - started)
