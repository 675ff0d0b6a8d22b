"""The serving artefact in ONNX Runtime, and the one prediction path every way of serving shares.

`Predictor` turns file bytes into a `Prediction`: decode (`scoring.imaging`), refuse what is not
plausibly a chest X-ray (`scoring.checks`), put a turned or mirrored X-ray back upright (the artefact's
orientation output), score, and label and triage at the artefact's own thresholds. The app,
the predict CLI, the MLflow pyfunc (and through it `mlflow models serve` and Spark) all call it, so they
accept, refuse and label the same files the same way. No TensorFlow anywhere on this path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scoring import checks
from scoring.decision import (
    CAM_OUTPUT,
    INPUT_NAME,
    OOD_OUTPUT,
    ORIENTATION_OUTPUT,
    PROBABILITY_OUTPUT,
    VIRAL_OUTPUT,
    Decision,
    DecisionError,
    read,
)
from scoring.imaging import ImageDecodeError, decode_greyscale, read_bytes, resize_grey
from scoring.orientation import ORIENTATIONS, UPRIGHT, upright
from scoring.pixels import MAX_FILE_BYTES

BATCH_SIZE = 64
# Images per network run: a batch is run in slices of this many. Measured with the EfficientNet-Lite0
# artefact on 2 cores: 4.3 ms an image alone, 4.1-4.2 ms in runs of 2-4, 5.1 ms in runs of 16 and 5.7 ms in
# runs of 64 (larger runs' activations leave the caches).
RUN_SIZE = 4
# One prediction record, in this order and under these names, for every client: the predict CLI's columns
# after `path` (its first four, `path, probability_pneumonia, label, error`, are how models are evaluated
# from outside), the MLflow pyfunc's and Spark's columns, and per file in the JSON of the REST route, the
# app's API and the on-device page (`answer`, with the file's `name`). `ood_score`: the input gate's score,
# where it ran (also for an image it refused), never shown on a page.
RECORD_FIELDS = ("probability_pneumonia", "label", "error", "triage", "subtype", "probability_viral", "note",
                 "ood_score")
# The note on a turned or mirrored X-ray put back upright before scoring (the browser page reads it from here).
UPRIGHT_NOTE = "the image was {orientation}; it was put back upright before scoring"
RECORD_TYPES = {"probability_pneumonia": "double", "label": "string", "error": "string", "triage": "string",
                "subtype": "string", "probability_viral": "double", "note": "string", "ood_score": "double"}


class ArtefactLoadError(RuntimeError):
    """The artefact's bytes are not a usable serving model."""


