"""MLX model folders: writing them atomically, reading them back, and checking and renaming weights.

Shared by every converter (flow, T5, VAEs) and by the model loaders (checkpoint files are read by ``checkpoint``):

- ``check_output_folder`` / ``write_model_folder``: ``config.json`` plus safetensors shards (5 GiB each,
  ``model-0000i-of-0000N``) and a ``model.safetensors.index.json``, the mlx-lm layout, written to a temporary folder
  and renamed into place (``staged_model_folder``, which also writes a pipeline folder of model folders, through
  ``staging.staged_folder``); an existing folder is only ever replaced when it is a model folder of ours
  (``model_folder_problem``; a pipeline folder's parts too), and never when it holds a source. What a killed run
  left beside it is removed only when its marker proves it ours (``staging.tidy_leftovers``).
- ``read_model_folder`` / ``load_weights_into``: the reverse, with transparent loading of quantized Linear layers.
- ``shard_files`` / ``shard_names`` / ``file_in_folder``: the shard files a ``*.index.json`` names (ours or a
  checkpoint's; ``shard_names`` whether they exist or not, what the pipeline converter downloads), and any file a
  source folder names (a T5's tokenizer files), each a regular file still inside the folder once links are
  resolved; used by ``read_model_folder`` and every converter that reads a folder.
- ``check_state_dict`` and ``KeyMap``: every key present with its shape and a floating dtype, and the renames
  between a checkpoint's names and ours, declared as template tables beside each model (``flow.OFFICIAL_NAMES``,
  ``t5.HF_NAMES``, ...).
- ``cast_floating``: the one cast to a storage dtype, refusing weights that are not finite or do not fit it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .checkpoint import CheckpointError, read_safetensors
from .config import MAX_INDEX_BYTES, PIPELINE_PARTS, read_json_object, shown
from .staging import MARKER_NAME, check_name_fits, is_regular_file, real_path, staged_folder, tidy_leftovers

log = logging.getLogger(__name__)

SHARD_BYTES = 5 << 30
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# The model_type of every folder starflow-mlx writes: the CLI's convert kinds and the pipeline folder.
MODEL_TYPES = ("flow", "t5", "wan-vae", "sd-vae", "pipeline")
# The tokenizer files a T5 folder carries beside its weights (``convert.t5`` copies those its source has): the only
# other files a model folder may hold, whatever its config.json lists.
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Files macOS Finder writes into folders: not the user's data (when they are files), so they do not stop a model
# folder being replaced.
IGNORED_NAMES = (".DS_Store",)
class OutputFolderError(ValueError):
    """An output folder that cannot be written, or an existing path that a conversion must not replace (another
    run writing it included)."""


# ----------------------------------------------------------------------------------------------------------------
# Checking names and shapes
# ----------------------------------------------------------------------------------------------------------------


def check_state_dict(
    expected: dict[str, tuple],
    got: dict[str, mx.array],
    source: str | os.PathLike,
    ignore: Callable[[str], bool] = None,
    non_floating: Collection[str] = (),
) -> None:
    """Every expected key present with its shape and a floating dtype, nothing unexpected (except what ``ignore``
    accepts). Only the keys in ``non_floating`` (a quantized layer's packed weights) may hold integers: an integer
    or boolean tensor where a weight belongs would otherwise be cast silently."""
    problems = []
    for key, shape in expected.items():
        if key not in got:
            problems.append(f"missing key {shown(key)} (expected shape {list(shape)})")
        elif tuple(got[key].shape) != tuple(shape):
            problems.append(f"key {shown(key)} has shape {list(got[key].shape)}, expected {list(shape)}")
        elif key not in non_floating and not mx.issubdtype(got[key].dtype, mx.floating):
            problems.append(f"key {shown(key)} has dtype {dtype_name(got[key].dtype)}, expected a floating tensor")
    for key in got:
        if key not in expected and not (ignore and ignore(key)):
            problems.append(f"unexpected key {shown(key)} (shape {list(got[key].shape)})")
    if problems:
        listed = "; ".join(problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(f"{source}: {len(problems)} problem(s) with the weights: {listed}{more}")


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


# Fields every KeyMap knows: a layer index, and any run of characters before or after a renamed part.
KEY_FIELDS = {"i": r"\d+", "pre": r".+", "rest": r".+"}


class KeyMap:
    """The renames between a checkpoint's parameter names and ours, declared as ``(checkpoint, ours)`` template pairs.

    A template is a whole parameter name in which ``{field}`` stands for a part matched by the regular expression
    ``fields[field]`` (``KEY_FIELDS`` plus the map's own): ``("encoder.block.{i}.layer.0.layer_norm.weight",
    "layers.{i}.attention_norm.weight")``. Each pair is a rewrite rule and every rule applies in turn: ``to_ours``
    goes through the pairs first to last, and each pair whose checkpoint template matches the whole name (as the
    earlier pairs left it) rewrites it into its own template with the same field values; ``to_checkpoint`` goes
    the other way, last to first. A name that no template matches is kept. So rules that rename different parts of
    one name (``{pre}.attn_blocks.{rest}`` and ``{pre}.mlp.main.0.{rest}``) compose, and ``then`` chains two maps
    through an intermediate naming; the rules of a map must not match each other's results.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]], fields: dict[str, str] | None = None):
        fields = {**KEY_FIELDS, **(fields or {})}
        # (checkpoint regex, our regex), (checkpoint template, our template): index 0 is the checkpoint side.
        self.rules = [((_template_regex(a, fields), _template_regex(b, fields)), (a, b)) for a, b in pairs]

    def then(self, other: "KeyMap") -> "KeyMap":
        """Checkpoint names of ``self`` <-> our names of ``other``, where ``self``'s names are ``other``'s checkpoint
        names (original Wan -> diffusers -> ours)."""
        chained = KeyMap([])
        chained.rules = self.rules + other.rules
        return chained

    def to_ours(self, name: str) -> str:
        return self._apply(name, self.rules, 0)

    def to_checkpoint(self, name: str) -> str:
        return self._apply(name, reversed(self.rules), 1)

    def rename(self, state: dict[str, mx.array], source: str | os.PathLike) -> dict[str, mx.array]:
        """``state`` under our names; two checkpoint keys that become the same name are an error."""
        out, origin = {}, {}
        for key, value in state.items():
            name = self.to_ours(key)
            if name in out:
                raise CheckpointError(f"{source}: keys {shown(origin[name])} and {shown(key)} both stand for "
                                      f"{shown(name)}")
            out[name], origin[name] = value, key
        return out

    @staticmethod
    def _apply(name: str, rules, side: int) -> str:
        """Rewrite ``name`` from ``side`` (0: checkpoint, 1: ours) to the other side."""
        for patterns, templates in rules:
            match = patterns[side].fullmatch(name)
            if match:
                name = templates[1 - side].format(**match.groupdict())
        return name


def _template_regex(template: str, fields: dict[str, str]) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field name, literal, ..., literal
    return re.compile("".join(f"(?P<{p}>{fields[p]})" if i % 2 else re.escape(p) for i, p in enumerate(parts)))


# ----------------------------------------------------------------------------------------------------------------
# MLX model folders
# ----------------------------------------------------------------------------------------------------------------


def _shards(weights: dict[str, mx.array], shard_bytes: int) -> list[dict[str, mx.array]]:
    shards, current, size = [], {}, 0
    for key, value in weights.items():
        if current and size + value.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = value
        size += value.nbytes
    shards.append(current)
    return shards


def check_output_folder(
    out_dir: str | os.PathLike, overwrite: bool, sources: Iterable[str | os.PathLike] = ()
) -> Path:
    """``out_dir`` as an absolute Path, once writing it is safe: what a converter checks before reading anything.

    Refused whatever ``overwrite`` says: a path under a file, a name too long for the hidden folders beside it, a
    symbolic link (never followed, so its target is never replaced behind the user's back), a path through a loop
    of links, one of ``sources`` or a folder holding one (writing or replacing it could delete what is being read),
    an existing file, and an existing folder that is not a model folder of ours (``model_folder_problem``). An
    existing model folder is replaced only with ``overwrite``. Before that, what killed runs writing the same path
    left beside it is tidied (``staging.tidy_leftovers``), and a path another run is writing is refused.
    """
    out = _absolute(out_dir)
    try:
        _check_path(out)
        _check_not_a_source(out, sources)
        tidy_leftovers(out, OutputFolderError, _is_complete)
        _check_replaceable(out, overwrite)
    except OSError as e:
        raise OutputFolderError(f"{out}: cannot be used as the output folder: {e.strerror or e}") from None
    return out


def _absolute(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir).absolute()
    # "/" or a trailing "..": the folder it names
    return real_path(out, OutputFolderError) if out.name in ("", "..") else out


def _check_path(out: Path) -> None:
    """What makes ``out`` unusable whatever it holds: no name, a parent that is a file, a name too long, a link."""
    if not out.name:
        raise OutputFolderError(f"{out}: not a folder that can be written; name a new folder")
    existing = next(p for p in out.parents if p.exists())
    if not existing.is_dir():
        raise OutputFolderError(f"{out}: cannot be created: {existing} is a file, not a folder")
    check_name_fits(out, existing, OutputFolderError, is_folder=True)
    if out.is_symlink():
        raise OutputFolderError(
            f"{out}: is a symbolic link; name the folder itself (a link is never followed to replace its target)"
        )


def _check_not_a_source(out: Path, sources: Iterable[str | os.PathLike]) -> None:
    """Writing or replacing ``out`` must never delete a source: it may neither be one nor hold one (compared by real
    path, so links and ``..`` hide nothing). A new folder inside a source folder is fine: the converters read named
    files there, and an existing subfolder that holds sources is not a model folder of ours, so never replaced."""
    real = real_path(out, OutputFolderError)
    for source in sources:
        source_real = real_path(Path(source), CheckpointError)
        if source_real == real:
            raise OutputFolderError(f"{out}: is the source {source} itself; choose another output folder")
        if real in source_real.parents:
            raise OutputFolderError(
                f"{out}: holds the source {source}, which writing the output there could delete; choose an output "
                "folder outside it"
            )


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputFolderError(f"{out}: exists and is a file, not a model folder; choose another output folder")
    problem = model_folder_problem(out)
    if problem:
        raise OutputFolderError(
            f"{out}: already exists and is not a starflow-mlx model folder ({problem}); --overwrite only replaces "
            "a model folder, so choose another output folder"
        )
    if not overwrite:
        raise OutputFolderError(f"{out}: already exists (pass overwrite / --overwrite to replace it)")


def model_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` may hold the user's data, so that nothing may replace it; None when it is empty or a model
    folder of ours: a ``config.json`` with a known ``model_type`` and our ``converter_version`` and ``source``, and
    nothing but the regular files (never links, folders or FIFOs) that ``_is_own_file`` accepts, or for a pipeline
    folder its part folders (``_pipeline_folder_problem``). Finder's files (``IGNORED_NAMES``) do not count, but
    only when they are regular files too."""
    entries = sorted((p for p in folder.iterdir() if not (p.name in IGNORED_NAMES and is_regular_file(p))),
                     key=lambda p: p.name)
    if not entries:
        return None
    meta = _our_config(folder / CONFIG_NAME)
    if meta is None:
        return f"no {CONFIG_NAME} written by starflow-mlx"
    if meta["model_type"] == "pipeline":
        return _pipeline_folder_problem(entries)
    return _foreign_files_problem([p for p in entries if not (_is_own_file(p.name, meta) and is_regular_file(p))])


def _foreign_files_problem(foreign: list[Path]) -> str | None:
    names = [p.name for p in foreign]
    return f"it also holds {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}" if names else None


def _is_own_file(name: str, meta: dict) -> bool:
    """Whether a model folder whose ``config.json`` says ``meta`` writes a file called ``name``: the config, the
    weights and their index, the tokenizer files it lists, and the marker of a run killed while moving it aside."""
    return name in (CONFIG_NAME, INDEX_NAME, MARKER_NAME) or bool(SHARD_NAME.fullmatch(name)) or (
        name in _companion_files(meta)
    )


def _pipeline_folder_problem(entries: list[Path]) -> str | None:
    """A pipeline folder holds its config.json (and the marker of a run killed while moving it aside), regular
    files both, and its part folders (``PIPELINE_PARTS``), nothing else; each part is a real folder (not a link,
    whose target is not ours to delete) that is empty or a model folder of ours of a component kind (never another
    pipeline). A part may be missing: what is left is still ours."""
    parts = [p for p in entries if p.name in PIPELINE_PARTS]
    foreign = _foreign_files_problem(
        [p for p in entries if p not in parts and not (p.name in (CONFIG_NAME, MARKER_NAME) and is_regular_file(p))]
    )
    if foreign:
        return foreign
    for part in parts:
        if part.is_symlink() or not part.is_dir():
            return f"its part {part.name} is not a folder"
        meta = _our_config(part / CONFIG_NAME)
        if meta is not None and meta["model_type"] == "pipeline":  # checked first: no recursion into nesting
            return f"its part {part.name} is a pipeline folder itself"
        problem = model_folder_problem(part)
        if problem:
            return f"its part {part.name}: {problem}"
    return None


def _our_config(path: Path) -> dict | None:
    """The parsed ``config.json`` at ``path`` when it is one that starflow-mlx writes, else None."""
    if path.is_symlink():
        return None
    try:
        meta = read_json_object(path)
    except ValueError:  # missing, too large, not JSON: not one we wrote
        return None
    if not isinstance(meta, dict) or meta.get("model_type") not in MODEL_TYPES:
        return None
    return meta if {"converter_version", "source"} <= meta.keys() else None


def _companion_files(meta: dict) -> list[str]:
    """The tokenizer files ``config.json`` lists, among those a model folder may have (a tampered list could
    otherwise make any file of the user's count as ours)."""
    tokenizer = meta.get("tokenizer")
    files = tokenizer.get("files") if isinstance(tokenizer, dict) else None
    return [name for name in TOKENIZER_FILES if name in files] if isinstance(files, list) else []


def _is_complete(folder: Path) -> bool:
    """A model folder of ours with every file its config and index name: one a killed run may put back."""
    meta = _our_config(folder / CONFIG_NAME)
    if meta is None or model_folder_problem(folder) is not None:
        return False
    if meta["model_type"] == "pipeline":
        return all(_is_complete(folder / name) for name in PIPELINE_PARTS)
    try:
        shard_files(folder / INDEX_NAME)  # every shard named there is a file in the folder
    except ValueError:
        return False
    return all((folder / name).is_file() for name in _companion_files(meta))


# ---- writing ----


def write_model_folder(
    out_dir: str | os.PathLike,
    config: dict,
    weights: dict[str, mx.array],
    *,
    overwrite: bool = False,
    shard_bytes: int | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``config.json``, sharded safetensors and the index into ``out_dir``, atomically
    (``staged_model_folder``); returns its absolute path."""
    with staged_model_folder(out_dir, overwrite) as folder:
        try:
            _write_files(folder, config, weights, shard_bytes or SHARD_BYTES, extra_files or {})
        except OSError as e:
            raise _write_error(_absolute(out_dir), e) from None
    return _absolute(out_dir)


@contextlib.contextmanager
def staged_model_folder(
    out_dir: str | os.PathLike, overwrite: bool = False, sources: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """The temporary folder in which to write what becomes ``out_dir``, put in place when the block ends without
    an error: how every model folder, and a pipeline folder of model folders, is written atomically.

    ``out_dir`` is checked first (``check_output_folder``, with ``sources``); the block writes into a hidden folder
    beside it, marked as ours and locked while this process lives, that replaces ``out_dir`` at the end
    (``staging.staged_folder``: an existing model folder is moved aside and deleted once the new one is in place).
    Any failure (Ctrl-C and the CLI's SIGTERM included) leaves ``out_dir`` as it was. A failure to write (disk full,
    read-only, name too long) is an ``OutputFolderError`` naming ``out_dir``; the block's own errors (a source
    unreadable) stay its own.
    """
    out = check_output_folder(out_dir, overwrite, sources)
    in_block = False
    try:
        check = partial(_check_replaceable, overwrite=overwrite)
        with staged_folder(out, check, _is_complete, OutputFolderError) as tmp:
            in_block = True
            yield tmp
            in_block = False
    except OSError as e:
        if in_block:
            raise
        raise _write_error(out, e) from None


def _write_error(out: Path, error: OSError) -> OutputFolderError:
    return OutputFolderError(f"{out}: cannot write the model folder: {error.strerror or error}")


def _write_files(folder: Path, config: dict, weights: dict[str, mx.array], shard_bytes: int, extra_files: dict) -> None:
    shards = _shards(weights, shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_shard(folder / name, shard)
        for key, value in shard.items():
            weight_map[key] = name
            total += value.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False))
    for name, data in extra_files.items():
        (folder / name).write_bytes(data)


def _save_shard(path: Path, shard: dict[str, mx.array]) -> None:
    """``mx.save_safetensors``, its failures as the ``OSError`` they are: MLX reports a failed write as a
    RuntimeError without the cause, so a full disk is told apart by the space left."""
    try:
        mx.save_safetensors(str(path), shard, metadata={"format": "mlx"})
    except RuntimeError as e:
        if shutil.disk_usage(path.parent).free < sum(value.nbytes for value in shard.values()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise OSError(errno.EIO, str(e), str(path)) from None


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}; is this a converted starflow-mlx model folder?")
    try:
        return read_json_object(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def shard_files(index: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> list[Path]:
    """The shard files a ``*.index.json`` names (for the weights ``keep`` accepts, default all), in its folder.

    The index comes with the checkpoint, so its names are untrusted: each shard must be a plain file name
    (``shard_names``), a file inside the folder (``file_in_folder``).
    """
    index = Path(index)
    return [_shard_path(index, name) for name in shard_names(index, keep)]


def shard_names(index: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> list[str]:
    """The shard file names a ``*.index.json`` names (for the weights ``keep`` accepts, default all), sorted, whether
    the files exist or not (what to download): ``weight_map`` must map names to names, and each shard must be a plain
    file name (no separator, ``..``, NUL or absolute path) with the suffix the index name announces
    (``model.safetensors.index.json``: ``.safetensors``)."""
    index = Path(index)
    try:
        weight_map = read_json_object(index, MAX_INDEX_BYTES).get("weight_map")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map must be a non-empty mapping of weight names to shard files")
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad:
        raise CheckpointError(f"{index}: weight_map[{bad[0]!r}] must be a shard file name, got {shown(bad[1])}")
    names = sorted({name for key, name in weight_map.items() if keep is None or keep(key)})
    suffix = Path(index.name.removesuffix(".index.json")).suffix
    for name in names:
        plain = 0 < len(name) <= 255 and name not in (".", "..") and not any(c in name for c in "/\\\0")
        if not plain or not name.endswith(suffix):
            raise CheckpointError(
                f"{index}: shard {shown(name)} is not a plain {suffix} file name in the index's folder"
            )
    return names


def _shard_path(index: Path, name: str) -> Path:
    return file_in_folder(index.parent, name, "shard", index)


def file_in_folder(folder: Path, name: str, what: str, named_by: str | os.PathLike) -> Path:
    """``folder / name``, the ``what`` (e.g. "shard") that ``named_by`` names, once it is a regular file (links
    followed) that is still inside ``folder`` once links are resolved, so that a source folder cannot make a
    converter read (and copy into its output) a file from anywhere. The one exception is the Hugging Face cache,
    whose files in ``snapshots/<revision>/`` (and its subfolders: the parts of a pipeline repo) are links into the
    repo's ``blobs/`` folder. Every refusal is a ``CheckpointError`` naming ``named_by``."""
    path = folder / name
    real, allowed = real_path(path, CheckpointError), [real_path(folder, CheckpointError)]
    if not path.exists():
        raise CheckpointError(f"{named_by}: names the {what} {name}, which is missing")
    if not path.is_file():
        raise CheckpointError(f"{named_by}: the {what} {name} is not a regular file")
    snapshot = next(
        (p for p in (allowed[0], *allowed[0].parents)
         if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--")),
        None,
    )
    if snapshot is not None:
        allowed.append(snapshot.parent.parent / "blobs")
    if real.parent not in allowed:
        raise CheckpointError(f"{named_by}: {what} {name} links to {real}, outside the folder {folder}")
    return path


def read_model_folder(folder: str | os.PathLike) -> dict[str, mx.array]:
    """All weights of a model folder, from its index (or every ``*.safetensors`` when there is no index)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        files = shard_files(index)
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no safetensors weights found")
    weights = {}
    for path in files:
        weights.update(read_safetensors(path))
    return weights


# ----------------------------------------------------------------------------------------------------------------
# Quantization (MLX affine, the mlx-lm convention: a "quantization" block in config.json)
# ----------------------------------------------------------------------------------------------------------------


def quantizable(path: str, module: nn.Module, group_size: int, skip: Iterable[str] = ()) -> bool:
    """Linear layers whose input width is a multiple of the group size, except names containing ``skip``."""
    return (
        isinstance(module, nn.Linear)
        and module.weight.shape[-1] % group_size == 0
        and not any(s in path for s in skip)
    )


def quantize_model(model: nn.Module, bits: int, group_size: int = 64, skip: Iterable[str] = ()) -> dict:
    """Quantize ``model`` in place; return the ``quantization`` block to record in ``config.json``."""
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"quantization group size must be 32, 64 or 128, got {group_size}")
    skip = tuple(skip)
    if not any(quantizable(path, module, group_size, skip) for path, module in model.named_modules()):
        raise ValueError(
            f"cannot quantize: no Linear layer of this model has an input width that is a multiple of the group "
            f"size {group_size} (--q-group-size), so nothing would be quantized; use a smaller group size or none"
        )
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=lambda p, m: quantizable(p, m, group_size, skip))
    return {"group_size": group_size, "bits": bits}


def load_weights_into(model: nn.Module, weights: dict[str, mx.array], config: dict, source: str | os.PathLike) -> nn.Module:
    """Load ``weights`` into ``model`` strictly; quantize first the Linear layers that were saved quantized."""
    quant = config.get("quantization")
    if quant:
        nn.quantize(
            model,
            group_size=quant["group_size"],
            bits=quant["bits"],
            class_predicate=lambda p, m: isinstance(m, nn.Linear) and f"{p}.scales" in weights,
        )
    parameters = tree_flatten(model.parameters())
    packed = {k for k, v in parameters if not mx.issubdtype(v.dtype, mx.floating)}
    check_state_dict({k: v.shape for k, v in parameters}, weights, source, non_floating=packed)
    model.update(tree_unflatten(list(weights.items())))
    return model


def read_model_config(folder: str | os.PathLike, config_class: type) -> tuple[Any, dict]:
    """The parsed config of a converted folder (``config_class``, whose ``model_type`` it must have) and its raw
    dict: every check of ``load_model`` that reads no weight."""
    if not isinstance(folder, (str, os.PathLike)):
        raise ValueError(f"folder must be the path of a converted model folder (str or os.PathLike), got "
                         f"{type(folder).__name__}")
    raw = read_config(folder)
    kind = config_class.model_type
    if raw.get("model_type") != kind:
        raise CheckpointError(
            f"{folder}: model_type is {raw.get('model_type')!r}, expected {kind!r} "
            f"(convert it with `starflow-mlx convert {kind}`)"
        )
    try:
        return config_class.from_dict(raw, source=str(Path(folder) / CONFIG_NAME)), raw
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_model(
    folder: str | os.PathLike,
    config_class: type,
    build: Callable[[Any], nn.Module],
    dtype: "str | mx.Dtype | None" = None,
) -> nn.Module:
    """Build a component from a converted folder and load its weights strictly.

    ``config_class`` (a ``Config`` subclass) names the expected ``model_type`` and parses ``config.json``; ``build``
    makes the module from that config; ``dtype`` (``parse_dtype``) casts the floating weights (``None`` keeps the
    stored ones).
    """
    dtype = parse_dtype(dtype, optional=True)
    config, raw = read_model_config(folder, config_class)
    model = build(config)
    weights = read_model_folder(folder)
    if dtype is not None:
        weights = cast_floating(weights, dtype, folder)
    load_weights_into(model, weights, raw, folder)
    model.eval()
    mx.eval(model.parameters())
    return model


def compute_dtype(module: nn.Module) -> mx.Dtype:
    """The dtype policy of every component, in one place: a component computes in the dtype of its floating
    weights (for a quantized layer, its scales), casts its inputs to it at its entry, and hands float32 to the
    next component. Numerically sensitive steps (the flow's affine step and likelihood, RoPE tables, the VAE
    latent normalisation) run in float32 whatever the weights."""
    for _, value in tree_flatten(module.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    return mx.float32


def cast_floating(weights: dict[str, mx.array], dtype: mx.Dtype, source: str | os.PathLike) -> dict[str, mx.array]:
    """The floating weights cast to ``dtype`` (the others kept), evaluated one tensor at a time so that checking
    them costs one tensor's memory at most. Refused, naming the key: a weight with inf or NaN values in ``source``
    (whatever ``dtype``), and one whose values do not fit ``dtype`` (beyond float16's 65504, or float32's largest
    values in bfloat16), with the largest magnitude and the dtypes that hold it."""
    cast = {}
    for key, value in weights.items():
        if not mx.issubdtype(value.dtype, mx.floating):
            cast[key] = value
            continue
        converted = value.astype(dtype)
        finite, fits = mx.all(mx.isfinite(value)), mx.all(mx.isfinite(converted))
        mx.eval(converted, finite, fits)
        if not finite.item():
            raise CheckpointError(f"{source}: weight {key!r} holds inf or NaN values; the checkpoint is damaged")
        if not fits.item():
            largest = mx.max(mx.abs(value)).item()
            wider = "float32" if dtype == mx.bfloat16 else "bfloat16 or float32"
            raise CheckpointError(
                f"{source}: weight {key!r} has values up to {largest:.6g}, beyond {dtype_name(dtype)}'s largest "
                f"{mx.finfo(dtype).max:.6g}; use --dtype {wider}"
            )
        cast[key] = converted
    return cast


DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def parse_dtype(dtype: "str | mx.Dtype | None", optional: bool = False) -> mx.Dtype | None:
    """The storage dtype a name ("float32", "bfloat16", "float16") or the matching ``mx`` dtype stands for; None
    when ``optional`` (keep the stored dtypes). Anything else (float64, integers, numpy or torch dtypes) is refused
    in one line: the weights are only ever stored and computed in these three."""
    if dtype is None and optional:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, mx.Dtype) and dtype in DTYPES.values():
        return dtype
    given = shown(dtype, 60) if isinstance(dtype, str) else str(dtype)[:60]
    choices = ", ".join(DTYPES)
    raise ValueError(f"dtype must be one of {choices} (as a name or an mx dtype){' or None' if optional else ''}, "
                     f"got {given}")


def provenance(files, **extra) -> dict:
    """The ``source`` block every converter records: each source file's sha256, plus converter-specific fields."""
    return {"files": {Path(f).name: sha256_file(f) for f in files}, **extra}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
