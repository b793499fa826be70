"""Property-based fuzzing of the weights-only checkpoint reader (hypothesis).

Each case mutates a small valid ``torch.save`` checkpoint: raw bytes anywhere (flips, overwrites, insertions,
deletions, splices, truncation), the pickle (bytes and opcodes, re-zipped with a valid CRC so that the pickle
interpreter sees them), the integers of the pickle (the offsets, sizes, strides and storage sizes of the REDUCE
argument tuples) and the fields of the zip headers. For every case:

- the process never crashes: the hypothesis loop runs in a subprocess under RLIMIT_AS / RLIMIT_CPU, so a segfault
  or a memory blow-up fails the test instead of killing pytest (the last case is left in ``last_case.pth``);
- no code runs: an audit hook armed during our read records any exec/compile/import/open/os/subprocess event;
- the outcome is a one-line ``CheckpointError``, or a state dict exactly equal to what
  ``torch.load(weights_only=True)`` returns for the same bytes. When torch refuses bytes that we load, the values
  must still be what the file really holds: they must equal an independent decoding (Python's own unpickler with
  the rebuild functions resolved to plain markers, zipfile's CRC-checked reading, numpy views). torch refuses
  such files for reasons that do not change the values: its zip reader is stricter about entries we never read
  (``version``, ``.storage_alignment``, local header fields), it checks ``requires_grad``, the storage location
  string and the record files' text, and its pre-scan of the pickle for globals misreads some operands.

CI runs a few hundred derandomized cases; ``benchmarks/fuzz_checkpoint.py`` runs the long campaign.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path

import pytest

from tests.crafted_checkpoints import (
    CENTRAL_FIELDS,
    END_FIELDS,
    LOCAL_FIELDS,
    Audit,
    comparable,
    entries,
    op_int,
    rezip,
)
from tests.helpers import run_bounded

# ----------------------------------------------------------------------------------------------------------------
# The seed checkpoint and the mutations
# ----------------------------------------------------------------------------------------------------------------


def seed_checkpoint() -> bytes:
    import torch
    from collections import OrderedDict

    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3) - 2.5
    state = OrderedDict(
        w=weight, t=weight.t(), tied=weight, h=torch.tensor([1.5, -2.0, 65504.0]).half(),
        b=torch.tensor([0.5, -3.0]).to(torch.bfloat16), i=torch.arange(-1, 2), e=torch.arange(2.0).expand(3, 2),
        s=weight[1, 1:],
    )
    state._metadata = OrderedDict({"": {"version": 1}})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


INTERESTING_INTS = [0, 1, 2, 3, 5, 6, 7, 8, 12, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1,
                    2**63, 2**64, -1, -2, -(2**31), -(2**62), -(2**63)]
PICKLE_OPCODES = sorted({op.code.encode("latin-1") for op in pickletools.opcodes})
INT_OPCODES = {"BININT", "BININT1", "BININT2", "LONG1"}


def with_pickle(seed: bytes, pkl: bytes) -> bytes:
    return rezip([(n, pkl if n.endswith("data.pkl") else d) for n, d in entries(seed)])


def zip_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of every numeric field of the local headers, central records and end record."""
    fields = []
    for signature, layout in ((b"PK\x03\x04", LOCAL_FIELDS), (b"PK\x01\x02", list(CENTRAL_FIELDS.values())),
                              (b"PK\x05\x06", END_FIELDS)):
        position = data.find(signature)
        while position >= 0:
            fields += [(position + offset, fmt) for offset, fmt in layout]
            position = data.find(signature, position + 4)
    return fields


