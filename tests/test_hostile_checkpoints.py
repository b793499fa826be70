"""Crafted checkpoint files, each built here (with ``crafted_checkpoints``), against the weights-only reader
(``starflow_mlx.checkpoint``).

Every hostile file is refused with a one-line ``CheckpointError`` (``UnsafeCheckpointError`` for code) that names
the file and the problem; nothing is returned, so nothing outside what the file declares is read; no file is
written or changed; our own functions and classes are unchanged. The cases that could crash, hang or eat memory
on a regression (bombs, deep nesting) run in a subprocess under RLIMIT_AS / RLIMIT_CPU and a timeout. Legitimate
files that ``torch.load(weights_only=True)`` accepts load here to the same values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from starflow_mlx import checkpoint
from starflow_mlx.checkpoint import CheckpointError, UnsafeCheckpointError, read_state_dict
from starflow_mlx.weights import read_model_folder

from tests.crafted_checkpoints import (
    FOUR_FLOATS,
    comparable,
    entries,
    local_data_offset,
    op_call,
    op_dict,
    op_global,
    op_int,
    op_storage,
    op_str,
    op_tensor,
    op_tuple,
    patch_central,
    rezip,
    state_pickle,
    tensor_file,
    write_zip,
)
from tests.helpers import refusal, run_bounded

torch = pytest.importorskip("torch")


def torch_zip(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Running a case, in process or bounded in a subprocess
# ----------------------------------------------------------------------------------------------------------------

BOUNDED_READER = """
import json, sys
from starflow_mlx.checkpoint import CheckpointError, read_state_dict
try:
    state = read_state_dict(sys.argv[1])
    print(json.dumps({"loaded": sorted(state)}))
except CheckpointError as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e)}))
"""


def read_bounded(path: Path) -> dict:
    """``read_state_dict(path)`` in a subprocess under ``run_bounded``'s limits: what it loaded, or its refusal."""
    proc = run_bounded(BOUNDED_READER, path, imports=("starflow_mlx.checkpoint",))
    assert proc.returncode == 0, f"the bounded reader died (rc {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.splitlines()[-1])


def our_code_snapshot() -> dict:
    """Every attribute that a BUILD or SETITEM on our own objects could change."""
    snapshot = {}
    for name, value in vars(checkpoint).items():
        if callable(value) and getattr(value, "__module__", None) == checkpoint.__name__:
            if isinstance(value, type):
                snapshot[name] = dict(vars(value))
            else:
                snapshot[name] = (value.__code__, value.__defaults__, value.__kwdefaults__, dict(value.__dict__))
    snapshot["_CALLABLE_GLOBALS"] = dict(checkpoint._CALLABLE_GLOBALS)
    snapshot["_Unpickler._DISPATCH"] = dict(checkpoint._Unpickler._DISPATCH)
    return snapshot


