"""Grad-CAM for the pneumonia CNN: which regions of an image raised the model's score for a class.

It shows where the model looked, not where a lesion is. The gradient sub-model and its traced
`tf.function` are built once per model (`GradCam(model)`), never per image.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline.imaging import resize_grey
from pipeline.model import last_conv_layer_name

log = logging.getLogger(__name__)

# Weight of the colour map where the heatmap is 1; where it is 0 the X-ray shows through unchanged.
OVERLAY_ALPHA = 0.6
COLOUR_MAP = "jet"


class GradCam:
    """Grad-CAM (Selvaraju et al. 2017) at the last convolutional block of a sigmoid classifier.

    Gradients are taken of the output unit's logit where the model ends in a sigmoid `Dense` layer:
    a confident model's sigmoid saturates to exactly 1.0 in float32, and its gradient to zero.
    """

    def __init__(self, keras_model: keras.Model, layer_name: str | None = None) -> None:
        self.input_size = int(keras_model.input_shape[1])
        self.layer_name = layer_name or last_conv_layer_name(keras_model)
        conv_output = keras_model.get_layer(self.layer_name).output
        head = keras_model.layers[-1]
        self._logit_head = _is_sigmoid_dense(head)
        second_output = head.input if self._logit_head else keras_model.output
        self._grad_model = keras.Model(keras_model.inputs, [conv_output, second_output])
        spec = tf.TensorSpec([None, self.input_size, self.input_size, 1], tf.float32)
        sign_spec = tf.TensorSpec([], tf.float32)
        self._cams = tf.function(self._cam_batch, input_signature=[spec, sign_spec])
        self._head = head

    def _cam_batch(self, batch: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            conv, second = self._grad_model(batch, training=False)
            if self._logit_head:
                score = tf.matmul(second, self._head.kernel) + self._head.bias
            else:
                score = second
            # One image's score depends only on its own activations, so the sum's gradient is per image.
            target = tf.reduce_sum(sign * score)
        grads = tape.gradient(target, conv)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # one weight per channel
        cams = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1))
        peak = tf.reduce_max(cams, axis=(1, 2), keepdims=True)
        return tf.math.divide_no_nan(cams, peak)

    def heatmap(self, grey: np.ndarray, towards_pneumonia: bool = True) -> np.ndarray:
        """A float32 map in [0, 1] with `grey`'s shape: 1 where the evidence for the class is strongest.

        `towards_pneumonia=False` explains a NORMAL decision (regions that lowered the score). A map
        of zeros means no region pushed the score that way.
        """
        batch = resize_grey(grey, self.input_size).astype(np.float32)[np.newaxis, ..., np.newaxis]
        sign = tf.constant(1.0 if towards_pneumonia else -1.0)
        cam = self._cams(tf.constant(batch), sign).numpy()[0].astype(np.float32)
        heat = upsample(cam, grey.shape)
        peak = float(heat.max())
        # Interpolation between cell centres shaves an isolated peak: rescale so the strongest region is 1.
        return heat / peak if peak > 0 else heat


def _is_sigmoid_dense(layer: keras.layers.Layer) -> bool:
    activation = getattr(layer, "activation", None)
    return (isinstance(layer, keras.layers.Dense) and layer.units == 1
            and getattr(activation, "__name__", "") == "sigmoid")


def upsample(cam: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Bilinear resize of a small [0, 1] map to (height, width), clipped back into [0, 1]."""
    height, width = int(shape[0]), int(shape[1])
    resized = Image.fromarray(np.asarray(cam, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def overlay(grey: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGB uint8 (H x W x 3): the greyscale image with the heatmap's colours blended in where it is high."""
    from matplotlib import colormaps  # no pyplot: no display backend is needed

    if grey.ndim != 2 or heat.shape != grey.shape:
        raise ValueError(f"expected a 2-D image and a heatmap of its shape, got {grey.shape} and {heat.shape}")
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    colours = colormaps[COLOUR_MAP](heat)[..., :3].astype(np.float32) * 255.0
    base = np.repeat(np.asarray(grey, dtype=np.float32)[..., np.newaxis], 3, axis=-1)
    weight = (alpha * heat)[..., np.newaxis]
    return np.round(base * (1.0 - weight) + colours * weight).astype(np.uint8)
