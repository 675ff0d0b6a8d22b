"""Self-supervised pretraining of the network's trunk on the training X-rays, without their labels: SimSiam
(Chen & He 2021). Used by `docs/recipe_search.py --simsiam-epochs N`, which then trains the pipeline's recipe
from these weights instead of from random ones.

Two augmented views of each X-ray go through the trunk (the network up to its pooled features), a projector
and a predictor; the loss is the negative cosine similarity of one view's prediction with the other view's
projection, the latter held constant (stop-gradient: what keeps the two from collapsing to one constant
vector). Only training-split images are used: validation still chooses the epoch, and no weight is ever fitted
on the external set.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from pipeline.model import augment, build_model, model_parts
from pipeline.params import AugmentParams, TrainParams

logger = logging.getLogger(__name__)

PROJECTION_UNITS = 256
BOTTLENECK_UNITS = 64
BATCH_SIZE = 64
# SimSiam's recipe (SGD, momentum 0.9, weight decay 5e-4, cosine decay), scaled to this batch.
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def trunk_of(model: keras.Model) -> keras.Model:
    """The network from its input to its pooled features, sharing the layers (and weights) of `model`."""
    return keras.Model(model.input, model_parts(model).pooled, name="trunk")


def view_augmentation(settings: AugmentParams) -> AugmentParams:
    """The recipe's augmentation with wider geometry and random erasing, so that the two views of an X-ray
    differ as much as SimSiam needs (it relies on strong crops) while staying a plausible X-ray."""
    return dataclasses.replace(settings, zoom=max(settings.zoom, 0.4), shift=max(settings.shift, 0.1),
                               erase=max(settings.erase, 0.5), normal_zoom_in=0.0)


def two_views(images: np.ndarray, seed: int, settings: AugmentParams) -> tf.data.Dataset:
    """Batches of (first view, second view) of the same X-rays, each view augmented and mirrored on its own."""
    dataset = tf.data.Dataset.from_tensor_slices(images[..., np.newaxis])
    dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(6)

    def view(image: tf.Tensor, view_seed: tf.Tensor, flip_seed: tf.Tensor) -> tf.Tensor:
        augmented = augment(image, view_seed, settings)
        return tf.image.stateless_random_flip_left_right(augmented, flip_seed) if settings.flip else augmented

    def pair(image: tf.Tensor, pair_seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.cast(image, tf.float32)
        return view(image, pair_seed[0:2], pair_seed[4:6]), view(image, pair_seed[2:4], pair_seed[4:6] + 1)

    dataset = tf.data.Dataset.zip((dataset, seeds)).map(pair, num_parallel_calls=tf.data.AUTOTUNE,
                                                         deterministic=True)
    return dataset.batch(BATCH_SIZE, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def negative_cosine(prediction: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    target = tf.stop_gradient(target)
    return -tf.reduce_mean(tf.reduce_sum(tf.math.l2_normalize(prediction, axis=1)
                                         * tf.math.l2_normalize(target, axis=1), axis=1))


class SimSiam(keras.Model):
    """The trunk with SimSiam's projector and predictor; `fit` on `two_views` batches trains all three.
    `spread`: the per-dimension standard deviation of the normalised projections times sqrt(units), about 1
    while the representation is healthy and 0 once it has collapsed."""

    def __init__(self, trunk: keras.Model, **kwargs) -> None:
        super().__init__(**kwargs)
        self.trunk = trunk
        self.projector = keras.Sequential([
            layers.Dense(PROJECTION_UNITS, use_bias=False), layers.BatchNormalization(), layers.ReLU(),
            layers.Dense(PROJECTION_UNITS, use_bias=False), layers.BatchNormalization(),
        ], name="projector")
        self.predictor = keras.Sequential([
            layers.Dense(BOTTLENECK_UNITS, use_bias=False), layers.BatchNormalization(), layers.ReLU(),
            layers.Dense(PROJECTION_UNITS),
        ], name="predictor")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.spread_tracker = keras.metrics.Mean(name="spread")

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        return [self.loss_tracker, self.spread_tracker]

    def call(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.projector(self.trunk(images, training=training), training=training)

    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        first, second = data
        with tf.GradientTape() as tape:
            projected_first, projected_second = self(first, training=True), self(second, training=True)
            predicted_first = self.predictor(projected_first, training=True)
            predicted_second = self.predictor(projected_second, training=True)
            loss = 0.5 * (negative_cosine(predicted_first, projected_second)
                          + negative_cosine(predicted_second, projected_first))
        variables = self.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        spread = tf.reduce_mean(tf.math.reduce_std(tf.math.l2_normalize(projected_first, axis=1), axis=0))
        self.loss_tracker.update_state(loss)
        self.spread_tracker.update_state(spread * PROJECTION_UNITS ** 0.5)
        return {metric.name: metric.result() for metric in self.metrics}


def pretrain(params: TrainParams, images: np.ndarray, seed: int, epochs: int) -> tuple[list[np.ndarray], list[dict]]:
    """The trunk's weights after `epochs` of SimSiam on `images` (raw pixels, N x S x S), and one log row per
    epoch (loss, spread, seconds)."""
    if epochs < 1:
        raise ValueError(f"SimSiam needs at least one epoch, got {epochs}")
    keras.utils.set_random_seed(seed)
    trunk = trunk_of(build_model(images.shape[1], params))
    model = SimSiam(trunk)
    steps = epochs * (len(images) // BATCH_SIZE)
    model.compile(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(LEARNING_RATE, steps),
                                                 momentum=MOMENTUM, weight_decay=WEIGHT_DECAY))
    rows: list[dict] = []

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            row = {"epoch": epoch + 1, **{k: round(float(v), 4) for k, v in (logs or {}).items()},
                   "seconds": round(time.perf_counter() - self.started, 1)}
            rows.append(row)
            logger.info("simsiam epoch %d: %s", epoch + 1, row)

    model.fit(two_views(images, seed, view_augmentation(params.augment)), epochs=epochs, callbacks=[EpochLog()],
              verbose=0)
    return trunk.get_weights(), rows


class StartFromTrunk(keras.callbacks.Callback):
    """Loads pretrained trunk weights into the network `fit` has just built, before its first step (the
    optimiser's weight average starts from the weights of that first step, so it starts from these too)."""

    def __init__(self, weights: list[np.ndarray]) -> None:
        super().__init__()
        self.weights = weights

    def on_train_begin(self, logs: dict | None = None) -> None:
        trunk_of(self.model).set_weights(self.weights)