def files_under(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Case:
    id: str
    build: Callable[[Path], Path]  # writes the hostile file under the given folder, returns it
    words: tuple[str, ...]  # in the message, besides the file's path
    error: type = CheckpointError
    bounded: bool = False  # run in a subprocess under resource limits


def assert_refused(case: Case, tmp_path: Path):
    source = case.build(tmp_path)
    before = files_under(tmp_path)
    code = our_code_snapshot()
    if case.bounded:
        result = read_bounded(source)
        assert "loaded" not in result, result
        error_type, message = result["type"], result["message"]
    else:
        with pytest.raises(CheckpointError) as caught:
            read_state_dict(source)
        error_type, message = type(caught.value).__name__, str(caught.value)
    assert error_type == case.error.__name__, message
    assert message.startswith(f"{source}: "), message
    for words in case.words:
        assert words in message, message
    assert "\n" not in message
    assert files_under(tmp_path) == before
    assert our_code_snapshot() == code


# ----------------------------------------------------------------------------------------------------------------
# Tensor records
# ----------------------------------------------------------------------------------------------------------------

RECORD_CASES = [
    Case("negative_offset", lambda d: tensor_file(d / "c.pth", offset=-1),
         ("tensor 'w': its storage offset -1 is not a non-negative integer",)),
    Case("bool_offset", lambda d: tensor_file(d / "c.pth", offset_op=b"\x88"),
         ("tensor 'w': its storage offset True is not a non-negative integer",)),
    Case("negative_stride", lambda d: tensor_file(d / "c.pth", offset=3, stride=(-1,)),
         ("its stride (-1,) is not a tuple of at most 32 non-negative integers",)),
    Case("huge_negative_stride", lambda d: tensor_file(d / "c.pth", size=(2,), stride=(-(2**62),)),
         (f"its stride ({-(2**62)},) is not a tuple",)),
    Case("negative_size", lambda d: tensor_file(d / "c.pth", size=(-4,)), ("its size (-4,) is not a tuple",)),
    Case("float_size", lambda d: tensor_file(d / "c.pth", size=(4.0,), dims=lambda x: b"G" + struct.pack(">d", x)),
         ("its size (4.0,) is not a tuple",)),
    Case("too_many_dims", lambda d: tensor_file(d / "c.pth", size=(1,) * 33, stride=(1,) * 33),
         ("is not a tuple of at most 32 non-negative integers",)),
    Case("size_stride_lengths", lambda d: tensor_file(d / "c.pth", size=(2, 2), stride=(1,)),
         ("its size [2, 2] and stride [1] differ in length",)),
    Case("dimension_over_mlx_limit", lambda d: tensor_file(d / "c.pth", size=(2**31, 0), stride=(1, 1)),
         (f"its size [{2**31}, 0] has a dimension over {2**31 - 1}, the most an MLX array holds",)),
    Case("huge_offset", lambda d: tensor_file(d / "c.pth", offset=2**63, size=(1,)),
         (f"reaches element {2**63}, outside its storage of 4 elements",)),
    Case("huge_stride", lambda d: tensor_file(d / "c.pth", size=(2,), stride=(2**62,)),
         (f"reaches element {2**62}, outside its storage of 4 elements",)),
    Case("view_past_storage", lambda d: tensor_file(d / "c.pth", size=(5,)),
         ("its view (offset 0, size [5], stride [1]) reaches element 4, outside its storage of 4 elements",)),
    Case("offset_past_storage", lambda d: tensor_file(d / "c.pth", offset=2, size=(2, 2), stride=(1, 1)),
         ("reaches element 4, outside its storage of 4 elements",)),
    Case("empty_view_past_storage", lambda d: tensor_file(d / "c.pth", offset=9, size=(0,)),
         ("reaches element 8, outside its storage of 4 elements",)),
    Case("declared_larger_than_entry", lambda d: tensor_file(d / "c.pth", numel=1000),
         ("its storage '0' is declared as 4000 bytes of 4-byte elements, but the zip entry holds 16 bytes",)),
    Case("missing_storage", lambda d: write_zip(d / "c.pth", state_pickle({"w": op_tensor()}), {}),
         ("tensor 'w': its storage '0' is missing from the archive",)),
    Case("complex_storage", lambda d: tensor_file(d / "c.pth", numel=2, size=(2,), storage="ComplexFloatStorage"),
         ("tensor 'w': it is stored as ComplexFloatStorage, which is not a weight dtype",)),
    Case("quantized_storage", lambda d: tensor_file(d / "c.pth", numel=16, size=(16,), storage="QInt8Storage"),
         ("tensor 'w': it is stored as QInt8Storage, which is not a weight dtype",)),
    Case("float8_v3", lambda d: write_zip(d / "c.pth", state_pickle({"w": op_call(
        "torch._utils", "_rebuild_tensor_v3", op_storage(numel=16, storage="UntypedStorage", module="torch.storage"),
        op_int(0), op_tuple(op_int(16)), op_tuple(op_int(1)), b"\x89", op_call("collections", "OrderedDict"),
        op_global("torch", "float8_e4m3fn"))})),
         ("tensor 'w': it is stored as torch.float8_e4m3fn, which is not a weight dtype",)),
    Case("negative_view_metadata", lambda d: tensor_file(d / "c.pth", extra=(op_dict({"neg": b"\x88"}),)),
         ("tensor 'w': it carries tensor metadata (a negative or conjugate view)",)),
    Case("storage_declared_twice", lambda d: write_zip(d / "c.pth", state_pickle(
        {"a": op_tensor(), "b": op_tensor(numel=2, size=(2,), storage="DoubleStorage")})),
         ("malformed checkpoint pickle: storage '0' is declared twice with different types or sizes",)),
    Case("not_a_tensor", lambda d: write_zip(d / "c.pth", state_pickle({"w": op_int(3)})),
         ("entry 'w' is an int, not a tensor",)),
    Case("key_not_a_name", lambda d: write_zip(d / "c.pth", b"\x80\x02}" + op_int(1) + op_tensor() + b"s."),
         ("a state_dict key is an int, not a name",)),
    Case("not_a_mapping", lambda d: write_zip(d / "c.pth", b"\x80\x02]" + op_tensor() + b"a."),
         ("expected a state_dict (a mapping of names to tensors), got a list",)),
    Case("dtype_as_weight", lambda d: write_zip(d / "c.pth", state_pickle({"w": op_global("torch", "float32")})),
         ("entry 'w' is a dtype, not a tensor",)),
    Case("storage_type_as_weight", lambda d: write_zip(d / "c.pth", state_pickle(
        {"w": op_global("torch", "FloatStorage")})), ("entry 'w' is a storage type, not a tensor",)),
    Case("float64_beyond_float32", lambda d: write_zip(d / "c.pth", state_pickle(
        {"w": op_tensor(numel=2, size=(2,), storage="DoubleStorage")}), {"0": struct.pack("<2d", 1.0, -1e300)}),
         ("tensor 'w': it holds values up to 1e+300, beyond float32's range (3.40282e+38)",)),
    Case("long_key_bounded", lambda d: write_zip(d / "c.pth", state_pickle({"k" * 1_000_000: op_tensor(offset=-1)})),
         ("tensor 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk ...': its storage "
          "offset -1",)),
    # Many times the memory the file holds, through views that read the same elements again.
    Case("stride0_bomb", lambda d: tensor_file(d / "c.pth", size=(1 << 20, 1 << 10), stride=(0, 0)),
         ("tensor 'w': its view (size [1048576, 1024], stride [0, 0]) of storage '0' would bring the tensors read "
          "from this file past", "overlapping or stride-0 views"), bounded=True),
    Case("overlap_bomb", lambda d: write_zip(d / "c.pth", state_pickle(
        {"w": op_tensor(numel=1 << 16, size=(1 << 15, 1 << 15), stride=(1, 1))}),
        {"0": bytes(4 << 16)}), ("tensor 'w': its view (size [32768, 32768], stride [1, 1])",), bounded=True),
    Case("many_views_bomb", lambda d: write_zip(d / "c.pth", state_pickle(
        {f"w{k}": op_tensor(numel=1 << 18, offset=k, size=((1 << 18) - k,)) for k in range(64)}),
        {"0": bytes(4 << 18)}), ("of storage '0' would bring the tensors read from this file past",), bounded=True),
]


# ----------------------------------------------------------------------------------------------------------------
# The zip container
# ----------------------------------------------------------------------------------------------------------------


def deflate_bomb(folder: Path) -> Path:
    """256 MiB of zeros in a deflated entry of 256 KiB, declared as a storage of that size."""
    numel = 64 << 20
    path = write_zip(folder / "c.pth", state_pickle({"w": op_tensor(numel=numel, size=(numel,))}), {})
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data/0", "w", force_zip64=True) as entry:
            for _ in range(256):
                entry.write(bytes(1 << 20))
    return path


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def compressed(method: int) -> Callable[[Path], Path]:
    return lambda folder: write_zip(folder / "c.pth", state_pickle({"w": op_tensor()}), compression=method)


def duplicate_names(folder: Path) -> Path:
    path = write_zip(folder / "c.pth", state_pickle({"w": op_tensor()}))
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as z:
        z.writestr("archive/data/0", np.full(4, 7, np.float32).tobytes())
    return path


def overlapping_entries(folder: Path) -> Path:
    """The storage's entry declares itself long enough to swallow the entry after it."""
    path = write_zip(folder / "c.pth", state_pickle({"w": op_tensor()}))
    span = zipfile.ZipFile(path).getinfo("archive/version").header_offset - local_data_offset(path, "archive/data/0")
    return patch_central(path, "archive/data/0", compressed_size=span + 8, file_size=span + 8)


def flipped_data_byte(folder: Path) -> Path:
    path = tensor_file(folder / "c.pth")
    data = bytearray(path.read_bytes())
    data[local_data_offset(path, "archive/data/0") + 5] ^= 0x40
    path.write_bytes(bytes(data))
    return path


def renamed_local_header(folder: Path) -> Path:
    path = tensor_file(folder / "c.pth")
    data = bytearray(path.read_bytes())
    header = zipfile.ZipFile(path).getinfo("archive/data/0").header_offset
    data[header + 30 + len("archive/data/")] = ord("9")
    path.write_bytes(bytes(data))
    return path


def multi_disk(folder: Path) -> Path:
    """torch.save's zip64 end records, with the locator claiming the archive spans three disks."""
    path = torch_zip(folder / "c.pth", {"w": torch.ones(2)})
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, data.rfind(b"PK\x06\x07") + 16, 3)
    return written(path, bytes(data))


