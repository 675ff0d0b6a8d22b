"""Build the serving artefact: the trained Keras network as one ONNX graph with its decision inside.

The graph takes raw greyscale pixels (float32 N x S x S x 1, 0..255) and scores each image and its
left-right mirror, averaging their logits (the network was trained on both: the diagnosis must not depend
on which way round the film was put), and gives
- `probability` (N): the calibrated probability of pneumonia. Calibration sigmoid(logit / T + b) is
  folded into the head's weights, so nothing downstream applies it again;
- `cam` (N x h x w): the class-activation map of the feature map that feeds global average pooling,
  in calibrated logit units (positive: towards pneumonia), the mirror's map mirrored back and averaged.
  Its mean plus the folded bias is the logit, and with global average pooling followed by one dense unit
  it equals Grad-CAM up to normalisation (tested against `pipeline.gradcam`);
- `probability_viral` (N): the calibrated probability that a pneumonia is viral (`decision.subtype_calibration`
  folded in, as for `probability`);
- `orientation` (N x 8): the probability of each of `scoring.orientation.ORIENTATIONS`, from the image as
  given (not averaged with its mirror: it has to tell them apart);
- `ood_score` (N), when an input gate is given: over the gate's layers, the sum of each layer's squared
  Mahalanobis distance (per feature) from its globally pooled output to the nearer class mean (tied
  covariance, fitted on the training images; `pipeline.ood`).
The decision metadata (`scoring.decision`) is written into the graph's metadata.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline.common import write_atomically
from pipeline.model import ModelParts, ModelPartsError, model_parts
from scoring.decision import (
    CAM_OUTPUT,
    INPUT_NAME,
    OOD_OUTPUT,
    ORIENTATION_OUTPUT,
    PROBABILITY_OUTPUT,
    VIRAL_OUTPUT,
    Decision,
    write,
)
from scoring.orientation import ORIENTATIONS

log = logging.getLogger(__name__)

OPSET = 17
# The artefact must agree with the Keras model it came from to float rounding: the probability and the gate's
# score to 1e-5 of their scale. The CAM is a sum over the feature map's channels of activations that cancel,
# so float32 rounding reaches ~1e-4 of its largest value on a noise probe (measured: 3.3e-4); it is shown
# normalised to its range, and 1e-3 of the range is under one of the overlay's 256 colour levels.
AGREEMENT_TOLERANCE = 1e-5
CAM_TOLERANCE = 1e-3


class ArtefactError(RuntimeError):
    """The network cannot be turned into a serving artefact that agrees with it."""


def parts(keras_model: keras.Model) -> ModelParts:
    try:
        return model_parts(keras_model)
    except ModelPartsError as error:
        raise ArtefactError(str(error)) from error


def feature_map(keras_model: keras.Model):
    """The (symbolic) tensor global average pooling reduces: what the CAM is computed on."""
    return parts(keras_model).feature_map


def _head(keras_model: keras.Model, name: str = "pneumonia", units: int = 1) -> keras.layers.Dense:
    head = parts(keras_model).heads[name]
    if not (isinstance(head, keras.layers.Dense) and head.units == units):
        raise ArtefactError(f"the '{head.name}' head must be a dense layer of {units} units")
    return head


def calibrated_head(keras_model: keras.Model, temperature: float, bias: float,
                    name: str = "pneumonia") -> tuple[np.ndarray, float]:
    """(weights, bias) of a one-unit head with sigmoid(logit / temperature + bias) folded in."""
    if not temperature > 0:
        raise ArtefactError(f"temperature must be positive, got {temperature}")
    kernel, dense_bias = (np.asarray(value, dtype=np.float64) for value in _head(keras_model, name).get_weights())
    return kernel[:, 0] / temperature, float(dense_bias[0] / temperature + bias)


@dataclass(frozen=True)
class LayerGate:
    """One layer's part of the input gate: class means (C x D) of its globally pooled output and a factor W
    of the shared precision matrix (precision = W W^T): the squared distance is |(f - mean) W|^2."""

    layer: str
    means: np.ndarray
    precision_factor: np.ndarray

    def distance(self, pooled: np.ndarray) -> np.ndarray:
        """Per feature, to the nearer class mean: comparable across layers of different widths."""
        offsets = pooled[:, np.newaxis, :] - self.means[np.newaxis]
        return np.square(offsets @ self.precision_factor).sum(axis=2).min(axis=1) / self.means.shape[1]


@dataclass(frozen=True)
class Gate:
    layers: tuple[LayerGate, ...]

    def score(self, pooled: list[np.ndarray]) -> np.ndarray:
        return sum(layer.distance(features) for layer, features in zip(self.layers, pooled))

    def write(self, path: Path, rule: dict[str, Any]) -> None:
        """The gate's arrays and `rule` (what the decision records of it: its limit, the orientation rule)."""
        arrays = {}
        for index, layer in enumerate(self.layers):
            arrays[f"means_{index}"], arrays[f"precision_factor_{index}"] = layer.means, layer.precision_factor
        record = {"layers": [layer.layer for layer in self.layers], "rule": rule}
        buffer = io.BytesIO()
        np.savez(buffer, record=np.array(json.dumps(record)), **arrays)
        write_atomically(path, buffer.getvalue())

    @classmethod
    def read(cls, path: Path) -> tuple[Gate, dict[str, Any]]:
        """(the gate, its rule) as `write` left them."""
        with np.load(path, allow_pickle=False) as stored:
            record = json.loads(str(stored["record"]))
            layers = tuple(LayerGate(name, stored[f"means_{index}"], stored[f"precision_factor_{index}"])
                           for index, name in enumerate(record["layers"]))
        return cls(layers), record["rule"]


