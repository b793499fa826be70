"""Where a model comes from: the model shipped in the package, a local pipeline folder or a Hugging Face hub repo,
and what a pipeline folder holds.

- ``default_model()``: the pipeline folder shipped inside the package (``starflow_mlx/models/shapes``, a small
  STARFlow-V trained by ``tests/reference`` on synthetic clips of coloured shapes), found with
  ``importlib.resources`` so that a wheel install and an editable one both find it. It is the model wherever none
  is named: ``Pipeline.from_pretrained()`` and ``starflow-mlx generate|score|info`` without ``--model``.
- ``resolve_model(path_or_repo_id)``: the one function behind every ``--model`` argument and
  ``Pipeline.from_pretrained``. The rule: None is the shipped model; **an existing path wins**; otherwise a text of
  the form ``org/name`` (one ``/``, letters, digits, ``.``, ``_``, ``-``, not starting with ``.`` ``/`` or ``~``)
  is a hub repo id of an already converted pipeline, fetched with ``snapshot_download`` (the hub cache, resumed
  downloads, ``HF_HUB_OFFLINE``, tokens from the environment or ``hf auth login``); anything else is a missing
  folder. Either way the folder is checked by ``read_pipeline_folder`` before it is returned. A converted repo holds
  the pipeline folder at its root (``config.json``, ``flow/``, ``text/``, ``vae/``); nothing else in it is
  downloaded.
- ``read_pipeline_folder(path) -> PipelineFolder``: a pipeline folder checked without reading any weight: its
  ``config.json`` (``config.PipelineConfig``), each part (``config.PIPELINE_PARTS``) present with the right
  ``model_type``, and the parts made for each other (the text width the flow expects, its latent channels, the
  VAE of its task, a denoiser where the defaults use one), and its ``provenance`` block where it has one (the
  shipped model's training record: ``name``, ``version``, the training command, the checkpoint's sha256...).
- ``model_name(folder)``, ``part_records(folder)``, ``describe(folder)``: what the records of the outputs and
  ``starflow-mlx info`` say of a model, from its config files.
- ``download(HubFile)``: one file through ``huggingface_hub.hf_hub_download``; every failure (offline and not
  cached, gated, private or missing repo, missing file) is one ``HubError`` line saying what is missing and how to
  get it.

``huggingface_hub`` is imported on first use: nothing here touches the network until a repo id is resolved.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError
from .config import PIPELINE_PARTS, TASK_VAE, FlowConfig, PipelineConfig, check_value, shown
from .weights import CONFIG_NAME, read_config

log = logging.getLogger(__name__)

# A hub repo id as the hub spells them: "org/name", each part at most 96 characters.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# The files of a converted pipeline repo that resolve_model downloads.
PIPELINE_PATTERNS = [CONFIG_NAME, *(f"{part}/*" for part in PIPELINE_PARTS)]
# The config field of each VAE kind that gives its latent channels.
VAE_LATENT_CHANNELS = {"wan-vae": "z_dim", "sd-vae": "latent_channels"}
LOGIN_HINT = "log in with `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0) or set HF_TOKEN"
# The pipeline folder shipped inside the package, under starflow_mlx/models/: the model when none is named.
DEFAULT_MODEL = "shapes"
DEFAULT_MODEL_ID = f"{DEFAULT_MODEL} (shipped with starflow-mlx)"
DEFAULT_MODEL_HELP = (
    f"default: the small STARFlow-V shipped with starflow-mlx (starflow_mlx/models/{DEFAULT_MODEL}), trained on "
    "clips of coloured shapes moving on plain backgrounds"
)
# The keys of a folder's provenance block that name its model in the record of every output; the rest of the block
# (training command, checkpoint sha256, figures) stays in its config.json.
PROVENANCE_NAME_KEYS = ("name", "version")
MAX_PROVENANCE_NAME = 200


class HubError(ValueError):
    """A file or repo that cannot be had from the Hugging Face hub or its cache; the message says how to get it."""


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repo (``revision`` None: the default branch)."""

    repo_id: str
    filename: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.filename} of {self.repo_id}" + (f" (revision {self.revision})" if self.revision else "")


