"""The flow converter: folder layout, tolerated wrappers, and the bad inputs particular to it (the ones every
converter shares are in test_converters.py)."""

import json
import pickle

import mlx.core as mx
import pytest

from starflow_mlx.convert.flow import convert_flow
from starflow_mlx.cli import main as cli_main
from starflow_mlx.flow import load_flow
from starflow_mlx.checkpoint import CheckpointError
from starflow_mlx.weights import OutputFolderError, read_model_folder

torch = pytest.importorskip("torch")


def leftovers(folder):
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


def test_folder_layout_and_metadata(tiny_video):
    ckpt, folder = tiny_video.checkpoint, tiny_video.folder
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    meta = json.loads((folder / "config.json").read_text())
    import hashlib

    assert meta["source"] == {"files": {"model.pth": hashlib.sha256(ckpt.read_bytes()).hexdigest()},
                              "config": "config.yaml"}
    assert meta["model_type"] == "flow" and meta["converter_version"] and meta["dtype"] == "float32"
    assert meta["top_block_channels"] == 96 and meta["layers_per_block"] == [1, 1, 1, 1, 1, 2]
    weights = read_model_folder(folder)
    assert "blocks.5.layers.1.mlp.fc1.weight" in weights and "denoiser.proj_txt.weight" in weights
    assert not any("attn_mask" in k or k.startswith(("var", "feat_rope")) for k in weights)


def test_sharding_writes_index_and_loads_back(tiny_video, tmp_path, monkeypatch):
    import starflow_mlx.weights as w

    ckpt, yaml_path, folder = tiny_video.checkpoint, tiny_video.yaml, tiny_video.folder
    monkeypatch.setattr(w, "SHARD_BYTES", 200_000)
    out = convert_flow(ckpt, yaml_path, tmp_path / "sharded")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    a, b = read_model_folder(out), read_model_folder(folder)
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def test_wrappers_and_prefixes_are_tolerated(tiny_video, tmp_path):
    yaml_path, folder = tiny_video.yaml, tiny_video.folder
    sd = torch.load(tiny_video.checkpoint, weights_only=True)
    wrapped = {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}, "step": 3}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    out = convert_flow(tmp_path / "wrapped.pth", yaml_path, tmp_path / "out")
    a, b = read_model_folder(out), read_model_folder(folder)
    assert all(mx.array_equal(a[k], b[k]) for k in b)


def test_shape_mismatch_names_both_shapes(tiny_video, tmp_path):
    sd = torch.load(tiny_video.checkpoint, weights_only=True)
    sd["blocks.0.proj_in.weight"] = torch.zeros(64, 7)
    sd["blocks.9.extra"] = torch.zeros(2)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError) as e:
        convert_flow(tmp_path / "m.pth", tiny_video.yaml, tmp_path / "out")
    assert "'blocks.0.proj_in.weight' has shape [64, 7], expected [64, 6]" in str(e.value)
    assert "unexpected key 'blocks.9.extra'" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("arguments:\n- img_size: [4\n", "invalid YAML"),
        ("arguments:\n- img_size: 4\n- channel_size: 6\n", "missing required field"),
        ("arguments:\n- img_size: 4\n- channel_size: x\n- channels: 64\n- layers_per_block: 1\n- txt_size: 5\n"
         "- rope: 1\n- sos: 1\n- text: tiny-16\n", r"channel_size must be an integer in \[1, 1024\], got 'x'"),
        ("arguments:\n- img_size: 4\n- channel_size: 6\n- channels: 64\n- layers_per_block: 1\n- txt_size: 5\n"
         "- rope: 1\n- sos: 1\n- use_swiglu: 1\n- text: tiny-16\n", "use_swiglu=1 is not supported"),
        ("just a string\n", "not an official STARFlow config"),
    ],
)
def test_wrong_yaml(tiny_video, tmp_path, yaml_text, message):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    with pytest.raises(ValueError, match=message):
        convert_flow(tiny_video.checkpoint, tmp_path / "bad.yaml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_yaml_that_does_not_match_the_checkpoint(tiny_video, tmp_path):
    (tmp_path / "c.yaml").write_text(tiny_video.yaml.read_text().replace("channels: 64", "channels: 128"))
    with pytest.raises(CheckpointError, match=r"has shape \[64, 6\], expected \[128, 6\]"):
        convert_flow(tiny_video.checkpoint, tmp_path / "c.yaml", tmp_path / "out")


def test_interrupted_write_leaves_nothing(tiny_video, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "save_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_flow(tiny_video.checkpoint, tiny_video.yaml, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_video, tmp_path):
    out = convert_flow(tiny_video.checkpoint, tiny_video.yaml, tmp_path / "out")
    with pytest.raises(OutputFolderError, match="--overwrite"):
        convert_flow(tiny_video.checkpoint, tiny_video.yaml, out)
    convert_flow(tiny_video.checkpoint, tiny_video.yaml, out, overwrite=True)
    assert load_flow(out).config.channels == 64 and not leftovers(out)


def test_cli_reports_errors_without_traceback(tiny_video, tmp_path, caplog):
    sd = torch.load(tiny_video.checkpoint, weights_only=True)
    del sd["blocks.0.sos_embed"]
    torch.save(sd, tmp_path / "m.pth")
    code = cli_main(["convert", "flow", str(tmp_path / "m.pth"), str(tiny_video.yaml), str(tmp_path / "out")])
    assert code == 2
    assert "missing key 'blocks.0.sos_embed'" in caplog.text and "Traceback" not in caplog.text
    assert cli_main(["convert", "flow", str(tiny_video.checkpoint), str(tiny_video.yaml), str(tmp_path / "ok"), "--q-bits", "8",
                     "--q-group-size", "32"]) == 0
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["quantization"]["bits"] == 8


def test_legacy_or_non_zip_file_is_refused(tmp_path):
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="legacy.pth: not a readable PyTorch zip checkpoint"):
        from starflow_mlx.checkpoint import read_state_dict

        read_state_dict(tmp_path / "legacy.pth")
