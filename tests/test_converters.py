"""Every converter's bad inputs, through the command line: exit status 2, one logged error naming the file, the key
or the shapes, and nothing written (no output folder, no hidden temporary folder beside it).

The tiny sources are the converter tests' own: the flow checkpoint of ``conftest.tiny_video``, the T5 config and
tokenizer of ``test_t5``, the Wan2.2 VAE of ``test_wan_vae`` (in the original ``.pth`` layout) and the SD VAE of
``test_sd_vae``, each saved as a PyTorch zip checkpoint so that every case, the pickle one included, applies.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

from starflow_mlx.cli import main as cli_main  # noqa: E402
from starflow_mlx.wan_vae import original_names  # noqa: E402


@dataclass
class Source:
    """A valid source of one converter, written under a test's tmp_path, and how to break it."""

    argv: list[str]  # its source arguments for ``convert <kind>``
    root: Path  # the path the user names: a checkpoint file or a model folder
    weights: Path  # the PyTorch zip checkpoint at or inside ``root``
    state: dict  # the valid state dict saved there
    missing: str  # a key the converter requires
    reshaped: tuple[str, tuple]  # a key and a shape it cannot have


@pytest.fixture(scope="module")
def t5_parts():
    from tests.test_t5 import _hf_config, train_spiece

    model = transformers.T5EncoderModel(_hf_config())
    return model.config, dict(model.state_dict()), train_spiece()


@pytest.fixture(scope="module")
def wan_state():
    from tests.test_wan_vae import tiny_wan_vae

    names = original_names(2)
    return {names.to_checkpoint(k): v for k, v in tiny_wan_vae().state_dict().items()}


@pytest.fixture(scope="module")
def sd_model():
    from tests.test_sd_vae import _tiny_diffusers

    return _tiny_diffusers()


def _flow(tmp: Path, request) -> Source:
    tiny = request.getfixturevalue("tiny_video")
    checkpoint, yaml_path = tiny.checkpoint, tiny.yaml
    state = torch.load(checkpoint, weights_only=True)
    weights = tmp / "model.pth"
    return Source([str(weights), str(yaml_path)], weights, weights, state,
                  "blocks.5.attn_blocks.1.mlp.main.2.bias", ("blocks.0.proj_in.weight", (64, 7)))


def _t5(tmp: Path, request) -> Source:
    from tests.test_t5 import _write_tokenizer

    config, state, spiece = request.getfixturevalue("t5_parts")
    src = tmp / "flan-t5"
    src.mkdir()
    config.to_json_file(src / "config.json")
    _write_tokenizer(src, spiece)
    return Source([str(src)], src, src / "pytorch_model.bin", state,
                  "encoder.block.1.layer.1.DenseReluDense.wo.weight",
                  ("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", (128, 64)))


def _wan_vae(tmp: Path, request) -> Source:
    weights = tmp / "Wan2.2_VAE.pth"
    return Source([str(weights)], weights, weights, request.getfixturevalue("wan_state"),
                  "decoder.upsamples.1.upsamples.3.time_conv.weight",
                  ("encoder.middle.1.to_qkv.weight", (192, 64, 3, 3)))


def _sd_vae(tmp: Path, request) -> Source:
    model = request.getfixturevalue("sd_model")
    src = tmp / "sd-vae"
    model.save_config(src)
    return Source([str(src)], src, src / "diffusion_pytorch_model.bin", model.state_dict(),
                  "decoder.up_blocks.1.resnets.2.conv2.bias", ("encoder.conv_in.weight", (32, 3, 5, 5)))


SOURCES = {"flow": _flow, "t5": _t5, "wan-vae": _wan_vae, "sd-vae": _sd_vae}


# ----------------------------------------------------------------------------------------------------------------
# The bad inputs: each breaks a valid source (or the output folder) and returns what the error must name
# ----------------------------------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def missing_source(src: Source, out: Path) -> list[str]:
    if src.root.is_dir():
        shutil.rmtree(src.root)
    else:
        src.root.unlink()
    return [str(src.root)]


def truncated_file(src: Source, out: Path) -> list[str]:
    data = src.weights.read_bytes()
    src.weights.write_bytes(data[: len(data) // 2])
    return [str(src.weights)]


def code_running_pickle(src: Source, out: Path) -> list[str]:
    """The zip layout of ``torch.save``, whose pickle would call ``os.system`` if it were run."""
    with zipfile.ZipFile(src.weights, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"weight": _Exploit(out.parent / "exploited")}, protocol=2))
        z.writestr("archive/byteorder", "little")
    return [str(src.weights), f"{os.system.__module__}.system"]


