"""Reading checkpoint files that come from the internet: weights only, nothing executed, nothing read outside
what the file declares.

``read_state_dict`` reads a ``.safetensors`` file, or a PyTorch ``.pth``/``.bin``/``.pt`` zip checkpoint through a
restricted unpickler that only rebuilds tensors and plain containers: a checkpoint that references any other
callable is refused. torch is not needed.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint or model folder that cannot be used; the message names the file and the key or shape."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle inside a checkpoint references code other than tensor rebuilding."""


# ----------------------------------------------------------------------------------------------------------------
# Weights-only reading of PyTorch zip checkpoints
# ----------------------------------------------------------------------------------------------------------------

# Storage class name -> (numpy dtype of the raw bytes, MLX dtype of the tensor). bfloat16 has no numpy dtype: its
# bytes are read as uint16 and reinterpreted by MLX.
_STORAGE_DTYPES = {
    "FloatStorage": (np.float32, mx.float32),
    "DoubleStorage": (np.float64, mx.float32),  # MLX has no float64 on the GPU; weights never need it
    "HalfStorage": (np.float16, mx.float16),
    "BFloat16Storage": (np.uint16, mx.bfloat16),
    "LongStorage": (np.int64, mx.int64),
    "IntStorage": (np.int32, mx.int32),
    "ShortStorage": (np.int16, mx.int16),
    "CharStorage": (np.int8, mx.int8),
    "ByteStorage": (np.uint8, mx.uint8),
    "BoolStorage": (np.bool_, mx.bool_),
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _LazyStorage:
    """A storage record of the pickle; its bytes are read from the zip only when a tensor uses it."""

    def __init__(self, archive: "_TorchArchive", key: str, storage_type: _StorageType):
        self.archive, self.key, self.storage_type = archive, key, storage_type


def _rebuild_tensor(storage: _LazyStorage, offset, size, stride, *unused):
    np_dtype, mx_dtype = _STORAGE_DTYPES[storage.storage_type.name]
    raw = storage.archive.storage_bytes(storage.key)
    flat = np.frombuffer(raw, dtype=np_dtype)
    size, stride = tuple(size), tuple(stride)
    needed = offset + (sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0)
    if needed > flat.size:
        raise CheckpointError(
            f"{storage.archive.path}: tensor storage {storage.key!r} holds {flat.size} elements, "
            f"but a tensor of shape {list(size)} needs {needed}: the file is truncated or corrupt"
        )
    itemsize = flat.itemsize
    array = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride)
    )
    array = np.ascontiguousarray(array)
    if np_dtype is np.float64:
        array = array.astype(np.float32)
    out = mx.array(array)
    if mx_dtype == mx.bfloat16:
        out = out.view(mx.bfloat16)
    return out


def _rebuild_parameter(data, *unused):
    return data


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only the globals that a plain ``torch.save(state_dict)`` uses; everything else is refused."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "Size"): tuple,
        ("builtins", "tuple"): tuple,
        ("builtins", "list"): list,
        ("builtins", "dict"): dict,
        ("builtins", "set"): set,
    }

    def __init__(self, file, archive: "_TorchArchive"):
        super().__init__(file)
        self.archive = archive

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise UnsafeCheckpointError(
            f"{self.archive.path}: refusing to load: its pickle references {module}.{name}, which a weights-only "
            "checkpoint never needs (loading it could execute code)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self.archive.path}: unexpected persistent record {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"{self.archive.path}: storage record {key!r} has no known tensor type")
        return _LazyStorage(self.archive, key, storage_type)


class _TorchArchive:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise CheckpointError(
                f"{path}: not a readable PyTorch zip checkpoint (truncated, corrupt, or the legacy pre-1.6 "
                f"format): {e}"
            ) from None
        names = self.zip.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl record in the archive, found {len(pkl)}")
        self.prefix = pkl[0][: -len("data.pkl")]
        byteorder = self.prefix + "byteorder"
        if byteorder in names and self.zip.read(byteorder).strip() != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        self.pkl_name = pkl[0]

    def storage_bytes(self, key: str) -> bytes:
        try:
            return self.zip.read(f"{self.prefix}data/{key}")
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor storage {key!r} is missing from the archive") from None
        except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as e:
            raise CheckpointError(f"{self.path}: cannot read tensor storage {key!r}: {e}") from None

    def load(self):
        try:
            data = self.zip.read(self.pkl_name)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise CheckpointError(f"{self.path}: cannot read its pickle: {e}") from None
        try:
            return _SafeUnpickler(io.BytesIO(data), self).load()
        except CheckpointError:
            raise
        except Exception as e:  # a malformed pickle: report it, never a deep traceback
            raise CheckpointError(f"{self.path}: malformed checkpoint pickle: {type(e).__name__}: {e}") from None


def _unwrap(obj, path: Path) -> dict:
    """Strip ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers and ``module.`` / ``_orig_mod.`` prefixes."""
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        name = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod."):
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        if not isinstance(value, mx.array):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if name in out:
            raise CheckpointError(f"{path}: key {name!r} appears twice once prefixes are stripped")
        out[name] = value
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, mx.array]:
    """All tensors of a checkpoint file, by name, as MLX arrays in their stored dtype."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return _unwrap(mx.load(str(path)), path)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None
    return _unwrap(_TorchArchive(path).load(), path)
