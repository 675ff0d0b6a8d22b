"""Train one recipe variant and judge it on the external set: the tool behind docs/experiments.md.

    python docs/recipe_search.py NAME [--set train.KEY=VALUE ...] [--seed N] [--simsiam-epochs N] [--fold-test]
                                      [--no-mlflow]

Runs on the prepared splits of the project (`dvc repro` first, with an external set: `make repro
DATA=... EXTERNAL=...`). It trains with the pipeline's own `train.fit` on params.yaml's recipe plus the
overrides, exactly as the train stage would, and writes `docs/recipe-search/NAME.json`: the raw scores'
ROC-AUC with 95% bootstrap CIs on validation, carved test and external, the external specificity at fixed
sensitivities, and the external ROC-AUC after every epoch. The last is a diagnostic only: weights are never
chosen on the external set (the best epoch is chosen on validation, as in the pipeline). Each run is also an
MLflow run in the project's store (experiment `recipe-search`). `--simsiam-epochs N` first pretrains the
trunk without labels on the training images (`docs/simsiam.py`) and trains from those weights. `--fold-test`
trains on the carved test split as well (its figures are then in-sample).

    python docs/recipe_search.py --table    # the Markdown table of every result in docs/recipe-search/
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

RESULTS = Path(__file__).resolve().parent / "recipe-search"
MODELS = Path("models/recipe-search")
SENSITIVITIES = (0.93, 0.95)
RESAMPLES = 1000
# Framing probe: the external normals zoomed in by these factors (the centre kept, resized back).
FRAMING_ZOOMS = (1.2, 1.4)


def with_overrides(params, assignments: list[str]):
    """params (a TrainParams) with `train.a.b=value` assignments applied (values parsed as YAML)."""
    values = asdict(params)
    for assignment in assignments:
        key, _, raw = assignment.partition("=")
        parts = key.removeprefix("train.").split(".")
        target = values
        for part in parts[:-1]:
            target = target[part]
        if parts[-1] not in target:
            raise SystemExit(f"unknown setting {key}")
        target[parts[-1]] = yaml.safe_load(raw)
    from pipeline.params import TrainParams

    return TrainParams(**values)


def auc_with_ci(labels: np.ndarray, scores: np.ndarray, seed: int) -> dict[str, float]:
    from pipeline.metrics import metrics_with_ci

    return metrics_with_ci(labels, scores, 0.5, RESAMPLES, seed)["roc_auc"]


def specificity_at(labels: np.ndarray, scores: np.ndarray, sensitivity: float) -> float:
    """The specificity at the highest threshold that keeps `sensitivity` (an oracle operating point, for
    ranking recipes only: the pipeline chooses its threshold by its own rule)."""
    positives = np.sort(scores[labels == 1])
    # Rounded first: (1 - 0.9) * 10 is 0.999..., which must allow one positive below, not none.
    threshold = positives[int(np.floor(round((1 - sensitivity) * len(positives), 9)))]
    return round(float(np.mean(scores[labels == 0] < threshold)), 4)


def external_auc_callback(external, history: list[float]):
    """After every epoch, the external ROC-AUC of the pneumonia head as served (the logits of the image
    and its mirror averaged): a diagnostic, never used to choose weights."""
    import keras
    from sklearn.metrics import roc_auc_score

    pixels = external.images[..., np.newaxis].astype(np.float32)

    class ExternalAuc(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            history.append(round(float(roc_auc_score(external.labels, served_logit(self.model, pixels))), 4))

    return ExternalAuc()


def served_logit(model, pixels: np.ndarray, mirrored: bool = True) -> np.ndarray:
    """The pneumonia head's logit of each X-ray (`pixels`: N x H x W x 1), averaged with its mirror's as
    serving does."""
    views = (pixels, pixels[:, :, ::-1]) if mirrored else (pixels,)
    return np.mean([logit(model.predict(view, batch_size=64, verbose=0)["pneumonia"].reshape(-1)) for view in views],
                   axis=0)


def logit(probabilities: np.ndarray) -> np.ndarray:
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return np.log(clipped / (1 - clipped))


def run(name: str, assignments: list[str], seed: int | None, log_to_mlflow: bool,
        simsiam_epochs: int = 0, fold_test: bool = False) -> dict[str, Any]:
    from pipeline import hardware, train
    from pipeline.params import load_params

    params = load_params()
    seed = params.seed if seed is None else seed
    recipe = with_overrides(params.train, assignments)
    splits = load_splits()
    if fold_test:
        splits["train"] = concatenate(splits["train"], splits["test"])
        assignments = [*assignments, "fold_test=true"]
    history: list[float] = []
    started = time.perf_counter()
    callbacks = [external_auc_callback(splits["external"], history)]
    pretraining = {}
    if simsiam_epochs:
        import simsiam

        train.make_deterministic(seed)
        weights, simsiam_rows = simsiam.pretrain(recipe, splits["train"].images, seed, simsiam_epochs)
        callbacks.insert(0, simsiam.StartFromTrunk(weights))
        pretraining = {"simsiam_epochs": simsiam_rows, "simsiam_seconds": round(time.perf_counter() - started)}
        assignments = [*assignments, f"simsiam_epochs={simsiam_epochs}"]
    train.make_deterministic(seed)
    with tempfile.TemporaryDirectory() as scratch, _maybe_run(log_to_mlflow, name):
        model, rows = train.fit(recipe, seed, splits["train"], splits["val"], Path(scratch) / "best.weights.h5",
                                callbacks=callbacks)
        training = {**pretraining, "hardware": hardware.describe(),
                    "train_seconds": round(time.perf_counter() - started), "epochs": len(rows),
                    "best_epoch": int(train.kept_epoch(rows, recipe.keep)["epoch"]),
                    "external_auc_by_epoch": history, "val_auc_by_epoch": [round(row["val_auc"], 4) for row in rows]}
        # Kept (git-ignored) before scoring, so that a run can be scored again (`--rescore`).
        MODELS.mkdir(parents=True, exist_ok=True)
        model.save(MODELS / f"{name}.keras")
        record = {**training, "settings": assignments, "seed": seed}
        (MODELS / f"{name}.json").write_text(json.dumps(record) + "\n", encoding="utf-8")
        return score(name, assignments, seed, model, splits, training, log_to_mlflow)


def rescore(name: str, assignments: list[str], seed: int | None) -> dict[str, Any]:
    """Score a saved run again (its training record from models/recipe-search/NAME.json, or else from its
    MLflow run's epoch metrics; the per-epoch external diagnostic is then unknown). The settings and seed
    it was trained with come from that record where it has them, unless given again."""
    import keras

    from pipeline.params import load_params

    model = keras.models.load_model(MODELS / f"{name}.keras", compile=False, safe_mode=True)
    record = MODELS / f"{name}.json"
    training = json.loads(record.read_text()) if record.is_file() else _training_from_mlflow(name)
    recorded_settings = training.pop("settings", [])
    assignments = assignments or recorded_settings
    recorded_seed = training.pop("seed", None)
    seed = seed if seed is not None else recorded_seed if recorded_seed is not None else load_params().seed
    return score(name, assignments, seed, model, load_splits(), training, log_to_mlflow=False)


def concatenate(first, second):
    """One split of both (the carved test split folded into training: its figures are then in-sample)."""
    from pipeline.arrays import Split

    return Split(*(np.concatenate([getattr(first, field), getattr(second, field)])
                   for field in ("images", "labels", "patients", "subtypes")))


def load_splits() -> dict[str, Any]:
    from pipeline.arrays import load_split

    return {name: load_split(name) for name in ("train", "val", "test", "external")}


def score(name: str, assignments: list[str], seed: int, model, splits: dict[str, Any], training: dict[str, Any],
          log_to_mlflow: bool) -> dict[str, Any]:
    """Raw scores of the served artefact (no calibration: ROC-AUC is threshold-free) on every split."""
    import mlflow

    from pipeline.artefact import build
    from pipeline.model import model_parts
    from scoring.decision import Decision
    from scoring.runtime import ServingArtefact

    size = int(model.input_shape[1])
    crop = model_parts(model).crop
    served = ServingArtefact(build(model, Decision(0.5, "none", size, crop=crop)))
    scores = {split: served.scores(data.images) for split, data in splits.items() if split != "train"}
    external = splits["external"]
    result = {
        "name": name, "settings": assignments, "seed": seed, **training,
        "roc_auc": {split: auc_with_ci(splits[split].labels, values.probability, seed) for split, values in scores.items()},
        "external_specificity_at": {str(s): specificity_at(external.labels, scores["external"].probability, s)
                                    for s in SENSITIVITIES},
        "external_viral_roc_auc": viral_auc(external, scores["external"].viral, seed),
        "external_normal_logit_shift_when_zoomed": framing_shift(served, external, scores["external"].probability),
        "external_out_of_fold": as_reported(external, scores["external"].probability, seed),
    }
    if log_to_mlflow:
        mlflow.log_params({"settings": " ".join(assignments) or "(params.yaml)", "seed": seed})
        mlflow.log_metrics({f"{split}_roc_auc": values["value"] for split, values in result["roc_auc"].items()})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def as_reported(split, raw: np.ndarray, seed: int) -> dict[str, float]:
    """The external figures the pipeline would report for this network: calibration, threshold and triage
    band fitted by params.yaml's evaluate rules, out of fold by patient; and the log loss of those
    out-of-fold calibrated probabilities (what ranking alone does not show)."""
    from sklearn.metrics import log_loss

    from pipeline.evaluate import cross_fitted
    from pipeline.metrics import point_metrics, triage_metrics
    from pipeline.params import load_params

    reported = cross_fitted(split, raw, load_params().evaluate, seed)
    figures = point_metrics(split.labels, reported.probabilities, reported.thresholds)
    result = {name: round(float(figures[name]), 4) for name in ("accuracy", "sensitivity", "specificity", "ece")}
    result["log_loss"] = round(float(log_loss(split.labels, np.clip(reported.probabilities, 1e-7, 1 - 1e-7))), 4)
    return {**result, **triage_metrics(split.labels, reported.probabilities, reported.normal_below,
                                       reported.pneumonia_from)}


def framing_shift(served, split, probability: np.ndarray) -> dict[str, float]:
    """The median change of the normals' pneumonia logit when they are zoomed in (a tighter frame shows less
    of the body, as the training pneumonias do). Near 0: the network does not read framing as diagnosis."""
    from pipeline.robustness import zoom_in

    normals = split.images[split.labels == 0]
    shifts = {}
    for zoom in FRAMING_ZOOMS:
        zoomed = zoom_in(zoom)(normals, np.random.default_rng(0))
        shift = logit(served.scores(zoomed).probability) - logit(probability[split.labels == 0])
        shifts[str(zoom)] = round(float(np.median(shift)), 3)
    return shifts


def viral_auc(split, raw_viral: np.ndarray, seed: int) -> dict[str, float] | None:
    """Bacterial (0) or viral (1) ROC-AUC among the pneumonia images of known kind (raw: Platt is monotone)."""
    from pipeline.arrays import NO_SUBTYPE

    known = split.subtypes != NO_SUBTYPE
    return auc_with_ci(split.subtypes[known], raw_viral[known], seed) if known.any() else None


def _training_from_mlflow(name: str) -> dict[str, Any]:
    import mlflow

    from pipeline.registry import ensure_experiment

    client = mlflow.MlflowClient()
    runs = client.search_runs([ensure_experiment("recipe-search")], f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"no saved training record and no MLflow run named {name}")
    run_id = runs[0].info.run_id
    val = [m.value for m in sorted(client.get_metric_history(run_id, "val_auc"), key=lambda m: m.step)]
    seconds = sum(m.value for m in client.get_metric_history(run_id, "seconds"))
    return {"train_seconds": round(seconds), "epochs": len(val), "best_epoch": int(np.argmax(val)) + 1,
            "external_auc_by_epoch": [], "val_auc_by_epoch": [round(v, 4) for v in val]}


class _maybe_run:
    """An MLflow run in the project's store (experiment `recipe-search`), or nothing."""

    def __init__(self, enabled: bool, name: str) -> None:
        self.enabled, self.name = enabled, name

    def __enter__(self):
        if self.enabled:
            import mlflow

            from pipeline.registry import ensure_experiment

            mlflow.start_run(experiment_id=ensure_experiment("recipe-search"), run_name=self.name)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            import mlflow

            mlflow.end_run("FAILED" if exc[0] else "FINISHED")


