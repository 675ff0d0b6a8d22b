"""Stage: train the network (`train.backbone`: fine-tuned from ImageNet weights, or from scratch), keep the best
epoch by validation AUC (of the pneumonia head), log it all to MLflow.

Runs on a GPU when TensorFlow sees one (the `gpu` extra), else on the CPU, and says which; the CPU and the
instruction set of its kernels are recorded with the run (`pipeline.hardware`)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.entities import RunStatus
from mlflow.models import infer_signature

from pipeline import hardware
from pipeline.arrays import Split, load_split
from pipeline.common import git_commit, setup_logging, stage_errors, write_json
from pipeline.model import balanced_class_weights, build_model, make_dataset, network_record
from pipeline.params import TrainParams, stage_params
from pipeline.paths import HISTORY_FILE, MODEL_FILE, RUN_FILE, TRAIN_SUMMARY_FILE
from pipeline.registry import TrackingUnavailableError, ensure_experiment

log = logging.getLogger(__name__)


def make_deterministic(seed: int) -> None:
    """Same params, same machine, same data -> same weights: seed everything, deterministic kernels."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def training_device() -> str:
    """The device training runs on: the first GPU TensorFlow sees, else the CPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU ({details.get('device_name', gpus[0].name)})"


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def dataset_digest(*splits: Split) -> str:
    """Digest of the training and validation pixels and labels themselves (not of file bytes)."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(np.ascontiguousarray(split.images).tobytes())
        digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()[:32]


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics and throughput, to MLflow and to the history rows."""

    def __init__(self, samples_per_epoch: int) -> None:
        super().__init__()
        self.samples_per_epoch = samples_per_epoch
        self.rows: list[dict[str, float]] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self._started
        row = {history_key(key): float(value) for key, value in (logs or {}).items()}
        row.update(epoch=epoch + 1, seconds=seconds, images_per_second=self.samples_per_epoch / seconds)
        self.rows.append(row)
        if mlflow.active_run() is not None:  # never start a run in some default store by accident
            mlflow.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=epoch + 1)
        log.info("epoch %d: %s", epoch + 1, {key: round(value, 4) for key, value in row.items()})


# The pneumonia head's figures keep their plain names (auc, val_auc) in the history and its plots.
MONITORED = "val_pneumonia_auc"


def history_key(key: str) -> str:
    """A Keras log key as the history names it: `val_pneumonia_auc` -> `val_auc`, `val_viral_auc` kept, and
    the weighted sum of the three heads' losses `loss` -> `total_loss` (`loss` is the pneumonia head's)."""
    if key in ("loss", "val_loss"):
        return key.replace("loss", "total_loss")
    return key.replace("pneumonia_", "")


def make_optimizer(params: TrainParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam, or AdamW when `weight_decay` > 0; a constant rate or a cosine decay over all epochs; with an
    exponential moving average of the weights when `ema_momentum` > 0."""
    learning_rate = params.learning_rate
    if params.schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, params.epochs * steps_per_epoch)
    averaging = {"use_ema": True, "ema_momentum": params.ema_momentum} if params.ema_momentum > 0 else {}
    if params.weight_decay > 0:
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=params.weight_decay, **averaging)
    return keras.optimizers.Adam(learning_rate=learning_rate, **averaging)


def compile_model(model: keras.Model, params: TrainParams, steps_per_epoch: int) -> None:
    """Three heads, one optimiser: the pneumonia loss counts once, the others by their params' weights.
    Metrics are sample-weighted, so turned images never count towards the diagnosis heads' figures."""
    model.compile(
        optimizer=make_optimizer(params, steps_per_epoch),
        loss={"pneumonia": keras.losses.BinaryCrossentropy(label_smoothing=params.label_smoothing),
              "viral": keras.losses.BinaryCrossentropy(),
              "orientation": keras.losses.SparseCategoricalCrossentropy()},
        loss_weights={"pneumonia": 1.0, "viral": params.subtype_weight, "orientation": params.orientation_weight},
        weighted_metrics={"pneumonia": [keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
                          "viral": [keras.metrics.AUC(name="auc")],
                          "orientation": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]},
    )


