"""The pipeline folder: ``starflow-mlx convert pipeline`` from local files, from a local Hugging Face hub cache
(offline, no socket opened), and from converted parts; ``hub.read_pipeline_folder`` and ``hub.resolve_model``;
what ``--overwrite`` may replace; and every refusal as one line, with nothing written.

``tiny_sources`` builds official-format sources of parts made for each other (a T2V flow of 48 latent channels
reading 64-wide text, the Wan2.2 VAE, a T5 of width 64; a T2I flow of 4 channels and the SD VAE), with the tiny
models of the converter tests; ``build_hub_cache`` lays files out as the hub cache does. Both are meant for the
tests of the pipeline and CLI too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")
huggingface_hub = pytest.importorskip("huggingface_hub")

from starflow_mlx import hub  # noqa: E402
from starflow_mlx.checkpoint import CheckpointError  # noqa: E402
from starflow_mlx.cli import main as cli_main  # noqa: E402
from starflow_mlx.config import PipelineConfig, config_from_official  # noqa: E402
from starflow_mlx.convert.pipeline import RELEASES, convert_pipeline  # noqa: E402
from starflow_mlx.weights import MARKER_NAME, model_folder_problem, read_model_folder, sha256_file  # noqa: E402
from tests.helpers import REPO  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
T2V_YAML_CHANGES = {  # the conftest's tiny video flow, on the Wan2.2 latents (48 channels, 16x) and 64-wide text
    "- img_size: 4": "- img_size: 64",
    "- channel_size: 6": "- channel_size: 48",
    "- vae: none": "- vae: Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6",
    "- text: tiny-16": "- text: tiny-64",
    "- txt_size: 5": "- txt_size: 64",  # room for the prompt templates in the tiny tokenizer's short pieces
}
T2I_YAML = """arguments:
- img_size: 32
- channel_size: 4
- patch_size: 1
- channels: 64
- blocks: 2
- layers_per_block: 1 1
- head_dim: 32
- rope: 1
- sos: 1
- txt_size: 64
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- noise_std: 0.3
- vae: stabilityai/sd-vae-ft-ema
- text: tiny-64
"""


@dataclass(frozen=True)
class TinySources:
    """Official-format sources of two tiny pipelines (T2V and T2I) sharing one T5."""

    video_checkpoint: Path
    video_yaml: Path
    image_checkpoint: Path
    image_yaml: Path
    t5: Path  # a Hugging Face T5ForConditionalGeneration folder: sharded safetensors with an index, tokenizer
    wan_vae: Path  # Wan2.2_VAE.pth, the original layout
    sd_vae: Path  # a diffusers AutoencoderKL folder

    def local_argv(self, task: str = "t2v") -> list[str]:
        if task == "t2v":
            return ["--flow", str(self.video_checkpoint), "--config", str(self.video_yaml), "--t5", str(self.t5),
                    "--vae", str(self.wan_vae)]
        return ["--flow", str(self.image_checkpoint), "--config", str(self.image_yaml), "--t5", str(self.t5),
                "--vae", str(self.sd_vae)]


def _official_flow(yaml_text: str, folder: Path, seed: int) -> tuple[Path, Path]:
    from starflow_mlx.config import load_official_yaml
    from tests.conftest import official_state_dict, randomize_
    from tests.reference import StarFlow

    yaml_path = folder / "config.yaml"
    yaml_path.write_text(yaml_text)
    config = load_official_yaml(yaml_path)
    torch.manual_seed(seed)
    model = StarFlow(config).eval()
    randomize_(model, seed=seed)
    checkpoint = folder / "model.pth"
    torch.save(official_state_dict(model, config), checkpoint)
    return checkpoint, yaml_path


def make_tiny_sources(root: Path) -> TinySources:
    from starflow_mlx.wan_vae import original_names
    from tests.conftest import TINY_VIDEO_YAML
    from tests.test_sd_vae import _tiny_diffusers
    from tests.test_t5 import _hf_config, _write_tokenizer, train_spiece
    from tests.test_wan_vae import tiny_wan_vae

    video_yaml = TINY_VIDEO_YAML
    for old, new in T2V_YAML_CHANGES.items():
        assert old in video_yaml
        video_yaml = video_yaml.replace(old, new)
    (root / "t2v").mkdir()
    (root / "t2i").mkdir()
    video_checkpoint, video_yaml_path = _official_flow(video_yaml, root / "t2v", seed=1)
    image_checkpoint, image_yaml_path = _official_flow(T2I_YAML, root / "t2i", seed=2)

    torch.manual_seed(0)
    t5 = root / "flan-t5"
    transformers.T5ForConditionalGeneration(_hf_config()).save_pretrained(t5, max_shard_size="40KB")
    _write_tokenizer(t5, train_spiece())

    names = original_names(2)
    wan_vae = root / "Wan2.2_VAE.pth"
    torch.save({names.to_checkpoint(k): v for k, v in tiny_wan_vae().state_dict().items()}, wan_vae)
    sd_vae = root / "sd-vae"
    _tiny_diffusers().save_pretrained(sd_vae)
    return TinySources(video_checkpoint, video_yaml_path, image_checkpoint, image_yaml_path, t5, wan_vae, sd_vae)


def build_hub_cache(cache: Path, repos: dict[str, dict[str, Path]], commit: str = COMMIT) -> Path:
    """The hub cache layout: ``models--org--name/{blobs/<sha256>, refs/main, snapshots/<commit>/<file> -> blob}``,
    holding the given files (repo id -> file name in the repo -> local file)."""
    for repo_id, files in repos.items():
        base = cache / f"models--{repo_id.replace('/', '--')}"
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "blobs").mkdir(exist_ok=True)
        (base / "refs" / "main").write_text(commit)
        for name, source in files.items():
            data = source.read_bytes()
            blob = base / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = base / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return cache


def released_files(sources: TinySources) -> dict[str, dict[str, Path]]:
    """The tiny T2V sources under the released repos and file names; the T5 without the shards that hold decoder
    weights only (the converter must not ask for them)."""
    from starflow_mlx.weights import shard_names

    index = sources.t5 / "model.safetensors.index.json"
    encoder_shards = shard_names(index, keep=lambda key: not key.startswith(("decoder.", "lm_head.")))
    assert len(encoder_shards) < len(shard_names(index))  # some shards hold decoder weights only
    t5_files = ["config.json", "spiece.model", "tokenizer_config.json", index.name, *encoder_shards]
    return {
        "apple/starflow": {"starflow-v_7B_t2v_caus_480p_v3.pth": sources.video_checkpoint},
        "google/flan-t5-xl": {name: sources.t5 / name for name in t5_files},
        "Wan-AI/Wan2.2-TI2V-5B": {"Wan2.2_VAE.pth": sources.wan_vae},
    }


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory) -> TinySources:
    return make_tiny_sources(tmp_path_factory.mktemp("pipeline_sources"))


@pytest.fixture(scope="module")
def t2v_pipeline(tiny_sources, tmp_path_factory) -> Path:
    """The T2V pipeline converted from the local sources: the reference the other ways of building it must match."""
    out = tmp_path_factory.mktemp("t2v") / "pipeline"
    assert cli_main(["convert", "pipeline", *tiny_sources.local_argv(), str(out)]) == 0
    return out


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache, offline as ``HF_HUB_OFFLINE=1`` makes it, and a socket layer that fails any
    connection: returns (cache folder, the addresses something tried to reach)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # both read once, when huggingface_hub is imported
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    reached = []

    def refuse(*args, **kwargs):
        reached.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return cache, reached


def _one_error(caplog) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in caplog.text
    return errors[0]


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _same_weights(a: Path, b: Path) -> None:
    import numpy as np

    wa, wb = read_model_folder(a), read_model_folder(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert np.array_equal(np.asarray(wa[key]), np.asarray(wb[key])), key


# ----------------------------------------------------------------------------------------------------------------
# Building pipeline folders
# ----------------------------------------------------------------------------------------------------------------


def test_local_t2v_pipeline_has_the_parts_defaults_and_provenance(t2v_pipeline, tiny_sources):
    folder = hub.read_pipeline_folder(t2v_pipeline)
    assert sorted(p.name for p in t2v_pipeline.iterdir()) == ["config.json", "flow", "text", "vae"]
    # the task defaults: the released T2V settings with the frames and fps of the flow's vid_size '9:16'
    assert folder.config == PipelineConfig(frames=9, fps=16, aspect_ratio="1:1", aspect_ratios=["1:1"])
    assert (folder.vae_kind, folder.flow_config.in_channels, folder.flow_config.txt_dim) == ("wan-vae", 48, 64)
    meta = json.loads((t2v_pipeline / "config.json").read_text())
    assert meta["converter_version"] == "1"
    assert meta["source"]["flow"]["files"] == {"model.pth": sha256_file(tiny_sources.video_checkpoint)}
    assert meta["source"]["flow"]["config"] == "config.yaml"
    assert meta["source"]["vae"]["files"] == {"Wan2.2_VAE.pth": sha256_file(tiny_sources.wan_vae)}
    assert len(meta["source"]["text"]["files"]) >= 2  # the encoder shards only
    vae = json.loads((t2v_pipeline / "vae" / "config.json").read_text())
    assert vae["temporal_scale"] == 0.6  # from the flow's "Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6"
    text = json.loads((t2v_pipeline / "text" / "config.json").read_text())
    assert sorted(text["tokenizer"]["files"]) == ["spiece.model", "tokenizer_config.json"]
    assert (t2v_pipeline / "text" / "spiece.model").read_bytes() == (tiny_sources.t5 / "spiece.model").read_bytes()
    assert model_folder_problem(t2v_pipeline) is None


def test_part_weights_are_what_each_converter_writes(t2v_pipeline, tiny_sources, tmp_path):
    from starflow_mlx.convert.flow import convert_flow
    from starflow_mlx.convert.wan_vae import convert_wan_vae

    _same_weights(t2v_pipeline / "flow", convert_flow(tiny_sources.video_checkpoint, tiny_sources.video_yaml,
                                                      tmp_path / "flow"))
    _same_weights(t2v_pipeline / "vae", convert_wan_vae(tiny_sources.wan_vae, tmp_path / "vae"))


def test_t2i_pipeline_from_converted_parts_links_them(tiny_sources, tmp_path):
    from starflow_mlx.convert.flow import convert_flow
    from starflow_mlx.convert.sd_vae import convert_sd_vae
    from starflow_mlx.convert.t5 import convert_t5

    parts = {
        "flow": convert_flow(tiny_sources.image_checkpoint, tiny_sources.image_yaml, tmp_path / "flow"),
        "t5": convert_t5(tiny_sources.t5, tmp_path / "t5", q_bits=8, q_group_size=32),
        "vae": convert_sd_vae(tiny_sources.sd_vae, tmp_path / "vae"),
    }
    out = tmp_path / "t2i"
    argv = [arg for name, path in parts.items() for arg in (f"--{name}", str(path))]
    assert cli_main(["convert", "pipeline", *argv, str(out)]) == 0

    folder = hub.read_pipeline_folder(out)
    assert folder.config == PipelineConfig.for_flow(folder.flow_config)
    assert (folder.config.task, folder.config.frames, folder.config.fps, folder.config.guidance) == ("t2i", 1, 0, 3.6)
    assert (folder.config.learnable_denoiser, folder.config.jacobi_block_size, folder.vae_kind) == (False, 16, "sd-vae")
    for name, part in (("flow", "flow"), ("text", "t5"), ("vae", "vae")):
        for file in parts[part].iterdir():  # taken as they are: the same files (hard links here)
            assert (out / name / file.name).stat().st_ino == file.stat().st_ino
    assert json.loads((out / "text" / "config.json").read_text())["quantization"]["bits"] == 8


def test_from_hub_offline_uses_the_cache_and_never_the_network(tiny_sources, t2v_pipeline, offline_hub, tmp_path):
    cache, reached = offline_hub
    build_hub_cache(cache, released_files(tiny_sources))
    out = tmp_path / "from-hub"
    # the tiny checkpoint is not the 7B architecture of the built-in config: its YAML comes from --config
    assert cli_main(["convert", "pipeline", "--from-hub", "--config", str(tiny_sources.video_yaml), str(out)]) == 0

    assert reached == []
    for part in ("flow", "text", "vae"):
        _same_weights(out / part, t2v_pipeline / part)
    meta = json.loads((out / "config.json").read_text())
    assert meta["source"]["flow"]["hub"] == {"repo_id": "apple/starflow", "revision": COMMIT}
    assert meta["source"]["text"]["hub"] == {"repo_id": "google/flan-t5-xl", "revision": COMMIT}
    assert meta["source"]["vae"]["hub"] == {"repo_id": "Wan-AI/Wan2.2-TI2V-5B", "revision": COMMIT}
    assert meta["source"]["flow"]["files"] == {
        "starflow-v_7B_t2v_caus_480p_v3.pth": sha256_file(tiny_sources.video_checkpoint)
    }


@pytest.mark.parametrize(
    "repo_id, filename, flag",
    [
        ("apple/starflow", "starflow-v_7B_t2v_caus_480p_v3.pth",
         "or pass a local checkpoint with --flow (and its YAML with --config)"),
        ("google/flan-t5-xl", "spiece.model", "or pass a local flan-t5-xl folder with --t5"),
        ("google/flan-t5-xl", "ENCODER_SHARD", "or pass a local flan-t5-xl folder with --t5"),
        ("Wan-AI/Wan2.2-TI2V-5B", "Wan2.2_VAE.pth", "or pass the VAE with --vae"),
    ],
    ids=["flow-checkpoint", "t5-tokenizer", "t5-encoder-shard", "wan-vae"],
)
def test_from_hub_offline_names_the_missing_file(repo_id, filename, flag, tiny_sources, offline_hub, tmp_path, caplog):
    cache, reached = offline_hub
    files = released_files(tiny_sources)
    if filename == "ENCODER_SHARD":
        filename = sorted(name for name in files[repo_id] if name.startswith("model-"))[-1]
    del files[repo_id][filename]
    build_hub_cache(cache, files)
    out = tmp_path / "out"

    argv = ["convert", "pipeline", "--from-hub", "--config", str(tiny_sources.video_yaml), str(out)]
    assert cli_main(argv) == 2
    assert _one_error(caplog) == (
        f"error: {filename} of {repo_id} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
        f"unset HF_HUB_OFFLINE to download it; {flag}"
    )
    assert reached == []
    _nothing_written(out)


def _hub_failure(kind: str):
    """An error as huggingface_hub raises it (built without an HTTP response: only its class matters)."""
    from huggingface_hub import errors

    error_class = {"gated": errors.GatedRepoError, "not-found": errors.RepositoryNotFoundError,
                   "no-connection": errors.LocalEntryNotFoundError}[kind]
    error = error_class.__new__(error_class)
    Exception.__init__(error, "401 Client Error")
    return error


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("gated", "starflow-v_7B_t2v_caus_480p_v3.pth: apple/starflow is gated: accept its terms at "
                  "https://huggingface.co/apple/starflow, then log in with `hf auth login`"),
        ("not-found", "no repository apple/starflow on the hub, or it is private and you are not logged in (log in "
                      "with `hf auth login`"),
        ("no-connection", "starflow-v_7B_t2v_caus_480p_v3.pth of apple/starflow is not in the Hugging Face cache "
                          "(CACHE) and could not be downloaded (is the hub reachable?); or pass a local checkpoint "
                          "with --flow"),
    ],
    ids=["gated", "repo-not-found", "online-no-connection"],
)
def test_hub_failures_say_how_to_get_the_file(kind, expected, offline_hub, monkeypatch, tmp_path, caplog):
    from huggingface_hub import constants

    cache, _ = offline_hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def failing_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        raise _hub_failure(kind)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    out = tmp_path / "out"
    assert cli_main(["convert", "pipeline", "--from-hub", str(out)]) == 2
    message = _one_error(caplog)
    if kind == "gated":  # "of" joins file and repo in the other messages; here the repo is the subject
        expected = expected.replace("starflow-v_7B_t2v_caus_480p_v3.pth: ", "")
    assert expected.replace("CACHE", str(cache)) in message
    assert calls == [("apple/starflow", "starflow-v_7B_t2v_caus_480p_v3.pth")]
    _nothing_written(out)


# ----------------------------------------------------------------------------------------------------------------
# Refusals of the command line
# ----------------------------------------------------------------------------------------------------------------


def _argv_missing_t5(src: TinySources, tmp: Path) -> list[str]:
    return src.local_argv()[:4] + ["--vae", str(src.wan_vae)]


def _argv_config_with_converted_flow(src: TinySources, tmp: Path) -> list[str]:
    from starflow_mlx.convert.flow import convert_flow

    flow = convert_flow(src.video_checkpoint, src.video_yaml, tmp / "flow")
    return ["--flow", str(flow), "--config", str(src.video_yaml), *src.local_argv()[4:]]


def _argv_task_disagrees(src: TinySources, tmp: Path) -> list[str]:
    return [*src.local_argv(), "--task", "t2i"]


def _argv_checkpoint_without_config(src: TinySources, tmp: Path) -> list[str]:
    return ["--flow", str(src.video_checkpoint), *src.local_argv()[4:]]


def _argv_wrong_part_kind(src: TinySources, tmp: Path) -> list[str]:
    from starflow_mlx.convert.sd_vae import convert_sd_vae

    return [*src.local_argv()[:6], "--vae", str(convert_sd_vae(src.sd_vae, tmp / "sd"))]


def _argv_parts_of_different_models(src: TinySources, tmp: Path) -> list[str]:
    from tests.test_t5 import _hf_config, _write_tokenizer, train_spiece

    t5 = tmp / "narrow-t5"
    transformers.T5EncoderModel(_hf_config(d_model=32)).save_pretrained(t5)
    _write_tokenizer(t5, train_spiece())
    return [*src.local_argv()[:4], "--t5", str(t5), "--vae", str(src.wan_vae)]


@pytest.mark.parametrize(
    "make_argv, expected",
    [
        (_argv_missing_t5, "convert pipeline: --t5 is missing; pass its local source, or --from-hub to download it "
                           "from google/flan-t5-xl"),
        (_argv_config_with_converted_flow, "applies to a checkpoint, but --flow TMP/flow is already converted"),
        (_argv_task_disagrees, "--task t2i: the flow is a t2v model"),
        (_argv_checkpoint_without_config, "a checkpoint needs its official YAML (--config)"),
        (_argv_wrong_part_kind, "TMP/sd: is a converted sd-vae folder; --vae takes wan-vae"),
        (_argv_parts_of_different_models, "OUT: text/ encodes 32-wide vectors but flow/ expects txt_dim 64; its "
                                          "parts come from different models"),
    ],
    ids=["missing-part", "config-for-converted-flow", "task-disagrees", "checkpoint-without-yaml", "wrong-part-kind",
         "parts-of-different-models"],
)
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(make_argv, expected, tiny_sources, tmp_path, caplog):
    argv = make_argv(tiny_sources, tmp_path)
    out = tmp_path / "out"
    assert cli_main(["convert", "pipeline", *argv, str(out)]) == 2
    assert expected.replace("TMP", str(tmp_path)).replace("OUT", str(out)) in _one_error(caplog)
    _nothing_written(out)


# ----------------------------------------------------------------------------------------------------------------
# --overwrite: what may be replaced
# ----------------------------------------------------------------------------------------------------------------


def test_overwrite_replaces_a_pipeline_folder(t2v_pipeline, tiny_sources, tmp_path, caplog):
    out = tmp_path / "pipeline"
    shutil.copytree(t2v_pipeline, out)
    argv = ["convert", "pipeline", *tiny_sources.local_argv(), str(out), "--dtype", "bfloat16"]
    assert cli_main(argv) == 2
    assert "already exists (pass overwrite / --overwrite to replace it)" in _one_error(caplog)

    assert cli_main([*argv, "--overwrite", "--q-bits", "8", "--q-group-size", "32"]) == 0
    parts = {p: json.loads((out / p / "config.json").read_text()) for p in ("flow", "text", "vae")}
    assert {meta["dtype"] for meta in parts.values()} == {"bfloat16"}
    # --q-bits applies to the flow and T5; the VAEs are never quantized
    assert [meta.get("quantization") for meta in parts.values()] == [{"group_size": 32, "bits": 8}] * 2 + [None]
    hub.read_pipeline_folder(out)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".pipeline.")]


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "replacing-a-pipeline"])
def test_an_interrupted_conversion_leaves_the_output_as_it_was(existing, t2v_pipeline, tiny_sources, tmp_path,
                                                              monkeypatch, caplog):
    from starflow_mlx.convert import pipeline

    def interrupted(*args, **kwargs):  # Ctrl-C while the T5 is converted, after the flow was written
        assert (args[1].parent / "flow" / "config.json").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "convert_t5", interrupted)
    out = tmp_path / "pipeline"
    if existing:
        shutil.copytree(t2v_pipeline, out)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert cli_main(["convert", "pipeline", *tiny_sources.local_argv(), str(out), "--overwrite"]) == 130
    assert "interrupted (Ctrl-C); the partial output was removed" in _one_error(caplog)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def _extra_file(folder: Path) -> str:
    (folder / "notes.txt").write_text("mine")
    return "it also holds notes.txt"


def _extra_file_in_a_part(folder: Path) -> str:
    (folder / "vae" / "notes.txt").write_text("mine")
    return "its part vae: it also holds notes.txt"


def _part_is_a_link(folder: Path) -> str:
    target = folder.parent / "elsewhere"
    (folder / "text").rename(target)
    (folder / "text").symlink_to(target)
    return "its part text is not a folder"


def _nested_pipeline(folder: Path) -> str:
    shutil.rmtree(folder / "flow")
    shutil.copytree(folder, folder.parent / "inner")
    (folder.parent / "inner").rename(folder / "flow")
    return "its part flow is a pipeline folder itself"


def _not_a_pipeline(folder: Path) -> str:
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "pipeline"}))  # not written by starflow-mlx
    (folder / "flow").mkdir()
    return "no config.json written by starflow-mlx"


@pytest.mark.parametrize(
    "change", [_extra_file, _extra_file_in_a_part, _part_is_a_link, _nested_pipeline, _not_a_pipeline],
    ids=["extra-file", "extra-file-in-a-part", "part-is-a-link", "nested-pipeline", "not-ours"],
)
def test_overwrite_refuses_a_folder_with_anything_else(change, t2v_pipeline, tiny_sources, tmp_path, caplog):
    out = tmp_path / "pipeline"
    shutil.copytree(t2v_pipeline, out)
    problem = change(out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    assert model_folder_problem(out) == problem
    assert cli_main(["convert", "pipeline", *tiny_sources.local_argv(), str(out), "--overwrite"]) == 2
    assert f"already exists and is not a starflow-mlx model folder ({problem})" in _one_error(caplog)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_a_pipeline_missing_a_part_is_still_ours_to_replace(t2v_pipeline, tmp_path):
    out = tmp_path / "pipeline"
    shutil.copytree(t2v_pipeline, out)
    shutil.rmtree(out / "vae")
    assert model_folder_problem(out) is None


def _mark(folder: Path, kind: str) -> None:
    """The marker a conversion to "pipeline" by pid 4242 writes into its folder: what proves the folder ours."""
    marker = {"written_by": "starflow-mlx", "kind": kind, "pid": 4242, "out": "pipeline"}
    (folder / MARKER_NAME).write_text(json.dumps(marker))


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked-copies-of-the-user"])
def test_a_killed_replacement_puts_the_pipeline_back(marked, t2v_pipeline, tmp_path, caplog):
    from starflow_mlx.weights import check_output_folder

    out = tmp_path / "pipeline"
    old, tmp = tmp_path / ".pipeline.old-4242-0123abcd", tmp_path / ".pipeline.tmp-4242-89abcdef"
    shutil.copytree(t2v_pipeline, old)  # moved aside, then the run died
    shutil.copytree(t2v_pipeline, tmp)  # its half-written replacement
    if marked:
        _mark(old, "old")
        _mark(tmp, "tmp")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    check_output_folder(out, overwrite=True)
    if marked:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
        assert MARKER_NAME not in os.listdir(out)
        hub.read_pipeline_folder(out)
    else:  # named like ours, but nothing proves it: the user's folders, left as they were
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
        assert caplog.text.count("but not marked as one") == 2


# ----------------------------------------------------------------------------------------------------------------
# Reading a pipeline folder
# ----------------------------------------------------------------------------------------------------------------


def _missing_part(folder: Path) -> str:
    shutil.rmtree(folder / "vae")
    return (f"{folder}: the pipeline's vae/ part (wan-vae or sd-vae) is missing; rebuild the pipeline with "
            f"`starflow-mlx convert pipeline`, or convert the part into it with `starflow-mlx convert wan-vae|sd-vae "
            f"SRC {folder / 'vae'}`")


def _part_without_config(folder: Path) -> str:
    (folder / "flow" / "config.json").unlink()
    return f"{folder / 'flow'}: the pipeline's flow/ part has no config.json"


def _wrong_part_kind(folder: Path) -> str:
    shutil.rmtree(folder / "text")
    shutil.copytree(folder / "vae", folder / "text")
    return f"{folder / 'text'}: model_type is 'wan-vae', but the pipeline's text/ part must be 't5'"


def _a_part_given_as_pipeline(folder: Path) -> str:
    return f"{folder / 'flow'}: model_type is 'flow', not a pipeline folder (config.json, flow/, text/, vae/)"


def _bad_default(folder: Path) -> str:
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "aspect_ratio": "7:3"}))
    return f"{folder / 'config.json'}: PipelineConfig.aspect_ratio must be one of '1:1', '2:3'"


def _vae_of_another_task(folder: Path) -> str:
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "task": "t2i", "frames": 1, "fps": 0}))
    return f"{folder}: a t2i pipeline decodes with a sd-vae VAE, but vae/ holds a wan-vae folder"


def _latent_channels_disagree(folder: Path) -> str:
    meta = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**meta, "z_dim": 16}))
    return f"{folder}: vae/ has 16 latent channels but flow/ expects in_channels 48; its parts come from different"


def _denoiser_default_without_denoiser(folder: Path) -> str:
    meta = json.loads((folder / "flow" / "config.json").read_text())
    (folder / "flow" / "config.json").write_text(json.dumps({**meta, "learnable_self_denoiser": False}))
    return f"{folder}: config.json's learnable_denoiser is true but flow/ has no learnable self-denoiser"


def _provenance_not_an_object(folder: Path) -> str:
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "provenance": "shapes v1"}))
    return f"{folder / 'config.json'}: provenance must be a JSON object {{...}}, got 'shapes v1'"


def _provenance_name_not_text(folder: Path) -> str:
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "provenance": {"name": {"nested": 1}}}))
    return f"{folder / 'config.json'}: provenance: name must be a string of at most 200 characters, got {{'nested': 1}}"


@pytest.mark.parametrize(
    "change",
    [_missing_part, _part_without_config, _wrong_part_kind, _a_part_given_as_pipeline, _bad_default,
     _vae_of_another_task, _latent_channels_disagree, _denoiser_default_without_denoiser, _provenance_not_an_object,
     _provenance_name_not_text],
    ids=["missing-part", "part-without-config", "wrong-part-kind", "part-given", "bad-default", "vae-of-another-task",
         "latent-channels-disagree", "denoiser-default-without-denoiser", "provenance-not-an-object",
         "provenance-name-not-text"],
)
def test_read_pipeline_folder_refuses_with_one_line(change, t2v_pipeline, tmp_path):
    folder = tmp_path / "pipeline"
    shutil.copytree(t2v_pipeline, folder)
    expected = change(folder)
    path = folder / "flow" if change is _a_part_given_as_pipeline else folder
    with pytest.raises(CheckpointError) as caught:
        hub.read_pipeline_folder(path)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------------------------
# resolve_model: a folder or a hub repo id
# ----------------------------------------------------------------------------------------------------------------


def _cache_pipeline(cache: Path, repo_id: str, folder: Path) -> None:
    build_hub_cache(cache, {repo_id: {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}})


def test_resolve_model_folder_and_cached_repo(t2v_pipeline, offline_hub, tmp_path, monkeypatch):
    cache, reached = offline_hub
    assert hub.resolve_model(t2v_pipeline) == t2v_pipeline
    assert hub.resolve_model(str(t2v_pipeline)) == t2v_pipeline

    _cache_pipeline(cache, "me/tiny-pipeline", t2v_pipeline)
    snapshot = hub.resolve_model("me/tiny-pipeline")
    assert snapshot == cache / "models--me--tiny-pipeline" / "snapshots" / COMMIT
    _same_weights(snapshot / "flow", t2v_pipeline / "flow")
    assert reached == []

    # an existing path wins over a repo id of the same spelling
    monkeypatch.chdir(tmp_path)
    shutil.copytree(t2v_pipeline, tmp_path / "me" / "tiny-pipeline")
    assert hub.resolve_model("me/tiny-pipeline") == Path("me/tiny-pipeline")


@pytest.mark.parametrize(
    "argument, error, expected",
    [
        ("me/missing", hub.HubError, "me/missing is not in the Hugging Face cache (CACHE) and HF_HUB_OFFLINE is set; "
                                     "unset HF_HUB_OFFLINE to download it; or pass the folder of a converted pipeline "
                                     "(me/missing is not a folder here)"),
        ("./no/such/folder", CheckpointError, "./no/such/folder: no such folder (a Hugging Face repo id of a "
                                              "converted pipeline has the form org/name)"),
        ("me/flow-only", CheckpointError, "SNAPSHOT: the pipeline's text/ part (t5) is missing"),
    ],
    ids=["repo-not-cached", "no-such-folder", "cached-repo-incomplete"],
)
def test_resolve_model_refusals(argument, error, expected, t2v_pipeline, offline_hub):
    cache, reached = offline_hub
    flow_only = {p: q for p, q in ((str(p.relative_to(t2v_pipeline)), p) for p in t2v_pipeline.rglob("*"))
                 if q.is_file() and not p.startswith(("text", "vae"))}
    build_hub_cache(cache, {"me/flow-only": flow_only})
    snapshot = cache / "models--me--flow-only" / "snapshots" / COMMIT
    with pytest.raises(error) as caught:
        hub.resolve_model(argument)
    assert str(caught.value).startswith(expected.replace("CACHE", str(cache)).replace("SNAPSHOT", str(snapshot)))
    assert reached == []


def test_resolve_model_honours_the_environment_in_a_fresh_process(t2v_pipeline, tmp_path):
    """HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them, read by a process that imports huggingface_hub after."""
    cache = tmp_path / "cache"
    _cache_pipeline(cache, "me/tiny-pipeline", t2v_pipeline)
    script = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise SystemExit('network access')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse; socket.getaddrinfo = refuse\n"
        "from starflow_mlx.hub import resolve_model, HubError\n"
        "print(resolve_model('me/tiny-pipeline'))\n"
        "try:\n    resolve_model('me/other')\nexcept HubError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(cache / "models--me--tiny-pipeline" / "snapshots" / COMMIT)
    assert lines[1].startswith(f"me/other is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set")


# ----------------------------------------------------------------------------------------------------------------
# The released defaults
# ----------------------------------------------------------------------------------------------------------------


def test_built_in_release_configs_are_the_released_models():
    video = config_from_official(RELEASES["t2v"].arguments, "t2v")
    image = config_from_official(RELEASES["t2i"].arguments, "t2i")
    # STARFlow-V 7B with its denoiser, and STARFlow 3B, counted from the official YAMLs
    assert (video.parameter_count(), image.parameter_count()) == (6_890_096_528, 3_858_281_544)
    assert (video.txt_dim, video.in_channels, video.img_size, image.img_size) == (2048, 48, 40, 32)
    assert PipelineConfig.for_flow(video) == PipelineConfig()
    assert PipelineConfig.for_flow(video).to_dict() == {
        "model_type": "pipeline", "task": "t2v", "frames": 81, "fps": 16, "aspect_ratio": "16:9",
        "aspect_ratios": ["1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21"], "guidance": 3.5,
        "jacobi": True, "jacobi_block_size": 32, "jacobi_threshold": 0.001, "jacobi_max_iter": 32, "denoise": True,
        "learnable_denoiser": True, "denoise_step_size": 1.0, "target_noise_std": None, "context_length": 16,
        "attention_temperature": 1.0,
    }
    assert PipelineConfig.for_flow(image) == PipelineConfig(
        task="t2i", frames=1, fps=0, aspect_ratio="1:1", aspect_ratios=["1:1"], guidance=3.6, jacobi_block_size=16,
        learnable_denoiser=False,
    )


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"task": "t2i"}, "a t2i pipeline makes one frame at fps 0, got frames 81, fps 16"),
        ({"aspect_ratio": "9:16", "aspect_ratios": ["1:1"]}, "aspect_ratio '9:16' is not one of aspect_ratios ['1:1']"),
        ({"aspect_ratios": ["1:1", "16:9", "1:1"]}, "aspect_ratios ['1:1', '16:9', '1:1'] lists a ratio twice"),
        ({"fps": 0}, "a t2v pipeline needs fps >= 1, got 0"),
        ({"frames": 0}, "PipelineConfig.frames must be an integer in [1, 65536], got 0"),
        ({"guidance": float("nan")}, "PipelineConfig.guidance must be a finite number in [0, 100], got nan"),
        ({"jacobi_threshold": 2.0}, "PipelineConfig.jacobi_threshold must be a finite number in [0, 1], got 2.0"),
        ({"target_noise_std": 0.0}, "PipelineConfig.target_noise_std must be a finite number in (0, 100], got 0.0"),
        ({"aspect_ratios": ["1:1", "4:3"]}, "PipelineConfig.aspect_ratios[1] must be one of '1:1', '2:3'"),
    ],
    ids=["t2i-frames", "ratio-not-a-bucket", "bucket-twice", "video-fps-0", "frames-0", "guidance-nan",
         "threshold-above-1", "noise-std-0", "unknown-bucket"],
)
def test_pipeline_config_refuses_absurd_defaults(fields, expected):
    with pytest.raises(ValueError) as caught:
        PipelineConfig(**fields)
    assert str(caught.value).startswith(expected)


# ----------------------------------------------------------------------------------------------------------------
# Task defaults and provenance (convert pipeline --default / --provenance)
# ----------------------------------------------------------------------------------------------------------------

PROVENANCE = {
    "name": "starflow-v-shapes", "version": "1", "command": "torchrun --nproc_per_node 2 -m tests.reference.train",
    "checkpoint_sha256": "ab" * 32, "figures": {"bits_per_dim": {"train": 1.25, "held_out": 1.5}, "steps": 4000},
}


def _converted_parts_argv(pipeline: Path) -> list[str]:
    """A pipeline's own parts as the sources of another: taken as converted (linked), so nothing is converted."""
    return ["--flow", str(pipeline / "flow"), "--t5", str(pipeline / "text"), "--vae", str(pipeline / "vae")]


