"""EfficientNet-Lite (Tan & Le 2019; the Lite variants of the TensorFlow TPU repository) as Keras 3
Functional layers, with the ImageNet weights of `pipeline.pretrained` loaded into them.

Lite differs from EfficientNet by what runs well on mobile CPUs: ReLU6 instead of swish, no
squeeze-and-excitation, and a stem (32 filters) and head (1280) that do not scale with the width. The
padding is TensorFlow's "same" (the PyTorch port pads statically the same way), BatchNorm's epsilon 1e-3,
and the network takes RGB scaled as (x - 127) / 128. Layer names follow the weights' own
(`_blocks.3._expand_conv` is `block3_expand_conv`), so every weight has exactly one home.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

from pipeline import pretrained

STEM_FILTERS, HEAD_FILTERS = 32, 1280
BATCH_NORM_EPSILON = 1e-3
# PyTorch's momentum 0.01 is Keras's 0.99 (the share of the old statistic kept).
BATCH_NORM_MOMENTUM = 0.99
IMAGENET_CLASSES = 1000
# What the ImageNet training fed the network: (x - 127) / 128 on 0..255 RGB.
INPUT_MEAN, INPUT_SCALE = 127.0, 128.0


@dataclass(frozen=True)
class StageSpec:
    """One stage of the base network (B0): kernel, stride of its first block, expansion, width, repeats."""

    kernel: int
    stride: int
    expansion: int
    filters: int
    repeats: int


BASE_STAGES = (
    StageSpec(3, 1, 1, 16, 1), StageSpec(3, 2, 6, 24, 2), StageSpec(5, 2, 6, 40, 2), StageSpec(3, 2, 6, 80, 3),
    StageSpec(5, 1, 6, 112, 3), StageSpec(5, 2, 6, 192, 4), StageSpec(3, 1, 6, 320, 1),
)
# (width, depth) multipliers and the resolution each variant was trained at.
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}


@dataclass(frozen=True)
class BlockSpec:
    index: int
    stage: int
    kernel: int
    stride: int
    expansion: int
    inputs: int
    outputs: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.inputs == self.outputs


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """The reference implementation's rounding of a scaled width to a multiple of `divisor`."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def block_specs(variant: str) -> list[BlockSpec]:
    """Every MBConv block of `variant`, in order. Lite keeps the first and last stages' repeats unscaled."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant '{variant}': one of {sorted(VARIANTS)}")
    width, depth, _ = VARIANTS[variant]
    specs, inputs = [], STEM_FILTERS
    for stage, base in enumerate(BASE_STAGES, start=1):
        repeats = base.repeats if stage in (1, len(BASE_STAGES)) else math.ceil(depth * base.repeats)
        outputs = round_filters(base.filters, width)
        for repeat in range(repeats):
            specs.append(BlockSpec(len(specs), stage, base.kernel, base.stride if repeat == 0 else 1,
                                   base.expansion, inputs, outputs))
            inputs = outputs
    return specs


def stage_output_name(stage: int) -> str:
    return f"stage{stage}_output"


def trunk(x, variant: str) -> tuple:
    """The convolutional trunk applied to `x` (N x S x S x 3, already scaled): the head's feature map (after
    its ReLU6) and each stage's output, shallow to deep (each passed through a named identity layer)."""
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "stem")
    stage_outputs = []
    specs = block_specs(variant)
    for spec in specs:
        x = _mbconv(x, spec)
        if spec.index == len(specs) - 1 or specs[spec.index + 1].stage != spec.stage:
            x = layers.Identity(name=stage_output_name(spec.stage))(x)
            stage_outputs.append(x)
    return _conv_bn(x, HEAD_FILTERS, 1, 1, "head"), stage_outputs


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(max_value=6.0, name=f"{name}_relu6")(x) if activation else x


def _mbconv(x, spec: BlockSpec):
    """Inverted residual: 1x1 expansion (none when the ratio is 1), depthwise k x k, 1x1 projection."""
    name = f"block{spec.index}"
    block_input = x
    if spec.expansion != 1:
        x = _conv_bn(x, spec.inputs * spec.expansion, 1, 1, f"{name}_expand")
    x = layers.DepthwiseConv2D(spec.kernel, strides=spec.stride, padding="same", use_bias=False,
                               name=f"{name}_depthwise_conv")(x)
    x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON,
                                  name=f"{name}_depthwise_bn")(x)
    x = layers.ReLU(max_value=6.0, name=f"{name}_depthwise_relu6")(x)
    x = _conv_bn(x, spec.outputs, 1, 1, f"{name}_project", activation=False)
    return layers.Add(name=f"{name}_add")([x, block_input]) if spec.residual else x


