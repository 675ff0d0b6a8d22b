"""Model behaviour: architecture contract, augmentation, a short training run that learns, determinism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf

from pipeline.arrays import NO_SUBTYPE, VIRAL, Split
from pipeline.model import (
    _cutmix,
    _mixup,
    augment,
    balanced_class_weights,
    build_model,
    make_dataset,
    model_parts,
    orient,
)
from pipeline.params import AugmentParams
from pipeline.preprocess import assign_splits, decode_all
from pipeline.train import fit, history_key, kept_epoch, make_deterministic
from scoring import orientation
from tests.helpers import FIXTURE_DATASET, tiny_keras_model, train_params

NO_AUGMENT = AugmentParams.none()


def scratch_params(**overrides):
    """The project's train params for this project's own CNN (what these tests build), with `overrides`."""
    return train_params(**{"backbone": "scratch", **overrides})


def seed_of(*values: int) -> tf.Tensor:
    return tf.constant(list(values), dtype=tf.int64)


def pneumonia(model, images: np.ndarray) -> np.ndarray:
    return model(images)["pneumonia"].numpy()


def test_model_takes_raw_pixels_at_the_stored_size_and_outputs_probabilities():
    model = build_model(64, scratch_params(image_size=32, filters=[4, 8], dropout=0.1, crop=1.0, stem_filters=0))
    assert model.input_shape == (None, 64, 64, 1)
    outputs = model(np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 1)).astype("float32"))
    for head in ("pneumonia", "viral"):
        assert outputs[head].shape == (3, 1) and ((outputs[head] > 0) & (outputs[head] < 1)).numpy().all()
    # One probability per way an X-ray can lie, summing to one.
    np.testing.assert_allclose(outputs["orientation"].numpy().sum(axis=1), 1.0, rtol=1e-5)
    assert outputs["orientation"].shape == (3, len(orientation.ORIENTATIONS))
    names = [layer.name for layer in model.layers]
    assert "centre_crop" not in names and "stem_conv" not in names
    # The CAM of the serving artefact is computed on what global pooling reduces: the last block's
    # feature map, at image_size / 2**blocks.
    parts = model_parts(model)
    assert parts.stages == ("stage1_output", "stage2_output") and names[names.index("global_pool") - 1] == "stage2_output"
    assert tuple(parts.feature_map.shape) == (None, 8, 8, 8) and parts.crop == 1.0


def test_model_rejects_impossible_configurations():
    with pytest.raises(ValueError, match="filters"):
        scratch_params(filters=[])
    with pytest.raises(ValueError, match="too small"):
        build_model(64, scratch_params(image_size=8, filters=[4, 8, 16, 32], stem_filters=0))
    # The strided stem halves the side before the blocks: 16 px cannot take a stem and four pools.
    build_model(64, scratch_params(image_size=16, filters=[4, 8, 16, 32], stem_filters=0))
    with pytest.raises(ValueError, match="too small"):
        build_model(64, scratch_params(image_size=16, filters=[4, 8, 16, 32], stem_filters=4))
    with pytest.raises(ValueError, match="crop"):
        scratch_params(crop=0.3)


def test_centre_crop_keeps_only_the_middle_of_the_image():
    model = tiny_keras_model(64, crop=0.75)
    assert model.get_layer("centre_crop").output.shape[1:3] == (48, 48)
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 1)).astype("float32")
    output = pneumonia(model, images)
    assert output.shape == (2, 1) and ((output > 0) & (output < 1)).all()
    # The 8-pixel border (markers, text) is outside what the network sees: changing it changes nothing.
    bordered = images.copy()
    bordered[:, :8], bordered[:, -8:], bordered[:, :, :8], bordered[:, :, -8:] = 255.0, 0.0, 255.0, 0.0
    np.testing.assert_array_equal(pneumonia(model, bordered), output)
    inner = images.copy()
    inner[:, 24:40, 24:40] = 255.0
    assert not np.allclose(pneumonia(model, inner), output)


def test_stem_convolution_halves_the_side_before_the_blocks():
    model = tiny_keras_model(64, image_size=32, stem_filters=6)
    stem = model.get_layer("stem_conv")
    assert stem.strides == (2, 2) and stem.filters == 6
    assert tuple(stem.output.shape) == (None, 16, 16, 6)
    # Two pooling blocks after the stem: 32 / 2 / 4.
    assert tuple(model.get_layer("global_pool").input.shape) == (None, 4, 4, 8)
    output = pneumonia(model, np.random.default_rng(1).uniform(0, 255, (3, 64, 64, 1)).astype("float32"))
    assert output.shape == (3, 1) and ((output > 0) & (output < 1)).all()
    without = tiny_keras_model(64, image_size=32)
    assert model.count_params() > without.count_params()


def test_augmentation_with_zero_settings_is_identity_and_shift_moves_content():
    image = np.zeros((32, 32, 1), dtype="float32")
    image[10:20, 10:20] = 200.0
    unchanged = augment(tf.constant(image), seed_of(1, 2), NO_AUGMENT).numpy()
    np.testing.assert_allclose(unchanged, image, atol=1e-3)
    shifted = augment(tf.constant(image), seed_of(1, 2), replace(NO_AUGMENT, shift=0.2)).numpy()
    assert not np.allclose(shifted, image) and shifted.max() <= 255.0


def test_augmented_dataset_is_reproducible_and_differs_between_epochs():
    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32), dtype=np.uint8)
    labels = np.array([0, 1] * 4, dtype=np.uint8)
    subtypes = np.where(labels == 1, VIRAL, NO_SUBTYPE).astype(np.int8)
    settings = replace(NO_AUGMENT, rotation_deg=10.0, brightness=0.1)
    dataset = make_dataset(images, labels, subtypes, batch_size=8, seed=5, augmentation=settings)
    first_epoch, second_epoch = [next(iter(dataset))[0].numpy() for _ in range(2)]
    again = next(iter(make_dataset(images, labels, subtypes, batch_size=8, seed=5, augmentation=settings)))[0].numpy()
    np.testing.assert_array_equal(first_epoch, again)
    assert not np.array_equal(first_epoch, second_epoch)
    # Without augmentation: the images as stored, in order, upright, every epoch.
    plain = make_dataset(images, labels, subtypes, batch_size=8, seed=5)
    for _ in range(2):
        batch, targets, weights = next(iter(plain))
        np.testing.assert_array_equal(batch.numpy()[..., 0], images.astype("float32"))
        np.testing.assert_array_equal(targets["pneumonia"].numpy()[:, 0], labels.astype("float32"))
        np.testing.assert_array_equal(targets["orientation"].numpy(), 0)
        # The viral head learns from pneumonia images only.
        np.testing.assert_array_equal(weights["viral"].numpy(), labels.astype("float32"))


def test_normal_zoom_in_magnifies_normals_only():
    # A bright square in the centre of each image: zooming in makes it cover more pixels.
    images = np.zeros((16, 32, 32), dtype=np.uint8)
    images[:, 12:20, 12:20] = 200
    labels = np.array([0, 1] * 8, dtype=np.uint8)
    subtypes = np.where(labels == 1, VIRAL, NO_SUBTYPE).astype(np.int8)
    settings = replace(NO_AUGMENT, normal_zoom_in=0.5)
    batch, targets, _ = next(iter(make_dataset(images, labels, subtypes, batch_size=16, seed=2, augmentation=settings)))
    bright = (batch.numpy()[..., 0] > 100).sum(axis=(1, 2))
    is_normal = targets["pneumonia"].numpy()[:, 0] == 0
    np.testing.assert_array_equal(bright[~is_normal], 64)
    assert (bright[is_normal] >= 64).all() and (bright[is_normal] > 64).mean() > 0.5
    # The extra zoom draws from a stream of its own: the pneumonias' other random draws do not move.
    turned = replace(NO_AUGMENT, rotation_deg=10.0, brightness=0.1)
    with_zoom, without = (next(iter(make_dataset(images, labels, subtypes, batch_size=16, seed=2, augmentation=setting)))
                          for setting in (replace(turned, normal_zoom_in=0.5), turned))
    pneumonias = with_zoom[1]["pneumonia"].numpy()[:, 0] == 1
    np.testing.assert_array_equal(with_zoom[0].numpy()[pneumonias], without[0].numpy()[pneumonias])
    assert not np.array_equal(with_zoom[0].numpy()[~pneumonias], without[0].numpy()[~pneumonias])


def test_mixup_blends_upright_pairs_and_their_diagnosis_targets_alike():
    # Each image one grey level, so a blend's level tells its weight.
    count = 16
    levels = np.arange(count, dtype=np.float32) * 13 + 10
    images = tf.constant(np.broadcast_to(levels[:, None, None, None], (count, 4, 4, 1)))
    labels = np.array([0, 1] * (count // 2), dtype=np.float32)
    orientations = np.array([0, 0, 4, 0, 1, 0, 0, 4, 0, 0, 2, 0, 4, 4, 0, 0], dtype=np.int32)
    turned = orientations % orientation.TURNS > 0
    has_subtype = labels * ~turned
    class_weight = np.where(labels == 1, 1.0, 2.0).astype(np.float32) * ~turned
    targets = {"pneumonia": tf.constant(labels[:, None]), "viral": tf.constant(labels[:, None] * 0),
               "orientation": tf.constant(orientations)}
    weights = {"pneumonia": tf.constant(class_weight), "viral": tf.constant(has_subtype.astype(np.float32)),
               "orientation": tf.ones(count)}
    mixed_images, mixed_targets, mixed_weights = (
        {key: value.numpy() for key, value in part.items()} if isinstance(part, dict) else part.numpy()
        for part in _mixup(images, targets, weights, seed_of(3, 9), alpha=0.4))
    partner = np.roll(np.arange(count), 1)
    own = (mixed_images[:, 0, 0, 0] - levels[partner]) / (levels - levels[partner])
    blended = own < 1 - 1e-6
    # Only pairs of upright images blend, each keeping at least half of itself.
    assert blended.sum() >= 4 and not (blended & (turned | turned[partner])).any()
    assert (own >= 0.5 - 1e-6).all()
    np.testing.assert_allclose(mixed_targets["pneumonia"][:, 0], own * labels + (1 - own) * labels[partner], atol=1e-5)
    np.testing.assert_allclose(mixed_weights["pneumonia"], own * class_weight + (1 - own) * class_weight[partner],
                               atol=1e-5)
    # A blend of a normal and a pneumonia has no subtype to learn; one of two orientations, no orientation.
    np.testing.assert_array_equal(mixed_weights["viral"][blended], (has_subtype * has_subtype[partner])[blended])
    differ = orientations != orientations[partner]
    np.testing.assert_array_equal(mixed_weights["orientation"], np.where(blended & differ, 0.0, 1.0))
    np.testing.assert_array_equal(mixed_targets["orientation"], orientations)


def test_cutmix_pastes_a_rectangle_of_the_partner_and_blends_targets_by_area():
    count, size = 16, 16
    levels = np.arange(count, dtype=np.float32) * 13 + 10
    images = tf.constant(np.broadcast_to(levels[:, None, None, None], (count, size, size, 1)))
    labels = np.array([0, 1] * (count // 2), dtype=np.float32)
    orientations = np.array([0, 0, 4, 0, 1, 0, 0, 4, 0, 0, 2, 0, 4, 4, 0, 0], dtype=np.int32)
    turned = orientations % orientation.TURNS > 0
    class_weight = np.where(labels == 1, 1.0, 2.0).astype(np.float32)
    targets = {"pneumonia": tf.constant(labels[:, None]), "viral": tf.constant(labels[:, None] * 0),
               "orientation": tf.constant(orientations)}
    weights = {"pneumonia": tf.constant(class_weight), "viral": tf.constant(labels),
               "orientation": tf.ones(count)}
    mixed, mixed_targets, mixed_weights = _cutmix(images, targets, weights, seed_of(3, 9), alpha=1.0)
    mixed = mixed.numpy()[..., 0]
    partner = np.roll(np.arange(count), 1)
    from_partner = mixed == levels[partner][:, None, None]
    # Every pixel is the image's own or its partner's, and the partner's form one axis-aligned rectangle.
    assert ((mixed == levels[:, None, None]) | from_partner).all()
    for pasted in from_partner[from_partner.any(axis=(1, 2))]:
        rows, columns = np.flatnonzero(pasted.any(axis=1)), np.flatnonzero(pasted.any(axis=0))
        assert pasted[rows.min():rows.max() + 1, columns.min():columns.max() + 1].all()
    own = 1 - from_partner.mean(axis=(1, 2))
    cut = own < 1
    assert cut.sum() >= 4 and not (cut & (turned | turned[partner])).any()
    assert (own >= 0.5 - 1e-6).all()
    np.testing.assert_allclose(mixed_targets["pneumonia"].numpy()[:, 0], own * labels + (1 - own) * labels[partner],
                               atol=1e-5)
    np.testing.assert_allclose(mixed_weights["pneumonia"].numpy(),
                               own * class_weight + (1 - own) * class_weight[partner], atol=1e-5)


def test_turned_images_teach_the_orientation_head_only():
    images = np.random.default_rng(1).integers(0, 255, (64, 16, 16), dtype=np.uint8)
    labels = np.array([0, 1] * 32, dtype=np.uint8)
    subtypes = np.where(labels == 1, VIRAL, NO_SUBTYPE).astype(np.int8)
    settings = replace(NO_AUGMENT, flip=True)
    dataset = make_dataset(images, labels, subtypes, batch_size=64, seed=3, augmentation=settings,
                           orientation_rate=0.5, class_weights={0: 2.0, 1: 1.0})
    batch, targets, weights = next(iter(dataset))
    turns = targets["orientation"].numpy() % orientation.TURNS
    mirrored = targets["orientation"].numpy() >= orientation.TURNS
    assert 0 < (turns > 0).mean() < 1 and 0 < mirrored.mean() < 1
    diagnosis = weights["pneumonia"].numpy()
    np.testing.assert_array_equal(diagnosis[turns > 0], 0.0)
    upright = turns == 0
    np.testing.assert_array_equal(diagnosis[upright], np.where(targets["pneumonia"].numpy()[upright, 0] == 1, 1.0, 2.0))
    np.testing.assert_array_equal(weights["viral"].numpy()[turns > 0], 0.0)
    # Each image is the stored one put in the orientation its target names.
    stored = {image.tobytes(): image for image in images.astype("float32")}
    for image, number in zip(batch.numpy()[..., 0], targets["orientation"].numpy()):
        assert orientation.upright(image, int(number)).tobytes() in stored


def test_tensorflow_and_numpy_orient_alike_and_serving_undoes_it():
    image = np.arange(4 * 6, dtype="float32").reshape(4, 4 + 2)[:, :4]
    for number in range(len(orientation.ORIENTATIONS)):
        turned = orient(tf.constant(image[..., np.newaxis]), tf.constant(number)).numpy()[..., 0]
        np.testing.assert_array_equal(turned, orientation.orient(image, number))
        np.testing.assert_array_equal(orientation.upright(turned, number), image)
    assert len({orientation.orient(image, n).tobytes() for n in range(len(orientation.ORIENTATIONS))}) == 8


def test_history_keeps_the_pneumonia_heads_plain_names():
    assert history_key("val_pneumonia_auc") == "val_auc" and history_key("pneumonia_loss") == "loss"
    assert history_key("val_viral_auc") == "val_viral_auc"
    assert history_key("loss") == "total_loss" and history_key("val_loss") == "val_total_loss"


def test_class_weights_balance_the_classes():
    weights = balanced_class_weights(np.array([0, 1, 1, 1]))
    assert weights[0] * 1 == pytest.approx(weights[1] * 3)
    with pytest.raises(ValueError, match="miss a class"):
        balanced_class_weights(np.array([1, 1]))


@pytest.fixture(scope="module")
def fixture_splits() -> tuple[Split, Split]:
    """The fixture X-rays at 48 px, split by patient into train and validation."""
    records = assign_splits(FIXTURE_DATASET.parent, val_fraction=0.25, test_fraction=0.25, seed=42)
    images, _ = decode_all(records, FIXTURE_DATASET.parent, size=48, workers=2)

    def split(name: str) -> Split:
        kept = [record for record in records if record.split == name and record.file in images]
        return Split(np.stack([images[r.file] for r in kept]), np.array([r.label for r in kept], dtype=np.uint8),
                     np.array([r.patient for r in kept]))

    return split("train"), split("val")


@pytest.fixture
def logged_metrics(monkeypatch) -> list[tuple[dict, int]]:
    """What `fit` logs to MLflow each epoch, caught here: nothing reaches any store."""
    import mlflow

    logged: list[tuple[dict, int]] = []
    monkeypatch.setattr(mlflow, "log_metrics", lambda metrics, step=None, **_: logged.append((metrics, step)))
    monkeypatch.setattr(mlflow, "active_run", lambda: "a run")  # as inside the train stage's run
    return logged


def test_outside_a_run_nothing_is_logged(monkeypatch):
    """`fit` outside an MLflow run (a test, a notebook) must not start a run in some default store."""
    import mlflow

    from pipeline.train import EpochLogger

    logged = []
    monkeypatch.setattr(mlflow, "log_metrics", lambda *args, **kwargs: logged.append(args))
    monkeypatch.setattr(mlflow, "active_run", lambda: None)
    epoch_logger = EpochLogger(10)
    epoch_logger.on_epoch_begin(0)
    epoch_logger.on_epoch_end(0, {"loss": 0.9, "pneumonia_loss": 0.5})
    assert logged == [] and epoch_logger.rows[0]["loss"] == 0.5 and epoch_logger.rows[0]["total_loss"] == 0.9


def brief_params(epochs: int, ema_momentum: float = 0.0):
    return scratch_params(image_size=32, filters=[8, 16], dropout=0.0, crop=1.0, stem_filters=0, batch_size=8,
                        learning_rate=3e-3, epochs=epochs, patience=epochs, orientation_rate=0.0,
                        augment=replace(NO_AUGMENT, rotation_deg=5.0), ema_momentum=ema_momentum)


def train_briefly(train: Split, val: Split, checkpoint, epochs: int, ema_momentum: float = 0.0):
    make_deterministic(7)  # as the train stage does before fitting
    return fit(brief_params(epochs, ema_momentum), 7, train, val, checkpoint)


def test_weight_averaging_keeps_the_averaged_network(fixture_splits, tmp_path):
    train, val = fixture_splits
    make_deterministic(7)
    initial = [weight.numpy() for weight in build_model(48, brief_params(1)).trainable_weights]
    plain, _ = train_briefly(train, val, tmp_path / "plain.weights.h5", epochs=3)
    # An average that barely moves stays at the first step's weights (its first value): the plain network
    # walks on for three epochs.
    averaged, _ = train_briefly(train, val, tmp_path / "averaged.weights.h5", epochs=3, ema_momentum=0.9999)

    def distance(model) -> float:
        return sum(float(np.abs(now.numpy() - start).sum())
                   for now, start in zip(model.trainable_weights, initial, strict=True))

    assert distance(averaged) < 0.5 * distance(plain), (distance(averaged), distance(plain))


def test_short_training_reduces_the_loss_and_is_deterministic(fixture_splits, logged_metrics, tmp_path):
    train, val = fixture_splits
    model, rows = train_briefly(train, val, tmp_path / "first.weights.h5", epochs=2)
    assert [row["epoch"] for row in rows] == [1, 2]
    assert [step for _, step in logged_metrics] == [1, 2]
    assert {"loss", "val_loss", "val_auc", "orientation_loss", "images_per_second"} <= set(logged_metrics[0][0])
    assert rows[-1]["loss"] < rows[0]["loss"], rows
    assert all(0.0 <= row["val_auc"] <= 1.0 for row in rows)
    assert model.input_shape == (None, 48, 48, 1)
    again, rows_again = train_briefly(train, val, tmp_path / "second.weights.h5", epochs=2)
    assert [row["loss"] for row in rows] == [row["loss"] for row in rows_again]
    for first, second in zip(model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(first, second)


def test_keeping_the_last_epoch_keeps_its_averaged_weights(fixture_splits, tmp_path):
    """keep: last returns the network that the last epoch's validation measured (EMA weights included), and no
    checkpoint is written or read."""
    train, val = fixture_splits
    make_deterministic(7)
    params = replace(brief_params(2, ema_momentum=0.9), keep="last")
    model, rows = fit(params, 7, train, val, tmp_path / "unused.weights.h5")
    assert not (tmp_path / "unused.weights.h5").exists() and kept_epoch(rows, "last") == rows[-1]
    measured = model.evaluate(make_dataset(val.images, val.labels, val.subtypes, 8, 7), return_dict=True, verbose=0)
    assert measured["pneumonia_loss"] == pytest.approx(rows[-1]["val_loss"], abs=1e-6)
    assert measured["pneumonia_loss"] != pytest.approx(rows[0]["val_loss"], abs=1e-6)
    assert kept_epoch([{"val_auc": 0.9, "epoch": 1}, {"val_auc": 0.8, "epoch": 2}], "best")["epoch"] == 1


def test_per_image_normalisation_makes_the_model_blind_to_exposure_shifts():
    model = build_model(32, scratch_params(image_size=32, filters=[4], dropout=0.0, crop=1.0, stem_filters=0,
                                         normalization="per_image"))
    image = np.random.default_rng(0).uniform(60, 160, (1, 32, 32, 1)).astype("float32")
    brighter_flatter = (image - 60) * 0.5 + 90
    np.testing.assert_allclose(pneumonia(model, image), pneumonia(model, brighter_flatter), atol=1e-3)
    with pytest.raises(ValueError, match="normalization"):
        scratch_params(normalization="whiten")


def test_noise_augmentation_adds_noise_within_range():
    image = tf.constant(np.full((32, 32, 1), 128.0, dtype="float32"))
    noisy = augment(image, seed_of(3, 4), replace(NO_AUGMENT, noise=20.0)).numpy()
    assert noisy.std() > 0 and 0.0 <= noisy.min() and noisy.max() <= 255.0


def test_downscale_augmentation_loses_fine_detail_and_keeps_shape():
    checkerboard = np.indices((64, 64)).sum(axis=0) % 2 * 255.0
    image = tf.constant(checkerboard[..., np.newaxis].astype("float32"))
    settings = replace(NO_AUGMENT, downscale=0.9)
    outputs = [augment(image, seed_of(seed, 7), settings).numpy() for seed in range(8)]
    assert all(output.shape == (64, 64, 1) for output in outputs)
    assert all(0.0 <= output.min() and output.max() <= 255.0 for output in outputs)
    # A one-pixel checkerboard cannot survive any real downscale: its contrast must fall.
    assert min(output.std() for output in outputs) < 0.5 * checkerboard.std()
    unchanged = augment(image, seed_of(1, 7), NO_AUGMENT).numpy()
    np.testing.assert_array_equal(unchanged, checkerboard[..., np.newaxis])
    with pytest.raises(ValueError, match="downscale"):
        replace(NO_AUGMENT, downscale=1.5)


def test_erase_augmentation_fills_one_rectangle_with_one_grey():
    image = np.full((40, 40, 1), 128.0, dtype="float32")
    image[::2] = 60.0  # stripes, so that no fill value can look like the original everywhere
    unchanged = augment(tf.constant(image), seed_of(5, 6), replace(NO_AUGMENT, erase=0.0)).numpy()
    np.testing.assert_array_equal(unchanged, image)
    always = replace(NO_AUGMENT, erase=1.0)
    areas = []
    for seed in range(6):
        erased = augment(tf.constant(image), seed_of(seed, 11), always).numpy()
        assert erased.shape == image.shape
        changed = (erased != image)[..., 0]
        assert changed.any(), seed
        rows, cols = np.nonzero(changed)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        box = erased[top:bottom, left:right, 0]
        # One axis-aligned rectangle, one grey inside it, the rest untouched.
        assert np.unique(box).size == 1, seed
        outside = np.ones(changed.shape, dtype=bool)
        outside[top:bottom, left:right] = False
        np.testing.assert_array_equal(erased[outside], image[outside])
        areas.append((bottom - top) * (right - left) / changed.size)
    # 2-20% of the image (the rectangle is rounded to whole pixels).
    assert all(0.01 <= area <= 0.25 for area in areas), areas
    with pytest.raises(ValueError, match="erase"):
        replace(NO_AUGMENT, erase=1.5)


@pytest.mark.parametrize("fill", ["nearest", "reflect"])
def test_geometric_augmentation_can_continue_the_image_instead_of_black_borders(fill):
    image = tf.constant(np.full((48, 48, 1), 200.0, dtype="float32"))
    shrink_and_turn = replace(NO_AUGMENT, zoom=0.3, rotation_deg=20.0, shift=0.1)
    black = [augment(image, seed_of(seed, 3), shrink_and_turn).numpy() for seed in range(6)]
    continued = [augment(image, seed_of(seed, 3), replace(shrink_and_turn, fill=fill)).numpy() for seed in range(6)]
    assert min(output.min() for output in black) == 0.0  # the default fill leaves black corners
    assert min(output.min() for output in continued) > 199.0