@dataclass(frozen=True)
class PipelineFolder:
    """A checked pipeline folder: its task defaults, the path of each part, and the flow's config (the parts'
    other configs are checked in full when each part is loaded)."""

    root: Path
    config: PipelineConfig
    flow: Path
    text: Path
    vae: Path
    vae_kind: str  # "wan-vae" or "sd-vae"
    flow_config: FlowConfig
    provenance: dict | None = None  # config.json's "provenance" block (where the model came from), if any


# ----------------------------------------------------------------------------------------------------------------
# Model arguments
# ----------------------------------------------------------------------------------------------------------------


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a hub repo id (``org/name``); an existing path is never taken for one."""
    return bool(REPO_ID.fullmatch(text)) and ".." not in text


def default_model() -> Path:
    """The pipeline folder shipped inside the package, checked (``read_pipeline_folder``); a one-line
    ``CheckpointError`` when an incomplete install lacks it."""
    folder = shipped_model_location()
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: the model shipped with starflow-mlx is missing (an incomplete install); reinstall "
            "starflow-mlx, or name a model: --model PATH_OR_REPO (Pipeline.from_pretrained(path_or_repo) in Python)"
        )
    read_pipeline_folder(folder)
    return folder


def shipped_model_location() -> Path:
    """Where the shipped pipeline folder is, whether it is there or not: inside the installed package (site-packages
    for a wheel, the source tree for an editable install)."""
    location = importlib.resources.files(__package__) / "models" / DEFAULT_MODEL
    if not isinstance(location, Path):  # a zipped install: the loaders read real files
        raise CheckpointError(
            f"{location}: the model shipped with starflow-mlx is inside an archive; install starflow-mlx unpacked "
            "(pip install), or name a model: --model PATH_OR_REPO"
        )
    return location


def resolve_model(path_or_repo_id: str | os.PathLike | None = None, *, revision: str | None = None) -> Path:
    """The pipeline folder a model argument names, checked (``read_pipeline_folder``): None for the shipped model
    (``default_model``), an existing path, or else a hub repo id of a converted pipeline, downloaded into (or found
    in) the hub cache. ``revision`` (a branch, tag or commit) applies to a repo id only. Raises
    ``CheckpointError`` for a missing or incomplete folder and ``HubError`` for a repo that cannot be had."""
    if path_or_repo_id is None:
        return default_model()
    text = os.fspath(path_or_repo_id)
    path = Path(text).expanduser()
    if path.exists():
        folder = path
    elif is_repo_id(text):
        folder = _snapshot(text, revision)
    else:
        raise CheckpointError(
            f"{text}: no such folder (a Hugging Face repo id of a converted pipeline has the form org/name)"
        )
    read_pipeline_folder(folder)
    return folder


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    log.info("fetching %s from the Hugging Face hub (or its cache)", repo_id)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=PIPELINE_PATTERNS))
    except Exception as e:
        raise _hub_error(e, repo_id, None, revision, f"or pass the folder of a converted pipeline ({repo_id} is not a "
                         "folder here)") from None


# ----------------------------------------------------------------------------------------------------------------
# Files from the hub
# ----------------------------------------------------------------------------------------------------------------


def download(file: HubFile, alternative: str = "") -> Path:
    """The local path of ``file``, from the hub cache or downloaded into it (an interrupted download resumes).
    ``alternative`` ends every error message: how to do without the hub (e.g. "or pass a local checkpoint with
    --flow")."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(file.repo_id, file.filename, revision=file.revision))
    except Exception as e:
        raise _hub_error(e, file.repo_id, file.filename, file.revision, alternative) from None


def cached_revision(path: Path) -> str | None:
    """The commit a file of the hub cache (``.../snapshots/<commit>/<file>``) belongs to."""
    for parent in path.parents:
        if parent.parent.name == "snapshots":
            return parent.name
    return None