def test_defaults_and_provenance_go_into_config_json_and_the_pipeline_loads(t2v_pipeline, tmp_path):
    from starflow_mlx.pipeline import Pipeline

    provenance_file = tmp_path / "provenance.json"
    provenance_file.write_text(json.dumps(PROVENANCE))
    out = tmp_path / "pipeline"
    defaults = ["guidance=3", "jacobi=false", 'aspect_ratio="1:1"', "jacobi_block_size=8", "target_noise_std=0.25",
                "jacobi_threshold=1e-2"]
    argv = [arg for default in defaults for arg in ("--default", default)]
    assert cli_main(["convert", "pipeline", *_converted_parts_argv(t2v_pipeline), *argv, "--provenance",
                     str(provenance_file), str(out)]) == 0

    meta = json.loads((out / "config.json").read_text())
    released = json.loads((t2v_pipeline / "config.json").read_text())
    changed = {key: meta[key] for key in released if key not in ("source",) and meta[key] != released[key]}
    assert changed == {"guidance": 3.0, "jacobi": False, "jacobi_block_size": 8, "target_noise_std": 0.25,
                       "jacobi_threshold": 0.01}  # aspect_ratio 1:1 was the tiny flow's already
    assert meta["provenance"] == PROVENANCE and meta["source"] == released["source"]
    folder = hub.read_pipeline_folder(out)
    assert folder.provenance == PROVENANCE and folder.config.guidance == 3.0

    pipeline = Pipeline.from_pretrained(out)
    record = pipeline.model_record()
    assert (record["id"], record["name"], record["version"]) == (str(out), "starflow-v-shapes", "1")
    assert "provenance" not in record and "command" not in json.dumps(record)  # the name only, not the whole block
    assert pipeline.settings().guidance == 3.0 and pipeline.settings().jacobi is False

    # the same from Python: a mapping of defaults (JSON values) and a provenance mapping make the same config.json
    again = convert_pipeline(tmp_path / "again", flow=out / "flow", t5=out / "text", vae=out / "vae",
                             defaults={"guidance": 3, "jacobi": False, "aspect_ratio": "1:1", "jacobi_block_size": 8,
                                       "target_noise_std": 0.25, "jacobi_threshold": 0.01},
                             provenance=PROVENANCE)
    assert json.loads((again / "config.json").read_text()) == meta


