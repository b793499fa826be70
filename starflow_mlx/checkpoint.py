"""Reading checkpoint files that come from the internet: weights only, nothing executed, nothing read outside
what the file declares, memory bounded by the tensors the file really holds.

``read_state_dict`` reads a ``.safetensors`` file, or a PyTorch ``.pth``/``.bin``/``.pt`` zip checkpoint; torch is
not needed. The promise is that of safetensors and ``torch.load(weights_only=True)``:

- The pickle inside a PyTorch zip is run by our own interpreter of the protocol-2 opcodes that ``torch.save``
  writes (the same set as torch's weights-only unpickler). It resolves only the globals such files use (tensor and
  parameter rebuilding, ``OrderedDict``, ``torch.Size``, dtypes, devices, and the ``set``/``bytes``/``slice``/
  ``complex`` of plain data); any other global, REDUCE on anything else, BUILD on anything but an ``OrderedDict``
  (``torch.save``'s ``_metadata``), object-creating opcodes (INST, OBJ, NEWOBJ, EXT) and persistent ids other
  than torch's storage record are refused. Nothing in the pickle can reach our own functions or classes. Sparse,
  meta, quantized and nested tensors (their own rebuild functions) are refused as unsupported.
- A tensor in the pickle becomes a record; it is checked and read only once its state-dict key is known, so every
  error names the file and the key: a known weight dtype (not complex, quantized or float8; float64 only with
  values inside float32's range, which it is read as), non-negative integer
  offset, sizes and strides, the lowest and highest element of the view inside the storage, and the storage's
  zip entry exactly as large as its record declares. Only the byte range a view needs is read.
- Zip entries must be stored (``torch.save`` never compresses; a compressed entry could inflate to any size),
  unencrypted, inside the file, not overlapping, uniquely named, at most ``_MAX_ZIP_ENTRIES`` of them, and every
  entry read must match its CRC-32.
- Views may overlap (``torch.save`` writes ``expand``-ed tensors with stride 0 and ``unfold``-ed ones with
  overlapping strides), but all the distinct views materialised from one file may not exceed
  ``_VIEW_BYTES_FACTOR`` times the tensor bytes it holds (plus ``_VIEW_BYTES_SLACK``); identical views (tied
  weights) are materialised once.
- A ``.safetensors`` header is checked before MLX reads it (``read_safetensors``): bounded length, a JSON object
  of records with known weight dtypes, integer shapes and data offsets that tile the data section exactly.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from .config import shown


class CheckpointError(ValueError):
    """A checkpoint or model folder that cannot be used; the message names the file and the key or shape."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle inside a checkpoint references code other than tensor rebuilding."""


# torch.save spends 32 opcodes per tensor of a state dict, so this allows some 130,000 tensors; each opcode creates
# at most one small object, which bounds the memory a crafted pickle can cost to about 300 MB.
_MAX_PICKLE_OPS = 1 << 22
_MAX_ZIP_ENTRIES = 1 << 20
_MAX_NDIM = 32
_MAX_DIM = 2**31 - 1  # MLX shapes are 32-bit
# Distinct views of the file's storages may materialise this many times the tensor bytes it holds, plus the slack
# (small expanded buffers); beyond that a tiny file could claim gigabytes through stride-0 or overlapping views.
_VIEW_BYTES_FACTOR = 4
_VIEW_BYTES_SLACK = 16 << 20
_MAX_SAFETENSORS_HEADER = 100_000_000  # the limit of the safetensors library itself
_CRC_CHUNK = 16 << 20
# Zip flag bits that change nothing for a stored entry: compression options (1, 2), sizes in a data descriptor (3,
# as torch.save writes), UTF-8 names (11). The others are encryption and patched data.
_ZIP_FLAGS = 0x080E


# ----------------------------------------------------------------------------------------------------------------
# Element types
# ----------------------------------------------------------------------------------------------------------------