def missing_key(src: Source, out: Path) -> list[str]:
    torch.save({k: v for k, v in src.state.items() if k != src.missing}, src.weights)
    return [str(src.weights), f"missing key {src.missing!r} (expected shape {list(src.state[src.missing].shape)})"]


def wrong_shape(src: Source, out: Path) -> list[str]:
    key, shape = src.reshaped
    torch.save({**src.state, key: torch.zeros(shape)}, src.weights)
    return [str(src.weights), f"key {key!r} has shape {list(shape)}, expected {list(src.state[key].shape)}"]


def existing_output(src: Source, out: Path) -> list[str]:
    """Refused before the source is read: the checkpoint is unreadable too, but the error is about the output."""
    out.mkdir()
    (out / "kept.txt").write_text("not replaced")
    src.weights.write_bytes(b"")
    return [str(out), "already exists", "--overwrite"]


@pytest.mark.parametrize(
    "breaks", [missing_source, truncated_file, code_running_pickle, missing_key, wrong_shape, existing_output]
)
@pytest.mark.parametrize("kind", list(SOURCES))
def test_bad_input_exits_2_with_one_error_and_writes_nothing(kind, breaks, tmp_path, request, caplog):
    src = SOURCES[kind](tmp_path, request)
    torch.save(src.state, src.weights)
    out = tmp_path / "out"
    expected = breaks(src, out)

    assert cli_main(["convert", kind, *src.argv, str(out)]) == 2

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    for part in expected:
        assert part in message
    assert "Traceback" not in caplog.text
    assert not (tmp_path / "exploited").exists()
    if breaks is existing_output:
        assert [p.name for p in out.iterdir()] == ["kept.txt"]
    else:
        assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# ----------------------------------------------------------------------------------------------------------------
# The declared name tables (weights.KeyMap)
# ----------------------------------------------------------------------------------------------------------------


def test_name_tables_rename_both_ways(tmp_path):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from starflow_mlx.config import load_official_yaml
    from starflow_mlx.flow import OFFICIAL_NAMES, StarFlow
    from starflow_mlx.sd_vae import ALIASES
    from starflow_mlx.t5 import HF_NAMES, T5Config, T5Encoder
    from starflow_mlx.wan_vae import DIFFUSERS_NAMES, WanVAE, WanVAEConfig
    from starflow_mlx.checkpoint import CheckpointError
    from tests.conftest import TINY_VIDEO_YAML

    assert OFFICIAL_NAMES.to_checkpoint("denoiser.layers.1.mlp.fc2.bias") == (
        "learnable_self_denoiser.attn_blocks.1.mlp.main.2.bias"
    )
    assert HF_NAMES.to_ours("encoder.block.3.layer.1.DenseReluDense.wi_1.weight") == "layers.3.ffn.wi_1.weight"
    wan = original_names(2).then(DIFFUSERS_NAMES)
    assert wan.to_checkpoint("decoder.up_blocks.0.resample.time_conv.weight") == (
        "decoder.upsamples.0.upsamples.3.time_conv.weight"
    )
    assert wan.to_checkpoint("encoder.mid_block.resnets.1.norm2.weight") == "encoder.middle.2.residual.3.gamma"
    assert ALIASES.to_ours("decoder.1.mid_block.attentions.0.proj_attn.bias") == (
        "decoder.mid_block.attentions.0.to_out.0.bias"
    )

    # Every parameter of each model goes to its checkpoint name and back (the rules do not undo one another).
    (tmp_path / "config.yaml").write_text(TINY_VIDEO_YAML)
    flow = StarFlow(load_official_yaml(tmp_path / "config.yaml"))
    models = [(flow, OFFICIAL_NAMES), (T5Encoder(T5Config(num_layers=2, d_model=64, d_kv=16, d_ff=96)), HF_NAMES)]
    for blocks in (1, 2, 3):
        vae = WanVAE(WanVAEConfig(base_dim=16, decoder_base_dim=24, num_res_blocks=blocks))
        models += [(vae, DIFFUSERS_NAMES), (vae, original_names(blocks).then(DIFFUSERS_NAMES))]
    for model, names in models:
        ours = [k for k, _ in tree_flatten(model.parameters())]
        theirs = [names.to_checkpoint(k) for k in ours]
        assert len(set(theirs)) == len(ours)
        assert [names.to_ours(k) for k in theirs] == ours

    # Two checkpoint keys that name the same parameter are an error that names both.
    old, new = "encoder.mid_block.attentions.0.query.weight", "encoder.mid_block.attentions.0.to_q.weight"
    with pytest.raises(CheckpointError, match=f"vae.bin: keys '{old}' and '{new}' both stand for '{new}'"):
        ALIASES.rename({old: mx.zeros(1), new: mx.zeros(1)}, "vae.bin")
