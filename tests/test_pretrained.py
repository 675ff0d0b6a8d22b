"""The ImageNet weights and their port: the reader (format, strides, checksum) and the Keras network, proven on
ImageNet itself (natural photos that installed packages ship get their classes), then the backbone as the
project builds it (grey stem, frozen parts, the parts contract, the ONNX export)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import sys
import types
from dataclasses import replace
from importlib.util import find_spec

import numpy as np
import pytest
from PIL import Image

from pipeline import efficientnet, pretrained
from pipeline.model import build_model, model_parts
from tests.helpers import train_params

# ImageNet class indices: what each photo shows, and the classes a working port must rank in its top 5.
MILITARY_UNIFORM = 652
CATS = {281, 282, 283, 285, 287}  # tabby, tiger cat, Persian, Egyptian cat, lynx
COFFEE = {504, 967, 968}  # coffee mug, espresso, cup


def installed(variant: str) -> bool:
    return find_spec(pretrained.WEIGHTS[variant].module) is not None


def photos(size: int) -> np.ndarray:
    """matplotlib's grace_hopper.jpg, scikit-image's chelsea and coffee: centre squares at `size`, RGB."""
    import matplotlib.cbook
    from skimage import data

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as hopper:
        pictures = [np.asarray(hopper.convert("RGB")), data.chelsea(), data.coffee()]
    squares = []
    for picture in pictures:
        image = Image.fromarray(picture)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
        squares.append(np.asarray(square, dtype=np.float32))
    return np.stack(squares)


@pytest.mark.parametrize("variant", sorted(efficientnet.VARIANTS))
def test_the_port_names_imagenet_photos(variant):
    """A wrong padding, epsilon, layout or stride reading would lose these at once."""
    if not installed(variant):
        pytest.skip(f"{pretrained.WEIGHTS[variant].package} is not installed (the 'backbones' extra)")
    model = efficientnet.imagenet_classifier(variant)
    top5 = [set(np.argsort(-row)[:5].tolist()) for row in model.predict(photos(model.input_shape[1]), verbose=0)]
    assert MILITARY_UNIFORM in top5[0], top5[0]
    assert top5[1] & CATS, top5[1]
    assert top5[2] & COFFEE, top5[2]


def test_block_table_matches_every_weights_file():
    """The architecture is built from the paper's table; each installed file has exactly its blocks, with
    their widths and kernels (loading also fails on any tensor left over or any layer without one)."""
    specs = efficientnet.block_specs("efficientnet_lite0")
    assert len(specs) == 16 and [s.stride for s in specs].count(2) == 4
    assert (specs[0].inputs, specs[-1].outputs) == (32, 320)
    for variant in filter(installed, efficientnet.VARIANTS):
        state = pretrained.load_weights(variant)
        specs = efficientnet.block_specs(variant)
        assert len({key.split(".")[1] for key in state if key.startswith("_blocks.")}) == len(specs), variant
        for spec in specs:
            kernel = state[f"_blocks.{spec.index}._depthwise_conv.weight"]
            assert kernel.shape == (spec.inputs * spec.expansion, 1, spec.kernel, spec.kernel), (variant, spec)
            assert state[f"_blocks.{spec.index}._project_conv.weight"].shape[0] == spec.outputs
    assert efficientnet.round_filters(112, 1.1) == 120 and efficientnet.round_filters(16, 1.1) == 16
    with pytest.raises(ValueError, match="unknown"):
        efficientnet.block_specs("efficientnet_b7")


def test_the_grey_stem_is_the_rgb_network_on_a_grey_image():
    """One grey channel through the summed stem kernel equals the ImageNet network on the grey image copied
    into red, green and blue."""
    rgb = efficientnet.imagenet_classifier("efficientnet_lite0", size=64)
    grey_model = build_model(64, train_params(backbone="efficientnet_lite0", image_size=64, normalization="none",
                                              frozen_stages=0, freeze_batch_norm=False, crop=1.0))
    grey = photos(64).mean(axis=3, keepdims=True)
    trunk = type(rgb)(rgb.inputs, rgb.get_layer("global_pool").output)
    expected = trunk(np.repeat(grey, 3, axis=3), training=False).numpy()
    pooled = type(grey_model)(grey_model.inputs, model_parts(grey_model).pooled)(grey, training=False).numpy()
    np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-4)


def test_frozen_stages_and_batch_norm_stay_as_imagenet_left_them():
    model = build_model(64, train_params(backbone="efficientnet_lite0", image_size=64, frozen_stages=2,
                                         freeze_batch_norm=True, crop=1.0))
    trainable = {layer.name: layer.trainable for layer in model.layers}
    assert not trainable["stem_conv"] and not trainable["block2_project_conv"]  # stage 2 ends with block 2
    assert trainable["block3_expand_conv"] and trainable["head_conv"]
    assert not trainable["block3_expand_bn"] and not trainable["head_bn"]
    assert all(trainable[name] for name in ("pneumonia_probability", "viral_probability", "orientation_probabilities"))
    parts = model_parts(model)
    assert parts.stages[-1] == "stage7_output" and len(parts.stages) == 7
    assert tuple(parts.feature_map.shape) == (None, 2, 2, efficientnet.HEAD_FILTERS)


def test_the_saved_network_loads_in_safe_mode_as_it_was(tmp_path):
    """What the train stage saves and every later stage loads: the same outputs, the frozen parts still frozen."""
    import keras

    model = build_model(64, train_params(backbone="efficientnet_lite0", image_size=64, frozen_stages=1,
                                         freeze_batch_norm=True, crop=1.0))
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False, safe_mode=True)
    images = photos(64).mean(axis=3, keepdims=True)
    np.testing.assert_array_equal(loaded(images)["pneumonia"].numpy(), model(images)["pneumonia"].numpy())
    assert [layer.trainable for layer in loaded.layers] == [layer.trainable for layer in model.layers]
    assert model_parts(loaded).stages == model_parts(model).stages


def test_an_unknown_backbone_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="backbone"):
        train_params(backbone="resnet50")


# --------------------------------------------------------------------------------------------------
# The reader


def test_strided_views_are_read_through_their_strides():
    storage = np.arange(24, dtype=np.float32)
    view = pretrained._TensorView("0", 0, (2, 3, 4), (1, 2, 6))  # a transposed (4, 3, 2) tensor
    np.testing.assert_array_equal(pretrained._materialise(view, storage),
                                  np.arange(24, dtype=np.float32).reshape(4, 3, 2).transpose(2, 1, 0))
    offset = pretrained._TensorView("0", 5, (3,), (2,))
    np.testing.assert_array_equal(pretrained._materialise(offset, storage), [5, 7, 9])
    with pytest.raises(pretrained.PretrainedWeightsError, match="outside"):
        pretrained._materialise(pretrained._TensorView("0", 20, (3,), (2,)), storage)


def legacy_file(tensors: dict[str, tuple[np.ndarray, int, tuple, tuple]]) -> bytes:
    """A file in torch's legacy format, written without torch: `name -> (storage, offset, size, stride)`.
    torch's own names are stand-ins registered for the pickler only (what the reader resolves)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        return args

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2

    class Tensor:
        def __init__(self, key, offset, size, stride):
            self.key, self.offset, self.size, self.stride = key, offset, size, stride

        def __reduce__(self):
            return _rebuild_tensor_v2, (StorageRef(self.key), self.offset, self.size, self.stride, False, {})

    class StorageRef:
        def __init__(self, key):
            self.key = key

    class Writer(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, StorageRef):
                return ("storage", FloatStorage, obj.key, "cpu", len(storages[obj.key]), None)
            return None

    storages = {str(i): data for i, (data, *_) in enumerate(tensors.values())}
    state = {name: Tensor(str(i), offset, size, stride) for i, (name, (_, offset, size, stride)) in enumerate(tensors.items())}
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        buffer = io.BytesIO()
        for header in (pretrained.LEGACY_MAGIC, pretrained.LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(header, buffer, protocol=2)
        Writer(buffer, protocol=2).dump(state)
        pickle.dump(sorted(storages), buffer, protocol=2)
        for key in sorted(storages):
            buffer.write(struct.pack("<q", len(storages[key])) + storages[key].astype("<f4").tobytes())
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return buffer.getvalue()


def test_a_legacy_file_is_read_with_offsets_and_strides(tmp_path):
    kernel = np.arange(12, dtype=np.float32)
    path = tmp_path / "weights.pth"
    path.write_bytes(legacy_file({"conv.weight": (kernel, 0, (2, 3, 2), (1, 4, 2)), "bn.bias": (kernel, 4, (4,), (1,))}))
    state = pretrained.read_legacy_torch(path)
    np.testing.assert_array_equal(state["conv.weight"],
                                  np.lib.stride_tricks.as_strided(kernel, (2, 3, 2), (4, 16, 8)))
    np.testing.assert_array_equal(state["bn.bias"], [4, 5, 6, 7])


def test_a_damaged_or_foreign_file_is_refused(tmp_path):
    good = legacy_file({"w": (np.ones(4, np.float32), 0, (4,), (1,))})
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good[:-3])
    with pytest.raises(pretrained.PretrainedWeightsError, match="ends inside"):
        pretrained.read_legacy_torch(truncated)
    foreign = tmp_path / "foreign.pth"
    foreign.write_bytes(pickle.dumps(pretrained.LEGACY_MAGIC) + pickle.dumps(pretrained.LEGACY_PROTOCOL)
                        + pickle.dumps({}) + pickle.dumps(types.SimpleNamespace(x=1)))
    with pytest.raises(pretrained.PretrainedWeightsError, match="unexpected object"):
        pretrained.read_legacy_torch(foreign)
    # Not even the first pickle of a file may name a callable: nothing outside the list is ever resolved.
    hostile = tmp_path / "hostile.pth"
    hostile.write_bytes(pickle.dumps(os.getcwd))
    with pytest.raises(pretrained.PretrainedWeightsError, match="unexpected object"):
        pretrained.read_legacy_torch(hostile)
    not_torch = tmp_path / "zip.pth"
    not_torch.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(pretrained.PretrainedWeightsError):
        pretrained.read_legacy_torch(not_torch)