def _hub_error(error: Exception, repo_id: str, filename: str | None, revision: str | None, alternative: str):
    """``error`` from huggingface_hub as one line; errors that are not about the hub are returned unchanged (to be
    raised as they are)."""
    from huggingface_hub import constants, errors

    what = f"{filename} of {repo_id}" if filename else repo_id
    also = f"; {alternative}" if alternative else ""
    if isinstance(error, errors.GatedRepoError):
        text = f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id}, then {LOGIN_HINT}"
    elif isinstance(error, errors.RepositoryNotFoundError):
        text = f"no repository {repo_id} on the hub, or it is private and you are not logged in ({LOGIN_HINT})"
    elif isinstance(error, errors.RevisionNotFoundError):
        text = f"{repo_id} has no revision {revision!r}"
    elif isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        if constants.HF_HUB_OFFLINE:
            text = f"{what} is not in {where} and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download it"
        else:
            text = f"{what} is not in {where} and could not be downloaded (is the hub reachable?)"
    elif isinstance(error, errors.EntryNotFoundError):
        text = f"{repo_id} has no file {filename}"
    elif isinstance(error, errors.HFValidationError):
        text = f"{shown(repo_id)} is not a valid hub repo id: {str(error).splitlines()[0]}"
    elif isinstance(error, OSError):  # HTTP errors, a full disk, a cache that cannot be written
        text = f"cannot download {what}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    else:
        return error
    return HubError(text + also)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline folder
# ----------------------------------------------------------------------------------------------------------------


