"""The CNN and its input pipeline. Preprocessing (resize, rescale) lives inside the model, so
serving feeds raw greyscale pixels (0..255, float32, N x S x S x 1) exactly as preprocess stores them.

One trunk, three heads on its pooled features:
- `pneumonia`: the probability of pneumonia (the diagnosis);
- `viral`: the probability that a pneumonia is viral rather than bacterial (trained on pneumonia images);
- `orientation`: which of the eight ways an X-ray can lie (`ORIENTATIONS`) the image is in. Turned copies
  of the training images are free labels, and predicting them is a classic self-supervised task.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from pipeline import efficientnet
from pipeline import pretrained as pretrained_weights
from pipeline.arrays import NO_SUBTYPE
from pipeline.params import AugmentParams, TrainParams
from scoring.decision import INPUT_NAME
from scoring.orientation import ORIENTATIONS

OUTPUT_NAME = "pneumonia_probability"
SUBTYPE_OUTPUT_NAME = "viral_probability"
ORIENTATION_OUTPUT_NAME = "orientation_probabilities"
POOLING_LAYER = "global_pool"
CROP_LAYER = "centre_crop"
SCRATCH = "scratch"
BACKBONES = (SCRATCH, *efficientnet.VARIANTS)
# A typical training X-ray's grey-level spread (61) over ImageNet's input scale (128): per-image
# standardisation times this feeds a pretrained trunk inputs of the spread it was trained on.
XRAY_SPREAD = 0.48


@dataclass(frozen=True)
class ModelParts:
    """How the export, the input gate, the heatmap and the tools find a network's parts: the one contract of
    this builder, whatever the backbone.

    - `feature_map`: the (symbolic) tensor global average pooling reduces: what the CAM is computed on;
    - `stages`: the layers whose outputs are the trunk's stages, shallow to deep (the scratch network's last
      stage is the feature map; EfficientNet's seven stages are followed by its 1x1 head convolution);
    - `pooled`: the pooled features the heads read (before dropout);
    - `heads`: the dense head of each output (`pneumonia`, `viral`, `orientation`);
    - `crop`: the central fraction of the input side the network sees.
    """

    feature_map: Any
    stages: tuple[str, ...]
    pooled: Any
    heads: dict[str, layers.Dense]
    crop: float


class ModelPartsError(ValueError):
    """The model was not built by `build_model`: it lacks a part the contract names."""


def stage_output_name(stage: int) -> str:
    return efficientnet.stage_output_name(stage)


def model_parts(model: keras.Model) -> ModelParts:
    names = [layer.name for layer in model.layers]
    stages = tuple(sorted((name for name in names if re.fullmatch(r"stage\d+_output", name)),
                          key=lambda name: int(name[5:].split("_")[0])))
    missing = [name for name in (POOLING_LAYER, OUTPUT_NAME, SUBTYPE_OUTPUT_NAME, ORIENTATION_OUTPUT_NAME)
               if name not in names]
    if missing or not stages:
        raise ModelPartsError(f"the model has no {', '.join(missing) or 'stage outputs'}: not this project's network")
    heads = {head: model.get_layer(name) for head, name in
             (("pneumonia", OUTPUT_NAME), ("viral", SUBTYPE_OUTPUT_NAME), ("orientation", ORIENTATION_OUTPUT_NAME))}
    crop = model.get_layer(CROP_LAYER).height / int(model.input_shape[1]) if CROP_LAYER in names else 1.0
    pooling = model.get_layer(POOLING_LAYER)
    return ModelParts(pooling.input, stages, pooling.output, heads, crop)


def network_record(params: TrainParams, model: keras.Model) -> dict[str, Any]:
    """What the network is and where its starting weights came from (the model card's credit)."""
    origin = ("random initialisation (trained from scratch)" if params.backbone == SCRATCH
              else pretrained_weights.WEIGHTS[params.backbone].credit())
    return {"backbone": params.backbone, "initial_weights": origin, "image_size": params.image_size,
            "parameters": int(model.count_params())}


def build_model(input_size: int, params: TrainParams, pretrained: bool = True) -> keras.Model:
    """The network for `params.backbone`: raw greyscale pixels in (resized, rescaled and normalised inside),
    a convolutional trunk, global average pooling, dropout, and the three heads.

    `scratch` is this project's own CNN (`_scratch_trunk`), trained from random weights; an
    `efficientnet_lite*` backbone is the ImageNet-trained EfficientNet-Lite (`pipeline.efficientnet`), its
    weights loaded when `pretrained`. Its stem and first `frozen_stages` stages are frozen (kept as ImageNet
    left them, and cheaper: no gradients through the largest feature maps), and with `freeze_batch_norm`
    every BatchNorm layer of the trunk keeps ImageNet's statistics (inference mode throughout).

    normalization "per_image" standardises each image to zero mean and unit variance (times `XRAY_SPREAD` for
    a pretrained trunk), so a darker or flatter exposure reaches the convolutions looking like any other;
    "none" rescales to 0..1 (scratch) or as ImageNet did, (x - 127) / 128. `crop` < 1 keeps only that
    central fraction of the side (borders hold markers and text, not lungs).
    """
    if params.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone '{params.backbone}': one of {', '.join(BACKBONES)}")
    inputs = keras.Input(shape=(input_size, input_size, 1), name=INPUT_NAME)
    x = _prepare(inputs, params)
    if params.backbone == SCRATCH:
        features = _scratch_trunk(x, params)
    else:
        features, _ = efficientnet.trunk(x, params.backbone)  # its 1x1 head convolution is not a stage
    x = layers.GlobalAveragePooling2D(name=POOLING_LAYER)(features)
    x = layers.Dropout(params.dropout, name="dropout")(x)
    outputs = {
        "viral": layers.Dense(1, activation="sigmoid", name=SUBTYPE_OUTPUT_NAME)(x),
        "orientation": layers.Dense(len(ORIENTATIONS), activation="softmax", name=ORIENTATION_OUTPUT_NAME)(x),
        "pneumonia": layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME)(x),
    }
    model = keras.Model(inputs, outputs, name=f"pneumonia_{params.backbone}")
    if params.backbone != SCRATCH:
        if pretrained:
            efficientnet.load_imagenet_weights(model, params.backbone)
        _freeze(model, params)
    return model


