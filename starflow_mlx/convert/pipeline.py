"""A whole pipeline folder (``starflow-mlx convert pipeline OUT``): everything generating needs, in one folder.

OUT holds ``config.json`` (``config.PipelineConfig``: the task defaults of the flow, plus ``source``,
``converter_version`` and, where given, ``provenance``) and three converted folders: ``flow/``, ``text/`` (the T5
encoder and its tokenizer) and ``vae/`` (the Wan2.2 VAE for a video flow, the SD VAE for an image flow). Each part is
written by its own converter into OUT's temporary folder, the whole is checked (``hub.read_pipeline_folder``: the
parts made for each other) and put in place with one rename (``weights.staged_model_folder``): OUT is complete or as
it was.

Each part comes from a local flag or, with ``--from-hub``, from the released sources (``hub.download``: the hub
cache, resumed downloads, ``HF_HUB_OFFLINE``, tokens from the environment):

- flow: ``--flow`` (an official ``.pth`` with its YAML ``--config``, or a converted flow folder); from the hub,
  ``apple/starflow``'s checkpoint of ``--task`` (t2v: STARFlow-V 7B, t2i: STARFlow 3B) with its built-in config;
- text: ``--t5`` (a Hugging Face T5 folder or a converted t5 folder); from the hub, ``google/flan-t5-xl`` (its
  config, tokenizer and the shards holding encoder weights, never the decoder-only ones);
- vae: ``--vae`` (any source ``convert wan-vae`` / ``convert sd-vae`` takes, or a converted VAE folder); from the
  hub, the VAE the flow's config names, where the official ``utils/model_setup.VAE`` gets it: ``Wan2.2_VAE.pth``
  of ``Wan-AI/Wan2.2-TI2V-5B`` for any ``Wan-AI/Wan2.2...`` name (with the temporal scale after its ``:``), the
  diffusers folder of ``stabilityai/sd-vae-ft-ema`` for the SD VAE.

A converted part folder is taken as it is (hard-linked where possible, else copied): ``--dtype`` and ``--q-bits``
apply to the parts converted here (``--q-bits`` to the flow and T5 only).

Task defaults are the released ones for the flow (``PipelineConfig.for_flow``); ``--default KEY=VALUE`` (Python:
``defaults={...}``) overrides them, each checked as ``PipelineConfig`` and generating (``pipeline.Settings``) check
it. ``--provenance FILE.json`` (Python: ``provenance={...}`` or a path) stores a JSON object as ``provenance``:
where the model came from (the shipped model: its name and version, training command, the PyTorch checkpoint's
sha256, the training figures); its ``name`` and ``version`` go into the record of every output.

Built-in configs: the official code reads a checkpoint's YAML from its own git repository (``configs/``), not from
the hub, and ``apple/starflow`` is not known to carry them; so the values of the two released YAMLs that the model
uses are kept here as data (``RELEASES``), and ``--config`` replaces them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import (
    TASK_VAE,
    FlowConfig,
    PipelineConfig,
    config_from_official,
    load_official_yaml,
    parse_json_object,
    read_json_object,
    shown,
)
from ..hub import HubFile, cached_revision, check_provenance, download, read_pipeline_folder
from ..weights import (
    CONFIG_NAME,
    INDEX_NAME,
    MODEL_TYPES,
    model_folder_problem,
    read_config,
    shard_names,
    staged_model_folder,
)
from .common import add_output_arguments, check_output
from .flow import convert_flow_config
from .sd_vae import convert_sd_vae
from .t5 import _ignored as t5_unused_key
from .t5 import convert_t5
from .wan_vae import convert_wan_vae

log = logging.getLogger(__name__)

CONVERTER_VERSION = "1"
# The task defaults --default may set: every PipelineConfig field but the task, which is the flow's.
TASK_DEFAULTS = tuple(f.name for f in dataclasses.fields(PipelineConfig) if f.name != "task")
# A provenance block is a short record (a command, a checksum, a few figures), copied into every copy of the model.
MAX_PROVENANCE_BYTES = 64 << 10


@dataclass(frozen=True)
class Release:
    """A released model: its checkpoint on the hub and the arguments of its official YAML that the model uses."""

    checkpoint: HubFile
    config_name: str
    arguments: dict


# From configs/starflow-v_7B_t2v_caus_480p.yaml and configs/starflow_3B_t2i_256x256.yaml of the official release:
# the fields config.config_from_official reads (training-only fields left out; absent ones take the parser's
# defaults, as there).
RELEASES = {
    "t2v": Release(
        HubFile("apple/starflow", "starflow-v_7B_t2v_caus_480p_v3.pth"),
        "starflow-v_7B_t2v_caus_480p.yaml",
        {
            "img_size": 640, "txt_size": 256, "vid_size": "81:16", "fps_cond": 1, "channel_size": 48,
            "patch_size": 1, "channels": 3072, "top_block_channels": 4096, "blocks": 6,
            "layers_per_block": "2 2 2 2 2 24", "noise_std": 0.5, "rope": 1, "sos": 1, "seq_order": "L2R",
            "pt_seq_len": 32, "mix_aspect": 1, "use_softplus": 1, "cond_top_only": 1, "use_final_norm": 1,
            "learnable_self_denoiser": 1, "conditional_denoiser": 1, "denoiser_window": 10, "cond_noise_level": 1,
            "temporal_causal": 2, "shallow_block_local": 1, "vae": "Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6",
            "text": "google/flan-t5-xl", "cfg": 2.5, "soft_clip": 4,
        },
    ),
    "t2i": Release(
        HubFile("apple/starflow", "starflow_3B_t2i_256x256.pth"),
        "starflow_3B_t2i_256x256.yaml",
        {
            "img_size": 256, "txt_size": 128, "channel_size": 4, "patch_size": 1, "channels": 3072, "blocks": 6,
            "layers_per_block": "2 2 2 2 2 24", "noise_std": 0.3, "rope": 1, "sos": 1, "seq_order": "L2R",
            "use_softplus": 1, "cond_top_only": 1, "use_final_norm": 1, "vae": "stabilityai/sd-vae-ft-ema",
            "text": "google/flan-t5-xl", "cfg": 2.5, "soft_clip": 4,
        },
    ),
}
T5_REPO = "google/flan-t5-xl"
# What convert_t5 reads besides the weights (tokenizer.json and special_tokens_map.json are not used).
T5_FILES = ("config.json", "spiece.model", "tokenizer_config.json")
# utils/model_setup.VAE downloads this file for any "Wan-AI/Wan2.2..." vae name.
WAN_VAE = HubFile("Wan-AI/Wan2.2-TI2V-5B", "Wan2.2_VAE.pth")
SD_VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


@dataclass
class PartSource:
    """Where one part comes from: ``path`` is a source to convert or, when ``converted``, a converted folder to
    take as it is; ``hub`` names the hub repo and revision it was downloaded from."""

    path: Path
    converted: bool = False
    hub: dict | None = None


def convert_pipeline(
    out_dir: str | os.PathLike,
    *,
    flow: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    t5: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    from_hub: bool = False,
    task: str | None = None,
    dtype: str = "float32",
    q_bits: int | None = None,
    q_group_size: int = 64,
    overwrite: bool = False,
    defaults: dict | None = None,
    provenance: dict | str | os.PathLike | None = None,
) -> Path:
    """Build the pipeline folder ``out_dir`` (see the module docstring); returns its absolute path.

    ``flow``/``config``/``t5``/``vae`` are local sources (or converted part folders); a part not given comes from
    the hub with ``from_hub`` and is an error without. ``task`` ("t2v" or "t2i") picks the released flow to
    download (default t2v) and, when the flow is local, must be the flow's. ``defaults``: task defaults that replace
    the released ones (``TASK_DEFAULTS`` names); ``provenance``: a JSON-ready mapping, or the path of a JSON file
    holding one, stored in config.json.
    """
    flow, config, t5, vae = (Path(p) if p is not None else None for p in (flow, config, t5, vae))
    _check_arguments(flow, config, t5, vae, from_hub, task)
    overrides = _check_defaults(defaults)
    provenance_file = Path(provenance) if isinstance(provenance, (str, os.PathLike)) else None
    provenance = _provenance(provenance)
    named = [p for p in (flow, config, t5, vae, provenance_file) if p is not None] + _hub_cache(from_hub, flow, t5, vae)
    out = check_output(out_dir, dtype, overwrite, named)

    flow_source, flow_config, config_name = _flow_source(flow, config, task)
    task_defaults = _task_defaults(flow_config, overrides)
    sources = {"flow": flow_source, "text": _text_source(t5), "vae": _vae_source(vae, flow_config)}
    with staged_model_folder(out, overwrite, named) as staging:
        try:
            _write_parts(staging, sources, flow_config, config_name, dtype, q_bits, q_group_size)
            _write_config(staging, task_defaults, sources, provenance)
            read_pipeline_folder(staging)
        except ValueError as e:  # name the part where it will be, not the temporary folder
            raise type(e)(str(e).replace(str(staging), str(out))) from None
    log.info("wrote the %s pipeline %s", task_defaults.task, out)
    return out


def _check_arguments(flow, config, t5, vae, from_hub: bool, task: str | None) -> None:
    if task is not None and task not in RELEASES:
        raise ValueError(f"--task must be one of {', '.join(RELEASES)}, got {task!r}")
    if from_hub:
        return
    hub_sources = {"flow": "apple/starflow", "t5": T5_REPO, "vae": "the VAE the flow's config names"}
    for flag, value in (("flow", flow), ("t5", t5), ("vae", vae)):
        if value is None:
            raise ValueError(
                f"convert pipeline: --{flag} is missing; pass its local source, or --from-hub to download it "
                f"from {hub_sources[flag]}"
            )


def _check_defaults(defaults: dict | None) -> dict:
    """Each task default given, checked as its ``PipelineConfig`` field (before any download or write)."""
    if defaults is None:
        return {}
    if not isinstance(defaults, dict):
        raise ValueError(f"defaults must be a mapping of task defaults, got {shown(defaults)}")
    for key in defaults:
        if key == "task":
            raise ValueError("--default task: the task is the flow's (t2v for a video flow, t2i for an image flow)")
        if key not in TASK_DEFAULTS:
            raise ValueError(f"--default {shown(key, 40)}: unknown task default; they are {', '.join(TASK_DEFAULTS)}")
    return {key: PipelineConfig.check_field(key, value, f"--default {key}") for key, value in defaults.items()}


def _task_defaults(flow: FlowConfig, overrides: dict) -> PipelineConfig:
    """The released defaults for ``flow`` with ``overrides``, refused (naming them) where they disagree with each
    other, with the flow, or with what generating accepts (``pipeline.Settings``)."""
    from ..pipeline import FOLDER_DEFAULTS, Settings

    released = PipelineConfig.for_flow(flow)
    if not overrides:
        return released
    try:
        defaults = dataclasses.replace(released, **overrides)
        Settings(**{name: getattr(defaults, name) for name in FOLDER_DEFAULTS})
        if defaults.learnable_denoiser and not flow.learnable_self_denoiser:
            raise ValueError("learnable_denoiser is true but the flow has no learnable self-denoiser")
    except ValueError as e:
        raise ValueError(f"--default {', '.join(overrides)}: {e}") from None
    return defaults


def parse_defaults(flags: list[str] | None) -> dict:
    """``--default KEY=VALUE`` flags as a mapping; VALUE is read as a JSON scalar (``3``, ``2.5``, ``false``,
    ``null``, ``"1:1"``), or taken as text when it is not JSON (``1:1``)."""
    defaults = {}
    for flag in flags or ():
        key, equals, text = flag.partition("=")
        if not equals or not key:
            raise ValueError(f"--default {shown(flag, 60)}: expected KEY=VALUE, e.g. guidance=3")
        if key in defaults:
            raise ValueError(f"--default {shown(key, 40)}: given twice")
        try:
            value = json.loads(text)
        except ValueError:  # not JSON: the text itself
            value = text
        if isinstance(value, (list, dict)):
            raise ValueError(f"--default {shown(flag, 60)}: the value must be a number, true/false, null or text")
        defaults[key] = value
    return defaults


def _provenance(provenance: dict | str | os.PathLike | None) -> dict | None:
    """The provenance block to store, bounded as config files are (size, nesting, finite numbers), with a short
    ``name`` and ``version`` (``hub.check_provenance``): a mapping, or a JSON file holding one."""
    if provenance is None:
        return None
    if isinstance(provenance, (str, os.PathLike)):
        where = f"--provenance {provenance}"
        try:
            return check_provenance(read_json_object(provenance, MAX_PROVENANCE_BYTES), where)
        except ValueError as e:
            message = str(e)
            raise ValueError(message if message.startswith(where) else f"--provenance {message}") from None
    if not isinstance(provenance, dict):
        raise ValueError(f"provenance must be a mapping or the path of a JSON file, got {shown(provenance)}")
    try:
        text = json.dumps(provenance, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"provenance is not JSON-ready: {e}") from None
    size = len(text.encode())
    if size > MAX_PROVENANCE_BYTES:
        raise ValueError(f"provenance: {size:,} bytes of JSON, over the {MAX_PROVENANCE_BYTES:,}-byte limit")
    return check_provenance(parse_json_object(text, "provenance"), "provenance")


def _hub_cache(from_hub: bool, *local) -> list[str]:
    """The hub cache, a source of every part downloaded: the output folder may neither be it nor hold it."""
    if not from_hub or all(p is not None for p in local):
        return []
    from huggingface_hub import constants

    return [constants.HF_HUB_CACHE]


# ---- where each part comes from (downloads happen here, before anything is written) ----


def _converted_kind(path: Path) -> str | None:
    """The model_type of a folder starflow-mlx converted (its config.json has our converter_version), else None:
    a Hugging Face T5 folder also says model_type "t5"."""
    if not (path / CONFIG_NAME).is_file():
        return None
    meta = read_config(path)
    kind = meta.get("model_type")
    return kind if kind in MODEL_TYPES and "converter_version" in meta else None


def _converted(path: Path, flag: str, kinds: tuple[str, ...]) -> PartSource | None:
    """``path`` as a converted part when it is a converted folder of one of ``kinds``; None for a source."""
    kind = _converted_kind(path) if path.is_dir() else None
    if kind is None:
        return None
    if kind not in kinds:
        raise ValueError(f"{path}: is a converted {kind} folder; --{flag} takes {' or '.join(kinds)}")
    problem = model_folder_problem(path)
    if problem:
        raise ValueError(f"{path}: is not a converted folder as starflow-mlx writes them ({problem})")
    return PartSource(path, converted=True)


def _flow_source(flow: Path | None, config: Path | None, task: str | None) -> tuple[PartSource, FlowConfig, str]:
    """The flow's source, its config and the name of the config it came with."""
    release = RELEASES[task or "t2v"]
    if flow is None:
        path = download(release.checkpoint, "or pass a local checkpoint with --flow (and its YAML with --config)")
        source = PartSource(path, hub=_hub_record(release.checkpoint.repo_id, path))
    else:
        source = _converted(flow, "flow", ("flow",)) or PartSource(flow)
    if source.converted:
        if config is not None:
            raise ValueError(f"--config {config}: applies to a checkpoint, but --flow {flow} is already converted")
        raw = read_config(flow)
        flow_config, config_name = FlowConfig.from_dict(raw, source=str(flow / CONFIG_NAME)), ""
    elif config is not None:
        flow_config, config_name = load_official_yaml(config), config.name
    elif flow is None or task is not None:
        source_name = f"{release.config_name} (built into starflow-mlx)"
        flow_config, config_name = config_from_official(release.arguments, source_name), source_name
    else:
        raise ValueError(f"--flow {flow}: a checkpoint needs its official YAML (--config), or --task for a release's")
    flow_task = "t2v" if flow_config.is_video else "t2i"
    if task is not None and task != flow_task:
        raise ValueError(f"--task {task}: the flow is a {flow_task} model ({flow or release.checkpoint})")
    return source, flow_config, config_name