def mutations():
    from hypothesis import strategies as st

    def byte_edits(draw, data: bytes) -> bytes:
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, max(len(data) - 1, 0)))
            edit = draw(st.sampled_from(["flip", "set", "insert", "delete", "splice", "truncate"]))
            if edit == "flip" and data:
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif edit == "set" and data:
                data[at] = draw(st.integers(0, 255))
            elif edit == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            elif edit == "delete":
                del data[at:at + draw(st.integers(1, 16))]
            elif edit == "splice" and data:
                source = draw(st.integers(0, len(data) - 1))
                data[at:at] = data[source:source + draw(st.integers(1, 64))]
            elif edit == "truncate":
                del data[at:]
        return bytes(data)

    def opcode_edits(draw, pkl: bytes) -> bytes:
        ops = [position for _, _, position in pickletools.genops(pkl)]
        at = draw(st.sampled_from(ops))
        edit = draw(st.sampled_from(["replace", "insert", "delete", "duplicate"]))
        end = next((p for p in ops if p > at), len(pkl))
        if edit == "replace":
            return pkl[:at] + draw(st.sampled_from(PICKLE_OPCODES)) + pkl[at + 1:]
        if edit == "insert":
            return pkl[:at] + draw(st.sampled_from(PICKLE_OPCODES)) + draw(st.binary(max_size=4)) + pkl[at:]
        if edit == "delete":
            return pkl[:at] + pkl[end:]
        return pkl[:at] + pkl[at:end] + pkl[at:]

    def number_edits(draw, pkl: bytes) -> bytes:
        ops = list(pickletools.genops(pkl))
        numbers = [(i, pos) for i, (op, _, pos) in enumerate(ops) if op.name in INT_OPCODES]
        for _ in range(draw(st.integers(1, 3))):
            i, at = draw(st.sampled_from(numbers))
            end = ops[i + 1][2]
            value = draw(st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-(2**70), 2**70)))
            new = op_int(value)
            pkl = pkl[:at] + new + pkl[end:]
            ops = list(pickletools.genops(pkl))
            numbers = [(j, pos) for j, (op, _, pos) in enumerate(ops) if op.name in INT_OPCODES]
        return pkl

    def field_edit(draw, data: bytes) -> bytes:
        at, fmt = draw(st.sampled_from(zip_fields(data)))
        old = struct.unpack_from(fmt, data, at)[0]
        top = (1 << (8 * struct.calcsize(fmt))) - 1
        value = draw(st.one_of(st.sampled_from([0, 1, top, top - 1, len(data), len(data) + 1]),
                               st.integers(-64, 64).map(lambda d: old + d), st.integers(0, top)))
        out = bytearray(data)
        struct.pack_into(fmt, out, at, min(max(value, 0), top))
        return bytes(out)

    @st.composite
    def mutated(draw, seed: bytes, pkl: bytes):
        kind = draw(st.sampled_from(["bytes", "pickle_bytes", "pickle_opcodes", "pickle_numbers", "zip_fields"]))
        if kind == "bytes":
            return kind, byte_edits(draw, seed)
        if kind == "pickle_bytes":
            return kind, with_pickle(seed, byte_edits(draw, pkl))
        if kind == "pickle_opcodes":
            return kind, with_pickle(seed, opcode_edits(draw, pkl))
        if kind == "pickle_numbers":
            return kind, with_pickle(seed, number_edits(draw, pkl))
        return kind, field_edit(draw, seed)

    return mutated


# ----------------------------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------------------------

def unwrap(obj) -> dict | None:
    """The state dict inside ``obj`` as our reader finds it (wrappers and prefixes stripped), or None."""
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        return None
    state = {}
    for key, value in obj.items():
        name = key
        while isinstance(name, str) and name.startswith(("module.", "_orig_mod.")):
            name = name.split(".", 1)[1]
        state[name] = value
    return state


def torch_state(path: Path):
    """(state, None) as torch.load(weights_only=True) reads it, or (None, the reason torch refuses)."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal by torch is an outcome to classify
        return None, f"{type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}"[:160]
    state = unwrap(obj)
    return (None, "not a dict") if state is None else ({k: comparable(v) for k, v in state.items()}, None)


REFERENCE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
                    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
                    "ByteStorage": "u1", "BoolStorage": "u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8"}


def reference_state(path: Path) -> dict:
    """What the file holds, decoded independently of our reader: Python's own unpickler with the names torch.save
    writes resolved to plain markers, zipfile's reading (which checks the CRC of each entry it reads), numpy views.
    Used when torch refuses a file that we load: its values must be these."""
    import numpy as np

    archive = zipfile.ZipFile(path)
    pkl_name = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl"))
    prefix = pkl_name[: -len("data.pkl")]

    def view(storage, offset, size, stride, *rest):
        type_name, raw = storage
        dtype = np.dtype(REFERENCE_DTYPES[rest[2][1] if type_name == "UntypedStorage" else type_name])
        flat = np.frombuffer(raw, dtype)
        if np.prod(size) == 0:
            return np.zeros(size, dtype)
        assert offset + sum((n - 1) * s for n, s in zip(size, stride)) < flat.size, "a view outside its storage"
        array = np.lib.stride_tricks.as_strided(flat[offset:], size, [s * dtype.itemsize for s in stride]).copy()
        if type_name == "BFloat16Storage":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array != 0 if type_name == "BoolStorage" else array.astype(np.float32) if dtype == "<f8" else array

    class Reference(pickle.Unpickler):
        def find_class(self, module, name):
            if name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3"):
                return view
            if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return lambda data, *rest: data
            if (module, name) == ("collections", "OrderedDict"):
                return OrderedDict
            return name if name.endswith("Storage") else (module, name)

        def persistent_load(self, pid):
            return pid[1], archive.read(f"{prefix}data/{pid[2]}")

    return unwrap(Reference(io.BytesIO(archive.read(pkl_name))).load())


def same_values(ours: dict, theirs: dict) -> bool:
    import numpy as np

    if sorted(ours) != sorted(theirs):
        return False
    for key, expected in theirs.items():
        got = comparable(ours[key])
        if not isinstance(expected, np.ndarray) or got.shape != expected.shape or got.dtype != expected.dtype:
            return False
        if not np.array_equal(got, expected, equal_nan=got.dtype.kind == "f"):
            return False
    return True


def outcome_kind(message: str) -> str:
    """A refusal's message with names and numbers blanked, cut at its first clause: one count per kind."""
    message = re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", message))
    return re.split(r"[:;(]", message.replace("tensor '…': ", ""), maxsplit=1)[0].strip()[:60]