def test_a_folder_without_provenance_records_no_name(t2v_pipeline):
    from starflow_mlx.pipeline import Pipeline

    assert hub.read_pipeline_folder(t2v_pipeline).provenance is None
    record = Pipeline.from_pretrained(t2v_pipeline).model_record()
    assert sorted(record) == ["folder", "id", "parts"]
    assert sorted(record["parts"]) == ["flow", "text", "vae"]
    assert record["parts"]["vae"]["model_type"] == "wan-vae" and record["parts"]["flow"]["dtype"] == "float32"


def test_default_values_are_json_scalars_or_text():
    from starflow_mlx.convert.pipeline import parse_defaults

    flags = ["a=3", "b=2.5", "c=false", "d=null", 'e="1:1"', "f=1:1", "g=", "h=x=y", "i=-0", 'j="3"']
    assert parse_defaults(flags) == {"a": 3, "b": 2.5, "c": False, "d": None, "e": "1:1", "f": "1:1", "g": "",
                                     "h": "x=y", "i": 0, "j": "3"}
    assert parse_defaults(None) == {}


def _t2i_flow_argv(src: TinySources, pipeline: Path) -> list[str]:
    return ["--flow", str(src.image_checkpoint), "--config", str(src.image_yaml), "--t5", str(pipeline / "text"),
            "--vae", str(src.sd_vae)]