def serving_function(keras_model: keras.Model, temperature: float = 1.0, bias: float = 0.0,
                     gate: Gate | None = None, subtype_calibration: tuple[float, float] = (1.0, 0.0)):
    """The traced inference function the ONNX graph is converted from (also used to check it)."""
    size = int(keras_model.input_shape[1])
    gated = gate.layers if gate else ()
    features = keras.Model(keras_model.inputs,
                           [feature_map(keras_model), *(keras_model.get_layer(g.layer).output for g in gated)])
    # Plain NumPy values, so the trace embeds them as constants rather than capturing graph inputs.
    weights, folded_bias = (np.float32(value) for value in calibrated_head(keras_model, temperature, bias))
    viral_weights, viral_bias = (np.float32(value) for value in
                                 calibrated_head(keras_model, *subtype_calibration, name="viral"))
    orientation_weights, orientation_bias = (
        np.float32(value) for value in _head(keras_model, "orientation", len(ORIENTATIONS)).get_weights())
    constants = [(g.means.astype(np.float32), g.precision_factor.astype(np.float32), np.float32(g.means.shape[1]))
                 for g in gated]

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32, name=INPUT_NAME)])
    def serve(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        count = tf.shape(pixels)[0]
        # The image and its mirror in one batch: the diagnosis averages both, orientation reads the first.
        outputs = features(tf.concat([pixels, tf.reverse(pixels, axis=[2])], axis=0), training=False)
        maps, *layer_outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        both_cams = tf.tensordot(maps, weights, axes=[[3], [0]])
        cam = (both_cams[:count] + tf.reverse(both_cams[count:], axis=[2])) / 2.0
        pooled = tf.reduce_mean(maps, axis=[1, 2])
        viral_logit = tf.tensordot(pooled, viral_weights, axes=[[1], [0]]) + viral_bias
        results = {
            PROBABILITY_OUTPUT: tf.sigmoid(tf.reduce_mean(cam, axis=[1, 2]) + folded_bias),
            CAM_OUTPUT: cam,
            VIRAL_OUTPUT: tf.sigmoid((viral_logit[:count] + viral_logit[count:]) / 2.0),
            ORIENTATION_OUTPUT: tf.nn.softmax(pooled[:count] @ orientation_weights + orientation_bias),
        }
        if constants:
            results[OOD_OUTPUT] = tf.add_n([_distance(output[:count], *values)
                                            for output, values in zip(layer_outputs, constants)])
        return results

    return serve



def _distance(layer_output: tf.Tensor, means: np.ndarray, factor: np.ndarray, width: np.float32) -> tf.Tensor:
    """LayerGate.distance, in TensorFlow: pooled output, offsets N x C x D, nearer class, per feature."""
    pooled = tf.reduce_mean(layer_output, axis=[1, 2])
    offsets = pooled[:, tf.newaxis, :] - means[tf.newaxis]
    distances = tf.reduce_sum(tf.square(tf.tensordot(offsets, factor, axes=[[2], [0]])), axis=2)
    return tf.reduce_min(distances, axis=1) / width


def build(keras_model: keras.Model, decision: Decision, gate: Gate | None = None) -> bytes:
    """The serving artefact (serialised ONNX) for `keras_model` under `decision` (and with the input
    `gate`, whose limit `decision.ood` holds), checked against TensorFlow."""
    import tf2onnx

    if (gate is None) != (not decision.ood):
        raise ArtefactError("an input gate and its limit (decision.ood) go together")
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    calibration, subtype = decision.calibration or {}, decision.subtype_calibration or {}
    serve = serving_function(keras_model, float(calibration.get("temperature", 1.0)),
                             float(calibration.get("bias", 0.0)), gate,
                             (float(subtype.get("temperature", 1.0)), float(subtype.get("bias", 0.0))))
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=OPSET)
    _name_outputs(proto, serve)
    artefact = write(proto.SerializeToString(), decision)
    _check_agreement(artefact, serve, int(keras_model.input_shape[1]))
    return artefact


def _name_outputs(proto, serve) -> None:
    """tf2onnx names graph outputs after TensorFlow's tensors; rename them to the artefact's names."""
    structured = serve.get_concrete_function().structured_outputs
    renames = {tensor.name: key for key, tensor in structured.items()}
    for node in proto.graph.node:
        node.output[:] = [renames.get(name, name) for name in node.output]
    for output in proto.graph.output:
        output.name = renames.get(output.name, output.name)


def _check_agreement(artefact: bytes, serve, size: int) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(artefact, providers=["CPUExecutionProvider"])
    probe = np.random.default_rng(0).uniform(0, 255, (2, size, size, 1)).astype(np.float32)
    expected = {key: value.numpy() for key, value in serve(tf.constant(probe)).items()}
    actual = dict(zip([o.name for o in session.get_outputs()], session.run(None, {INPUT_NAME: probe})))
    for key, value in expected.items():
        difference = float(np.abs(actual[key] - value).max())
        if key == CAM_OUTPUT:
            allowed = CAM_TOLERANCE * max(1.0, float(value.max() - value.min()))
        else:
            allowed = AGREEMENT_TOLERANCE * max(1.0, float(np.abs(value).max()))
        if difference > allowed:
            raise ArtefactError(f"the ONNX artefact's {key} differs from TensorFlow's by {difference:.2e}")