# torch storage class -> (numpy dtype of the raw bytes, MLX dtype of the tensor). bfloat16 has no numpy dtype: its
# bytes are read as uint16 and reinterpreted by MLX.
_WEIGHT_STORAGES = {
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
# Storage classes that torch writes but that hold no weights we can use: accepted by the pickle so that the error
# can name the tensor's key.
_OTHER_STORAGES = {
    "ComplexFloatStorage", "ComplexDoubleStorage", "QInt8Storage", "QUInt8Storage", "QInt32Storage",
    "QUInt4x2Storage", "QUInt2x4Storage", "UntypedStorage",
}
# torch dtype name -> the storage class of the same element type, for ``_rebuild_tensor_v3`` (which names the dtype
# of an UntypedStorage); unsigned 16/32/64-bit ints exist only there.
_DTYPE_STORAGES = {
    "float32": "FloatStorage", "float": "FloatStorage", "float64": "DoubleStorage", "double": "DoubleStorage",
    "float16": "HalfStorage", "half": "HalfStorage", "bfloat16": "BFloat16Storage", "int64": "LongStorage",
    "long": "LongStorage", "int32": "IntStorage", "int": "IntStorage", "int16": "ShortStorage",
    "short": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
    "uint16": "UInt16Storage", "uint32": "UInt32Storage", "uint64": "UInt64Storage",
}
_V3_STORAGES = {
    "UInt16Storage": (np.uint16, mx.uint16),
    "UInt32Storage": (np.uint32, mx.uint32),
    "UInt64Storage": (np.uint64, mx.uint64),
}
_OTHER_DTYPES = {
    "complex32", "complex64", "complex128", "cfloat", "cdouble", "chalf", "qint8", "quint8", "qint32", "quint4x2",
    "quint2x4", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
}
# The only dict keys and set items a pickle may hash (and may show in errors): scalars, and shallow tuples of them.
_KEY_TYPES = (str, int, float, bool, bytes, type(None))
_MAX_KEY_DEPTH = 8
_NOT_A_WEIGHT = "which is not a weight dtype (float32, float16, bfloat16, float64, or an integer or bool buffer)"
# The rebuild functions torch.save writes for sparse, meta, quantized and nested tensors: refused like any other
# global (never called), but with a message that says what the tensor is rather than suspecting code.
_UNSUPPORTED_REBUILDS = {
    "_rebuild_sparse_tensor", "_rebuild_sparse_csr_tensor", "_rebuild_meta_tensor_no_storage", "_rebuild_qtensor",
    "_rebuild_nested_tensor",
}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _TorchDtype:
    name: str


@dataclass(frozen=True)
class _Storage:
    """A storage record of the pickle: its bytes are the zip entry ``data/<key>``, read only for a tensor view."""

    key: str
    type: _StorageType
    numel: int  # elements of its type; bytes for an UntypedStorage


@dataclass(frozen=True)
class _TensorRecord:
    """The arguments of a tensor rebuild, as the pickle gave them: checked only when the tensor's key is known."""

    storage: Any
    offset: Any
    size: Any
    stride: Any
    dtype: Any = None  # a _TorchDtype for _rebuild_tensor_v3; None: the storage's type
    metadata: Any = None


# The rebuild functions take the arguments torch's do, so that a call torch would refuse is refused here too.
def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _TensorRecord(storage, offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return _TensorRecord(storage, offset, size, stride, dtype, metadata)


def _rebuild_tensor(storage, offset, size, stride):
    return _TensorRecord(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


def _ordered_dict():
    # torch.save writes an OrderedDict as a call with no arguments followed by SETITEMS, whose keys we check.
    return OrderedDict()


def _size(dims):
    if type(dims) not in (tuple, list) or not all(type(d) is int for d in dims):
        raise ValueError(f"torch.Size of {type(dims).__name__}, not a sequence of integers")
    return tuple(dims)


def _device(kind, index=None):
    if type(kind) is not str or not (index is None or type(index) is int):
        raise ValueError("torch.device with arguments other than a name and an index")
    return kind if index is None else f"{kind}:{index}"


def _encode(text, encoding="utf-8"):
    # Protocol 2 writes bytes as _codecs.encode(text, "latin1"); no other codec is ever needed.
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise ValueError("_codecs.encode with arguments other than a string and 'latin1'")
    return text.encode("latin-1")


def _bytearray(data=b"", encoding=None):
    if type(data) is bytes and encoding is None:
        return bytearray(data)
    return bytearray(_encode(data, encoding))  # never a length: bytearray(10**12) would allocate it


def _slice(*bounds):
    if len(bounds) > 3 or not all(b is None or type(b) is int for b in bounds):
        raise ValueError("slice with arguments other than integers or None")
    return slice(*bounds)


def _complex(real=0.0, imag=0.0):
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise ValueError("complex with arguments other than two numbers")
    return complex(real, imag)


# ``builtins.set``: called by the unpickler itself, which checks the items before hashing them.
_SET = object()

# (module, name) as a protocol-2 pickle spells it -> what the name stands for here. Only these are ever called.
_CALLABLE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
    ("_codecs", "encode"): _encode,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "slice"): _slice,
    ("builtins", "complex"): _complex,
}
_CALLABLES = {id(f): f for f in _CALLABLE_GLOBALS.values()}


def _allowed_global(module: str, name: str):
    """What a GLOBAL stands for, or None when a weights-only checkpoint has no use for it."""
    module = "builtins" if module == "__builtin__" else module  # protocol 2 spells builtins the Python 2 way
    if (module, name) == ("builtins", "set"):
        return _SET
    if (module, name) in _CALLABLE_GLOBALS:
        return _CALLABLE_GLOBALS[(module, name)]
    if module in ("torch", "torch.storage") and (name in _WEIGHT_STORAGES or name in _OTHER_STORAGES):
        return _StorageType(name)
    if module == "torch" and (name in _DTYPE_STORAGES or name in _OTHER_DTYPES):
        return _TorchDtype(name)
    return None



# What the pickle's values are, in the user's words: never the name of one of our own record classes.
_KINDS = {_TensorRecord: "a tensor", _TorchDtype: "a dtype", _StorageType: "a storage type", _Storage: "a storage"}


def _kind(value) -> str:
    if type(value) in _KINDS:
        return _KINDS[type(value)]
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _describe(value) -> str:
    """A value from the pickle for an error message: scalars and flat sequences of them in full, anything else
    (which could be nested deeper than repr can go) by its type."""
    if type(value) in (str, bytes):
        return repr(value[:60])
    if type(value) in _KEY_TYPES:
        return f"{value!r:.60}"
    if type(value) in (tuple, list) and len(value) <= _MAX_NDIM and all(type(v) in _KEY_TYPES for v in value):
        return f"{value!r:.200}"
    return _kind(value)


# ----------------------------------------------------------------------------------------------------------------
# The pickle interpreter
# ----------------------------------------------------------------------------------------------------------------

# Opcodes that build objects of classes the pickle names: never needed, refused as code.
_CODE_OPCODES = {pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.STACK_GLOBAL, pickle.EXT1,
                 pickle.EXT2, pickle.EXT4}


class _Unpickler:
    """Runs the protocol-2 opcodes that ``torch.save`` writes, the set torch's weights-only unpickler runs, on a
    stack of plain data; it never calls anything outside ``_CALLABLE_GLOBALS`` and never touches attributes."""

    def __init__(self, data: bytes, archive: "_TorchArchive"):
        self.file = io.BytesIO(data)
        self.archive = archive
        self.stack: list = []
        self.metastack: list[list] = []
        self.memo: dict[int, Any] = {}
        self.storages: dict[str, _Storage] = {}

    def load(self):
        for _ in range(_MAX_PICKLE_OPS):
            code = self.file.read(1)
            if not code:
                raise self._malformed("it ends before its STOP opcode (truncated)")
            if code == pickle.STOP:
                return self._pop()
            handler = self._DISPATCH.get(code)
            if handler is None:
                self._refuse_opcode(code)
            handler(self)
        raise CheckpointError(
            f"{self.archive.path}: its pickle runs more than {_MAX_PICKLE_OPS} opcodes, more than any state dict needs"
        )

    def _refuse_opcode(self, code: bytes):
        op = pickletools.code2op.get(code.decode("latin-1"))
        where = f"opcode {op.name if op else repr(code)} at byte {self.file.tell() - 1}"
        if code in _CODE_OPCODES:
            raise UnsafeCheckpointError(
                f"{self.archive.path}: refusing to load: its pickle uses {where}, which builds objects of named "
                "classes (loading it could execute code)"
            )
        raise CheckpointError(
            f"{self.archive.path}: unsupported pickle {where}; torch.save writes pickle protocol 2"
        )

    def _malformed(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.archive.path}: malformed checkpoint pickle: {problem}")

    def _refuse(self, problem: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{self.archive.path}: refusing to load: its pickle {problem}")

    # -- reading operands --------------------------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        data = self.file.read(n)
        if len(data) != n:
            raise self._malformed("it ends inside an opcode's operand (truncated)")
        return data

    def _unpack(self, fmt: str):
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    def _line(self) -> str:
        line = self.file.readline(256)
        if not line.endswith(b"\n"):
            raise self._malformed("a GLOBAL name is not a line of at most 255 characters")
        return line[:-1].decode("utf-8")

    # -- the stack -----------------------------------------------------------------------------------------------

    def _pop(self):
        if not self.stack:
            raise self._malformed("an opcode needs more values than the stack holds")
        return self.stack.pop()

    def _top(self):
        if not self.stack:
            raise self._malformed("an opcode needs a value on the empty stack")
        return self.stack[-1]

    def _pop_mark(self) -> list:
        if not self.metastack:
            raise self._malformed("an opcode needs a MARK that is not there")
        items, self.stack = self.stack, self.metastack.pop()
        return items

    def _check_key(self, key, depth: int = 0):
        """Dict keys and set items are hashed; only flat scalars and shallow tuples of them, so that hashing is
        cheap and cannot recurse deep enough to crash the interpreter."""
        if type(key) in _KEY_TYPES:
            return
        if type(key) is tuple and depth < _MAX_KEY_DEPTH:
            for item in key:
                self._check_key(item, depth + 1)
            return
        raise self._malformed(f"a dict key or set item is {_kind(key)}")

    # -- opcodes -------------------------------------------------------------------------------------------------

    def _proto(self):
        # Only protocol-2 opcodes may follow whatever the number says, but a number no pickle module writes
        # (Python refuses it too) is damage, not a file to guess at.
        version = self._read(1)[0]
        if version > pickle.HIGHEST_PROTOCOL:
            raise self._malformed(f"unsupported pickle protocol {version}")

    def _global(self):
        module, name = self._line(), self._line()
        value = _allowed_global(module, name)
        if value is None and module == "torch._utils" and name in _UNSUPPORTED_REBUILDS:
            raise CheckpointError(
                f"{self.archive.path}: it holds a tensor rebuilt by torch._utils.{name}: sparse, quantized, nested and "
                "meta tensors are not supported; save the dense tensors"
            )
        if value is None:
            raise self._refuse(
                f"references {module}.{name}, which a weights-only checkpoint never needs (loading it could "
                "execute code)"
            )
        self.stack.append(value)

    def _reduce(self):
        args, func = self._pop(), self._pop()
        if func is _SET:
            self.stack.append(self._set(args))
            return
        if _CALLABLES.get(id(func)) is not func:
            raise self._refuse(f"calls {_kind(func)}, which is not a tensor or plain-data constructor")
        if type(args) is not tuple:
            raise self._malformed(f"the arguments of a call are {_kind(args)}, not a tuple")
        try:
            self.stack.append(func(*args))
        except (TypeError, ValueError) as e:
            raise self._malformed(f"{func.__name__.lstrip('_')} of {_describe(args)}: {e}") from None

    def _set(self, args):
        items = args[0] if type(args) is tuple and len(args) == 1 else None
        if type(items) is not list:
            raise self._malformed("set() is not called with one list")
        for item in items:
            self._check_key(item)
        return set(items)

    def _build(self):
        state, target = self._pop(), self._top()
        # torch.save pickles a state dict's `_metadata` (module versions) as the OrderedDict's state; we have no
        # use for it. Anything else would set attributes, which we never do.
        if type(target) is not OrderedDict or type(state) is not dict:
            raise self._refuse(f"sets the state of {_kind(target)} (BUILD), which torch.save never does")

    def _setitem(self):
        value, key = self._pop(), self._pop()
        self._setitems([key, value])

    def _setitems(self, items=None):
        items = self._pop_mark() if items is None else items
        target = self._top()
        if type(target) not in (dict, OrderedDict):
            raise self._malformed(f"SETITEM on {_kind(target)}")
        if len(items) % 2:
            raise self._malformed("SETITEMS with a key but no value")
        for key, value in zip(items[::2], items[1::2]):
            self._check_key(key)
            target[key] = value

    def _append(self):
        item = self._pop()
        self._appends([item])

    def _appends(self, items=None):
        items = self._pop_mark() if items is None else items
        target = self._top()
        if type(target) is not list:
            raise self._malformed(f"APPEND on {_kind(target)}")
        target.extend(items)

    def _mark(self):
        self.metastack.append(self.stack)
        self.stack = []

    def _tuple(self, n: int | None = None):
        if n is None:
            items = tuple(self._pop_mark())  # before naming self.stack, which popping the mark replaces
            self.stack.append(items)
            return
        if len(self.stack) < n:
            raise self._malformed("a TUPLE opcode needs more values than the stack holds")
        items = tuple(self.stack[len(self.stack) - n:])
        del self.stack[len(self.stack) - n:]
        self.stack.append(items)

    def _binpersid(self):
        self.stack.append(self._persistent_load(self._pop()))

    def _persistent_load(self, pid) -> _Storage:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise self._refuse("has a persistent record other than torch's ('storage', type, key, location, size)")
        _, storage_type, key, location, numel = pid
        if type(storage_type) is not _StorageType:
            raise self._malformed(f"storage record {_describe(key)} names no storage type")
        if type(key) is int and key >= 0:
            key = str(key)
        if type(key) is not str or not re.fullmatch(r"[A-Za-z0-9_]{1,64}", key):
            raise self._malformed("a storage key is not a short name of letters and digits")
        if type(location) is not str or type(numel) is not int or numel < 0:
            raise self._malformed(f"storage record {shown(key)} has no location or no non-negative size")
        storage = _Storage(key, storage_type, numel)
        if self.storages.setdefault(key, storage) != storage:
            raise self._malformed(f"storage {shown(key)} is declared twice with different types or sizes")
        return storage

    def _get(self, index: int):
        if index not in self.memo:
            raise self._malformed(f"it refers to memo entry {index}, which was never stored")
        self.stack.append(self.memo[index])

    def _put(self, index: int):
        self.memo[index] = self._top()

    def _unicode(self):
        self.stack.append(self._read(self._unpack("<I")).decode("utf-8", "surrogatepass"))

    def _short_binstring(self):
        self.stack.append(self._read(self._unpack("<B")).decode("latin-1"))

    _DISPATCH: dict[bytes, Callable] = {
        pickle.PROTO: _proto,
        pickle.GLOBAL: _global,
        pickle.REDUCE: _reduce,
        pickle.BUILD: _build,
        pickle.SETITEM: _setitem,
        pickle.SETITEMS: _setitems,
        pickle.APPEND: _append,
        pickle.APPENDS: _appends,
        pickle.MARK: _mark,
        pickle.TUPLE: _tuple,
        pickle.TUPLE1: lambda self: self._tuple(1),
        pickle.TUPLE2: lambda self: self._tuple(2),
        pickle.TUPLE3: lambda self: self._tuple(3),
        pickle.EMPTY_TUPLE: lambda self: self.stack.append(()),
        pickle.EMPTY_LIST: lambda self: self.stack.append([]),
        pickle.EMPTY_DICT: lambda self: self.stack.append({}),
        pickle.NONE: lambda self: self.stack.append(None),
        pickle.NEWFALSE: lambda self: self.stack.append(False),
        pickle.NEWTRUE: lambda self: self.stack.append(True),
        pickle.BININT: lambda self: self.stack.append(self._unpack("<i")),
        pickle.BININT1: lambda self: self.stack.append(self._unpack("<B")),
        pickle.BININT2: lambda self: self.stack.append(self._unpack("<H")),
        pickle.LONG1: lambda self: self.stack.append(pickle.decode_long(self._read(self._unpack("<B")))),
        pickle.BINFLOAT: lambda self: self.stack.append(self._unpack(">d")),
        pickle.BINUNICODE: _unicode,
        pickle.SHORT_BINSTRING: _short_binstring,
        pickle.BINPERSID: _binpersid,
        pickle.BINGET: lambda self: self._get(self._unpack("<B")),
        pickle.LONG_BINGET: lambda self: self._get(self._unpack("<I")),
        pickle.BINPUT: lambda self: self._put(self._unpack("<B")),
        pickle.LONG_BINPUT: lambda self: self._put(self._unpack("<I")),
    }


# ----------------------------------------------------------------------------------------------------------------
# The zip archive of torch.save
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    start: int  # of the stored bytes in the file
    size: int
    crc: int


class _BadView(Exception):
    """A tensor record that cannot be read; the caller adds the file and the key."""


class _TorchArchive:
    """A PyTorch zip checkpoint whose entries are all checked when it is opened; bytes are read only on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")
        self.crc_checked: set[str] = set()
        try:
            self.entries = self._read_directory()
            self.prefix = self._archive_prefix()
        except BaseException:
            self.file.close()
            raise
        held = sum(e.size for name, e in self.entries.items() if name.startswith(f"{self.prefix}data/"))
        self.view_budget = _VIEW_BYTES_FACTOR * held + _VIEW_BYTES_SLACK
        self.views: dict[tuple, mx.array] = {}
        self.view_bytes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def _error(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {problem}")

    # -- the directory ---------------------------------------------------------------------------------------------

    def _read_directory(self) -> dict[str, _Entry]:
        file_size = os.fstat(self.file.fileno()).st_size
        unreadable = "not a readable PyTorch zip checkpoint (truncated, corrupt, or the legacy pre-1.6 format)"
        try:
            end_record = zipfile._EndRecData(self.file)  # read before the directory: it says how large that is
            if end_record is None:
                raise self._error(unreadable)
            if end_record[zipfile._ECD_ENTRIES_TOTAL] > _MAX_ZIP_ENTRIES:
                raise self._error(
                    f"its zip directory declares {end_record[zipfile._ECD_ENTRIES_TOTAL]} entries, more than the "
                    f"{_MAX_ZIP_ENTRIES} any checkpoint needs"
                )
            infos = zipfile.ZipFile(self.file).infolist()
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
                NotImplementedError, OverflowError) as e:
            raise self._error(f"{unreadable}: {e}") from None
        entries: dict[str, _Entry] = {}
        for info in infos:
            if info.filename in entries:
                raise self._error(f"zip entry {shown(info.filename)} appears twice")
            entries[info.filename] = self._entry(info, file_size)
        self._check_disjoint(sorted(infos, key=lambda i: i.header_offset), entries)
        return entries

    def _entry(self, info: zipfile.ZipInfo, file_size: int) -> _Entry:
        name = info.filename
        if info.flag_bits & ~_ZIP_FLAGS:
            raise self._error(f"zip entry {shown(name)} has flags {info.flag_bits:#06x}: encrypted or patched data, "
                              "which torch.save never writes")
        if info.compress_type != zipfile.ZIP_STORED:
            raise self._error(
                f"zip entry {shown(name)} is compressed (method {info.compress_type}); torch.save stores entries "
                "uncompressed, and a compressed one could inflate to any size"
            )
        if info.compress_size != info.file_size:
            raise self._error(f"zip entry {shown(name)} is stored but declares {info.compress_size} bytes in the file "
                              f"for {info.file_size} bytes of data")
        local = self._pread(info.header_offset, 30) if 0 <= info.header_offset <= file_size - 30 else b""
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise self._error(f"zip entry {shown(name)} has no local header at byte {info.header_offset}")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        if self._pread(info.header_offset + 30, name_length) != info.orig_filename.encode(
            "utf-8" if info.flag_bits & 0x800 else "cp437", "surrogateescape"
        ):
            raise self._error(f"zip entry {shown(name)} has another name in its local header")
        if start + info.file_size > file_size:
            raise self._error(
                f"zip entry {shown(name)} declares {info.file_size} bytes at byte {start}, past the end of the "
                f"{file_size}-byte file (truncated download?)"
            )
        return _Entry(name, start, info.file_size, info.CRC)

    def _check_disjoint(self, infos: list[zipfile.ZipInfo], entries: dict[str, _Entry]):
        end, previous = 0, None
        for info in infos:
            if info.header_offset < end:
                raise self._error(f"zip entries {shown(previous)} and {shown(info.filename)} overlap")
            end, previous = entries[info.filename].start + info.file_size, info.filename

    def _archive_prefix(self) -> str:
        pickles = [n for n in self.entries if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise self._error(f"expected one <archive>/data.pkl record in the zip, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = self.entries.get(f"{prefix}byteorder")
        if byteorder is not None:
            order = self.read_whole(byteorder) if byteorder.size <= 16 else b"?"
            if order != b"little":
                raise self._error(f"its byteorder record says {order[:16]!r}: only little-endian checkpoints "
                                  "are supported")
        return prefix

    # -- bytes -------------------------------------------------------------------------------------------------

    def _pread(self, offset: int, n: int) -> bytes:
        self.file.seek(offset)
        return self.file.read(n)

    def read_range(self, entry: _Entry, start: int, stop: int) -> np.ndarray:
        """Bytes ``start:stop`` of a stored entry, into a fresh buffer; the entry's CRC is checked once."""
        buffer = np.empty(stop - start, np.uint8)
        view, done = memoryview(buffer), 0
        self.file.seek(entry.start + start)
        while done < len(buffer):
            n = self.file.readinto(view[done:])
            if not n:
                raise self._error(f"zip entry {shown(entry.name)} ends early (truncated)")
            done += n
        self._check_crc(entry, buffer if (start, stop) == (0, entry.size) else None)
        return buffer

    def read_whole(self, entry: _Entry) -> bytes:
        return self.read_range(entry, 0, entry.size).tobytes()

    def _check_crc(self, entry: _Entry, whole: np.ndarray | None):
        if entry.name in self.crc_checked:
            return
        if whole is not None:
            crc = zlib.crc32(whole)
        else:  # a view that needs part of its storage: the rest is streamed through the CRC, never held
            crc = 0
            self.file.seek(entry.start)
            for offset in range(0, entry.size, _CRC_CHUNK):
                crc = zlib.crc32(self.file.read(min(_CRC_CHUNK, entry.size - offset)), crc)
        if crc != entry.crc:
            raise self._error(f"zip entry {shown(entry.name)} fails its CRC-32 check (the file is corrupt)")
        self.crc_checked.add(entry.name)

    # -- the pickle and its tensors ----------------------------------------------------------------------------

    def load(self):
        """The object the checkpoint's pickle describes, with tensors as unread ``_TensorRecord``s."""
        data = self.read_whole(self.entries[f"{self.prefix}data.pkl"])
        try:
            return _Unpickler(data, self).load()
        except CheckpointError:
            raise
        except Exception as e:  # bytes that are no valid pickle at all: report them, never a deep traceback
            raise CheckpointError(f"{self.path}: malformed checkpoint pickle: {type(e).__name__}: {e}") from None

    def tensor(self, key: str, record) -> mx.array:
        """The tensor that ``record`` describes, checked in full before any of its bytes is read."""
        if not isinstance(record, _TensorRecord):
            raise self._error(f"entry {shown(key)} is {_kind(record)}, not a tensor")
        try:
            return self._materialise(record)
        except _BadView as e:
            raise self._error(f"tensor {shown(key)}: {e}") from None

    def _materialise(self, record: _TensorRecord) -> mx.array:
        storage = record.storage
        if type(storage) is not _Storage:
            raise _BadView(f"its storage is {_kind(storage)}, not a storage record")
        np_dtype, mx_dtype = _element_type(record)
        itemsize = np.dtype(np_dtype).itemsize
        entry = self._storage_entry(storage, itemsize)
        offset, size, stride = _checked_view(record, entry.size // itemsize)
        cache_key = (storage.key, str(mx_dtype), offset, size, stride)
        if cache_key in self.views:  # tied weights: one array
            return self.views[cache_key]
        numel = math.prod(size)
        out_bytes = numel * np.dtype(np.float32 if np_dtype is np.float64 else np_dtype).itemsize
        if self.view_bytes + out_bytes > self.view_budget:
            raise _BadView(
                f"its view (size {list(size)}, stride {list(stride)}) of storage {storage.key!r} would bring the "
                f"tensors read from this file past {self.view_budget} bytes, {_VIEW_BYTES_FACTOR} times the tensor "
                "data it holds: overlapping or stride-0 views of a small storage"
            )
        array = self._read_view(entry, np_dtype, offset, size, stride)
        out = mx.array(_float64_to_float32(array) if np_dtype is np.float64 else array)
        self.views[cache_key] = out.view(mx_dtype) if mx_dtype == mx.bfloat16 else out
        self.view_bytes += out_bytes
        return self.views[cache_key]

    def _storage_entry(self, storage: _Storage, itemsize: int) -> _Entry:
        entry = self.entries.get(f"{self.prefix}data/{storage.key}")
        if entry is None:
            raise _BadView(f"its storage {storage.key!r} is missing from the archive")
        declared = storage.numel if storage.type.name == "UntypedStorage" else storage.numel * itemsize
        if entry.size != declared or entry.size % itemsize:
            raise _BadView(
                f"its storage {storage.key!r} is declared as {declared} bytes of {itemsize}-byte elements, but "
                f"the zip entry holds {entry.size} bytes"
            )
        return entry

    def _read_view(self, entry: _Entry, np_dtype, offset: int, size: tuple, stride: tuple) -> np.ndarray:
        itemsize = np.dtype(np_dtype).itemsize
        if math.prod(size) == 0:
            return np.zeros(size, np_dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        raw = self.read_range(entry, offset * itemsize, (last + 1) * itemsize)
        flat = raw.view(np.uint8 if np_dtype is np.bool_ else np_dtype)
        array = np.lib.stride_tricks.as_strided(flat, shape=size, strides=[s * itemsize for s in stride])
        return array != 0 if np_dtype is np.bool_ else array.copy()  # C order, and 0-d stays 0-d


def _float64_to_float32(array: np.ndarray) -> np.ndarray:
    """A float64 tensor as float32, once its finite values are known to fit (inf and NaN are kept: the weight
    checks name them); checked first, so that numpy never warns of an overflow."""
    largest = np.max(np.abs(array), initial=0.0, where=np.isfinite(array))
    if largest > np.finfo(np.float32).max:
        raise _BadView(f"it holds values up to {largest:.6g}, beyond float32's range ({np.finfo(np.float32).max:.6g})")
    return array.astype(np.float32)


def _element_type(record: _TensorRecord):
    """(numpy dtype of the stored bytes, MLX dtype) of a record: a weight dtype, or a ``_BadView``."""
    storage_name = record.storage.type.name
    if record.dtype is not None:  # _rebuild_tensor_v3: an UntypedStorage holding the named dtype
        if type(record.dtype) is not _TorchDtype or storage_name != "UntypedStorage":
            raise _BadView(f"it is rebuilt with dtype {_describe(record.dtype)} from a {storage_name}")
        if record.dtype.name not in _DTYPE_STORAGES:
            raise _BadView(f"it is stored as torch.{record.dtype.name}, {_NOT_A_WEIGHT}")
        storage_name = _DTYPE_STORAGES[record.dtype.name]
    types = {**_WEIGHT_STORAGES, **_V3_STORAGES}
    if storage_name not in types:
        raise _BadView(f"it is stored as {storage_name}, {_NOT_A_WEIGHT}")
    if record.metadata is not None and (type(record.metadata) is not dict or any(record.metadata.values())):
        raise _BadView("it carries tensor metadata (a negative or conjugate view); save it with "
                       ".resolve_neg().resolve_conj()")
    return types[storage_name]


def _checked_view(record: _TensorRecord, storage_numel: int) -> tuple[int, tuple, tuple]:
    """(offset, size, stride) of a record whose every element lies inside a storage of ``storage_numel``."""
    offset, size, stride = record.offset, record.size, record.stride
    if type(offset) is not int or offset < 0:
        raise _BadView(f"its storage offset {_describe(offset)} is not a non-negative integer")
    for name, dims in (("size", size), ("stride", stride)):
        if type(dims) is not tuple or len(dims) > _MAX_NDIM or not all(type(d) is int and d >= 0 for d in dims):
            raise _BadView(f"its {name} {_describe(dims)} is not a tuple of at most {_MAX_NDIM} non-negative "
                           "integers")
    if any(n > _MAX_DIM for n in size):
        raise _BadView(f"its size {list(size)} has a dimension over {_MAX_DIM}, the most an MLX array holds")
    if len(size) != len(stride):
        raise _BadView(f"its size {list(size)} and stride {list(stride)} differ in length")
    if math.prod(size) == 0:
        last = offset - 1  # an empty view touches nothing, but its offset may not lie past the storage's end
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage_numel:
        raise _BadView(
            f"its view (offset {offset}, size {list(size)}, stride {list(stride)}) reaches element {last}, "
            f"outside its storage of {storage_numel} elements"
        )
    return offset, size, stride


# ----------------------------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------------------------

# The dtypes MLX reads that can be weights or integer buffers, with their byte widths.
_SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8,
    "F16": 2, "BF16": 2, "F32": 4,
}
# F64 is left out: MLX reads it as a float64 array, which no weight is; torch files' float64 is range-checked and
# read as float32 instead.
_NOT_A_SAFETENSORS_WEIGHT = ("which is not a weight dtype of a safetensors file (F32, F16, BF16, or an integer or "
                             "BOOL buffer; save float64 weights as F32)")


def read_safetensors(path: str | os.PathLike) -> dict[str, mx.array]:
    """All tensors of a ``.safetensors`` file, after checking its header: MLX's loader trusts more of it."""
    path = Path(path)
    _check_safetensors(path)
    try:
        return mx.load(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None


def _check_safetensors(path: Path):
    def fail(problem: str):
        raise CheckpointError(f"{path}: not a readable safetensors file: {problem}")

    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        length = int.from_bytes(f.read(8).ljust(8, b"\0"), "little") if file_size >= 8 else None
        if length is None or length > min(file_size - 8, _MAX_SAFETENSORS_HEADER):
            fail(f"its header length {length} does not fit the {file_size}-byte file")
        header = f.read(length)
    try:
        records = json.loads(header.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        fail(f"its header is not valid JSON: {str(e)[:200]}")
    if type(records) is not dict:
        fail(f"its header is a JSON {type(records).__name__}, not an object")
    metadata = records.pop("__metadata__", {})
    if type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
        fail("its __metadata__ is not an object of strings")
    spans = sorted((_safetensors_span(key, record, fail), key) for key, record in records.items())
    position = 0
    for (begin, end), key in spans:
        if begin != position:
            fail(f"tensor {shown(key)} starts at byte {begin} of the data, expected {position} (tensors are packed "
                 "without gaps or overlaps)")
        position = end
    if position != file_size - 8 - length:
        fail(f"its tensors end at byte {position}, but its data section holds {file_size - 8 - length} bytes")


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a key appears twice in one object ({sorted(keys)[:3]}...)")
    return dict(pairs)


def _safetensors_span(key: str, record, fail) -> tuple[int, int]:
    """(begin, end) in the data section of one tensor record, checked against its dtype and shape."""
    if type(record) is not dict or set(record) != {"dtype", "shape", "data_offsets"}:
        fail(f"tensor {shown(key)} is not a record of dtype, shape and data_offsets")
    dtype, shape, offsets = record["dtype"], record["shape"], record["data_offsets"]
    if dtype not in _SAFETENSORS_DTYPES:
        fail(f"tensor {shown(key)} has dtype {_describe(dtype)}, {_NOT_A_SAFETENSORS_WEIGHT}")
    if type(shape) is not list or len(shape) > _MAX_NDIM or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape):
        fail(f"tensor {shown(key)} has shape {_describe(shape)}, not a list of at most {_MAX_NDIM} integers in "
             f"[0, {_MAX_DIM}]")
    if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int for o in offsets) \
            or not 0 <= offsets[0] <= offsets[1]:
        fail(f"tensor {shown(key)} has data_offsets {_describe(offsets)}, not [begin, end] with 0 <= begin <= end")
    needed = math.prod(shape) * _SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != needed:
        fail(f"tensor {shown(key)} spans {offsets[1] - offsets[0]} bytes, but {dtype} of shape {shape} needs {needed}")
    return offsets[0], offsets[1]


# ----------------------------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------------------------


def _state_dict(obj, path: Path, tensor: Callable[[str, Any], mx.array]) -> dict[str, mx.array]:
    """Strip ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers and ``module.`` / ``_orig_mod.`` prefixes; each
    value becomes an array through ``tensor(key, value)``."""
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors), got {_kind(obj)}")
    out = {}
    for key, value in obj.items():
        if type(key) is not str:
            raise CheckpointError(f"{path}: a state_dict key is {_kind(key)}, not a name")
        name = key
        while name.startswith(("module.", "_orig_mod.")):
            name = name.split(".", 1)[1]
        if name in out:
            raise CheckpointError(f"{path}: key {shown(name)} appears twice once prefixes are stripped")
        out[name] = tensor(key, value)
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, mx.array]:
    """All tensors of a checkpoint file, by name, as MLX arrays in their stored dtype (float64 becomes float32,
    refused when a value does not fit it)."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, expected a checkpoint file" if path.is_dir() else (
            "not a regular file" if path.exists() else "no such file")
        raise CheckpointError(f"{path}: {problem}")
    if path.suffix == ".safetensors":
        return _state_dict(read_safetensors(path), path, lambda key, array: array)
    with _TorchArchive(path) as archive:
        return _state_dict(archive.load(), path, archive.tensor)