def test_an_altered_weights_file_is_refused_before_it_is_read(tmp_path):
    shipped = pretrained.WEIGHTS["efficientnet_lite0"]
    data = bytearray(shipped.path().read_bytes())
    assert hashlib.sha256(data).hexdigest() == shipped.sha256
    data[len(data) // 2] ^= 1
    altered = tmp_path / shipped.filename
    altered.write_bytes(bytes(data))
    with pytest.raises(pretrained.PretrainedWeightsError, match="altered"):
        pretrained.verify_sha256(altered, shipped.sha256)
    missing = replace(shipped, module="no_such_weights_package")
    with pytest.raises(pretrained.PretrainedWeightsError, match="make setup"):
        missing.path()


def test_the_backbone_exports_to_one_onnx_artefact_that_agrees_with_keras():
    """The serving artefact of a pretrained network: built (and checked against TensorFlow inside
    `artefact.build`) with a gate on its last two stages, its CAM on the head's feature map."""
    from pipeline import artefact, ood
    from scoring.decision import Decision
    from scoring.runtime import ServingArtefact

    model = build_model(96, train_params(backbone="efficientnet_lite0", image_size=64, frozen_stages=0,
                                         freeze_batch_norm=True, crop=1.0))
    images = photos(96).mean(axis=3).astype(np.uint8)
    layers = ood.block_outputs(model, 2)
    assert layers == ["stage6_output", "stage7_output"]
    pooled = ood.network_features(model, layers, np.concatenate([images] * 4)).pooled
    gate = artefact.Gate(tuple(ood.fit_layer(name, values, np.arange(12) % 2) for name, values in zip(layers, pooled)))
    served = ServingArtefact(artefact.build(model, Decision(0.5, "youden", 96, ood={"limit": 1e9}), gate))
    scores = served.run(images, with_cam=True)
    assert scores.cam.shape == (3, 2, 2) and scores.ood.shape == (3,)
    assert np.all((0 < scores.probability) & (scores.probability < 1))