def check_case(data: bytes, path: Path, audit: Audit | None) -> str:
    """The outcome of one case; an AssertionError when a rule is broken."""
    from starflow_mlx.checkpoint import CheckpointError, read_state_dict

    path.write_bytes(data)
    audit = audit or Audit.__new__(Audit)  # warm-up cases run before the hook exists
    audit.allowed_open, audit.events = str(path), []
    try:
        ours = read_state_dict(path)
    except CheckpointError as e:
        ours, refusal = None, str(e)
    finally:
        audit.allowed_open = None
    assert not audit.events, audit.events
    if ours is None:
        assert "\n" not in refusal and refusal.startswith(f"{path}: "), refusal
        return "refused: " + outcome_kind(refusal[len(str(path)) + 2:])
    theirs, torch_refusal = torch_state(path)
    if theirs is not None:
        if same_values(ours, theirs):
            return "loaded, equal to torch"
        # torch 2.13 can return uninitialised memory for a damaged zip (different values on every load): then the
        # file's own values, decoded independently, are the truth.
        assert same_values(ours, reference_state(path)), "we load values that differ from torch.load's and the file's"
        return "loaded, torch returns other values"
    assert same_values(ours, reference_state(path)), "torch refuses, and we load values the file does not hold"
    return "loaded, torch refuses: " + torch_refusal[:70]


# ----------------------------------------------------------------------------------------------------------------
# The loop, in a bounded subprocess
# ----------------------------------------------------------------------------------------------------------------


def run_cases(examples: int, seed: int | None, workdir: Path) -> dict:
    """Run ``examples`` hypothesis cases in this process; ``seed`` None derandomizes. Returns the outcome counts."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    seed_file = seed_checkpoint()
    pkl = dict(entries(seed_file))[next(n for n, _ in entries(seed_file) if n.endswith("data.pkl"))]
    outcomes, kinds = Counter(), Counter()
    case_path = workdir / "last_case.pth"
    for warm_up in (seed_file, rezip(entries(seed_file))):  # lazy imports (zip name codecs) before the audit
        check_case(warm_up, case_path, None)
    audit = Audit()

    @settings(max_examples=examples, derandomize=seed is None, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    @given(mutations()(seed_file, pkl))
    def case(mutation):
        kind, data = mutation
        outcome = check_case(data, case_path, audit)
        outcomes[outcome] += 1
        kinds[f"{kind}: {outcome.split(':')[0].split(',')[0]}"] += 1

    if seed is not None:
        case = hypothesis_seed(seed)(case)
    case()
    return {"cases": sum(outcomes.values()), "outcomes": dict(outcomes), "by_kind": dict(kinds)}


CHILD = """
import json, sys
from pathlib import Path
from tests.test_fuzz_checkpoint import run_cases
print(json.dumps(run_cases(int(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3]))))
"""


def run_in_subprocess(examples: int, seed: int | None, workdir: Path, timeout: int = 600) -> dict:
    """The loop in a child under ``run_bounded``'s limits (its address space after importing torch, hypothesis, the
    reader and this module, plus 1 GiB; ``timeout`` CPU seconds): a crash or a blow-up fails with the last case left in
    ``workdir/last_case.pth``."""
    proc = run_bounded(CHILD, examples, json.dumps(seed), workdir, extra_memory=1 << 30, cpu=timeout,
                       timeout=timeout + 60,
                       imports=("torch", "hypothesis", "starflow_mlx.checkpoint", "tests.test_fuzz_checkpoint"))
    if proc.returncode != 0:
        raise AssertionError(f"the fuzzing process failed (rc {proc.returncode}); last case in "
                             f"{workdir / 'last_case.pth'}:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def test_fuzzed_checkpoints_load_exactly_or_are_refused(tmp_path):
    pytest.importorskip("hypothesis")
    pytest.importorskip("torch")
    result = run_in_subprocess(examples=300, seed=None, workdir=tmp_path)
    assert result["cases"] == 300
    loaded = sum(n for outcome, n in result["outcomes"].items() if outcome.startswith("loaded"))
    refused = sum(n for outcome, n in result["outcomes"].items() if outcome.startswith("refused"))
    # Both branches are exercised: mutations that keep the file loadable and mutations that break it.
    assert loaded >= 10 and refused >= 100, result
