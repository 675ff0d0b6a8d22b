"""Model behaviour: architecture contract, augmentation, a short training run that learns, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipeline.model import augment, balanced_class_weights, build_model, last_conv_layer_name, make_dataset
from pipeline.preprocess import assign_splits, decode_all
from pipeline.train import make_deterministic

from .conftest import FIXTURE_DATASET


def test_model_takes_raw_pixels_at_the_stored_size_and_outputs_probabilities():
    model = build_model(input_size=64, image_size=32, filters=[4, 8], dropout=0.1)
    assert model.input_shape == (None, 64, 64, 1)
    output = model(np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 1)).astype("float32")).numpy()
    assert output.shape == (3, 1) and ((output > 0) & (output < 1)).all()
    assert last_conv_layer_name(model) == "block2_relu2"


def test_model_rejects_impossible_configurations():
    with pytest.raises(ValueError, match="at least one block"):
        build_model(64, 32, [], 0.1)
    with pytest.raises(ValueError, match="too small"):
        build_model(64, 8, [4, 8, 16, 32], 0.1)


def test_augmentation_with_zero_settings_is_identity_and_shift_moves_content():
    image = np.zeros((32, 32, 1), dtype="float32")
    image[10:20, 10:20] = 200.0
    seed = tf.constant([1, 2], dtype=tf.int64)
    unchanged = augment(tf.constant(image), seed, {}).numpy()
    np.testing.assert_allclose(unchanged, image, atol=1e-3)
    shifted = augment(tf.constant(image), seed, {"shift": 0.2}).numpy()
    assert not np.allclose(shifted, image) and shifted.max() <= 255.0


def test_augmented_dataset_is_reproducible_and_differs_between_epochs():
    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32), dtype=np.uint8)
    labels = np.array([0, 1] * 4, dtype=np.uint8)
    settings = {"rotation_deg": 10.0, "brightness": 0.1}
    dataset = make_dataset(images, labels, batch_size=8, seed=5, augmentation=settings)
    first_epoch, second_epoch = [next(iter(dataset))[0].numpy() for _ in range(2)]
    again = next(iter(make_dataset(images, labels, batch_size=8, seed=5, augmentation=settings)))[0].numpy()
    np.testing.assert_array_equal(first_epoch, again)
    assert not np.array_equal(first_epoch, second_epoch)


def test_class_weights_balance_the_classes():
    weights = balanced_class_weights(np.array([0, 1, 1, 1]))
    assert weights[0] * 1 == pytest.approx(weights[1] * 3)
    with pytest.raises(ValueError, match="miss a class"):
        balanced_class_weights(np.array([1, 1]))


@pytest.fixture(scope="module")
def fixture_arrays():
    records = assign_splits(FIXTURE_DATASET.parent, val_fraction=0.25, test_fraction=0.25, seed=42)
    images, _ = decode_all(records, FIXTURE_DATASET.parent, size=48, workers=2)
    kept = [record for record in records if record.file in images]
    return np.stack([images[r.file] for r in kept]), np.array([r.label for r in kept], dtype=np.uint8)


def train_briefly(images, labels, epochs: int):
    import keras

    make_deterministic(7)
    model = build_model(48, 32, [8, 16], 0.0)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=3e-3), loss="binary_crossentropy")
    history = model.fit(make_dataset(images, labels, 16, 7, {"rotation_deg": 5.0}), epochs=epochs, verbose=0,
                        class_weight=balanced_class_weights(labels))
    return model, history.history["loss"]


def test_short_training_reduces_the_loss_and_is_deterministic(fixture_arrays):
    images, labels = fixture_arrays
    model, losses = train_briefly(images, labels, epochs=8)
    assert losses[-1] < losses[0]
    again, losses_again = train_briefly(images, labels, epochs=8)
    assert losses == losses_again
    for first, second in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(first, second)


def test_per_image_normalisation_makes_the_model_blind_to_exposure_shifts():
    model = build_model(input_size=32, image_size=32, filters=[4], dropout=0.0, normalization="per_image")
    image = np.random.default_rng(0).uniform(60, 160, (1, 32, 32, 1)).astype("float32")
    brighter_flatter = (image - 60) * 0.5 + 90
    np.testing.assert_allclose(model(image).numpy(), model(brighter_flatter).numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="normalization"):
        build_model(32, 32, [4], 0.0, normalization="whiten")


def test_noise_augmentation_adds_noise_within_range():
    image = tf.constant(np.full((32, 32, 1), 128.0, dtype="float32"))
    noisy = augment(image, tf.constant([3, 4], dtype=tf.int64), {"noise": 20.0}).numpy()
    assert noisy.std() > 0 and 0.0 <= noisy.min() and noisy.max() <= 255.0


def test_downscale_augmentation_loses_fine_detail_and_keeps_shape():
    checkerboard = np.indices((64, 64)).sum(axis=0) % 2 * 255.0
    image = tf.constant(checkerboard[..., np.newaxis].astype("float32"))
    outputs = [augment(image, tf.constant([seed, 7], dtype=tf.int64), {"downscale": 0.9}).numpy()
               for seed in range(8)]
    assert all(output.shape == (64, 64, 1) for output in outputs)
    assert all(0.0 <= output.min() and output.max() <= 255.0 for output in outputs)
    # A one-pixel checkerboard cannot survive any real downscale: its contrast must fall.
    assert min(output.std() for output in outputs) < 0.5 * checkerboard.std()
    unchanged = augment(image, tf.constant([1, 7], dtype=tf.int64), {}).numpy()
    np.testing.assert_array_equal(unchanged, checkerboard[..., np.newaxis])
    with pytest.raises(ValueError, match="downscale"):
        augment(image, tf.constant([1, 7], dtype=tf.int64), {"downscale": 1.5})