def _text_source(t5: Path | None) -> PartSource:
    if t5 is not None:
        return _converted(t5, "t5", ("t5",)) or PartSource(t5)
    alternative = "or pass a local flan-t5-xl folder with --t5"
    for name in T5_FILES:
        download(HubFile(T5_REPO, name), alternative)
    index = download(HubFile(T5_REPO, INDEX_NAME), alternative)
    for name in shard_names(index, keep=lambda key: not t5_unused_key(key)):
        download(HubFile(T5_REPO, name), alternative)
    return PartSource(index.parent, hub=_hub_record(T5_REPO, index))


def _vae_source(vae: Path | None, flow: FlowConfig) -> PartSource:
    kind = TASK_VAE["t2v" if flow.is_video else "t2i"]
    if vae is not None:
        return _converted(vae, "vae", (kind,)) or PartSource(vae)
    alternative = "or pass the VAE with --vae"
    if flow.is_video:
        if "Wan-AI/Wan2.2" not in flow.vae:
            raise ValueError(f"the flow's vae {flow.vae!r} is not the Wan2.2 VAE: no hub source known; pass --vae")
        path = download(WAN_VAE, alternative)
        return PartSource(path, hub=_hub_record(WAN_VAE.repo_id, path))
    repo = flow.vae.partition(":")[0]
    if "sd-vae" not in repo and "sdxl-vae" not in repo:
        raise ValueError(f"the flow's vae {flow.vae!r} is not an SD VAE: no hub source known; pass --vae")
    paths = [download(HubFile(repo, name), alternative) for name in SD_VAE_FILES]
    return PartSource(paths[0].parent, hub=_hub_record(repo, paths[0]))