BAD_DEFAULTS = {  # id: (--default flags, expected error, the flow's sources)
    "unknown-key": (["cfg=3"], "--default 'cfg': unknown task default; they are frames, fps, aspect_ratio"),
    "task": (["task=t2i"], "--default task: the task is the flow's (t2v for a video flow, t2i for an image flow)"),
    "wrong-type": (["guidance=strong"], "--default guidance must be a finite number in [0, 100], got 'strong'"),
    "out-of-range": (["guidance=200"], "--default guidance must be a finite number in [0, 100], got 200"),
    "not-finite": (["guidance=NaN"], "--default guidance must be a finite number in [0, 100], got nan"),
    "overflow": (["guidance=1e999"], "--default guidance must be a finite number in [0, 100], got inf"),
    "bool-not-json": (["jacobi=yes"], "--default jacobi must be true or false, got 'yes'"),
    "integer-as-float": (["jacobi_block_size=8.5"], "--default jacobi_block_size must be an integer in [1, 65536], "
                                                    "got 8.5"),
    "null-not-optional": (["fps=null"], "--default fps must be an integer in [0, 240], got None"),
    "unknown-ratio": (["aspect_ratio=7:3"], "--default aspect_ratio must be one of '1:1', '2:3'"),
    "not-a-scalar": (['aspect_ratios=["1:1"]'], "--default 'aspect_ratios=[\"1:1\"]': the value must be a number, "
                                                "true/false, null or text"),
    "no-equals": (["guidance"], "--default 'guidance': expected KEY=VALUE, e.g. guidance=3"),
    "no-key": (["=3"], "--default '=3': expected KEY=VALUE, e.g. guidance=3"),
    "given-twice": (["guidance=3", "guidance=4"], "--default 'guidance': given twice"),
    "ratio-not-a-bucket": (["aspect_ratio=16:9"], "--default aspect_ratio: aspect_ratio '16:9' is not one of "
                                                  "aspect_ratios ['1:1']"),
    "t2v-fps-0": (["fps=0"], "--default fps: a t2v pipeline needs fps >= 1, got 0"),
    "unsupported-temperature": (["attention_temperature=2"], "--default attention_temperature: attention_temperature "
                                                             "2.0 is not supported: only 1"),
    "t2i-frames": (["frames=5"], "--default frames: a t2i pipeline makes one frame at fps 0, got frames 5, fps 0"),
    "denoiser-the-flow-lacks": (["learnable_denoiser=true"], "--default learnable_denoiser: learnable_denoiser is "
                                                             "true but the flow has no learnable self-denoiser"),
}
T2I_CASES = ("t2i-frames", "denoiser-the-flow-lacks")