def read_pipeline_folder(path: str | os.PathLike) -> PipelineFolder:
    """``path`` checked as a pipeline folder, reading its config files only (no weight): one-line
    ``CheckpointError``s naming the missing or wrong part and how to make it."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder; a pipeline folder holds {CONFIG_NAME}, flow/, text/ and vae/")
    raw = read_config(root)
    if raw.get("model_type") != "pipeline":
        raise CheckpointError(
            f"{root}: model_type is {shown(raw.get('model_type'), 40)}, not a pipeline folder ({CONFIG_NAME}, flow/, "
            "text/, vae/); build one with `starflow-mlx convert pipeline`"
        )
    config = _parse(PipelineConfig, raw, root / CONFIG_NAME)
    parts = {name: _part(root, name, kinds) for name, kinds in PIPELINE_PARTS.items()}
    flow_config = _parse(FlowConfig, parts["flow"], root / "flow" / CONFIG_NAME)
    provenance = check_provenance(raw.get("provenance"), f"{root / CONFIG_NAME}: provenance", CheckpointError)
    folder = PipelineFolder(
        root, config, root / "flow", root / "text", root / "vae", parts["vae"]["model_type"], flow_config, provenance
    )
    _check_parts_agree(folder, parts)
    return folder


def check_provenance(provenance, where: str, error: type[ValueError] = ValueError) -> dict | None:
    """A provenance block (None: none) is a JSON object whose ``name`` and ``version``, where given, are short
    strings: they go into the record of every output. ``where`` names the block in errors."""
    if provenance is None:
        return None
    if not isinstance(provenance, dict):
        raise error(f"{where} must be a JSON object {{...}}, got {shown(provenance)}")
    try:
        for key in PROVENANCE_NAME_KEYS:
            if key in provenance:
                check_value(provenance[key], str, f"{where}: {key}", {"length": (1, MAX_PROVENANCE_NAME)})
                if not provenance[key].isprintable():  # it is shown in every record and by `info`
                    raise ValueError(f"{where}: {key} holds a control character (newline, escape...): "
                                     f"{provenance[key]!r}")
    except ValueError as e:
        raise error(str(e)) from None
    return provenance


def _parse(config_class, raw: dict, source: Path):
    try:
        return config_class.from_dict(raw, source=str(source))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _part(root: Path, name: str, kinds: tuple[str, ...]) -> dict:
    """The config of part ``name``, whose model_type must be one of ``kinds``."""
    folder = root / name
    remedy = (
        f"rebuild the pipeline with `starflow-mlx convert pipeline`, or convert the part into it with "
        f"`starflow-mlx convert {kinds[0] if len(kinds) == 1 else '|'.join(kinds)} SRC {folder}`"
    )
    if not folder.is_dir():
        raise CheckpointError(f"{root}: the pipeline's {name}/ part ({' or '.join(kinds)}) is missing; {remedy}")
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder}: the pipeline's {name}/ part has no {CONFIG_NAME}; {remedy}")
    raw = read_config(folder)
    if raw.get("model_type") not in kinds:
        raise CheckpointError(
            f"{folder}: model_type is {shown(raw.get('model_type'), 40)}, but the pipeline's {name}/ "
            f"part must be {' or '.join(repr(k) for k in kinds)}; {remedy}"
        )
    return raw


def _check_parts_agree(folder: PipelineFolder, parts: dict[str, dict]) -> None:
    """Parts converted from different models would fail later with shape errors deep inside a model: refused
    here, naming both sides."""
    root, flow, task = folder.root, folder.flow_config, folder.config.task
    problem = None
    if folder.vae_kind != TASK_VAE[task]:
        problem = f"a {task} pipeline decodes with a {TASK_VAE[task]} VAE, but vae/ holds a {folder.vae_kind} folder"
    elif flow.is_video != (task == "t2v"):
        problem = f"its task is {task} but flow/ is {'a video' if flow.is_video else 'an image'} model"
    elif folder.config.learnable_denoiser and not flow.learnable_self_denoiser:
        problem = "config.json's learnable_denoiser is true but flow/ has no learnable self-denoiser"
    if problem is None:
        width = _part_size(parts["text"], "d_model", folder.text)
        channels = _part_size(parts["vae"], VAE_LATENT_CHANNELS[folder.vae_kind], folder.vae)
        if width != flow.txt_dim:
            problem = f"text/ encodes {width}-wide vectors but flow/ expects txt_dim {flow.txt_dim}"
        elif channels != flow.in_channels:
            problem = f"vae/ has {channels} latent channels but flow/ expects in_channels {flow.in_channels}"
    if problem:
        raise CheckpointError(f"{root}: {problem}; its parts come from different models")


def _part_size(raw: dict, key: str, folder: Path) -> int:
    try:
        return check_value(raw.get(key), int, f"{folder / CONFIG_NAME}: {key}", {"min": 1})
    except ValueError as e:
        raise CheckpointError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------------
# What a pipeline folder is, in records
# ----------------------------------------------------------------------------------------------------------------


def model_name(folder: PipelineFolder) -> dict:
    """The provenance's ``name`` and ``version``, those it has: how output records name a shipped model."""
    provenance = folder.provenance or {}
    return {key: provenance[key] for key in PROVENANCE_NAME_KEYS if key in provenance}


def part_records(folder: PipelineFolder) -> dict:
    """Each part's kind, dtype, quantization and ``source`` block (the sha256 of every file it was converted from)."""
    records = {}
    for name in PIPELINE_PARTS:
        config = read_config(getattr(folder, name))
        records[name] = {key: config.get(key) for key in ("model_type", "dtype", "quantization", "source")}
    return records


def describe(folder: PipelineFolder) -> dict:
    """A pipeline folder in one JSON-ready dict, from its config files (no weight read): its name, task defaults,
    the flow's sizes, each part's record (``part_records``) and the whole provenance block."""
    flow = folder.flow_config
    return {
        "folder": str(folder.root),
        **model_name(folder),
        "task": folder.config.task,
        "defaults": {k: v for k, v in folder.config.to_dict().items() if k not in ("model_type", "task")},
        "flow": {
            "parameters": flow.parameter_count(), "blocks": flow.num_blocks, "latent_channels": flow.in_channels,
            "latent_size": flow.img_size, "text_tokens": flow.txt_size, "text_width": flow.txt_dim,
            "vid_size": flow.vid_size, "learnable_denoiser": flow.learnable_self_denoiser,
        },
        "parts": part_records(folder),
        "provenance": folder.provenance,
    }