def _prepare(inputs, params: TrainParams):
    """Crop, resize and normalise raw 0..255 pixels as the trunk expects them."""
    x = inputs
    if params.crop < 1.0:
        kept = round(inputs.shape[1] * params.crop)
        x = layers.CenterCrop(kept, kept, name=CROP_LAYER)(x)
    if params.image_size != x.shape[1]:
        x = layers.Resizing(params.image_size, params.image_size, interpolation="bilinear", name="resize")(x)
    if params.backbone == SCRATCH:
        x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
        return _standardise(x) if params.normalization == "per_image" else x
    if params.normalization == "per_image":
        return layers.Rescaling(XRAY_SPREAD, name="imagenet_spread")(_standardise(x))
    return layers.Rescaling(1.0 / efficientnet.INPUT_SCALE, offset=-efficientnet.INPUT_MEAN / efficientnet.INPUT_SCALE,
                            name="imagenet_scale")(x)


def _standardise(x):
    # A built-in layer (not a Lambda): models must load in Keras safe mode and convert to ONNX.
    return layers.LayerNormalization(axis=(1, 2, 3), center=False, scale=False, epsilon=1e-5,
                                     name="per_image_standardise")(x)


def _freeze(model: keras.Model, params: TrainParams) -> None:
    frozen = set(efficientnet.layers_up_to_stage(params.backbone, params.frozen_stages))
    for layer in model.layers:
        if layer.name in frozen or (params.freeze_batch_norm and isinstance(layer, layers.BatchNormalization)):
            layer.trainable = False