@pytest.mark.parametrize("case", list(BAD_DEFAULTS), ids=list(BAD_DEFAULTS))
def test_bad_defaults_are_one_line_and_write_nothing(case, t2v_pipeline, tiny_sources, tmp_path, caplog, capsys):
    flags, expected = BAD_DEFAULTS[case]
    sources = (_t2i_flow_argv(tiny_sources, t2v_pipeline) if case in T2I_CASES
               else _converted_parts_argv(t2v_pipeline))
    out = tmp_path / "pipeline"
    argv = [arg for flag in flags for arg in ("--default", flag)]
    assert cli_main(["convert", "pipeline", *sources, *argv, str(out)]) == 2
    assert _one_error(caplog).startswith(f"error: {expected}")
    _nothing_written(out)


def _provenance_file(tmp: Path, text: str | bytes) -> Path:
    path = tmp / "provenance.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


BAD_PROVENANCE_FILES = {  # id: (file contents, None: no file; expected error after "--provenance FILE")
    "missing": (None, ": no such file"),
    "not-json": ("name: shapes", ": invalid JSON: Expecting value: line 1 column 1 (char 0)"),
    "not-an-object": ('["shapes", 1]', ": expected a JSON object {...}, got a list"),
    "not-finite": ('{"bits_per_dim": NaN}', ": NaN is not allowed (only finite numbers)"),
    "not-utf8": (b'{"name": "\xff"}', ": not UTF-8 text (byte 0xff at offset 10)"),
    "too-large": ('{"log": "' + "x" * (64 << 10) + '"}', ": larger than the 65,536-byte limit for this kind of file"),
    "too-deep": ('{"a": ' * 40 + "1" + "}" * 40, ": JSON nested deeper than 32 levels"),
    "name-not-text": ('{"name": 7}', ": name must be a string of at most 200 characters, got 7"),
    "version-too-long": ('{"version": "' + "9" * 201 + '"}', ": version must be a string of at most 200 characters"),
}