def many_entries(folder: Path) -> Path:
    return write_zip(folder / "c.pth", state_pickle({"w": op_tensor()}),
                     extra=[(f"archive/extra/{i}", b"") for i in range(8)])


ZIP_CASES = [
    Case("deflate_bomb", deflate_bomb,
         ("zip entry 'archive/data/0' is compressed (method 8); torch.save stores entries uncompressed",),
         bounded=True),
    Case("bzip2_entry", compressed(zipfile.ZIP_BZIP2), ("zip entry 'archive/data/0' is compressed (method 12)",)),
    Case("lzma_entry", compressed(zipfile.ZIP_LZMA), ("zip entry 'archive/data/0' is compressed (method 14)",)),
    Case("deflated_pickle", lambda d: write_zip(d / "c.pth", state_pickle({"w": op_tensor()}),
                                                pkl_compression=zipfile.ZIP_DEFLATED),
         ("zip entry 'archive/data.pkl' is compressed (method 8)",)),
    Case("entry_past_eof", lambda d: patch_central(tensor_file(d / "c.pth"), "archive/data/0",
                                                   compressed_size=1 << 31, file_size=1 << 31),
         ("zip entry 'archive/data/0' declares 2147483648 bytes at byte", "past the end of the"),
         bounded=True),
    Case("sizes_disagree", lambda d: patch_central(tensor_file(d / "c.pth"), "archive/data/0", file_size=1 << 30),
         ("zip entry 'archive/data/0' is stored but declares 16 bytes in the file for 1073741824 bytes of data",)),
    Case("overlapping_entries", overlapping_entries,
         ("zip entries 'archive/data/0' and 'archive/version' overlap",)),
    Case("header_offset_past_eof", lambda d: patch_central(tensor_file(d / "c.pth"), "archive/data/0",
                                                           header_offset=1 << 30),
         ("zip entry 'archive/data/0' has no local header at byte",)),
    Case("renamed_local_header", renamed_local_header,
         ("zip entry 'archive/data/0' has another name in its local header",)),
    Case("encrypted_entry", lambda d: patch_central(tensor_file(d / "c.pth"), "archive/data/0", flags=1),
         ("zip entry 'archive/data/0' has flags 0x0001: encrypted or patched data, which torch.save never writes",)),
    Case("patched_data_entry", lambda d: patch_central(tensor_file(d / "c.pth"), "archive/data/0", flags=0x20),
         ("zip entry 'archive/data/0' has flags 0x0020: encrypted or patched data",)),
    Case("duplicate_names", duplicate_names, ("zip entry 'archive/data/0' appears twice",)),
    Case("bad_crc", flipped_data_byte, ("zip entry 'archive/data/0' fails its CRC-32 check (the file is corrupt)",)),
    Case("no_data_pkl", lambda d: written(d / "c.pth", rezip([(name, data) for name, data in entries(
        tensor_file(d / "c.pth").read_bytes()) if not name.endswith("data.pkl")])),
         ("expected one <archive>/data.pkl record in the zip, found 0",)),
    Case("two_data_pkl", lambda d: write_zip(d / "c.pth", state_pickle({"w": op_tensor()}),
                                             extra=[("other/data.pkl", state_pickle({}))]),
         ("expected one <archive>/data.pkl record in the zip, found 2",)),
    Case("big_endian", lambda d: write_zip(d / "c.pth", state_pickle({"w": op_tensor()}), byteorder=b"big"),
         ("its byteorder record says b'big': only little-endian checkpoints are supported",)),
    Case("truncated_file", lambda d: written(d / "c.pth", tensor_file(d / "c.pth").read_bytes()[:300]),
         ("not a readable PyTorch zip checkpoint (truncated, corrupt, or the legacy pre-1.6 format)",)),
    Case("empty_file", lambda d: written(d / "c.pth", b""),
         ("not a readable PyTorch zip checkpoint",)),
    Case("legacy_pickle_file", lambda d: torch.save({"w": torch.ones(2)}, d / "c.pth",
                                                    _use_new_zipfile_serialization=False) or d / "c.pth",
         ("not a readable PyTorch zip checkpoint",)),
    Case("multi_disk_zip64", multi_disk, ("not a readable PyTorch zip checkpoint", "span multiple disks")),
    Case("too_many_entries", many_entries, ("its zip directory declares 12 entries, more than the 10",)),
]