def _hub_record(repo_id: str, path: Path) -> dict:
    return {"repo_id": repo_id, "revision": cached_revision(path)}


def temporal_scale(vae: str) -> float:
    """STARFlow-V's scale on latent frames after the first, written after the VAE name's ':' (1 without one, as
    utils/model_setup.VAE reads it)."""
    name, colon, scale = vae.partition(":")
    try:
        return float(scale) if colon else 1.0
    except ValueError:
        raise ValueError(f"vae {vae!r}: the temporal scale after ':' must be a number") from None


# ---- writing ----


def _write_parts(
    staging: Path, sources: dict[str, PartSource], flow: FlowConfig, config_name: str, dtype: str,
    q_bits: int | None, q_group_size: int,
) -> None:
    for name, source in sources.items():
        target = staging / name
        if source.converted:
            _take_converted(source.path, target, dtype, q_bits)
            continue
        log.info("converting the %s part from %s", name, source.path)
        if name == "flow":
            convert_flow_config(source.path, flow, config_name, target, dtype, q_bits, q_group_size)
        elif name == "text":
            convert_t5(source.path, target, dtype, q_bits, q_group_size)
        elif flow.is_video:
            convert_wan_vae(source.path, target, dtype, temporal_scale=temporal_scale(flow.vae))
        else:
            convert_sd_vae(source.path, target, dtype)