@pytest.mark.parametrize("case", list(BAD_PROVENANCE_FILES), ids=list(BAD_PROVENANCE_FILES))
def test_bad_provenance_files_are_one_line_and_write_nothing(case, t2v_pipeline, tmp_path, caplog):
    text, expected = BAD_PROVENANCE_FILES[case]
    path = tmp_path / "provenance.json" if text is None else _provenance_file(tmp_path, text)
    out = tmp_path / "pipeline"
    assert cli_main(["convert", "pipeline", *_converted_parts_argv(t2v_pipeline), "--provenance", str(path),
                     str(out)]) == 2
    assert _one_error(caplog).startswith(f"error: --provenance {path}{expected}")
    _nothing_written(out)


class _Unserialisable:
    pass


BAD_PROVENANCE_VALUES = {  # id: (the Python value, expected error)
    "not-a-mapping": ([1, 2], "provenance must be a mapping or the path of a JSON file, got [1, 2]"),
    "not-json-ready": ({"model": _Unserialisable()}, "provenance is not JSON-ready: Object of type _Unserialisable"),
    "not-finite": ({"loss": float("inf")}, "provenance is not JSON-ready: Out of range float values"),
    "too-large": ({"log": "x" * (64 << 10)}, "provenance: 65,547 bytes of JSON, over the 65,536-byte limit"),
    "name-not-text": ({"name": ["a"]}, "provenance: name must be a string of at most 200 characters, got ['a']"),
}