def _scratch_trunk(x, params: TrainParams):
    """Conv blocks (conv-BN-ReLU x convs_per_block, then max-pool); each block's pooled output is a stage.
    With `residual`, each block's input is added back before its last ReLU (He et al. 2016).
    `stem_filters` > 0 adds a strided convolution first, so the blocks work at half of `image_size`."""
    filters = params.filters
    stride = 2 if params.stem_filters else 1
    if params.image_size < stride * 2 ** len(filters):
        raise ValueError(f"image_size {params.image_size} is too small for {len(filters)} pooling blocks")
    if params.stem_filters:
        x = layers.Conv2D(params.stem_filters, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
        x = layers.ReLU(name="stem_relu")(x)
    for block, width in enumerate(filters, start=1):
        block_input = x
        for conv in range(1, params.convs_per_block + 1):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}")(x)
            # momentum 0.9, not 0.99: with ~100 steps an epoch the moving statistics must settle within
            # the first epoch, or validation (inference mode) sees saturated outputs and an AUC of 0.5.
            x = layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn{conv}")(x)
            if params.residual and conv == params.convs_per_block:
                x = layers.Add(name=f"block{block}_add")([x, _shortcut(block_input, width, block)])
            x = layers.ReLU(name=f"block{block}_relu{conv}")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
        x = layers.Identity(name=stage_output_name(block))(x)
    return x


def _shortcut(block_input: tf.Tensor, width: int, block: int) -> tf.Tensor:
    """The identity, or a 1x1 projection (with batch normalisation) where the block changes the width."""
    if block_input.shape[-1] == width:
        return block_input
    projected = layers.Conv2D(width, 1, use_bias=False, name=f"block{block}_shortcut_conv")(block_input)
    return layers.BatchNormalization(momentum=0.9, name=f"block{block}_shortcut_bn")(projected)


def orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """`image` (S x S x 1) put in orientation number `orientation` of `ORIENTATIONS`: mirrored left-right
    first when it is a mirrored one, then turned anticlockwise by 90 degrees times its turns."""
    mirrored = orientation >= len(ORIENTATIONS) // 2
    image = tf.cond(mirrored, lambda: tf.image.flip_left_right(image), lambda: image)
    return tf.image.rot90(image, k=orientation % (len(ORIENTATIONS) // 2))


def augment(image: tf.Tensor, seed: tf.Tensor, settings: AugmentParams, zoom_in: tf.Tensor | None = None) -> tf.Tensor:
    """Random geometry and exposure, from a stateless seed so every run draws the same numbers.

    `zoom_in` adds a zoom of up to that fraction on top of `settings.zoom` (the normals' framing
    correction). Sensor noise comes last, as a detector adds it to whatever reaches it.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=8)
    size = tf.shape(image)[0]
    angle = _uniform(seeds[0], settings.rotation_deg) * (math.pi / 180.0)
    scale = 1.0 + _uniform(seeds[1], settings.zoom)
    if zoom_in is not None:
        # Its own stream (fold_in), so that every other draw is what it would be without it. Left out of the
        # graph when off: even an added zero lets the graph optimiser round the scale differently.
        scale = scale + zoom_in * tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 4))
    shifts = _uniform(seeds[2], settings.shift, shape=[2]) * tf.cast(size, tf.float32)
    image = _affine(image, angle, scale, shifts, settings.fill)
    brightness = _uniform(seeds[3], settings.brightness) * 255.0
    contrast = 1.0 + _uniform(seeds[4], settings.contrast)
    log_gamma = _uniform(seeds[5], settings.gamma)
    mean = tf.reduce_mean(image)
    image = (image - mean) * contrast + mean + brightness
    image = 255.0 * tf.pow(tf.clip_by_value(image / 255.0, 0.0, 1.0), tf.exp(log_gamma))
    if settings.downscale > 0:
        image = _downscale(image, tf.random.experimental.stateless_fold_in(seed, 1), settings.downscale)
    if settings.erase > 0:
        image = _erase(image, tf.random.experimental.stateless_fold_in(seed, 2), settings.erase)
    # Sensor noise of a random strength up to `noise` (in grey levels).
    noise_level = tf.abs(_uniform(seeds[6], settings.noise))
    image = image + noise_level * tf.random.stateless_normal(tf.shape(image), seed=seeds[7])
    return tf.clip_by_value(image, 0.0, 255.0)


def _erase(image: tf.Tensor, seed: tf.Tensor, probability: float) -> tf.Tensor:
    """With `probability`, one random rectangle (2-20% of the area, aspect 1:3 to 3:1) filled with a
    random grey (random erasing, Zhong et al. 2020): no single region may decide alone."""
    seeds = tf.random.experimental.stateless_split(seed, num=5)
    size = tf.cast(tf.shape(image)[0], tf.float32)
    area = tf.random.stateless_uniform([], seeds[0], 0.02, 0.20) * size * size
    log_aspect = tf.random.stateless_uniform([], seeds[1], -math.log(3.0), math.log(3.0))
    height = tf.minimum(tf.sqrt(area * tf.exp(log_aspect)), size)
    width = tf.minimum(tf.sqrt(area / tf.exp(log_aspect)), size)
    corner = tf.random.stateless_uniform([2], seeds[2], 0.0, 1.0) * (size - tf.stack([height, width]))
    rows = tf.range(size)[:, tf.newaxis, tf.newaxis]
    cols = tf.range(size)[tf.newaxis, :, tf.newaxis]
    inside = ((rows >= corner[0]) & (rows < corner[0] + height) & (cols >= corner[1]) & (cols < corner[1] + width))
    apply = tf.random.stateless_uniform([], seeds[3], 0.0, 1.0) < probability
    fill = tf.random.stateless_uniform([], seeds[4], 0.0, 255.0)
    return tf.where(inside & apply, fill, image)


def _downscale(image: tf.Tensor, seed: tf.Tensor, limit: float) -> tf.Tensor:
    """Down to a random fraction (1 - limit .. 1) of the side and back: the detail a lower-resolution
    detector, export or viewer would have lost."""
    if not 0.0 < limit < 1.0:
        raise ValueError(f"augment.downscale must be in (0, 1), got {limit}")
    size = tf.shape(image)[0:2]
    fraction = 1.0 - tf.abs(_uniform(seed, limit))
    small = tf.maximum(tf.cast(tf.round(tf.cast(size, tf.float32) * fraction), tf.int32), 1)
    image_small = tf.image.resize(image, small, method="bilinear", antialias=True)
    return tf.ensure_shape(tf.image.resize(image_small, size, method="bilinear"), image.shape)


def _uniform(seed: tf.Tensor, limit: float, shape: list[int] | None = None) -> tf.Tensor:
    return tf.random.stateless_uniform(shape or [], seed=seed, minval=-limit, maxval=limit)


def _affine(image: tf.Tensor, angle: tf.Tensor, scale: tf.Tensor, shifts: tf.Tensor, fill: str) -> tf.Tensor:
    """Rotate by `angle`, zoom by `scale` and shift about the centre. Uncovered pixels are black
    (`constant`) or continue the image (`nearest` edge pixels, `reflect`): black borders are never in a real
    X-ray and pull the per-image statistics."""
    size = tf.cast(tf.shape(image)[0], tf.float32)
    centre = (size - 1.0) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    out_x, out_y = centre + shifts[0], centre + shifts[1]
    # The transform maps each output pixel to the input pixel it samples.
    transform = tf.stack([cos, sin, centre - cos * out_x - sin * out_y,
                          -sin, cos, centre + sin * out_x - cos * out_y, 0.0, 0.0])
    size_int = tf.shape(image)[0:2]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis], transforms=transform[tf.newaxis], output_shape=size_int,
        fill_value=0.0, interpolation="BILINEAR", fill_mode=fill.upper())[0]


def make_dataset(images: np.ndarray, labels: np.ndarray, subtypes: np.ndarray, batch_size: int, seed: int,
                 augmentation: AugmentParams | None = None, orientation_rate: float = 0.0,
                 class_weights: dict[int, float] | None = None, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0) -> tf.data.Dataset:
    """In-memory dataset of (float32 N x S x S x 1 raw pixels, targets, sample weights), targets and weights
    keyed by head. Shuffled, augmented and turned (`orientation_rate` of the images) only when
    `augmentation` is given. A turned image teaches the orientation head only; the viral head learns from
    pneumonia images only; `class_weights` balance the pneumonia head; `mixup_alpha` > 0 blends the upright
    images of each augmented batch in pairs (`_mixup`), `cutmix_alpha` > 0 pastes a part of one into the
    other (`_cutmix`)."""
    weights = class_weights or {0: 1.0, 1: 1.0}
    class_weight = np.where(labels == 1, weights[1], weights[0]).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((images[..., np.newaxis], labels.astype(np.float32),
                                                  subtypes.astype(np.int32), class_weight))
    dataset = dataset.map(lambda x, *rest: (tf.cast(x, tf.float32), *rest), num_parallel_calls=tf.data.AUTOTUNE)
    if augmentation is not None:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda item, item_seed: _training_example(*item, item_seed, augmentation, orientation_rate),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        dataset = dataset.map(lambda *item: _example(*item, tf.constant(0)), num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size)
    for offset, alpha, mix in ((1, mixup_alpha, _mixup), (2, cutmix_alpha, _cutmix)):
        if augmentation is not None and alpha > 0:
            batch_seeds = tf.data.Dataset.random(seed=seed + offset, rerandomize_each_iteration=True).batch(2)
            dataset = tf.data.Dataset.zip((dataset, batch_seeds)).map(
                lambda batch, batch_seed, mix=mix, alpha=alpha: mix(*batch, batch_seed, alpha),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _mixup(images, targets, weights, seed, alpha: float):
    """mixup (Zhang et al. 2018) within a batch: each upright X-ray blended with the next one in the batch
    when that is upright too, with a weight of at least one half for its own (the larger of lam, 1 - lam,
    lam ~ Beta(alpha, alpha)). The targets follow `_blend_targets`. Turned images are left alone: the
    orientation head must be able to read them."""
    own, partner = _pair_shares(targets["orientation"], seed, alpha)
    return (_blend(images, own, partner), *_blend_targets(targets, weights, own, partner))


def _cutmix(images, targets, weights, seed, alpha: float):
    """CutMix (Yun et al. 2019) within a batch: into each upright X-ray, a rectangle of the next one in the
    batch (when that is upright too) is pasted, at most half of the area, at a random place (clipped at
    the border). The targets are blended by the area each X-ray keeps (`_blend_targets`)."""
    own, partner = _pair_shares(targets["orientation"], seed, alpha)
    size = tf.shape(images)[1]
    side = tf.cast(tf.round(tf.sqrt(1.0 - own) * tf.cast(size, tf.float32)), tf.int32)
    centres = tf.random.stateless_uniform([2, tf.shape(images)[0]], tf.random.experimental.stateless_fold_in(seed, 7),
                                          0, size, dtype=tf.int32)
    rows = tf.range(size)[tf.newaxis, :]

    def inside(centre: tf.Tensor) -> tf.Tensor:
        start = (centre - side // 2)[:, tf.newaxis]
        return (rows >= start) & (rows < start + side[:, tf.newaxis])

    pasted = inside(centres[0])[:, :, tf.newaxis] & inside(centres[1])[:, tf.newaxis, :]
    kept = 1.0 - tf.reduce_mean(tf.cast(pasted, tf.float32), axis=[1, 2])
    images = tf.where(pasted[..., tf.newaxis], tf.gather(images, partner), images)
    return (images, *_blend_targets(targets, weights, kept, partner))


def _pair_shares(orientation, seed, alpha: float):
    """Each X-ray's own share (at least one half: the larger of lam, 1 - lam, lam ~ Beta(alpha, alpha)) when
    it and its partner (the next in the batch) are both upright, else 1; and the partners."""
    count = tf.shape(orientation)[0]
    partner = tf.roll(tf.range(count), shift=1, axis=0)
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    first = tf.random.stateless_gamma([count], seeds[0], alpha)
    second = tf.random.stateless_gamma([count], seeds[1], alpha)
    total = first + second
    own = tf.where(total > 0, tf.maximum(first, second) / tf.maximum(total, 1e-30), 1.0)
    upright = tf.equal(orientation % (len(ORIENTATIONS) // 2), 0)
    return tf.where(upright & tf.gather(upright, partner), own, 1.0), partner


def _blend(values: tf.Tensor, own: tf.Tensor, partner: tf.Tensor) -> tf.Tensor:
    share = tf.reshape(own, tf.concat([tf.shape(own), tf.ones([tf.rank(values) - 1], tf.int32)], axis=0))
    return share * values + (1.0 - share) * tf.gather(values, partner)


def _blend_targets(targets, weights, own, partner):
    """The diagnosis targets and class weights blended by `own`; a subtype target kept only where both X-rays
    have one, an orientation only where both lie alike."""
    orientation = targets["orientation"]
    mixed = own < 1.0
    alike = tf.equal(orientation, tf.gather(orientation, partner))
    blended_targets = {"pneumonia": _blend(targets["pneumonia"], own, partner),
                       "viral": _blend(targets["viral"], own, partner), "orientation": orientation}
    blended_weights = {
        "pneumonia": _blend(weights["pneumonia"], own, partner),
        "viral": tf.where(mixed, weights["viral"] * tf.gather(weights["viral"], partner), weights["viral"]),
        "orientation": tf.where(mixed & ~alike, 0.0, weights["orientation"])}
    return blended_targets, blended_weights


def _training_example(image, label, subtype, class_weight, seed, settings: AugmentParams, rate: float):
    """Augmented (normals zoomed in further by up to `settings.normal_zoom_in`, so that framing stops
    telling the classes apart), then mirrored (`settings.flip`: the diagnosis heads learn from mirrored
    images too) and turned (`rate`: the orientation head only) at random; the orientation head is told
    which it got."""
    zoom_in = settings.normal_zoom_in * (1.0 - label) if settings.normal_zoom_in > 0 else None
    image = augment(image, seed, settings, zoom_in=zoom_in)
    seeds = tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(seed, 3), num=3)
    mirrored = tf.random.stateless_uniform([], seeds[0]) < (0.5 if settings.flip else 0.0)
    turned = tf.random.stateless_uniform([], seeds[1]) < rate
    turns = tf.where(turned, tf.random.stateless_uniform([], seeds[2], 1, 4, dtype=tf.int32), 0)
    orientation = turns + tf.where(mirrored, len(ORIENTATIONS) // 2, 0)
    return _example(orient(image, orientation), label, subtype, class_weight, orientation)


def _example(image, label, subtype, class_weight, orientation):
    upright = tf.cast(orientation % (len(ORIENTATIONS) // 2) == 0, tf.float32)
    has_subtype = tf.cast(subtype != NO_SUBTYPE, tf.float32)
    targets = {"pneumonia": label[tf.newaxis], "viral": tf.cast(tf.maximum(subtype, 0), tf.float32)[tf.newaxis],
               "orientation": orientation}
    weights = {"pneumonia": class_weight * upright, "viral": has_subtype * upright, "orientation": tf.constant(1.0)}
    return image, targets, weights


def balanced_class_weights(labels: np.ndarray) -> dict[int, float]:
    counts = np.bincount(labels.astype(np.int64), minlength=2)
    if (counts == 0).any():
        raise ValueError(f"training labels miss a class: counts {counts.tolist()}")
    return {label: float(len(labels) / (2 * count)) for label, count in enumerate(counts)}
