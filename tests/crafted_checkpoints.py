"""Crafting checkpoint files for the hostile-checkpoint tests and the fuzzer: protocol-2 pickle opcodes, the
``torch.save`` zip layout and its central directory fields, rewriting a zip entry by entry, the audit hook that
records code running while a file is read, and tensors of torch or MLX as comparable numpy arrays.

Imported by ``test_hostile_checkpoints.py`` and ``test_fuzz_checkpoint.py`` (and by their subprocesses), so it
imports nothing heavy at module level.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import zipfile
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------------
# Protocol-2 pickle opcodes
# ----------------------------------------------------------------------------------------------------------------


def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(n: int) -> bytes:
    """The opcode ``pickle`` writes for ``n`` at protocol 2 (BININT1, BININT or LONG1)."""
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    data = pickle.encode_long(n)
    return b"\x8a" + bytes([len(data)]) + data


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def op_dict(pairs: dict[str, bytes]) -> bytes:
    return b"}(" + b"".join(op_str(k) + v for k, v in pairs.items()) + b"u"


def op_call(module: str, name: str, *args: bytes) -> bytes:
    return op_global(module, name) + op_tuple(*args) + b"R"


def op_storage(key="0", numel=4, storage="FloatStorage", module="torch") -> bytes:
    return op_tuple(op_str("storage"), op_global(module, storage), op_str(key), op_str("cpu"), op_int(numel)) + b"Q"


def op_tensor(key="0", offset=0, size=(4,), stride=(1,), numel=4, storage="FloatStorage", *, dims=op_int,
              offset_op=None, extra=()) -> bytes:
    """``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict(), *extra)`` as torch.save writes it."""
    return op_call(
        "torch._utils", "_rebuild_tensor_v2",
        op_storage(key, numel, storage),
        offset_op if offset_op is not None else op_int(offset),
        op_tuple(*map(dims, size)),
        op_tuple(*map(dims, stride)),
        b"\x89",
        op_call("collections", "OrderedDict"),
        *extra,
    )


def state_pickle(tensors: dict[str, bytes]) -> bytes:
    return b"\x80\x02" + op_dict(tensors) + b"."


# ----------------------------------------------------------------------------------------------------------------
# torch.save zips
# ----------------------------------------------------------------------------------------------------------------

FOUR_FLOATS = struct.pack("<4f", 0, 1, 2, 3)


def write_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None, *, byteorder=b"little",
              compression=zipfile.ZIP_STORED, pkl_compression=zipfile.ZIP_STORED, extra=()) -> Path:
    """The layout of torch.save: ``archive/data.pkl``, ``archive/byteorder``, ``archive/data/<key>``."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl, compress_type=pkl_compression)
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        for key, data in ({"0": FOUR_FLOATS} if storages is None else storages).items():
            z.writestr(f"archive/data/{key}", data, compress_type=compression)
        for name, data in extra:
            z.writestr(name, data)
        z.writestr("archive/version", b"3\n")
    return path


def tensor_file(path: Path, **tensor) -> Path:
    """A checkpoint with one tensor ``w`` over the 4-float storage ``0``, built from ``op_tensor(**tensor)``."""
    return write_zip(path, state_pickle({"w": op_tensor(**tensor)}))


def entries(data: bytes) -> list[tuple[str, bytes]]:
    """The (name, content) of every entry of a zip, in order."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def rezip(items: list[tuple[str, bytes]]) -> bytes:
    """A zip of these entries, stored, with valid CRCs (``entries`` edited and written again)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, payload in items:
            z.writestr(name, payload)
    return buffer.getvalue()


# Numeric fields of the zip records: (offset in the record, struct format).
LOCAL_FIELDS = [(4, "<H"), (6, "<H"), (8, "<H"), (14, "<I"), (18, "<I"), (22, "<I"), (26, "<H"), (28, "<H")]
CENTRAL_FIELDS = {"flags": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"), "compressed_size": (20, "<I"),
                  "file_size": (24, "<I"), "name_length": (28, "<H"), "extra_length": (30, "<H"),
                  "comment_length": (32, "<H"), "disk": (34, "<H"), "header_offset": (42, "<I")}
END_FIELDS = [(4, "<H"), (6, "<H"), (8, "<H"), (10, "<H"), (12, "<I"), (16, "<I"), (20, "<H")]


def patch_central(path: Path, name: str, **fields: int) -> Path:
    """Rewrite fields of ``name``'s central directory record in place (the local header is left as it was)."""
    data = bytearray(path.read_bytes())
    position = struct.unpack("<I", data[data.rfind(b"PK\x05\x06") + 16:][:4])[0]  # start of the directory
    while data[position:position + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", data[position + 28:position + 34])  # name, extra and comment lengths
        if data[position + 46:position + 46 + n].decode() == name:
            for field, value in fields.items():
                offset, fmt = CENTRAL_FIELDS[field]
                struct.pack_into(fmt, data, position + offset, value)
            path.write_bytes(bytes(data))
            return path
        position += 46 + n + m + k
    raise AssertionError(f"no central record for {name}")


def local_data_offset(path: Path, name: str) -> int:
    data = path.read_bytes()
    header = zipfile.ZipFile(path).getinfo(name).header_offset
    n, m = struct.unpack("<HH", data[header + 26:header + 30])
    return header + 30 + n + m


# ----------------------------------------------------------------------------------------------------------------
# No code runs: audit events while a file is read
# ----------------------------------------------------------------------------------------------------------------

FORBIDDEN_EVENTS = ("os.", "subprocess.", "exec", "compile", "import", "socket.", "ctypes.", "marshal.",
                    "code.__new__", "object.__setattr__", "object.__delattr__", "builtins.input", "pickle.find_class",
                    "shutil.")


class Audit:
    """Records forbidden audit events (and any ``open``) while armed with the one file that may be opened for
    reading. Audit hooks cannot be removed: make one per process, after the lazy imports (warm up first)."""

    def __init__(self):
        self.allowed_open, self.events = None, []
        sys.addaudithook(self)

    def __call__(self, event, args):
        if self.allowed_open is None:
            return
        if event == "open" and str(args[0]) == self.allowed_open and args[1] in ("r", "rb"):
            return
        if event == "open" or event.startswith(FORBIDDEN_EVENTS):
            self.events.append(f"{event} {repr(args)[:200]}")


# ----------------------------------------------------------------------------------------------------------------
# Comparing what was read
# ----------------------------------------------------------------------------------------------------------------


def comparable(value):
    """A tensor of torch or MLX, or a numpy array, as numpy in the dtype our reader returns (bfloat16 and float64 as
    float32, since numpy has no bfloat16 and we store float64 as float32); anything else as itself."""
    import mlx.core as mx
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach()
        return (value.float() if value.dtype in (torch.bfloat16, torch.float64) else value).numpy()
    if isinstance(value, mx.array):
        return np.array(value.astype(mx.float32) if value.dtype == mx.bfloat16 else value)
    return value
