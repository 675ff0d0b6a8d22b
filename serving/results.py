"""What one request to the server page shows: a row per file, the selected file's result, the status line,
the JSON and the model panel, in the words of `scoring.wording`.

No Gradio here, and nothing is built at import: the page (`serving.server_page`) calls `predict_files`, the
tests call it directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scoring import wording
from scoring.card import DATA_SOURCE, NOT_A_DEVICE, card_markdown
from scoring.decision import REVIEW
from scoring.imaging import resize_to
from scoring.pixels import MAX_FILE_BYTES
from scoring.runtime import Prediction, Predictor, answer
from scoring.store import ModelUnavailableError
from serving.overlay import OVERLAY_MAX_SIDE, heatmap, overlay
from serving.service import ModelService, Served
from serving.settings import MAX_FILES

COLUMNS = ["file", "result", "probability of pneumonia", "note"]
UPLOAD_PROMPT = "Upload a chest X-ray (PNG, JPEG or DICOM), or click an example."
CHOOSE_A_ROW = " Choose a row in the table to see that file's result and map."
TRAINING_HELP = """
To train and register a model (from the project folder):

```bash
make repro          # or: make repro DATA=path/to/ChestXRay2017.zip
```

then restart the app. To serve a model copied from elsewhere, export it with
`python -m pipeline.export path/to/folder` and start `python app.py --model-uri path/to/folder`.
"""


@dataclass(frozen=True)
class Outcome:
    """Everything one request shows: a row per file, and each scored file's result and heatmap."""

    results: list[Prediction] = field(default_factory=list)
    threshold: float | None = None
    overlays: list[np.ndarray | None] = field(default_factory=list)  # per file: RGB, or None where not scored
    status: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def shown(self) -> int | None:
        """The file shown first: the first one scored."""
        return next((index for index, result in enumerate(self.results) if result.scored), None)

    @property
    def overlay(self) -> np.ndarray | None:
        return None if self.shown is None else self.overlays[self.shown]

    def result_text(self, index: int | None = None) -> str:
        index = self.shown if index is None else index
        return "" if index is None else result_markdown(self.results[index], self.threshold)

    def table(self) -> dict[str, list]:
        """The table's value as Gradio's plain headers and rows: a pandas DataFrame here allocated its
        strings in Arrow's memory pool, which kept growing under load (docs/benchmarks.md, "Under load")."""
        rows = [[file_name(r), result_words(r), wording.percent(r.probability), note_words(r)] for r in self.results]
        return {"headers": COLUMNS, "data": rows}


def predict_files(paths: Sequence[str] | None, service: Served, max_file_bytes: int = MAX_FILE_BYTES) -> Outcome:
    """The server page's prediction: uploaded file paths in, a result and a heatmap per file out; never raises
    for bad input. A file over the size limit is refused unread, in its own row; the others are scored."""
    paths = list(paths or [])
    if not paths:
        return Outcome(status=UPLOAD_PROMPT)
    if not service.ready:
        raise ModelUnavailableError(service.problem or wording.NO_MODEL)
    predictor = service.predictor
    results = predictor.predict_paths([Path(path) for path in paths[:MAX_FILES]], max_bytes=max_file_bytes,
                                      with_cam=True)
    results += [Prediction(path, None, None, predictor.threshold, wording.too_many_files(MAX_FILES))
                for path in paths[MAX_FILES:]]
    overlays = [render_overlay(r, predictor) if r.scored else None for r in results]
    details = answer(results, predictor.decision, [file_name(r) for r in results])
    return Outcome(results, predictor.threshold, overlays, status_text(results), details)


def render_overlay(prediction: Prediction, predictor: Predictor) -> np.ndarray:
    """The class-activation map over the (upright) X-ray, at most OVERLAY_MAX_SIDE a side."""
    grey = prediction.grey
    scale = OVERLAY_MAX_SIDE / max(grey.shape)
    if scale < 1:
        grey = resize_to(grey, (round(grey.shape[0] * scale), round(grey.shape[1] * scale)))
    heat = heatmap(prediction.cam, grey.shape, prediction.label == predictor.decision.class_names[1],
                   predictor.decision.crop)
    return overlay(grey, heat)


def file_name(prediction: Prediction) -> str:
    """The name a page shows for an upload: never the server's path to its cached copy."""
    return Path(prediction.name).name


def result_words(prediction: Prediction) -> str:
    return wording.result_words(prediction.record())


def note_words(prediction: Prediction) -> str:
    """The note column: why a file was not scored and what to do, or how it was put upright."""
    return wording.note(prediction.record())


def result_markdown(prediction: Prediction, threshold: float) -> str:
    """The selected file's result: the decision once, as a heading, then the sentence behind it."""
    name = f"`{_md_safe(file_name(prediction))}`"
    if not prediction.scored:
        return f"### {wording.NOT_SCORED.capitalize()}\n\n{name}: {note_words(prediction)}."
    lines = [f"### {result_words(prediction)}", name, wording.decision_sentence(prediction.record(), threshold)]
    if prediction.triage == REVIEW:
        lines.append(wording.REVIEW_LINE)
    if prediction.note:
        lines.append(f"*Note: {prediction.note}.*")
    return "\n\n".join(lines)


def status_text(results: list[Prediction]) -> str:
    scored = sum(r.scored for r in results)
    lines = [wording.scored_line(scored, len(results)) + (CHOOSE_A_ROW if scored and len(results) > 1 else "")]
    lines += [f"- {wording.REFUSED.format(name=f'`{_md_safe(file_name(r))}`', reason=note_words(r))}"
              for r in results if not r.scored]
    return "\n".join(lines)


def _md_safe(text: str) -> str:
    return text.replace("`", "'")


def no_model_message(service: Served) -> str:
    """One line for an error toast or an API client: why nothing can be scored, and the remedy."""
    sentence = wording.no_model(service.problem)
    remedy = "" if "make repro" in (service.problem or "") else f" {wording.NO_MODEL_REMEDY}"
    return f"{sentence[0].upper()}{sentence[1:]}.{remedy}"


def no_model_banner(service: Served) -> str:
    return f"## {wording.NO_MODEL.capitalize()}\n\n{service.problem}"


def model_panel(service: ModelService) -> str:
    if not service.ready:
        return f"{no_model_banner(service)}\n{TRAINING_HELP}\n**Training data:** {DATA_SOURCE}\n\n{NOT_A_DEVICE}"
    decision = service.predictor.decision
    version = f" (version {decision.model_version})" if decision.model_version else ""
    return f"*Served from `{service.source}`{version}.*\n\n{card_markdown(decision)}"