# ----------------------------------------------------------------------------------------------------------------
# The pickle
# ----------------------------------------------------------------------------------------------------------------


class _Gadget:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def code_case(module: str, name: str, *args: bytes) -> Case:
    return Case(
        f"global_{module}.{name}",
        lambda d: write_zip(d / "c.pth", state_pickle({"w": op_call(module, name, *args)})),
        (f"refusing to load: its pickle references {module}.{name}, which a weights-only checkpoint never needs",),
        UnsafeCheckpointError,
    )


def pickle_case(id: str, pkl: bytes, *words: str, error=CheckpointError, bounded=False) -> Case:
    return Case(id, lambda d: write_zip(d / "c.pth", pkl), words, error, bounded)


def build_on(target: bytes, state: bytes) -> bytes:
    """A pickle that BUILDs ``state`` onto ``target`` and keeps it as the value of ``w``."""
    return state_pickle({"w": target + state + b"b"})


DEPTH = 200_000

PICKLE_CASES = [
    code_case("os", "system", op_str("echo pwned")),
    code_case("posix", "system", op_str("echo pwned")),
    code_case("nt", "system", op_str("echo pwned")),
    code_case("builtins", "eval", op_str("1")),
    code_case("__builtin__", "exec", op_str("1")),
    code_case("builtins", "getattr", op_str("x"), op_str("y")),
    code_case("builtins", "__import__", op_str("os")),
    code_case("subprocess", "Popen", op_str("true")),
    code_case("pickle", "loads", op_str("x")),
    code_case("torch", "load", op_str("x")),
    code_case("torch.storage", "_load_from_bytes", op_str("x")),
    code_case("torch._utils", "_rebuild_device_tensor_from_numpy", op_str("x")),
    code_case("numpy.core.multiarray", "_reconstruct", op_str("x")),
    code_case("copyreg", "_reconstructor", op_str("x")),
    code_case("collections", "OrderedDict.fromkeys", op_str("x")),
    Case("reduce_gadget", lambda d: write_zip(d / "c.pth", pickle.dumps({"w": _Gadget()}, protocol=2)),
         (f"its pickle references {os.system.__module__}.system",), UnsafeCheckpointError),
    pickle_case("reduce_on_dtype", state_pickle({"w": op_global("torch", "float32") + b")R"}),
                "refusing to load: its pickle calls a dtype, which is not a tensor or plain-data constructor",
                error=UnsafeCheckpointError),
    pickle_case("opcode_INST", b"\x80\x02(ios\nsystem\n.", "opcode INST at byte 3", error=UnsafeCheckpointError),
    pickle_case("opcode_OBJ", b"\x80\x02(" + op_global("collections", "OrderedDict") + b"o.", "opcode OBJ",
                error=UnsafeCheckpointError),
    pickle_case("opcode_NEWOBJ", b"\x80\x02" + op_global("collections", "OrderedDict") + b")\x81.",
                "opcode NEWOBJ", error=UnsafeCheckpointError),
    pickle_case("opcode_EXT1", b"\x80\x02\x82\x01.", "opcode EXT1", error=UnsafeCheckpointError),
    pickle_case("opcode_STACK_GLOBAL", b"\x80\x04" + op_str("os") + op_str("system") + b"\x93.",
                "opcode STACK_GLOBAL", error=UnsafeCheckpointError),
    pickle_case("opcode_FRAME", b"\x80\x04\x95" + bytes(8) + b"}.",
                "unsupported pickle opcode FRAME at byte 2; torch.save writes pickle protocol 2"),
    pickle_case("opcode_BINBYTES", b"\x80\x03C\x01x.", "unsupported pickle opcode SHORT_BINBYTES"),
    pickle_case("opcode_INT_text", b"I1\n.", "unsupported pickle opcode INT"),
    # BUILD onto our own function, class or records: never applied.
    pickle_case("build_code_on_rebuild", build_on(op_global("torch._utils", "_rebuild_tensor_v2"),
                                                  op_dict({"__code__": op_int(0)})),
                "refusing to load: its pickle sets the state of a function (BUILD)", error=UnsafeCheckpointError),
    pickle_case("build_slots_on_rebuild", build_on(op_global("torch._utils", "_rebuild_tensor_v2"),
                                                   b"N" + op_dict({"__defaults__": op_tuple(op_int(1))}) + b"\x86"),
                "sets the state of a function (BUILD)", error=UnsafeCheckpointError),
    pickle_case("build_on_storage_type", build_on(op_global("torch", "FloatStorage"), op_dict({"name": op_int(0)})),
                "sets the state of a storage type (BUILD)", error=UnsafeCheckpointError),
    pickle_case("build_on_tensor_record", build_on(op_tensor(), op_dict({"offset": op_int(-1)})),
                "sets the state of a tensor (BUILD)", error=UnsafeCheckpointError),
    pickle_case("build_slots_on_ordered_dict", build_on(op_call("collections", "OrderedDict"),
                                                        b"N" + op_dict({"x": op_int(1)}) + b"\x86"),
                "sets the state of a OrderedDict (BUILD)", error=UnsafeCheckpointError),
    pickle_case("setitem_on_global", state_pickle({"w": op_global("torch._utils", "_rebuild_tensor_v2") + op_str(
        "__code__") + op_int(0) + b"s"}), "malformed checkpoint pickle: SETITEM on a function"),
    # Persistent ids other than torch's storage record.
    pickle_case("persistent_int", state_pickle({"w": op_int(7) + b"Q"}),
                "refusing to load: its pickle has a persistent record other than torch's", error=UnsafeCheckpointError),
    pickle_case("persistent_module", state_pickle({"w": op_tuple(op_str("module"), op_str("os")) + b"Q"}),
                "has a persistent record other than torch's", error=UnsafeCheckpointError),
    pickle_case("persistent_untyped", state_pickle({"w": op_tuple(
        op_str("storage"), op_str("FloatStorage"), op_str("0"), op_str("cpu"), op_int(4)) + b"Q"}),
        "malformed checkpoint pickle: storage record '0' names no storage type"),
    pickle_case("persistent_key_traversal", state_pickle({"w": op_tensor(key="../data.pkl")}),
                "malformed checkpoint pickle: a storage key is not a short name of letters and digits"),
    pickle_case("persistent_negative_size", state_pickle({"w": op_tensor(numel=-4)}),
                "storage record '0' has no location or no non-negative size"),
    # Plain-data constructors with arguments they would misuse.
    pickle_case("bytearray_of_a_length", state_pickle({"w": op_call("__builtin__", "bytearray", op_int(10**12))}),
                "malformed checkpoint pickle: bytearray of (1000000000000,)", bounded=True),
    pickle_case("codec_other_than_latin1", state_pickle({"w": op_call("_codecs", "encode", op_str("x"),
                                                                      op_str("rot13"))}),
                "encode of ('x', 'rot13'): _codecs.encode with arguments other than a string and 'latin1'"),
    pickle_case("ordered_dict_with_items", state_pickle({"w": op_call("collections", "OrderedDict", op_str("ab"))}),
                "malformed checkpoint pickle: ordered_dict of ('ab',)"),
    pickle_case("set_of_a_list", state_pickle({"w": op_call("__builtin__", "set", b"]]a")}),
                "malformed checkpoint pickle: a dict key or set item is a list"),
    # Malformed streams.
    pickle_case("truncated_before_stop", state_pickle({"w": op_tensor()})[:-1],
                "malformed checkpoint pickle: it ends before its STOP opcode (truncated)"),
    pickle_case("truncated_operand", b"\x80\x02X\xff\x00\x00\x00ab", "it ends inside an opcode's operand"),
    pickle_case("empty_pickle", b"", "it ends before its STOP opcode"),
    pickle_case("unknown_protocol", b"\x80\x06" + state_pickle({"w": op_tensor()})[2:],
                "malformed checkpoint pickle: unsupported pickle protocol 6"),  # found by the fuzz campaign
    pickle_case("stack_underflow", b"\x80\x02.", "an opcode needs more values than the stack holds"),
    pickle_case("setitems_without_mark", b"\x80\x02}u.", "an opcode needs a MARK that is not there"),
    pickle_case("memo_never_stored", b"\x80\x02h\x07.", "it refers to memo entry 7, which was never stored"),
    pickle_case("huge_memo_index", b"\x80\x02}r\xff\xff\xff\xff" + op_str("w") + op_int(1) + b"sj\xff\xff\xff\xff.",
                "entry 'w' is an int, not a tensor"),
    pickle_case("global_without_newline", b"\x80\x02c" + b"o" * 1000, "a GLOBAL name is not a line"),
    # Deep nesting, huge pickles: bounded, in a subprocess.
    pickle_case("deep_list", state_pickle({"w": b"]" * DEPTH + b"a" * (DEPTH - 1)}),
                "entry 'w' is a list, not a tensor", bounded=True),
    pickle_case("deep_tuple_key", b"\x80\x02}" + b"(" * DEPTH + b"t" * DEPTH + op_int(1) + b"s.",
                "malformed checkpoint pickle: a dict key or set item is a tuple", bounded=True),
    pickle_case("deep_tuple_in_set", state_pickle({"w": op_call("__builtin__", "set", b"]" + b"(" * DEPTH
                                                                + b"t" * DEPTH + b"a")}),
                "a dict key or set item is a tuple", bounded=True),
    pickle_case("opcode_bomb", b"\x80\x02(" + b"}" * (1 << 22) + b"t.",
                f"its pickle runs more than {1 << 22} opcodes", bounded=True),
]