def settings_cell(result: dict[str, Any]) -> str:
    """The run's changes to params.yaml, and the kernels' instruction set where it was capped."""
    settings = " ".join(result["settings"]) or "(default)"
    capped = result.get("hardware", {}).get("onednn_max_cpu_isa", "(not set)")
    return settings if capped == "(not set)" else f"{settings} ONEDNN_MAX_CPU_ISA={capped}"


def table() -> str:
    rows = [("| run | settings | seed | epochs (best) | train time | val ROC-AUC | carved test ROC-AUC | external ROC-AUC "
            "[95% CI] | external spec. at sens. 0.93 / 0.95 | external out of fold: accuracy / ECE / log loss / "
            "REVIEW share | normals' logit shift, zoomed x1.2 / x1.4 | external ROC-AUC by epoch |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        auc = result["roc_auc"]
        ext = auc["external"]
        spec = result["external_specificity_at"]
        framing = result.get("external_normal_logit_shift_when_zoomed")
        framing_cell = f"{framing['1.2']:+.2f} / {framing['1.4']:+.2f}" if framing else ""
        reported = result.get("external_out_of_fold")
        reported_cell = (f"{reported['accuracy']:.3f} / {reported['ece']:.3f} / {reported['log_loss']:.3f} / "
                         f"{reported['review_share']:.3f}" if reported else "")
        rows.append(f"| {result['name']} | `{settings_cell(result)}` | {result['seed']} | "
                    f"{result['epochs']} "
                    f"({result['best_epoch']}) | {result['train_seconds'] // 60} min | {auc['val']['value']:.3f} | "
                    f"{auc['test']['value']:.3f} | {ext['value']:.3f} [{ext['ci_low']:.3f}, {ext['ci_high']:.3f}] | "
                    f"{spec['0.93']:.3f} / {spec['0.95']:.3f} | {reported_cell} | {framing_cell} | "
                    f"{' '.join(f'{v:.3f}' for v in result['external_auc_by_epoch'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="train.KEY=VALUE")
    parser.add_argument("--seed", type=int, default=None, help="another seed than params.yaml's")
    parser.add_argument("--simsiam-epochs", type=int, default=0, metavar="N",
                        help="pretrain the trunk without labels for N epochs first (docs/simsiam.py)")
    parser.add_argument("--fold-test", action="store_true",
                        help="train on the carved test split too (21%% more X-rays; its figures become in-sample)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    parser.add_argument("--table", action="store_true", help="print the table of results and stop")
    parser.add_argument("--rescore", action="store_true", help="score the saved model of run NAME again")
    args = parser.parse_args(argv)
    if args.table:
        print(table())
        return 0
    if not args.name:
        parser.error("a NAME for the run is needed")
    from pipeline.common import setup_logging

    setup_logging()  # the pipeline's per-epoch lines, so that a long run shows its progress
    if args.rescore:
        result = rescore(args.name, args.assignments, args.seed)
    else:
        result = run(args.name, args.assignments, args.seed, not args.no_mlflow, args.simsiam_epochs,
                     args.fold_test)
    print(json.dumps({key: result[key] for key in ("name", "roc_auc", "external_specificity_at")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