class ServingArtefact:
    """The ONNX graph (calibrated probability and CAM per image) and the decision it carries.

    It keeps the exact bytes it was built from (`onnx_bytes`) and their `sha256`: what the on-device page
    sends to the browser is then the very model the server scores with, however it was loaded (a file, or a
    registry download whose scratch folder is gone by the time anyone asks)."""

    def __init__(self, onnx_model: bytes, source: str = "") -> None:
        import onnxruntime

        # ONNX Runtime ships with usage telemetry compiled in: a medical demo sends nothing anywhere.
        onnxruntime.disable_telemetry_events()
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        # Threads that wait do not spin: every client runs the network beside other work (HTTP, decoding,
        # Gradio), which spinning threads starve. Measured (benchmarks/rest_benchmark.py, 3,000 requests):
        # the REST endpoint 158 -> 172 images/s, one image alone 4.1 -> 5.1 ms.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = onnxruntime.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
            self.decision: Decision = read(self._session.get_modelmeta().custom_metadata_map)
        except DecisionError as error:
            raise ArtefactLoadError(f"{source or 'the model'}: {error}") from error
        except Exception as error:  # onnxruntime reports a corrupt graph as several exception types
            raise ArtefactLoadError(f"{source or 'the model'} is not a readable ONNX model: {error}") from error
        outputs = {output.name for output in self._session.get_outputs()}
        needed = ({PROBABILITY_OUTPUT, CAM_OUTPUT, VIRAL_OUTPUT, ORIENTATION_OUTPUT}
                  | ({OOD_OUTPUT} if self.decision.ood else set()))
        if not needed <= outputs:
            raise ArtefactLoadError(f"{source or 'the model'} lacks the outputs {sorted(needed - outputs)}")
        self.source = source
        self.onnx_bytes = bytes(onnx_model)
        self.sha256 = hashlib.sha256(self.onnx_bytes).hexdigest()

    @classmethod
    def from_file(cls, path: Path) -> ServingArtefact:
        return cls(Path(path).read_bytes(), str(path))

    @property
    def input_size(self) -> int:
        return self.decision.input_size

    def run(self, images: np.ndarray, with_cam: bool = False) -> Scores:
        """Scores of uint8 images N x S x S at the input size: calibrated probabilities (of pneumonia, and
        of a viral one), orientation probabilities, the gate's out-of-distribution scores (when the artefact
        has a gate) and, if asked, the CAMs."""
        if len(images) == 0:
            empty = np.zeros(0, dtype=np.float32)
            return Scores(empty, None, None, empty, np.zeros((0, len(ORIENTATIONS)), dtype=np.float32))
        batch = np.asarray(images, dtype=np.float32)[..., np.newaxis]
        wanted = ([PROBABILITY_OUTPUT, VIRAL_OUTPUT, ORIENTATION_OUTPUT] + ([OOD_OUTPUT] if self.decision.ood else [])
                  + ([CAM_OUTPUT] if with_cam else []))
        runs = [self._session.run(wanted, {INPUT_NAME: batch[start:start + RUN_SIZE]})
                for start in range(0, len(batch), RUN_SIZE)]
        results = {name: np.concatenate([outputs[index] for outputs in runs]) for index, name in enumerate(wanted)}
        return Scores(results[PROBABILITY_OUTPUT].reshape(-1), results.get(CAM_OUTPUT), results.get(OOD_OUTPUT),
                      results[VIRAL_OUTPUT].reshape(-1), results[ORIENTATION_OUTPUT])

    def probabilities(self, images: Sequence[np.ndarray], batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Calibrated probability per uint8 greyscale image of any size (resized as the model expects)."""
        return self.scores(images, batch_size).probability

    def scores(self, images: Sequence[np.ndarray], batch_size: int = BATCH_SIZE) -> Scores:
        """`run` over uint8 greyscale images of any size, in batches (no CAMs)."""
        parts = [self.run(np.stack([resize_grey(image, self.input_size) for image in images[start:start + batch_size]]))
                 for start in range(0, len(images), batch_size)]
        if not parts:
            return self.run(np.zeros((0, self.input_size, self.input_size), dtype=np.uint8))
        ood = None if parts[0].ood is None else np.concatenate([part.ood for part in parts])
        return Scores(np.concatenate([part.probability for part in parts]), None, ood,
                      np.concatenate([part.viral for part in parts]), np.concatenate([part.orientation for part in parts]))


@dataclass(frozen=True)
class Scores:
    """What the graph gives for a batch: probabilities N, CAMs N x h x w (on request), OOD scores N (if gated),
    probabilities that a pneumonia is viral N, orientation probabilities N x 8."""

    probability: np.ndarray
    cam: np.ndarray | None
    ood: np.ndarray | None
    viral: np.ndarray
    orientation: np.ndarray


@dataclass(frozen=True)
class Prediction:
    """One file's result: a probability, label, triage and subtype, or an error (then none of them)."""

    name: str
    probability: float | None
    label: str | None
    threshold: float
    error: str | None = None
    triage: str | None = None
    subtype: str | None = None
    probability_viral: float | None = None
    # How the file was put upright before scoring, when it was not ("the image was upside down; ...").
    note: str | None = None
    # The input gate's score (lower: more like the training X-rays), where the gate ran.
    ood_score: float | None = None
    # Filled on request, for the app's overlay: the decoded image (upright) and the CAM (calibrated logit units).
    grey: np.ndarray | None = field(default=None, repr=False, compare=False)
    cam: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def scored(self) -> bool:
        return self.probability is not None

    def record(self) -> dict[str, float | str | None]:
        """The RECORD_FIELDS of this prediction (None where empty)."""
        return {"probability_pneumonia": self.probability, "label": self.label, "error": self.error,
                "triage": self.triage, "subtype": self.subtype, "probability_viral": self.probability_viral,
                "note": self.note, "ood_score": self.ood_score}


def answer(predictions: Sequence[Prediction], decision: Decision,
           names: Sequence[str] | None = None) -> dict[str, Any]:
    """The JSON of one request, wherever a client answers in JSON (`POST /api/v1/predict`, the app's API):
    the model, then per file its `name` (`names`, else the prediction's) and its record, fractions 0 to 1."""
    names = [prediction.name for prediction in predictions] if names is None else names
    return {
        "model": {"name": decision.model_name, "version": decision.model_version, "threshold": decision.threshold},
        "results": [{"name": name, **prediction.record()} for name, prediction in zip(names, predictions, strict=True)],
    }


class Predictor:
    """File bytes in, predictions out, at the artefact's threshold; bad files become errors, never raise."""

    def __init__(self, artefact: ServingArtefact) -> None:
        self.artefact = artefact

    @property
    def decision(self) -> Decision:
        return self.artefact.decision

    @property
    def threshold(self) -> float:
        return self.decision.threshold

    def predict(self, items: Iterable[tuple[str, bytes | None]], with_cam: bool = False,
                max_bytes: int = MAX_FILE_BYTES) -> list[Prediction]:
        """Predictions for (name, file bytes) pairs, in order; memory stays one batch of decoded images."""
        results: list[Prediction] = []
        for chunk in _chunks(items, BATCH_SIZE):
            results += self._predict_chunk(chunk, with_cam, max_bytes)
        return results

    def predict_paths(self, paths: Iterable[Path], max_bytes: int = MAX_FILE_BYTES,
                      with_cam: bool = False) -> list[Prediction]:
        """Like `predict`, reading each file (within `max_bytes`) only when its batch comes up."""
        results: list[Prediction] = []
        for chunk in _chunks(paths, BATCH_SIZE):
            loaded = [(str(path), _read_or_error(path, max_bytes)) for path in chunk]
            results += self._predict_chunk(loaded, with_cam, max_bytes)
        return results

    def _predict_chunk(self, chunk: list[tuple[str, bytes | ImageDecodeError | None]], with_cam: bool,
                       max_bytes: int) -> list[Prediction]:
        results: list[Prediction | None] = [None] * len(chunk)
        accepted: list[tuple[int, np.ndarray]] = []
        for position, (name, data) in enumerate(chunk):
            try:
                grey = _decode(data, max_bytes)
                problem = checks.implausibility(data, grey)
            except ImageDecodeError as error:
                problem = str(error)
            if problem:
                results[position] = Prediction(name, None, None, self.threshold, problem)
            else:
                accepted.append((position, grey))
        first = self._score(accepted, with_cam)
        turned: list[tuple[int, np.ndarray, int]] = []
        for index, (position, grey) in enumerate(accepted):
            orientation = self.decision.orientation(first.orientation[index])
            if orientation is None:
                refusal = self._refusal(first, index) or self.decision.orientation_unclear()
                results[position] = Prediction(chunk[position][0], None, None, self.threshold, refusal)
            elif orientation == UPRIGHT:
                results[position] = self._prediction(chunk[position][0], first, index, grey, with_cam)
            else:
                turned.append((position, upright(grey, orientation), orientation))
        # Turned or mirrored X-rays are scored again, put back upright: the gate and the map need it so.
        second = self._score([(position, grey) for position, grey, _ in turned], with_cam)
        for index, (position, grey, orientation) in enumerate(turned):
            note = UPRIGHT_NOTE.format(orientation=ORIENTATIONS[orientation])
            results[position] = self._prediction(chunk[position][0], second, index, grey, with_cam, note)
        return results

    def _score(self, accepted: list[tuple[int, np.ndarray]], with_cam: bool) -> Scores:
        size = self.artefact.input_size
        batch = np.stack([resize_grey(grey, size) for _, grey in accepted]) if accepted else np.zeros((0, size, size))
        return self.artefact.run(batch, with_cam)

    def _refusal(self, scores: Scores, index: int) -> str | None:
        return None if scores.ood is None else self.decision.refusal(float(scores.ood[index]))

    def _prediction(self, name: str, scores: Scores, index: int, grey: np.ndarray, with_cam: bool,
                    note: str | None = None) -> Prediction:
        ood_score = None if scores.ood is None else round(float(scores.ood[index]), 4)
        refusal = self._refusal(scores, index)
        if refusal:
            return Prediction(name, None, None, self.threshold, refusal, note=note, ood_score=ood_score)
        probability, viral = float(scores.probability[index]), float(scores.viral[index])
        return Prediction(name, probability, self.decision.label(probability), self.threshold,
                          triage=self.decision.triaged(probability), subtype=self.decision.subtype(probability, viral),
                          probability_viral=viral, note=note, ood_score=ood_score,
                          grey=grey if with_cam else None, cam=scores.cam[index] if with_cam else None)


def _decode(data: bytes | ImageDecodeError | None, max_bytes: int) -> np.ndarray:
    if isinstance(data, ImageDecodeError):
        raise data
    if data is None:
        raise ImageDecodeError("no image data")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected the bytes of an image file, got {type(data).__name__}")
    return decode_greyscale(bytes(data), max_bytes=max_bytes)


def _read_or_error(path: Path, max_bytes: int) -> bytes | ImageDecodeError:
    try:
        return read_bytes(Path(path), max_bytes=max_bytes)
    except ImageDecodeError as error:
        return error


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