def _torch_prefixes(variant: str) -> dict[str, str]:
    """Keras layer name -> the prefix of its weights in the state dict."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1"}
    for spec in block_specs(variant):
        own, theirs = f"block{spec.index}", f"_blocks.{spec.index}"
        if spec.expansion != 1:
            names.update({f"{own}_expand_conv": f"{theirs}._expand_conv", f"{own}_expand_bn": f"{theirs}._bn0"})
        names.update({f"{own}_depthwise_conv": f"{theirs}._depthwise_conv", f"{own}_depthwise_bn": f"{theirs}._bn1",
                      f"{own}_project_conv": f"{theirs}._project_conv", f"{own}_project_bn": f"{theirs}._bn2"})
    return names


def load_imagenet_weights(model: keras.Model, variant: str, state: dict[str, np.ndarray] | None = None,
                          grey_input: bool = True) -> None:
    """Set every trunk layer of `model` from the ImageNet state dict; every tensor of the file but the
    classifier (`_fc`) and the BatchNorm step counters must find its layer, and every layer its tensors.

    With `grey_input`, the stem takes one channel: an RGB kernel applied to a grey image replicated in its
    three channels equals the kernel summed over them, so the sum is loaded."""
    state = pretrained.load_weights(variant) if state is None else state
    used = set()
    for layer_name, prefix in _torch_prefixes(variant).items():
        layer = model.get_layer(layer_name)
        if isinstance(layer, layers.BatchNormalization):
            keys = [f"{prefix}.{part}" for part in ("weight", "bias", "running_mean", "running_var")]
            values = [state[key] for key in keys]
        else:
            keys = [f"{prefix}.weight"]
            values = [_keras_kernel(layer, state[keys[0]], grey_input and layer_name == "stem_conv")]
        layer.set_weights(values)
        used.update(keys)
    left = {key for key in state if key not in used and not key.startswith("_fc.")
            and not key.endswith("num_batches_tracked")}
    if left:
        raise pretrained.PretrainedWeightsError(f"weights with no layer in the port: {sorted(left)[:5]}")


def load_classifier_weights(dense: layers.Dense, state: dict[str, np.ndarray]) -> None:
    dense.set_weights([state["_fc.weight"].T, state["_fc.bias"]])


def _keras_kernel(layer: layers.Layer, weight: np.ndarray, sum_channels: bool) -> np.ndarray:
    """PyTorch (out, in, kh, kw) as Keras (kh, kw, in, out); depthwise (in, 1, kh, kw) as (kh, kw, in, 1)."""
    if isinstance(layer, layers.DepthwiseConv2D):
        return weight.transpose(2, 3, 0, 1)
    kernel = weight.transpose(2, 3, 1, 0)
    return kernel.sum(axis=2, keepdims=True) if sum_channels else kernel


def imagenet_classifier(variant: str, size: int | None = None) -> keras.Model:
    """The whole ImageNet network (RGB 0..255 in, 1000 class probabilities out), weights loaded: the port's
    proof, by classifying natural photos."""
    size = size or VARIANTS[variant][2]
    inputs = keras.Input((size, size, 3), name="rgb")
    scaled = layers.Rescaling(1.0 / INPUT_SCALE, offset=-INPUT_MEAN / INPUT_SCALE, name="imagenet_scale")(inputs)
    features, _ = trunk(scaled, variant)
    pooled = layers.GlobalAveragePooling2D(name="global_pool")(features)
    classifier = layers.Dense(IMAGENET_CLASSES, activation="softmax", name="imagenet_classes")
    model = keras.Model(inputs, classifier(pooled), name=variant)
    state = pretrained.load_weights(variant)
    load_imagenet_weights(model, variant, state, grey_input=False)
    load_classifier_weights(classifier, state)
    return model


def layers_up_to_stage(variant: str, stage: int) -> list[str]:
    """The names of the stem's layers and of every block's layers in stages 1..`stage` (0: none at all)."""
    if stage <= 0:
        return []
    names = [f"stem_{part}" for part in ("conv", "bn", "relu6")]
    for spec in block_specs(variant):
        if spec.stage <= stage:
            names += [f"block{spec.index}_{part}" for part in
                      ("expand_conv", "expand_bn", "expand_relu6", "depthwise_conv", "depthwise_bn",
                       "depthwise_relu6", "project_conv", "project_bn", "add")]
    return names