def fit(params: TrainParams, seed: int, train: Split, val: Split, checkpoint: Path,
        callbacks: list[keras.callbacks.Callback] | None = None) -> tuple[Any, list[dict]]:
    """The trained network (its best epoch by the pneumonia head's validation AUC) and one history row per
    epoch. `callbacks` run after the pipeline's own (the recipe search adds its diagnostics there)."""
    model = build_model(train.images.shape[1], params)
    compile_model(model, params, -(-len(train) // params.batch_size))
    epoch_logger = EpochLogger(len(train))
    # Swapped in before validation and kept in through the epoch's end, so the checkpoint holds the average.
    averaging = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if params.ema_momentum > 0 else []
    keeping_best = params.keep == "best"
    own = [
        *averaging,
        *([keras.callbacks.ModelCheckpoint(checkpoint, monitor=MONITORED, mode="max", save_best_only=True,
                                           save_weights_only=True)] if keeping_best else []),
        keras.callbacks.EarlyStopping(monitor=MONITORED, mode="max", patience=params.patience),
        epoch_logger,
    ]
    model.fit(
        make_dataset(train.images, train.labels, train.subtypes, params.batch_size, seed, params.augment,
                     params.orientation_rate, balanced_class_weights(train.labels), params.mixup_alpha,
                     params.cutmix_alpha),
        validation_data=make_dataset(val.images, val.labels, val.subtypes, params.batch_size, seed),
        epochs=params.epochs, callbacks=[*own, *(callbacks or [])], verbose=0,
    )
    if keeping_best:
        model.load_weights(checkpoint)
    return model, epoch_logger.rows


def kept_epoch(rows: list[dict], keep: str) -> dict:
    """The history row of the epoch whose weights `fit` kept."""
    return max(rows, key=lambda row: row["val_auc"]) if keep == "best" else rows[-1]


def log_model(model: Any, example: np.ndarray) -> Any:
    """Log the Keras model (for retraining and inspection; serving uses the ONNX artefact registered
    later) with signature and input example; requirements are pinned, not inferred (slow)."""
    outputs = {head: value.numpy() for head, value in model(example, training=False).items()}
    signature = infer_signature(example, outputs)
    return mlflow.tensorflow.log_model(
        model, name="model", signature=signature, input_example=example,
        pip_requirements=[f"{tensorflow_distribution()}=={tf.__version__}", f"keras=={keras.__version__}"],
    )


def tensorflow_distribution() -> str:
    """The TensorFlow package installed here: tensorflow-cpu by default, tensorflow with the gpu extra."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("tensorflow-cpu")
    except PackageNotFoundError:
        return "tensorflow"
    return "tensorflow-cpu"


def write_history(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).set_index("epoch").to_csv(path)


def save_atomically(model: Any, path: Path) -> None:
    """A killed run must never leave a half-written model where later stages look for one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"partial-{path.name}")
    try:
        model.save(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def run(seed: int, params: TrainParams) -> dict[str, Any]:
    experiment_id = ensure_experiment()  # first: an unreachable store fails in seconds, before any training
    make_deterministic(seed)
    train, val = load_split("train"), load_split("val")
    device = training_device()
    machine = hardware.describe()
    log.info("training on %s: %s", device, machine)
    started = time.perf_counter()
    with mlflow.start_run(experiment_id=experiment_id, run_name="train") as active, _killed_if_interrupted():
        mlflow.log_params(flatten({"seed": seed, **asdict(params)}))
        digest = dataset_digest(train, val)
        commit = git_commit()
        mlflow.set_tags({"git_commit": commit, "data_digest": digest, "stage": "train", "device": device,
                         **{f"hardware.{key}": value for key, value in machine.items()}})
        mlflow.log_input(mlflow.data.from_numpy(train.images[:1], name="train", digest=digest), context="training")
        with tempfile.TemporaryDirectory() as scratch:
            model, rows = fit(params, seed, train, val, Path(scratch) / "best.weights.h5")
        wall = time.perf_counter() - started
        best = kept_epoch(rows, params.keep)
        summary = {
            "best_epoch": int(best["epoch"]), "epochs_run": len(rows), "best_val_auc": best["val_auc"],
            "kept": params.keep,
            "train_seconds": round(wall, 1),
            "images_per_second": round(float(np.median([row["images_per_second"] for row in rows])), 1),
            "parameters": int(model.count_params()), "device": device, "hardware": machine,
        }
        mlflow.log_metrics({f"train_{key}": float(value) for key, value in summary.items()
                            if key not in ("device", "hardware", "kept")})
        info = log_model(model, val.images[:1, ..., np.newaxis].astype(np.float32))
    save_atomically(model, MODEL_FILE)
    write_history(rows, HISTORY_FILE)
    write_json(TRAIN_SUMMARY_FILE, summary)
    write_json(RUN_FILE, {"run_id": active.info.run_id, "model_uri": info.model_uri,
                          "network": network_record(params, model),
                          "experiment_id": experiment_id, "data_digest": digest, "git_commit": commit,
                          "trained_at": datetime.fromtimestamp(active.info.start_time / 1000, UTC).isoformat()})
    return summary


@contextmanager
def _killed_if_interrupted() -> Iterator[None]:
    """End the active MLflow run as KILLED on Ctrl-C or SIGTERM (`start_run` alone would say FAILED)."""
    try:
        yield
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise


def main() -> None:
    setup_logging()
    # SIGTERM (a stopped `dvc repro`) ends the MLflow run as KILLED instead of leaving it RUNNING; an
    # unreachable store is one clear line, not a traceback.
    with stage_errors(log, TrackingUnavailableError):
        summary = run(*stage_params("train"))
    log.info("trained: %s", summary)


if __name__ == "__main__":
    main()
