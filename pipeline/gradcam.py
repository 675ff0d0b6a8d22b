"""Grad-CAM in TensorFlow (Selvaraju et al. 2017): the reference the serving artefact's CAM is tested against.

Serving never runs this: the artefact's `cam` output is the class-activation map of the feature map that
feeds global average pooling, which for this network (pooling, then one dense unit) equals Grad-CAM up to
normalisation. `tests/test_artefact.py` checks that on real images. As served, the logit is the mean of
the image's and its mirror's, so the map is Grad-CAM of that mean: each view's map, in the image's frame.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from pipeline.artefact import feature_map
from pipeline.model import model_parts


class GradCam:
    """Grad-CAM at the feature map global pooling reduces, of the output unit's logit (a confident model's
    sigmoid saturates to exactly 1.0 in float32, and its gradient to zero)."""

    def __init__(self, keras_model: keras.Model) -> None:
        head = model_parts(keras_model).heads["pneumonia"]
        if not (isinstance(head, keras.layers.Dense) and head.units == 1):
            raise ValueError("Grad-CAM here needs a pneumonia head of one dense unit")
        self._head = head
        self._model = keras.Model(keras_model.inputs, [feature_map(keras_model), head.input])
        size = int(keras_model.input_shape[1])
        spec = tf.TensorSpec([None, size, size, 1], tf.float32)
        self._cams = tf.function(self._cam_batch, input_signature=[spec, tf.TensorSpec([], tf.float32)])

    def _cam_batch(self, batch: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
        count = tf.shape(batch)[0]
        with tf.GradientTape() as tape:
            maps, features = self._model(tf.concat([batch, tf.reverse(batch, axis=[2])], axis=0), training=False)
            tape.watch(maps)
            logit = tf.matmul(features, self._head.kernel) + self._head.bias
            served = (logit[:count] + logit[count:]) / 2.0
            target = tf.reduce_sum(sign * served)  # one image's logit depends only on its own maps
        grads = tape.gradient(target, maps)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # one weight per channel and view
        views = tf.reduce_sum(weights * maps, axis=-1)
        cams = tf.nn.relu(views[:count] + tf.reverse(views[count:], axis=[2]))
        peak = tf.reduce_max(cams, axis=(1, 2), keepdims=True)
        return tf.math.divide_no_nan(cams, peak)

    def maps(self, images: np.ndarray, towards_pneumonia: bool = True) -> np.ndarray:
        """Grad-CAM maps in [0, 1] (N x h x w) for uint8 images N x S x S at the model's input size."""
        batch = tf.constant(np.asarray(images, dtype=np.float32)[..., np.newaxis])
        return self._cams(batch, tf.constant(1.0 if towards_pneumonia else -1.0)).numpy()