@pytest.mark.parametrize("case", list(BAD_PROVENANCE_VALUES), ids=list(BAD_PROVENANCE_VALUES))
def test_bad_provenance_values_are_refused_before_writing(case, t2v_pipeline, tmp_path):
    value, expected = BAD_PROVENANCE_VALUES[case]
    out = tmp_path / "pipeline"
    with pytest.raises(ValueError) as caught:
        convert_pipeline(out, flow=t2v_pipeline / "flow", t5=t2v_pipeline / "text", vae=t2v_pipeline / "vae",
                         provenance=value)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)
    _nothing_written(out)


@pytest.mark.parametrize("value", [["1:1"], "3", None], ids=["list", "text", "none-is-no-defaults"])
def test_defaults_from_python_are_checked_as_mappings(value, t2v_pipeline, tmp_path):
    out = tmp_path / "pipeline"
    parts = {"flow": t2v_pipeline / "flow", "t5": t2v_pipeline / "text", "vae": t2v_pipeline / "vae"}
    if value is None:
        convert_pipeline(out, **parts, defaults=None)
        assert hub.read_pipeline_folder(out).config == hub.read_pipeline_folder(t2v_pipeline).config
        return
    with pytest.raises(ValueError, match=r"^defaults must be a mapping of task defaults, got "):
        convert_pipeline(out, **parts, defaults=value)
    _nothing_written(out)


def test_overwrite_never_deletes_the_provenance_file_it_reads(t2v_pipeline, tmp_path, caplog):
    out = tmp_path / "pipeline"
    shutil.copytree(t2v_pipeline, out)
    inside = _provenance_file(out, json.dumps(PROVENANCE))  # the user keeps it in the folder being replaced
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert cli_main(["convert", "pipeline", *_converted_parts_argv(t2v_pipeline), "--provenance", str(inside),
                     str(out), "--overwrite"]) == 2
    assert _one_error(caplog) == (f"error: {out}: holds the source {inside}, which writing the output there could "
                                  "delete; choose an output folder outside it")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert json.loads(inside.read_text()) == PROVENANCE