def _take_converted(folder: Path, target: Path, dtype: str, q_bits: int | None) -> None:
    """A converted part, hard-linked where the file system allows (our folders are never changed in place, only
    replaced), copied otherwise."""
    meta = read_config(folder)
    quantization = meta.get("quantization")
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    if meta.get("dtype") != dtype or (q_bits is not None and bits != q_bits):
        log.warning(
            "%s: taken as converted (%s%s); --dtype %s%s apply only to the parts converted here", folder,
            meta.get("dtype"), f", {bits}-bit" if bits else "", dtype, f" and --q-bits {q_bits}" if q_bits else "",
        )
    log.info("taking the converted %s folder %s", meta.get("model_type"), folder)
    shutil.copytree(folder, target, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_config(
    staging: Path, defaults: PipelineConfig, sources: dict[str, PartSource], provenance: dict | None
) -> None:
    """config.json: the task defaults, where each part came from (its own source block, with the sha256 of every
    source file, and the hub repo and revision it was downloaded from), and the model's provenance if given."""
    source = {}
    for name, part in sources.items():
        source[name] = read_config(staging / name).get("source", {})
        if part.hub:
            source[name] = {**source[name], "hub": part.hub}
    meta = {**defaults.to_dict(), "source": source, "converter_version": CONVERTER_VERSION}
    if provenance is not None:
        meta["provenance"] = provenance
    (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pipeline",
        help="a whole pipeline folder (flow/, text/, vae/ and the task defaults) from local files or the hub",
        description=(
            "Build one folder holding the flow, the T5 text encoder and the VAE, converted, with the task defaults. "
            "Each part comes from its flag (a source, or a folder converted already) or, with --from-hub, from the "
            "released files on the Hugging Face hub (cached; HF_HUB_OFFLINE honoured)."
        ),
    )
    p.add_argument("--flow", default=None, help="official checkpoint (.pth) or converted flow folder")
    p.add_argument("--config", default=None, help="the official YAML of the --flow checkpoint")
    p.add_argument("--t5", default=None, help="Hugging Face T5 folder (flan-t5-xl) or converted t5 folder")
    p.add_argument("--vae", default=None, help="VAE source (Wan2.2_VAE.pth, diffusers folder) or converted VAE folder")
    p.add_argument("--from-hub", action="store_true", help="download the parts not given from the Hugging Face hub")
    p.add_argument(
        "--task", choices=list(RELEASES), default=None,
        help="the released model to download: t2v (STARFlow-V 7B, default) or t2i (STARFlow 3B)",
    )
    p.add_argument(
        "--default", action="append", default=None, metavar="KEY=VALUE",
        help="replace a task default in config.json (repeatable), e.g. guidance=3, jacobi=false, aspect_ratio=1:1; "
        f"the keys: {', '.join(TASK_DEFAULTS)}",
    )
    p.add_argument(
        "--provenance", default=None, metavar="FILE.json",
        help="a JSON object stored as config.json's provenance (e.g. name, version, training command, checkpoint "
        "sha256); its name and version go into every output's record",
    )
    add_output_arguments(p, quantize=True)
    p.set_defaults(
        func=lambda a: convert_pipeline(
            a.out, flow=a.flow, config=a.config, t5=a.t5, vae=a.vae, from_hub=a.from_hub, task=a.task,
            dtype=a.dtype, q_bits=a.q_bits, q_group_size=a.q_group_size, overwrite=a.overwrite,
            defaults=parse_defaults(a.default), provenance=a.provenance,
        )
    )