# ----------------------------------------------------------------------------------------------------------------
# safetensors headers
# ----------------------------------------------------------------------------------------------------------------


def safetensors_file(folder: Path, header, data: bytes = bytes(16), *, length: int | None = None,
                     raw: bytes | None = None, name: str = "c.safetensors") -> Path:
    text = raw if raw is not None else json.dumps(header).encode()
    path = folder / name
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def one_tensor(dtype="F32", shape=(4,), offsets=(0, 16), **extra) -> dict:
    return {"w": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}}


def st_case(id: str, *words: str, bounded=False, **file) -> Case:
    header = file.pop("header", None)
    return Case(id, lambda d: safetensors_file(d, header if header is not None else one_tensor(), **file),
                ("not a readable safetensors file: ", *words), bounded=bounded)


SAFETENSORS_CASES = [
    st_case("header_length_huge", "its header length 1099511627776 does not fit the", length=1 << 40),
    st_case("header_length_past_eof", "its header length 1000 does not fit the", length=1000),
    Case("shorter_than_length", lambda d: written(d / "c.safetensors", b"\x01\x00"),
         ("its header length None does not fit the 2-byte file",)),
    st_case("not_json", "its header is not valid JSON", raw=b"{not json}"),
    st_case("not_utf8", "its header is not valid JSON", raw=b'{"\xff": 1}'),
    st_case("json_array", "its header is a JSON list, not an object", header=[1, 2]),
    st_case("duplicate_key", "a key appears twice in one object",
            raw=b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
                b'"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'),
    st_case("deep_json", "its header is not valid JSON", raw=b"[" * 100_000 + b"]" * 100_000, bounded=True),
    st_case("complex_dtype", "tensor 'w' has dtype 'C64', which is not a weight dtype",
            header=one_tensor("C64", (2,))),
    st_case("float8_dtype", "tensor 'w' has dtype 'F8_E4M3', which is not a weight dtype",
            header=one_tensor("F8_E4M3", (16,))),
    st_case("float64_dtype", "tensor 'w' has dtype 'F64', which is not a weight dtype of a safetensors file (F32, "
            "F16, BF16, or an integer or BOOL buffer; save float64 weights as F32)", header=one_tensor("F64", (2,))),
    st_case("long_key_name_bounded", "tensor 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk ...' "
            "has dtype 'C64'", header={"k" * 1_000_000: one_tensor("C64", (2,))["w"]}),
    st_case("negative_shape", f"tensor 'w' has shape [-4], not a list of at most 32 integers in [0, {2**31 - 1}]",
            header=one_tensor(shape=(-4,))),
    st_case("dimension_over_mlx_limit", f"tensor 'w' has shape [{2**31}, 0]", header=one_tensor(
        shape=(2**31, 0), offsets=(0, 0)), data=b""),
    st_case("float_shape", "tensor 'w' has shape [4.0]", header=one_tensor(shape=(4.0,))),
    st_case("bool_shape", "tensor 'w' has shape [True, 4]", header=one_tensor(shape=(True, 4))),
    st_case("too_many_dims", "tensor 'w' has shape a list", header=one_tensor(shape=(1,) * 33)),
    st_case("offsets_reversed", "tensor 'w' has data_offsets [16, 0], not [begin, end]",
            header=one_tensor(offsets=(16, 0))),
    st_case("offsets_not_a_pair", "has data_offsets [0, 16, 32]", header=one_tensor(offsets=(0, 16, 32))),
    st_case("size_mismatch", "tensor 'w' spans 16 bytes, but F32 of shape [5] needs 20",
            header=one_tensor(shape=(5,))),
    st_case("shape_overflow", "tensor 'w' spans 0 bytes, but F32 of shape [2147483647, 2147483647, 4] needs",
            header=one_tensor(shape=((1 << 31) - 1, (1 << 31) - 1, 4), offsets=(0, 0)), data=b""),
    st_case("offsets_past_data", "its tensors end at byte 32, but its data section holds 16 bytes",
            header=one_tensor(shape=(8,), offsets=(0, 32))),
    st_case("overlap", "tensor 'w' starts at byte 0 of the data, expected 16",
            header={**one_tensor(), "v": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
    st_case("gap", "tensor 'w' starts at byte 8 of the data, expected 0", header=one_tensor(offsets=(8, 24)),
            data=bytes(24)),
    st_case("trailing_bytes", "its tensors end at byte 16, but its data section holds 4096 bytes",
            data=bytes(4096)),
    st_case("extra_record_field", "tensor 'w' is not a record of dtype, shape and data_offsets",
            header=one_tensor(offset=0)),
    st_case("metadata_not_strings", "its __metadata__ is not an object of strings",
            header={**one_tensor(), "__metadata__": {"format": 1}}),
]

ALL_CASES = RECORD_CASES + ZIP_CASES + PICKLE_CASES + SAFETENSORS_CASES


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_hostile_file_is_refused(case, tmp_path, monkeypatch):
    if case.id == "too_many_entries":
        monkeypatch.setattr(checkpoint, "_MAX_ZIP_ENTRIES", 10)
    assert_refused(case, tmp_path)


def test_crafting_helpers_build_loadable_files(tmp_path):
    """The hostile files differ from loadable ones only in what each case changes: the same helpers, left alone,
    build files that both readers load to the same values."""
    path = write_zip(tmp_path / "ok.pth", state_pickle({
        "w": op_tensor(),
        "t": op_tensor(key="1", numel=6, size=(3, 2), stride=(1, 3)),
        "s": op_tensor(offset=1, size=(2,), stride=(2,)),
    }), {"0": FOUR_FLOATS, "1": np.arange(6, dtype=np.float32).tobytes()})
    ours, theirs = read_state_dict(path), torch.load(path, weights_only=True)
    assert sorted(ours) == sorted(theirs) == ["s", "t", "w"]
    for key in ours:
        np.testing.assert_array_equal(np.array(ours[key]), theirs[key].numpy())
    np.testing.assert_array_equal(np.array(ours["t"]), [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(np.array(ours["s"]), [1, 3])
    folder = tmp_path / "st"
    folder.mkdir()
    safetensors_file(folder, one_tensor(), FOUR_FLOATS, name="model.safetensors")
    np.testing.assert_array_equal(np.array(read_model_folder(folder)["w"]), [0, 1, 2, 3])
    assert read_bounded(path) == {"loaded": ["s", "t", "w"]}  # the subprocess limits leave room for real reading


def test_model_folder_checks_each_shard_before_mlx_reads_it(tmp_path):
    safetensors_file(tmp_path, one_tensor("C64", (2,)), name="model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'model.safetensors'}: not a readable safetensors file: tensor 'w' has dtype 'C64'")):
        read_model_folder(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Legitimate files: what torch.load(weights_only=True) accepts loads here to the same values
# ----------------------------------------------------------------------------------------------------------------

BASE = torch.arange(24, dtype=torch.float32).reshape(4, 6)

LEGITIMATE_TENSORS = {
    "contiguous": BASE,
    "transposed": BASE.t(),
    "sliced": BASE[1:3, 2:5],
    "strided_slice": BASE[::2, ::3],
    "expanded": torch.arange(3.0).expand(4, 3),  # torch.save writes stride 0
    "position_ids": torch.arange(5).expand((1, -1)),  # size-1 dim with stride 0, as in HF models
    "unfolded": torch.arange(6.0).unfold(0, 3, 1),  # overlapping strides
    "size_one_dims": torch.arange(6.0).reshape(1, 6, 1),
    "zero_elements": torch.zeros(0, 5),
    "zero_elements_at_storage_end": BASE[4:],
    "scalar": torch.tensor(3.5),
    "bfloat16": torch.linspace(-2, 2, 7).to(torch.bfloat16),
    "float16": torch.linspace(-2, 2, 7).half(),
    "float64": torch.linspace(-2, 2, 7).double(),
    "int64": torch.arange(-3, 4),
    "int8": torch.arange(-3, 4, dtype=torch.int8),
    "bool": torch.tensor([True, False, True]),
    "uint16": torch.arange(5).to(torch.uint16),  # _rebuild_tensor_v3 on an UntypedStorage
    "parameter": torch.nn.Parameter(torch.ones(2, 3)),
}


def assert_same_state(ours: dict, theirs: dict):
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        expected = comparable(value)
        got = comparable(ours[key])
        assert got.shape == expected.shape and got.dtype == expected.dtype, (key, got.dtype, expected.dtype)
        np.testing.assert_array_equal(got, expected, err_msg=key)


@pytest.mark.parametrize("name", list(LEGITIMATE_TENSORS))
def test_each_tensor_form_torch_writes_loads_exactly(name, tmp_path):
    path = torch_zip(tmp_path / "c.pth", {name: LEGITIMATE_TENSORS[name]})
    assert_same_state(read_state_dict(path), torch.load(path, weights_only=True))


def test_checkpoint_with_metadata_wrappers_plain_data_and_tied_weights(tmp_path):
    state = OrderedDict(LEGITIMATE_TENSORS)
    state["tied"] = state["contiguous"]  # the same tensor twice: one storage, one view
    state["module.prefixed"] = torch.ones(2)
    state._metadata = OrderedDict({"": {"version": 1}, "layer": {"version": 2}})
    checkpoint_object = {
        "model": state,
        "epoch": 3,
        "args": {"lr": 1e-4, "name": "run", "shape": torch.Size([2, 3]), "dtype": torch.bfloat16,
                 "device": torch.device("cpu"), "tags": {"a", "b"}, "blob": b"\x00\xff", "pair": (1, None),
                 "z": 1 + 2j, "buffer": bytearray(b"xy"), "nested": [{"deep": [1, 2.5, True]}]},
        "optimizer": {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
    }
    path = torch_zip(tmp_path / "c.pth", checkpoint_object)
    theirs = torch.load(path, weights_only=True)["model"]
    theirs["prefixed"] = theirs.pop("module.prefixed")
    ours = read_state_dict(path)
    assert_same_state(ours, theirs)
    assert ours["tied"] is ours["contiguous"]


def test_large_state_dict_reads_fast(tmp_path):
    """5000 entries: the pure-Python pickle interpreter stays well under a second."""
    import time

    path = torch_zip(tmp_path / "c.pth", {f"layers.{i}.weight": torch.full((2, 2), float(i)) for i in range(5000)})
    start = time.perf_counter()
    state = read_state_dict(path)
    assert time.perf_counter() - start < 3.0
    assert len(state) == 5000 and float(state["layers.4999.weight"][1, 1]) == 4999.0


def test_view_reads_only_its_byte_range(tmp_path, monkeypatch):
    """A small slice of a large storage reads the slice's bytes, not the entry (the CRC is streamed once)."""
    path = torch_zip(tmp_path / "c.pth", {"row": torch.arange(1 << 20, dtype=torch.float32).reshape(1024, 1024)[5]})
    reads = []
    original = checkpoint._TorchArchive.read_range
    monkeypatch.setattr(checkpoint._TorchArchive, "read_range",
                        lambda self, entry, start, stop: reads.append(stop - start) or original(self, entry, start, stop))
    np.testing.assert_array_equal(np.array(read_state_dict(path)["row"]), np.arange(5 * 1024, 6 * 1024))
    assert max(reads) == 4096


# ----------------------------------------------------------------------------------------------------------------
# No code runs: audit events while reading hostile files
# ----------------------------------------------------------------------------------------------------------------

AUDITED_READER = """
import json, sys
from starflow_mlx.checkpoint import CheckpointError, read_state_dict
from tests.crafted_checkpoints import Audit
warm_up, paths = sys.argv[1:3], sys.argv[3:]
for path in warm_up:  # legitimate files first, so that lazy imports (zip name codecs) happen before the audit
    read_state_dict(path)
audit, outcomes = Audit(), {}
for path in paths:
    audit.allowed_open = path
    try:
        read_state_dict(path)
        outcomes[path] = "loaded"
    except CheckpointError as e:
        outcomes[path] = type(e).__name__
    audit.allowed_open = None
print(json.dumps({"events": audit.events, "outcomes": outcomes}))
"""


def test_reading_hostile_files_runs_no_code(tmp_path):
    legitimate = torch_zip(tmp_path / "legit.pth", {"w": BASE, "t": BASE.t()})
    crafted = tensor_file(tmp_path / "crafted.pth")
    hostile = [c for c in ZIP_CASES + PICKLE_CASES + RECORD_CASES if not c.bounded and c.id != "too_many_entries"]
    paths = [legitimate]
    for case in hostile:
        folder = tmp_path / case.id
        folder.mkdir()
        paths.append(case.build(folder))
    proc = run_bounded(AUDITED_READER, legitimate, crafted, *paths, imports=("starflow_mlx.checkpoint",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["events"] == []
    assert result["outcomes"][str(legitimate)] == "loaded"
    assert all(result["outcomes"][str(p)] in ("CheckpointError", "UnsafeCheckpointError") for p in paths[1:])
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------------------------------------------
# Messages: said once, in the user's words, bounded; float64 that does not fit float32
# ----------------------------------------------------------------------------------------------------------------

def legacy_pth(folder: Path) -> Path:
    path = folder / "c.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    return path


def renamed_safetensors(folder: Path) -> Path:
    safetensors_file(folder, one_tensor())
    return (folder / "c.safetensors").rename(folder / "c.pth")


NOT_A_ZIP = {"legacy": legacy_pth, "random-bytes": lambda d: written(d / "c.pth", bytes(range(256)) * 8),
             "safetensors-renamed": renamed_safetensors, "empty": lambda d: written(d / "c.pth", b"")}


@pytest.mark.parametrize("make", list(NOT_A_ZIP.values()), ids=list(NOT_A_ZIP))
def test_not_a_zip_is_said_once(make, tmp_path):
    path = make(tmp_path)
    before = files_under(tmp_path)
    message = str(pytest.raises(CheckpointError, read_state_dict, path).value)
    assert message.startswith(f"{path}: not a readable PyTorch zip checkpoint (truncated, corrupt, or the legacy "
                              "pre-1.6 format)"), message
    assert message.count("not a readable PyTorch zip checkpoint") == 1 and "\n" not in message, message
    assert files_under(tmp_path) == before


UNSUPPORTED_TENSORS = {
    "sparse": lambda: torch.eye(2).to_sparse(),
    "sparse-csr": lambda: torch.eye(2).to_sparse_csr(),
    "meta": lambda: torch.empty(2, device="meta"),
    "quantized": lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's own: beta sparse CSR, deprecated quantization
@pytest.mark.parametrize("make", list(UNSUPPORTED_TENSORS.values()), ids=list(UNSUPPORTED_TENSORS))
def test_tensors_without_dense_storage_are_named_not_suspected(make, tmp_path):
    """What torch.save writes for sparse, meta and quantized tensors is refused as unsupported, not as code."""
    path = torch_zip(tmp_path / "c.pth", {"w": make()})
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert type(caught.value) is CheckpointError, message  # not UnsafeCheckpointError: nothing suspicious
    assert re.fullmatch(rf"{re.escape(str(path))}: it holds a tensor rebuilt by torch\._utils\._rebuild_\w+: sparse, "
                        r"quantized, nested and meta tensors are not supported; save the dense tensors", message)


def test_float64_weights_that_fit_float32_load_and_others_are_refused_without_a_warning(tmp_path):
    """float64 values within float32's range load rounded to float32; inf and NaN are kept (the weight checks name
    them); a finite value beyond float32's range is refused in one line, and numpy never warns on stderr."""
    import warnings

    big = float(np.finfo(np.float32).max)
    values = torch.tensor([big, -1.5, float("inf"), float("nan"), 1e-300], dtype=torch.float64)
    path = torch_zip(tmp_path / "ok.pth", {"w": values})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = np.array(read_state_dict(path)["w"])
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, np.array([big, -1.5, np.inf, np.nan, 0.0], np.float32))
    path = torch_zip(tmp_path / "big.pth", {"w": torch.tensor([1.0, -2 * big], dtype=torch.float64)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        message = refusal(lambda: read_state_dict(path), CheckpointError)
    assert message == f"{path}: tensor 'w': it holds values up to {2 * big:.6g}, beyond float32's range ({big:.6g})"


def test_weight_problems_bound_key_names(tmp_path):
    """A 1 MB key name appears cut to a few dozen characters in every message about the weights."""
    from starflow_mlx.weights import KeyMap, check_state_dict

    import mlx.core as mx

    long = "k" * 1_000_000
    message = refusal(lambda: check_state_dict({"w": (2,)}, {long: mx.zeros(2)}, "src"), CheckpointError)
    assert message.startswith("src: 2 problem(s) with the weights: missing key 'w' (expected shape [2]); "
                              "unexpected key 'kkkk") and len(message) < 300, message[:400]
    renames = KeyMap([("a.{rest}", "{rest}")])
    message = refusal(lambda: renames.rename({long: mx.zeros(1), "a." + long: mx.zeros(1)}, "src"), CheckpointError)
    assert message.startswith("src: keys 'kkkk") and "both stand for 'kkkk" in message and len(message) < 400


# ----------------------------------------------------------------------------------------------------------------
# convert t5: the tokenizer model and the encoder keys
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_t5(tmp_path_factory):
    """A tiny Hugging Face T5 folder (config.json, spiece.model, tokenizer_config.json) and its encoder's state."""
    transformers = pytest.importorskip("transformers")
    from tests.test_t5 import _hf_config, _write_tokenizer, train_spiece

    torch.manual_seed(0)
    model = transformers.T5EncoderModel(_hf_config())
    folder = tmp_path_factory.mktemp("hf-t5")
    model.config.to_json_file(folder / "config.json")
    _write_tokenizer(folder, train_spiece())
    return folder, dict(model.state_dict())


def _t5_source(hf_t5, tmp_path: Path, state: dict, spiece: bytes | None = None) -> Path:
    folder, _ = hf_t5
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "tokenizer_config.json", "spiece.model"):
        (src / name).write_bytes((folder / name).read_bytes())
    if spiece is not None:
        (src / "spiece.model").write_bytes(spiece)
    torch.save(state, src / "pytorch_model.bin")
    return src


Q = "block.0.layer.0.SelfAttention.q.weight"
T5_SOURCE_CASES = {
    "spiece-empty": (lambda state: state, b"", "spiece.model: not a SentencePiece model: it is empty"),
    "spiece-garbage": (lambda state: state, b"not a model", "spiece.model: not a SentencePiece model: INTERNAL"),
    "bare-then-prefixed-key": (lambda state: {Q: state["encoder." + Q], **state}, None,
                               f"src: keys '{Q}' and 'encoder.{Q}' both stand for the weight "
                               f"'encoder.{Q}'"),
    "prefixed-then-bare-key": (lambda state: {**state, Q: state["encoder." + Q]}, None,
                               f"src: keys 'encoder.{Q}' and '{Q}' both stand for the weight "
                               f"'encoder.{Q}'"),
}


@pytest.mark.parametrize("change, spiece, expected", list(T5_SOURCE_CASES.values()), ids=list(T5_SOURCE_CASES))
def test_convert_t5_refuses_bad_tokenizer_and_duplicate_keys(hf_t5, change, spiece, expected, tmp_path, capfd,
                                                            caplog):
    """One line, exit 2, no output, and nothing from sentencepiece or absl on the process's stderr (fd 2)."""
    from starflow_mlx.cli import main

    src = _t5_source(hf_t5, tmp_path, change(hf_t5[1]), spiece)
    before = files_under(tmp_path)
    capfd.readouterr()
    assert main(["convert", "t5", str(src), str(tmp_path / "out")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and expected in errors[0], errors
    assert capfd.readouterr().err == ""
    assert files_under(tmp_path) == before
