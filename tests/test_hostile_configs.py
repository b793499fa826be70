"""Hostile configs: every field of every component config, the official YAML's traps, JSON traps, absurd sizes and
shard indexes that point outside their folder. Each case asserts the one-line error (type, and the words naming
the file, the field and the value) and that nothing was read, built or written.

Memory-bound cases (alias bombs, absurd sizes through the command line) run in a subprocess under RLIMIT_AS /
RLIMIT_CPU and a timeout, so that a regression fails the test instead of swapping or hanging the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest

from starflow_mlx.config import (
    FlowConfig,
    MAX_JSON_BYTES,
    MAX_YAML_BYTES,
    Quantization,
    TokenizerFiles,
    load_official_yaml,
    read_json_object,
)
from tests.helpers import refusal, run_bounded

# A valid tiny official YAML (the fields of the released T2V config that matter, at test sizes); cases change one
# line of it.
BASE_YAML = """\
arguments:
- img_size: 4
- txt_size: 5
- vid_size: '9:16'
- fps_cond: 1
- channel_size: 6
- patch_size: 1
- channels: 64
- top_block_channels: 96
- blocks: 3
- layers_per_block: 1 1 2
- head_dim: 32
- noise_std: 0.5
- rope: 1
- sos: 1
- seq_order: L2R
- pt_seq_len: 4
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- learnable_self_denoiser: 1
- conditional_denoiser: 1
- denoiser_window: 10
- cond_noise_level: 1
- temporal_causal: 2
- shallow_block_local: 1
- soft_clip: 4
- cfg: 2.5
- vae: none
- text: tiny-16
- lr: 5e-5
"""

# The same model as FlowConfig fields (what a converted folder's config.json holds).
BASE_FIELDS = dict(
    in_channels=6, img_size=4, channels=64, layers_per_block=[1, 1, 2], txt_size=5, txt_dim=16, top_block_channels=96,
    head_dim=32, pt_seq_len=4, soft_clip=4.0, temporal_causal=2, shallow_block_local=True, learnable_self_denoiser=True,
    conditional_denoiser=True, denoiser_window=10, noise_std=0.5, cond_noise_level=True, cfg=2.5, vid_size="9:16",
    fps_cond=True, pixel_size=4, text="tiny-16",
)


def with_line(name: str, value: str, text: str = BASE_YAML) -> str:
    """BASE_YAML with ``name`` set to the raw YAML ``value`` (replaced, or appended)."""
    lines = [line for line in text.splitlines() if not line.startswith(f"- {name}:")]
    return "\n".join(lines + [f"- {name}: {value}"]) + "\n"


def test_base_inputs_are_valid(tmp_path):
    (tmp_path / "c.yaml").write_text(BASE_YAML)
    config = load_official_yaml(tmp_path / "c.yaml")
    assert config == FlowConfig(**BASE_FIELDS, extra={"lr": 5e-5})
    assert FlowConfig.from_dict(config.to_dict()) == config


# ----------------------------------------------------------------------------------------------------------------
# Every FlowConfig field: a wrong type and an out-of-range value (config.json of a converted folder)
# ----------------------------------------------------------------------------------------------------------------

LIST_OF_LAYERS = "a list of 1 to 64 entries, each an integer in [1, 256]"
FLOW_FIELD_CASES = {
    "in_channels": [(6.5, "an integer in [1, 1024]"), (0, "an integer in [1, 1024]")],
    "img_size": [("4", "an integer in [1, 1024]"), (-4, "an integer in [1, 1024]")],
    "channels": [(64.9, "an integer in [1, 32768]"), (10**9, "an integer in [1, 32768]")],
    "layers_per_block": [(2, LIST_OF_LAYERS), ([], LIST_OF_LAYERS), ([1] * 65, LIST_OF_LAYERS), ([1, 0], "[1] must be an integer in [1, 256], got 0"),
                         ([100000], "[0] must be an integer in [1, 256], got 100000"),
                         ([1, True], "[1] must be an integer in [1, 256], got True")],
    "txt_size": [(None, "an integer in [1, 4096]"), (0, "an integer in [1, 4096]")],
    "txt_dim": [([16], "an integer in [1, 32768]"), (0, "an integer in [1, 32768]")],
    "patch_size": [(True, "an integer in [1, 64]"), (-1, "an integer in [1, 64]")],
    "top_block_channels": [("96", "an integer in [1, 32768]"), (0, "an integer in [1, 32768]")],
    "head_dim": [(32.0, "an integer multiple of 4 in [16, 1024]"), (8, "an integer multiple of 4 in [16, 1024]"),
                 (18, "an integer multiple of 4 in [16, 1024]")],
    "num_heads": [(2.0, "an integer in [1, 2048]"), (0, "an integer in [1, 2048]")],
    "pt_seq_len": [("4", "an integer in [1, 4096]"), (0, "an integer in [1, 4096]")],
    "cond_top_only": [(1, "true or false"), ("true", "true or false")],
    "use_softplus": [(0, "true or false"), (None, "true or false")],
    "use_final_norm": [("yes", "true or false")],
    "soft_clip": [("4", "a finite number in [0, 1000]"), (float("nan"), "a finite number in [0, 1000]"),
                  (float("inf"), "a finite number in [0, 1000]"), (-1.0, "a finite number in [0, 1000]"),
                  (10**400, "a finite number in [0, 1000]")],
    "seq_order": [(1, "one of 'L2R', 'R2L'"), ("l2r", "one of 'L2R', 'R2L'")],
    "temporal_causal": [(2.5, "an integer in [0, 64]"), (-1, "an integer in [0, 64]")],
    "shallow_block_local": [(1.0, "true or false")],
    "learnable_self_denoiser": [("1", "true or false")],
    "conditional_denoiser": [([True], "true or false")],
    "denoiser_window": [(10.5, "an integer in [1, 1024]"), (0, "an integer in [1, 1024]")],
    "local_attn_window": [("3", "an integer in [1, 1024]"), (-3, "an integer in [1, 1024]")],
    "noise_std": [([0.5], "a finite number in (0, 100]"), (0.0, "a finite number in (0, 100]"),
                  (float("-inf"), "a finite number in (0, 100]")],
    "cond_noise_level": [(2, "true or false")],
    "cfg": [([2.5, 3.0], "a finite number in [0, 100]"), (-1, "a finite number in [0, 100]"),
            (float("nan"), "a finite number in [0, 100]")],
    "vae": [(None, "a string of at most 256 characters"), ("x" * 257, "a string of at most 256 characters")],
    "text": [(2048, "a string of at most 256 characters")],
    "vid_size": [(196, "'frames:fps' such as '81:16'"), ([9, 16], "'frames:fps' such as '81:16'"),
                 ("196", "'frames:fps' such as '81:16'"), ("9:16; rm -rf /", "'frames:fps' such as '81:16'")],
    "fps_cond": [("on", "true or false")],
    "mix_aspect": [(0.0, "true or false")],
    "pixel_size": [(4.0, "an integer in [1, 16384]"), (100000, "an integer in [1, 16384]")],
}


@pytest.mark.parametrize(
    "name, value, expected",
    [pytest.param(n, v, e, id=f"{n}={str(v)[:20]}") for n, cases in FLOW_FIELD_CASES.items() for v, e in cases],
)
def test_flow_field_refused(name, value, expected):
    message = refusal(lambda: FlowConfig.from_dict({**BASE_FIELDS, name: value}, source="folder/config.json"))
    assert message.startswith(f"folder/config.json: FlowConfig.{name}")
    if expected.startswith("["):  # an entry of a list: the message names the entry and its value
        assert f"FlowConfig.{name}{expected}" in message
    else:
        assert f"FlowConfig.{name} must be {expected}, got {repr(value)[:40]}" in message


def test_every_flow_field_has_a_case():
    names = {f.name for f in dataclasses.fields(FlowConfig)} - {"extra"}
    assert names == set(FLOW_FIELD_CASES)


@pytest.mark.parametrize(
    "extra, expected",
    [
        pytest.param([1], "FlowConfig.extra must be a mapping", id="not-a-mapping"),
        pytest.param({"a": {"b": 1}}, "FlowConfig.extra['a'] must be a number, string", id="nested-mapping"),
        pytest.param({"a": list(range(65))}, "FlowConfig.extra['a'] must be a number", id="long-list"),
        pytest.param({"a": "x" * 1025}, "FlowConfig.extra['a'] must be a number", id="long-string"),
        pytest.param({"a": float("nan")}, "FlowConfig.extra['a'] must be a number", id="nan"),
        pytest.param({"a": 10**30}, "FlowConfig.extra['a'] must be a number", id="huge-int"),
        pytest.param({"k" * 65: 1}, "key 'kkkkk", id="long-key"),
        pytest.param({f"k{i}": i for i in range(257)}, "FlowConfig.extra has 257 entries", id="many-entries"),
    ],
)
def test_flow_extra_refused(extra, expected):
    message = refusal(lambda: FlowConfig.from_dict({**BASE_FIELDS, "extra": extra}, source="c.json"))
    assert expected in message


@pytest.mark.parametrize(
    "change, expected",
    [
        pytest.param({"num_heads": 4}, "num_heads 4 x head_dim 32 must equal channels 64", id="num_heads"),
        pytest.param({"channels": 48}, "channels 48 is not a multiple of head_dim 32", id="channels%head_dim"),
        pytest.param({"top_block_channels": 80}, "top_block_channels 80 is not a multiple of head_dim 32",
                     id="top%head_dim"),
        pytest.param({"patch_size": 3}, "img_size 4 is not a multiple of patch_size 3", id="img%patch"),
        pytest.param({"seq_order": "R2L"}, "temporal_causal requires seq_order 'L2R'", id="causal-R2L"),
        pytest.param({"cond_top_only": False}, "cond_top_only=0", id="cond_top_only"),
    ],
)
def test_flow_field_relations_refused(change, expected):
    message = refusal(lambda: FlowConfig.from_dict({**BASE_FIELDS, **change}, source="c.json"))
    assert message.startswith("c.json: ") and expected in message


def test_flow_unknown_and_missing_fields_are_listed_briefly():
    junk = {f"junk{i:03d}": 1 for i in range(5000)}
    message = refusal(lambda: FlowConfig.from_dict({**BASE_FIELDS, **junk}, source="c.json"))
    assert message.startswith("c.json: unknown flow config field(s): junk000, junk001,")
    assert "and 4990 more" in message and len(message) < 300
    with pytest.raises(ValueError, match="c.json: missing flow config field"):
        FlowConfig.from_dict({k: v for k, v in BASE_FIELDS.items() if k != "channels"}, source="c.json")


# ----------------------------------------------------------------------------------------------------------------
# The official YAML: traps of YAML 1.1, strict field types, anchors, tags, size
# ----------------------------------------------------------------------------------------------------------------

YAML_REFUSED = {
    # field: raw YAML value -> words of the error
    "channels-float": ("channels", "64.9", "channels must be an integer in [1, 32768], got 64.9"),
    "channels-hex": ("channels", "0x40", "channels must be an integer in [1, 32768], got '0x40'"),
    "channels-octal": ("channels", "0100", "channels must be an integer in [1, 32768], got '0100'"),
    "channels-underscore": ("channels", "6_4", "channels must be an integer in [1, 32768], got '6_4'"),
    "channels-list": ("channels", "[64]", "channels must be an integer in [1, 32768], got [64]"),
    "channels-huge": ("channels", "1000000000", "channels must be an integer in [1, 32768], got 1000000000"),
    "channels-bool": ("channels", "true", "channels must be an integer in [1, 32768], got True"),
    "img_size-base60": ("img_size", "1:04", "img_size must be an integer in [1, 16384], got '1:04'"),
    "img_size-null": ("img_size", "null", "img_size must be an integer in [1, 16384], got None"),
    "channel_size-none": ("channel_size", "none", "channel_size must be an integer in [1, 1024], got 'none'"),
    "channel_size-zero": ("channel_size", "0", "channel_size must be an integer in [1, 1024], got 0"),
    "txt_size-zero": ("txt_size", "0", "txt_size must be an integer in [1, 4096], got 0"),
    "pt_seq_len-zero": ("pt_seq_len", "0", "pt_seq_len must be an integer in [1, 4096], got 0"),
    "patch_size-negative": ("patch_size", "-1", "patch_size must be an integer in [1, 64], got -1"),
    "head_dim-odd": ("head_dim", "30", "head_dim must be an integer multiple of 4 in [16, 1024], got 30"),
    "soft_clip-nan": ("soft_clip", ".nan", "soft_clip must be a finite number in [0, 1000], got nan"),
    "soft_clip-inf": ("soft_clip", ".inf", "soft_clip must be a finite number in [0, 1000], got inf"),
    "soft_clip-string": ("soft_clip", "'4'", "soft_clip must be a finite number in [0, 1000], got '4'"),
    "noise_std-date": ("noise_std", "2001-01-01", "noise_std must be a finite number in (0, 100], got '2001-01-01'"),
    "noise_std-zero": ("noise_std", "0", "noise_std must be a finite number in (0, 100], got 0"),
    "vid_size-int": ("vid_size", "81", "vid_size must be 'frames:fps' such as '81:16', got 81"),
    "vid_size-list": ("vid_size", "[81, 16]", "vid_size must be 'frames:fps' such as '81:16', got [81, 16]"),
    "seq_order-other": ("seq_order", "T2B", "seq_order must be one of 'L2R', 'R2L', got 'T2B'"),
    "flag-yes": ("fps_cond", "yes", "fps_cond must be 0 or 1 (or true/false), got 'yes'"),
    "flag-on": ("use_softplus", "on", "use_softplus must be 0 or 1 (or true/false), got 'on'"),
    "flag-two": ("cond_noise_level", "2", "cond_noise_level must be 0 or 1 (or true/false), got 2"),
    "flag-string": ("learnable_self_denoiser", "'1'", "learnable_self_denoiser must be 0 or 1 (or true/false), got '1'"),
    "rope-off": ("rope", "0", "rope=0 is not supported (only 1)"),
    "sos-yes": ("sos", "yes", "sos must be 0 or 1 (or true/false), got 'yes'"),
    "swiglu": ("use_swiglu", "1", "use_swiglu=1 is not supported (only 0)"),
    "lpb-words": ("layers_per_block", "1 x 2", "layers_per_block must be integers separated by spaces, got '1 x 2'"),
    "lpb-float": ("layers_per_block", "1.5", "layers_per_block must be a list of 1 to 64 entries"),
    "lpb-zero": ("layers_per_block", "1 0 2", "layers_per_block[1] must be an integer in [1, 256], got 0"),
    "lpb-huge": ("layers_per_block", "[100000]", "layers_per_block[0] must be an integer in [1, 256], got 100000"),
    "lpb-empty": ("layers_per_block", "''", "layers_per_block must be a list of 1 to 64 entries"),
    "lpb-vs-blocks": ("blocks", "4", "layers_per_block has 3 entries but blocks is 4"),
    "blocks-huge": ("blocks", "200000", "blocks must be an integer in [1, 64], got 200000"),
    "blocks-float": ("blocks", "3.0", "blocks must be an integer in [1, 64], got 3.0"),
    "cfg-nan": ("cfg", "[2.5, .nan]", "cfg must be a finite number in [0, 100], got nan"),
    "cfg-words": ("cfg", "2.5 high", "cfg must be a number or numbers separated by spaces, got '2.5 high'"),
    "cfg-empty": ("cfg", "[]", "cfg must be a number or a list of 1 to 64 numbers, got []"),
    "cfg-negative": ("cfg", "-1", "cfg must be a finite number in [0, 100], got -1"),
    "vae-unknown": ("vae", "my-vae", "unknown VAE 'my-vae'"),
    "vae-list": ("vae", "[a]", "vae must be a string of at most 256 characters, got ['a']"),
    "text-unknown": ("text", "bert", "unknown text encoder 'bert'"),
    "img_size-vae": ("vae", "stabilityai/sd-vae-ft-ema", "img_size 4 is not a multiple of the VAE downsample 8"),
    "extra-nested": ("wandb", "{a: 1}", "FlowConfig.extra['wandb'] must be a number, string"),
    "extra-long": ("notes", "[" + ", ".join(["1"] * 65) + "]", "FlowConfig.extra['notes'] must be a number"),
    "extra-nan": ("lr", ".nan", "FlowConfig.extra['lr'] must be a number"),
    "duplicate": ("channels", "64\n- channels: 128", "argument 'channels' is given twice"),
    "anchor": ("channels", "&width 64\n- other_width: *width", "anchors and aliases (& and *) are not allowed"),
    "merge-key": ("extra_map", "{<<: {a: 1}}", "FlowConfig.extra['extra_map'] must be a number"),
    "python-tag": ("channels", "!!python/object/apply:os.system ['touch {marker}']", "explicit tags"),
    "binary-tag": ("notes", "!!binary aGVsbG8=", "explicit tags (tag:yaml.org,2002:binary) are not allowed"),
    "int-tag": ("channels", "!!int '0x40'", "explicit tags (tag:yaml.org,2002:int) are not allowed"),
    "non-string-name": ("1", "2", "argument name 1 is not a string"),
}


@pytest.mark.parametrize("name, value, expected", list(YAML_REFUSED.values()), ids=list(YAML_REFUSED))
def test_official_yaml_field_refused(name, value, expected, tmp_path):
    marker = tmp_path / "exploited"
    path = tmp_path / "c.yaml"
    path.write_text(with_line(name, value.replace("{marker}", str(marker))))
    message = refusal(lambda: load_official_yaml(path))
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert not marker.exists()


YAML_FILE_REFUSED = {
    "not-utf8": (b"arguments:\n- text: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 22)"),
    "too-large": (b"arguments:\n" + b"- a: 1\n" * (MAX_YAML_BYTES // 7 + 1), "larger than the 65,536-byte limit"),
    "deep-nesting": (b"arguments: " + b"[" * 5000 + b"]" * 5000, "nested deeper than 16 levels"),
    "invalid": (b"arguments:\n- img_size: [4\n", "invalid YAML: while parsing a flow sequence expected ',' or ']'"),
    "tab": (b"arguments:\n\t- img_size: 4\n", "invalid YAML"),
    "control-char": (b"arguments:\n- text: a\x07b\n", "invalid YAML: unacceptable character #x0007: special characters are not allowed"),
    "empty": (b"", "not an official STARFlow config"),
    "scalar": (b"just a string\n", "not an official STARFlow config"),
    "entry-with-two-names": (b"arguments:\n- a: 1\n  b: 2\n", "each entry under 'arguments' must be one 'name: value'"),
    "too-many-entries": (b"arguments:\n" + b"".join(b"- a%d: 1\n" % i for i in range(300)), "300 arguments"),
    "missing-field": (b"arguments:\n- img_size: 4\n", "missing required field(s): channel_size, channels"),
}


@pytest.mark.parametrize("data, expected", list(YAML_FILE_REFUSED.values()), ids=list(YAML_FILE_REFUSED))
def test_official_yaml_file_refused(data, expected, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    message = refusal(lambda: load_official_yaml(path))
    assert message.startswith(f"{path}: ")
    assert expected in message


@pytest.mark.parametrize("what", ["folder", "missing", "fifo", "nul", "too-long"])
def test_official_yaml_path_refused(what, tmp_path):
    path = tmp_path / {"nul": "c\0.yaml", "too-long": "c" * 300 + ".yaml"}.get(what, "c.yaml")
    if what == "folder":
        path.mkdir()
    elif what == "fifo":
        os.mkfifo(path)  # reading it would block forever
    expected = {"folder": "is a folder, expected a file", "missing": "no such file", "fifo": "not a regular file",
                "nul": "no such file", "too-long": "cannot read: File name too long"}[what]
    message = refusal(lambda: load_official_yaml(path))
    assert message == f"{path}: {expected}"


@pytest.mark.parametrize(
    "name, value, field, expected",
    [
        pytest.param("vid_size", "3:16", "vid_size", "3:16", id="unquoted-frames:fps-is-a-string"),
        pytest.param("vid_size", "81:16:24", "vid_size", "81:16:24", id="frames:fps1:fps2"),
        pytest.param("vid_size", "null", "vid_size", None, id="vid_size-null"),
        pytest.param("top_block_channels", "none", "top_block_channels", None, id="none-unsets"),
        pytest.param("fps_cond", "true", "fps_cond", True, id="flag-true"),
        pytest.param("fps_cond", "0", "fps_cond", False, id="flag-0"),
        pytest.param("cfg", "3.5 2.0", "cfg", 3.5, id="cfg-words-first"),
        pytest.param("cfg", "[4, 2]", "cfg", 4.0, id="cfg-list-first"),
        pytest.param("soft_clip", "4", "soft_clip", 4.0, id="int-for-float"),
        pytest.param("noise_std", "5e-1", "noise_std", 0.5, id="exponent-without-dot"),
        pytest.param("layers_per_block", "[1, 1, 2]", "layers_per_block", [1, 1, 2], id="lpb-list"),
        pytest.param("layers_per_block", "2", "layers_per_block", [2, 2, 2], id="lpb-broadcast"),
        pytest.param("notes", "yes", "extra", {"lr": 5e-5, "notes": "yes"}, id="extra-yes-stays-a-string"),
        pytest.param("lr", "0x10", "extra", {"lr": "0x10"}, id="extra-hex-stays-a-string"),
    ],
)
def test_official_yaml_values_read_as_written(name, value, field, expected, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(with_line(name, value))
    assert getattr(load_official_yaml(path), field) == expected


# The released configs (configs/*.yaml of apple/ml-starflow), in the form they use: an `arguments:` list of one-key
# mappings with plain scalars, layers_per_block and cfg as space-separated words, vid_size quoted, exponents
# without a dot. Only the training-only fields are abridged.
RELEASED = {
    "starflow-v_7B_t2v_caus_480p": (
        "img_size: 640|secondary_img_size: 512|txt_size: 256|vid_size: '81:16'|fps_cond: 1|channel_size: 48|"
        "patch_size: 1|channels: 3072|top_block_channels: 4096|blocks: 6|layers_per_block: 2 2 2 2 2 24|"
        "noise_std: 0.5|batch_size: 192|lr: 5e-5|min_lr: 1e-6|nvp: 1|rope: 1|adaln: 0|sos: 1|seq_order: L2R|"
        "pt_seq_len: 32|mix_aspect: 1|use_softplus: 1|cond_top_only: 1|use_final_norm: 1|"
        "learnable_self_denoiser: 1|conditional_denoiser: 1|denoiser_window: 10|cond_noise_level: 1|"
        "temporal_causal: 2|shallow_block_local: 1|vae: Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6|finetuned_vae: none|"
        "text: google/flan-t5-xl|cfg: 2.5|drop_label: 0.1|soft_clip: 4",
        dict(img_size=40, in_channels=48, top_block_channels=4096, vid_size="81:16", noise_std=0.5),
        6_890_096_528,  # spec §2: total state params
    ),
    "starflow_3B_t2i_256x256": (
        "img_size: 256|txt_size: 128|channel_size: 4|patch_size: 1|channels: 3072|blocks: 6|"
        "layers_per_block: 2 2 2 2 2 24|noise_std: 0.3|batch_size: 1024|lr: 6.4e-05|min_lr: 1e-6|nvp: 1|rope: 1|"
        "adaln: 0|sos: 1|seq_order: L2R|use_softplus: 1|cond_top_only: 1|use_final_norm: 1|"
        "vae: stabilityai/sd-vae-ft-ema|text: google/flan-t5-xl|cfg: 2.5|drop_label: 0.1|soft_clip: 4|"
        "latent_norm_regularization: 1e-4",
        dict(img_size=32, in_channels=4, top_block_channels=None, vid_size=None, noise_std=0.3),
        3_858_281_544,
    ),
}


def _released_yaml(fields: str) -> str:
    return "arguments:\n" + "".join(f"- {f}\n" for f in fields.split("|"))


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs_load(name, tmp_path):
    text, expected, parameters = RELEASED[name]
    (tmp_path / "c.yaml").write_text(_released_yaml(text))
    config = load_official_yaml(tmp_path / "c.yaml")
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.layers_per_block == [2, 2, 2, 2, 2, 24] and config.txt_dim == 2048 and config.cfg == 2.5
    assert config.extra["lr"] in (5e-5, 6.4e-5) and config.extra["min_lr"] == 1e-6
    assert config.parameter_count() == parameters


MIRROR = Path("/work/.mirror/apple+ml-starflow/repo")


@pytest.mark.skipif(not MIRROR.is_dir(), reason="the official repository mirror is not on this machine")
@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs_match_the_official_files(name, tmp_path):
    text = subprocess.run(["git", "-C", str(MIRROR), "show", f"HEAD:configs/{name}.yaml"], capture_output=True,
                          text=True, check=True).stdout
    (tmp_path / "official.yaml").write_text(text)
    (tmp_path / "ours.yaml").write_text(_released_yaml(RELEASED[name][0]))
    official, ours = load_official_yaml(tmp_path / "official.yaml"), load_official_yaml(tmp_path / "ours.yaml")
    assert dataclasses.replace(official, extra={}) == dataclasses.replace(ours, extra={})


# ----------------------------------------------------------------------------------------------------------------
# parameter_count: exactly the weights the model has, so the size cap means what it says
# ----------------------------------------------------------------------------------------------------------------


def _count(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize(
    "kind, fields",
    [
        pytest.param("flow", BASE_FIELDS, id="flow-video"),
        pytest.param("flow", {**BASE_FIELDS, "learnable_self_denoiser": False, "use_final_norm": False,
                              "patch_size": 2, "top_block_channels": None}, id="flow-image"),
        pytest.param("flow", {**BASE_FIELDS, "conditional_denoiser": False}, id="flow-unconditional-denoiser"),
        pytest.param("t5", dict(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=3), id="t5"),
        pytest.param("t5", dict(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                                feed_forward_proj="relu"), id="t5-not-gated"),
        pytest.param("wan", dict(base_dim=16, decoder_base_dim=24), id="wan"),
        pytest.param("wan", dict(base_dim=8, decoder_base_dim=12, num_res_blocks=1, dim_mult=[1, 3],
                                 temporal_downsample=[True], z_dim=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
                                 patch_size=1, image_channels=2), id="wan-small"),
        pytest.param("sd", dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4), id="sd"),
        pytest.param("sd", dict(block_out_channels=[8, 16], layers_per_block=3, norm_num_groups=4, latent_channels=3,
                                mid_block_add_attention=False, use_quant_conv=False, in_channels=2, out_channels=5),
                     id="sd-variant"),
    ],
)
def test_parameter_count_is_exact(kind, fields):
    from starflow_mlx.flow import StarFlow
    from starflow_mlx.sd_vae import SDVAE, SDVAEConfig
    from starflow_mlx.t5 import T5Config, T5Encoder
    from starflow_mlx.wan_vae import WanVAE, WanVAEConfig

    config_class, model_class = {
        "flow": (FlowConfig, StarFlow), "t5": (T5Config, T5Encoder), "wan": (WanVAEConfig, WanVAE),
        "sd": (SDVAEConfig, SDVAE),
    }[kind]
    config = config_class(**fields)
    assert config.parameter_count() == _count(model_class(config))


def test_released_component_sizes():
    from starflow_mlx.sd_vae import SDVAEConfig
    from starflow_mlx.t5 import T5Config
    from starflow_mlx.wan_vae import WanVAEConfig

    # spec §2: flan-T5-XL encoder, Wan2.2 VAE, SD-VAE
    assert T5Config().parameter_count() == 1_223_527_424
    assert WanVAEConfig().parameter_count() == 704_688_668
    assert SDVAEConfig().parameter_count() == 83_653_863


# ----------------------------------------------------------------------------------------------------------------
# T5 / Wan / SD configs: every field's limits, and absurd sizes refused with the numbers
# ----------------------------------------------------------------------------------------------------------------

COMPONENT_CASES = {
    "t5-vocab-huge": ("t5", {"vocab_size": 10**9}, "T5Config.vocab_size must be an integer in [1, 4194304]"),
    "t5-d_model-float": ("t5", {"d_model": 8.5}, "T5Config.d_model must be an integer in [1, 32768], got 8.5"),
    "t5-d_kv-zero": ("t5", {"d_kv": 0}, "T5Config.d_kv must be an integer in [1, 1024], got 0"),
    "t5-d_ff-string": ("t5", {"d_ff": "5120"}, "T5Config.d_ff must be an integer in [1, 524288], got '5120'"),
    "t5-layers-huge": ("t5", {"num_layers": 100000}, "T5Config.num_layers must be an integer in [1, 256]"),
    "t5-heads-negative": ("t5", {"num_heads": -32}, "T5Config.num_heads must be an integer in [1, 1024], got -32"),
    "t5-buckets-odd": ("t5", {"relative_attention_num_buckets": 33},
                       "T5Config.relative_attention_num_buckets must be an integer multiple of 2 in [4, 1024]"),
    "t5-distance": ("t5", {"relative_attention_max_distance": 8},
                    "relative_attention_max_distance (8) must exceed relative_attention_num_buckets // 4 (8)"),
    "t5-eps-nan": ("t5", {"layer_norm_epsilon": float("nan")},
                   "T5Config.layer_norm_epsilon must be a finite number in (0, 0.1], got nan"),
    "t5-eps-zero": ("t5", {"layer_norm_epsilon": 0}, "T5Config.layer_norm_epsilon must be a finite number in (0, 0.1]"),
    "t5-ffn": ("t5", {"feed_forward_proj": "swiglu"}, "T5Config.feed_forward_proj must be one of 'relu'"),
    "t5-over-cap": ("t5", {"d_model": 32768, "d_ff": 524288, "num_layers": 256, "num_heads": 512},
                    "T5Config describes a model of 14,294,720,757,760 parameters"),
    "wan-base-huge": ("wan", {"base_dim": 10**6}, "WanVAEConfig.base_dim must be an integer in [1, 4096]"),
    "wan-dim_mult-entry": ("wan", {"dim_mult": [1, 2, 0, 4]}, "WanVAEConfig.dim_mult[2] must be an integer in [1, 64]"),
    "wan-dim_mult-scalar": ("wan", {"dim_mult": 4}, "WanVAEConfig.dim_mult must be a list of 1 to 8 entries"),
    "wan-res-blocks": ("wan", {"num_res_blocks": 0}, "WanVAEConfig.num_res_blocks must be an integer in [1, 32]"),
    "wan-temporal-type": ("wan", {"temporal_downsample": [0, 1, 1]},
                          "WanVAEConfig.temporal_downsample[0] must be true or false, got 0"),
    "wan-temporal-length": ("wan", {"temporal_downsample": [True]}, "temporal_downsample has 1 entries"),
    "wan-patch": ("wan", {"patch_size": 0}, "WanVAEConfig.patch_size must be an integer in [1, 16], got 0"),
    "wan-image-channels": ("wan", {"image_channels": 1000}, "WanVAEConfig.image_channels must be an integer in [1, 64]"),
    "wan-std-zero": ("wan", {"latents_std": [0.0] * 48},
                     "WanVAEConfig.latents_std[0] must be a finite number in (0, 1000], got 0.0"),
    "wan-mean-inf": ("wan", {"latents_mean": [float("inf")] * 48},
                     "WanVAEConfig.latents_mean[0] must be a finite number in [-1000, 1000], got inf"),
    "wan-mean-length": ("wan", {"latents_mean": [0.0] * 47}, "latents_mean has 47 values, expected z_dim = 48"),
    "wan-scale": ("wan", {"temporal_scale": -0.6}, "WanVAEConfig.temporal_scale must be a finite number in (0, 10]"),
    "wan-over-cap": ("wan", {"base_dim": 4096, "decoder_base_dim": 4096, "dim_mult": [1, 2, 4, 8]},
                     "WanVAEConfig describes a model of"),
    "sd-width-huge": ("sd", {"block_out_channels": [10**6]}, "SDVAEConfig.block_out_channels[0] must be an integer"),
    "sd-widths-empty": ("sd", {"block_out_channels": []}, "SDVAEConfig.block_out_channels must be a list of 1 to 8"),
    "sd-groups": ("sd", {"norm_num_groups": 0}, "SDVAEConfig.norm_num_groups must be an integer in [1, 1024], got 0"),
    "sd-groups-divide": ("sd", {"norm_num_groups": 3}, "every width must be a multiple of norm_num_groups 3"),
    "sd-channels": ("sd", {"in_channels": 3.0}, "SDVAEConfig.in_channels must be an integer in [1, 64], got 3.0"),
    "sd-latent": ("sd", {"latent_channels": 100000}, "SDVAEConfig.latent_channels must be an integer in [1, 256]"),
    "sd-layers": ("sd", {"layers_per_block": -2}, "SDVAEConfig.layers_per_block must be an integer in [1, 32]"),
    "sd-scaling-zero": ("sd", {"scaling_factor": 0}, "SDVAEConfig.scaling_factor must be a finite number in (0, 100]"),
    "sd-shift-nan": ("sd", {"shift_factor": float("nan")}, "SDVAEConfig.shift_factor must be a finite number"),
    "sd-bool": ("sd", {"use_quant_conv": 1}, "SDVAEConfig.use_quant_conv must be true or false, got 1"),
    "sd-over-cap": ("sd", {"block_out_channels": [4096] * 8, "layers_per_block": 32},
                    "SDVAEConfig describes a model of"),
    "flow-over-cap": ("flow", {"channels": 32768, "layers_per_block": [256] * 64, "top_block_channels": None},
                      "FlowConfig describes a model of 211,"),
}


def _component(kind: str):
    from starflow_mlx.sd_vae import SDVAEConfig
    from starflow_mlx.t5 import T5Config
    from starflow_mlx.wan_vae import WanVAEConfig

    return {"t5": (T5Config, {}), "wan": (WanVAEConfig, {}), "sd": (SDVAEConfig, {}), "flow": (FlowConfig, BASE_FIELDS)}[
        kind
    ]


@pytest.mark.parametrize("kind, change, expected", list(COMPONENT_CASES.values()), ids=list(COMPONENT_CASES))
def test_component_config_refused(kind, change, expected):
    config_class, base = _component(kind)
    message = refusal(lambda: config_class.from_dict({**base, **change}, source="m/config.json"))
    assert message.startswith("m/config.json: ")
    assert expected in message
    if "describes a model of" in expected:  # the size cap: the count, the bytes and the limit
        assert re.search(r"of [0-9,]+ parameters \([0-9,.]+ GB in float32\), over the limit of [0-9,]+ \(about 10x",
                         message), message


@pytest.mark.parametrize(
    "key, block, expected",
    [
        pytest.param("quantization", "4-bit", "quantization: expected a mapping of quantization config fields", id="q-str"),
        pytest.param("quantization", {"group_size": 64, "bits": 7}, "Quantization.bits must be one of 2, 3, 4, 5, 6, 8",
                     id="q-bits"),
        pytest.param("quantization", {"group_size": 63, "bits": 4}, "Quantization.group_size must be one of 32, 64",
                     id="q-group"),
        pytest.param("quantization", {"bits": 4}, "missing quantization config field(s): group_size", id="q-missing"),
        pytest.param("tokenizer", {"extra_ids": -1}, "TokenizerFiles.extra_ids must be an integer", id="tok-ids"),
        pytest.param("tokenizer", {"files": ["../../.ssh/id_rsa"]}, "TokenizerFiles.files[0] must be a file name",
                     id="tok-traversal"),
    ],
)
def test_folder_metadata_refused(key, block, expected):
    from starflow_mlx.t5 import T5Config

    message = refusal(lambda: T5Config.from_dict({"model_type": "t5", key: block}, source="m/config.json"))
    assert message.startswith(f"m/config.json: {key}: ")
    assert expected in message


def test_folder_metadata_accepted():
    from starflow_mlx.t5 import T5Config

    blocks = {"quantization": {"group_size": 64, "bits": 4}, "tokenizer": {"extra_ids": 100, "files": ["spiece.model"]}}
    assert T5Config.from_dict({"model_type": "t5", "d_model": 8, **blocks}).d_model == 8
    assert Quantization(**blocks["quantization"]).bits == 4
    assert TokenizerFiles(**blocks["tokenizer"]).files == ["spiece.model"]


# ----------------------------------------------------------------------------------------------------------------
# JSON files: one reader for every config.json and index
# ----------------------------------------------------------------------------------------------------------------

JSON_REFUSED = {
    "nan": (b'{"d_model": NaN}', "NaN is not allowed (only finite numbers)"),
    "infinity": (b'{"d_model": Infinity}', "Infinity is not allowed"),
    "minus-infinity": (b'{"a": [-Infinity]}', "-Infinity is not allowed"),
    "overflow": (b'{"d_model": 1e999}', "1e999 is not a finite number"),
    "huge-int": (b'{"d_model": ' + b"9" * 5000 + b"}", "invalid JSON: Exceeds the limit"),
    "deep": (b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}", "JSON nested deeper than 32 levels"),
    "deep-40": (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "JSON nested deeper than 32 levels"),
    "list": (b"[1, 2]", "expected a JSON object {...}, got a list"),
    "string": (b'"config"', "expected a JSON object {...}, got a str"),
    "null": (b"null", "expected a JSON object {...}, got a NoneType"),
    "truncated": (b'{"d_model": 8', "invalid JSON: Expecting ',' delimiter"),
    "empty": (b"", "invalid JSON: Expecting value: line 1 column 1"),
    "not-utf8": (b'{"name": "\xff"}', "not UTF-8 text (byte 0xff at offset 10)"),
    "too-large": (b'{"a": "' + b"x" * MAX_JSON_BYTES + b'"}', "larger than the 1,048,576-byte limit"),
}


@pytest.mark.parametrize("data, expected", list(JSON_REFUSED.values()), ids=list(JSON_REFUSED))
def test_json_refused(data, expected, tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(data)
    message = refusal(lambda: read_json_object(path))
    assert message.startswith(f"{path}: ") and expected in message


def test_json_directory_and_missing(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ValueError, match="config.json: is a folder, expected a file"):
        read_json_object(tmp_path / "config.json")
    with pytest.raises(ValueError, match="other.json: no such file"):
        read_json_object(tmp_path / "other.json")


# ----------------------------------------------------------------------------------------------------------------
# The converters: configs refused before any weight is read or any model built, nothing written
# ----------------------------------------------------------------------------------------------------------------

T5_CONFIG = {"model_type": "t5", "vocab_size": 64, "d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 2,
             "num_heads": 4, "feed_forward_proj": "gated-gelu"}
WAN_CONFIG = {"_class_name": "AutoencoderKLWan", "is_residual": True, "patch_size": 2, "in_channels": 12,
              "out_channels": 12, "base_dim": 16, "decoder_base_dim": 24, "z_dim": 48, "dim_mult": [1, 2, 4, 4],
              "num_res_blocks": 2, "temperal_downsample": [False, True, True]}
SD_CONFIG = {"act_fn": "silu", "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
             "latent_channels": 4}


@pytest.fixture
def nothing_read(monkeypatch):
    """Fail the test if a converter reads a checkpoint or a weights file, or builds a model."""
    import mlx.core as mx

    from starflow_mlx.convert import flow, sd_vae, t5, wan_vae
    from starflow_mlx import weights

    def refuse(*args, **kwargs):
        raise AssertionError(f"weights read or model built before the config was checked: {args}")

    for module, names in ((flow, ("read_state_dict", "StarFlow")), (t5, ("read_state_dict", "T5Encoder")),
                          (wan_vae, ("read_state_dict", "WanVAE")), (sd_vae, ("read_state_dict", "SDVAE"))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(weights.mx, "load", refuse)
    return mx


def _source(kind: str, tmp_path: Path, config: dict | str) -> list[str]:
    """A source folder (or files) for ``convert <kind>`` whose config is ``config``; the weights are never read."""
    src = tmp_path / "src"
    src.mkdir()
    if kind == "flow":
        (src / "config.yaml").write_text(config)
        (src / "model.pth").write_bytes(b"never read")
        return [str(src / "model.pth"), str(src / "config.yaml")]
    (src / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    weights = {"t5": "model.safetensors", "wan-vae": "diffusion_pytorch_model.safetensors",
               "sd-vae": "diffusion_pytorch_model.safetensors"}[kind]
    (src / weights).write_bytes(b"never read")
    return [str(src)]


CONVERTER_CASES = {
    "flow-blocks-huge": ("flow", with_line("blocks", "1000000000000"), "blocks must be an integer in [1, 64]"),
    "flow-lpb-huge": ("flow", with_line("layers_per_block", "[100000]"), "layers_per_block[0] must be an integer"),
    "flow-channels-huge": ("flow", with_line("channels", "1000000000"), "channels must be an integer in [1, 32768]"),
    "flow-over-cap": ("flow", with_line("channels", "32768", with_line("layers_per_block", "256 256 256")),
                      "FlowConfig describes a model of"),
    "flow-alias": ("flow", with_line("extra", "&x [1]\n- more: *x"), "anchors and aliases"),
    "t5-vocab-huge": ("t5", {**T5_CONFIG, "vocab_size": 10**9}, "T5Config.vocab_size must be an integer"),
    "t5-nan": ("t5", json.dumps(T5_CONFIG).replace('"d_model": 16', '"d_model": NaN'), "NaN is not allowed"),
    "t5-missing": ("t5", {k: v for k, v in T5_CONFIG.items() if k != "d_ff"}, "missing T5 config field(s) d_ff"),
    "t5-model-type": ("t5", {**T5_CONFIG, "model_type": ["t5"]}, "model_type ['t5'] is not a T5 model"),
    "t5-name-or-path": ("t5", {**T5_CONFIG, "_name_or_path": "x" * 5000}, "_name_or_path must be a string"),
    "t5-list": ("t5", "[1]", "expected a JSON object {...}, got a list"),
    "wan-base-huge": ("wan-vae", {**WAN_CONFIG, "base_dim": 10**6}, "WanVAEConfig.base_dim must be an integer"),
    "wan-patch-string": ("wan-vae", {**WAN_CONFIG, "patch_size": "2"}, "patch_size must be an integer in [1, 16]"),
    "wan-channels-string": ("wan-vae", {**WAN_CONFIG, "in_channels": "12"}, "in_channels must be an integer"),
    "wan-mean-scalar": ("wan-vae", {**WAN_CONFIG, "latents_mean": 5, "latents_std": [1.0] * 48},
                        "WanVAEConfig.latents_mean must be a list"),
    "wan-residual": ("wan-vae", {**WAN_CONFIG, "is_residual": "false"}, "is_residual is not true"),
    "wan-over-cap": ("wan-vae", {**WAN_CONFIG, "base_dim": 4096, "decoder_base_dim": 4096, "dim_mult": [1, 2, 4, 8]},
                     "WanVAEConfig describes a model of"),
    "sd-width-huge": ("sd-vae", {**SD_CONFIG, "block_out_channels": [10**6]}, "block_out_channels[0] must be"),
    "sd-widths-scalar": ("sd-vae", {**SD_CONFIG, "block_out_channels": 8}, "block_out_channels must be a list"),
    "sd-block-types": ("sd-vae", {**SD_CONFIG, "down_block_types": 5}, "down_block_types 5 is not supported"),
    "sd-act": ("sd-vae", {**SD_CONFIG, "act_fn": "gelu"}, "act_fn 'gelu' is not supported"),
    "sd-class-wan": ("sd-vae", WAN_CONFIG, "_class_name is 'AutoencoderKLWan', not 'AutoencoderKL': not the config "
                                           "of an SD VAE (for a pipeline, pass its vae/ folder)"),
    "sd-class-pipeline": ("sd-vae", {**SD_CONFIG, "_class_name": "StableDiffusionPipeline"},
                          "_class_name is 'StableDiffusionPipeline', not 'AutoencoderKL'"),
    "sd-class-long": ("sd-vae", {**SD_CONFIG, "_class_name": "x" * 100_000}, "_class_name is 'xxxxx"),
    "sd-over-cap": ("sd-vae", {**SD_CONFIG, "block_out_channels": [4096] * 8, "layers_per_block": 32,
                               "norm_num_groups": 32}, "SDVAEConfig describes a model of"),
}


@pytest.mark.parametrize("kind, config, expected", list(CONVERTER_CASES.values()), ids=list(CONVERTER_CASES))
def test_converter_refuses_config_before_reading_weights(kind, config, expected, tmp_path, nothing_read, caplog):
    from starflow_mlx.cli import main

    argv = _source(kind, tmp_path, config)
    out = tmp_path / "out"
    assert main(["convert", kind, *argv, str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and len(errors[0]) < 1000, errors[0][:2000]
    assert errors[0].startswith(f"error: {tmp_path / 'src'}") and expected in errors[0], errors[0]
    assert "Traceback" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no hidden temporary folder


@pytest.mark.parametrize("z_dim", [16, 32])
def test_wan_checkpoint_of_another_z_dim_gets_advice_the_user_can_follow(z_dim, tmp_path, caplog):
    """The original Wan .pth carries no latent statistics; for another z_dim the error names what the user can
    do (the CLI has no option for them)."""
    torch = pytest.importorskip("torch")
    from starflow_mlx.cli import main

    path = tmp_path / "Wan_VAE.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(16, 12, 3, 3, 3), "decoder.head.2.weight": torch.zeros(12, 24, 3, 3, 3),
                "conv2.weight": torch.zeros(z_dim, z_dim, 1, 1, 1)}, path)
    assert main(["convert", "wan-vae", str(path), str(tmp_path / "out")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"error: {path}: z_dim is {z_dim}, not Wan2.2's 48, so the built-in latent mean/std do not apply; convert "
        "this VAE's diffusers folder instead (its config.json holds them), or pass latents_mean and latents_std to "
        "starflow_mlx.convert.wan_vae.convert_wan_vae from Python"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Wan_VAE.pth"]


# ----------------------------------------------------------------------------------------------------------------
# Shard indexes: plain file names inside the folder, through every reader of an index
# ----------------------------------------------------------------------------------------------------------------

INDEX_CASES = {
    "parent": ("../../etc/passwd.safetensors", "is not a plain .safetensors file name"),
    "absolute": ("/etc/passwd.safetensors", "is not a plain .safetensors file name"),
    "subfolder": ("sub/model.safetensors", "is not a plain .safetensors file name"),
    "backslash": ("..\\model.safetensors", "is not a plain .safetensors file name"),
    "nul": ("model\0.safetensors", "is not a plain .safetensors file name"),
    "dotdot": ("..", "is not a plain .safetensors file name"),
    "empty": ("", "is not a plain .safetensors file name"),
    "too-long": ("m" * 300 + ".safetensors", "is not a plain .safetensors file name"),
    "suffix": ("passwd", "shard 'passwd' is not a plain .safetensors file name"),
    "missing": ("model-2.safetensors", "names the shard model-2.safetensors, which is missing"),
    "symlink-out": ("link.safetensors", "shard link.safetensors links to"),
    "not-a-name": (7, "weight_map['w'] must be a shard file name, got 7"),
    "map-list": ([["w", "model.safetensors"]], "weight_map must be a non-empty mapping"),
    "map-empty": ({}, "weight_map must be a non-empty mapping"),
}


def _write_index(folder: Path, index_name: str, shard, outside: Path) -> Path:
    """An index naming ``shard`` for one weight, next to a real shard and a link to a file outside the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    outside.write_bytes(b"private data outside the folder")
    suffix = Path(index_name.removesuffix(".index.json")).suffix
    (folder / f"model{suffix}").write_bytes(b"x")
    (folder / f"link{suffix}").symlink_to(outside)
    if isinstance(shard, str):
        shard = shard.replace(".safetensors", suffix) if suffix != ".safetensors" else shard
        weight_map = {"w": shard}
    else:
        weight_map = shard if isinstance(shard, (list, dict)) else {"w": shard}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder / index_name


@pytest.mark.parametrize("shard, expected", list(INDEX_CASES.values()), ids=list(INDEX_CASES))
def test_shard_index_refused(shard, expected, tmp_path):
    from starflow_mlx.checkpoint import CheckpointError
    from starflow_mlx.weights import shard_files

    index = _write_index(tmp_path / "m", "model.safetensors.index.json", shard, tmp_path / "secret.safetensors")
    message = refusal(lambda: shard_files(index), CheckpointError)
    assert message.startswith(f"{index}: ") and expected in message


@pytest.mark.parametrize(
    "reader, shard",
    [
        pytest.param(reader, shard, id=f"{reader}-{case}")
        for reader in ("read_model_folder", "t5", "t5-bin", "wan-vae")
        for case, shard in (("parent", "../secret.safetensors"), ("absolute", "ABSOLUTE"), ("symlink", "link.safetensors"))
    ],
)
def test_index_traversal_through_every_reader(reader, shard, tmp_path, nothing_read, caplog):
    """Each reader of an index refuses a shard outside its folder, reading nothing and writing nothing."""
    from starflow_mlx.checkpoint import CheckpointError
    from starflow_mlx.cli import main
    from starflow_mlx.weights import read_model_folder

    src, secret = tmp_path / "src", tmp_path / "secret.safetensors"
    index_name = {"read_model_folder": "model.safetensors.index.json", "t5": "model.safetensors.index.json",
                  "t5-bin": "pytorch_model.bin.index.json",
                  "wan-vae": "diffusion_pytorch_model.safetensors.index.json"}[reader]
    suffix = ".bin" if reader == "t5-bin" else ".safetensors"
    shard = str(secret.with_suffix(suffix)) if shard == "ABSOLUTE" else shard.replace(".safetensors", suffix)
    index = _write_index(src, index_name, {"encoder.w": shard}, secret.with_suffix(suffix))
    if reader == "read_model_folder":
        message = refusal(lambda: read_model_folder(src), CheckpointError)
    else:
        (src / "config.json").write_text(json.dumps(T5_CONFIG if reader.startswith("t5") else WAN_CONFIG))
        kind = "t5" if reader.startswith("t5") else reader
        assert main(["convert", kind, str(src), str(tmp_path / "out")]) == 2
        [message] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert "Traceback" not in caplog.text and "\n" not in message
    assert message.removeprefix("error: ").startswith(f"{index}: ")
    assert "not a plain" in message or "links to" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", secret.with_suffix(suffix).name])


def test_hugging_face_cache_links_are_followed(tmp_path):
    """In the Hugging Face cache, snapshots/<revision>/ holds links into ../../blobs: those are the model's own."""
    from starflow_mlx.weights import shard_files

    blobs, snapshot = tmp_path / "models--t5" / "blobs", tmp_path / "models--t5" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i in (1, 2):
        (blobs / f"sha{i}").write_bytes(b"x")
        (snapshot / f"model-0000{i}-of-00002.safetensors").symlink_to(f"../../blobs/sha{i}")
    weight_map = {"encoder.a": "model-00001-of-00002.safetensors", "decoder.b": "model-00002-of-00002.safetensors"}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    index = snapshot / "model.safetensors.index.json"
    assert shard_files(index) == [snapshot / "model-00001-of-00002.safetensors",
                                  snapshot / "model-00002-of-00002.safetensors"]
    assert shard_files(index, keep=lambda key: key.startswith("encoder.")) == [
        snapshot / "model-00001-of-00002.safetensors"
    ]


# ----------------------------------------------------------------------------------------------------------------
# Memory bombs through the command line, in a subprocess under resource limits
# ----------------------------------------------------------------------------------------------------------------

ALIAS_BOMB = "\n".join(
    ["- lol0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"- lol{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
)

BOMBS = {
    "alias-bomb": ("flow", BASE_YAML + ALIAS_BOMB + "\n", "anchors and aliases (& and *) are not allowed"),
    "nesting-bomb": ("flow", BASE_YAML + "- deep: " + "[" * 20000 + "]" * 20000 + "\n", "nested deeper than 16"),
    "blocks-bomb": ("flow", with_line("blocks", "1000000000000", with_line("layers_per_block", "1")),
                    "blocks must be an integer in [1, 64]"),
    "width-bomb": ("flow", with_line("channels", "1000000000"), "channels must be an integer in [1, 32768]"),
    "vocab-bomb": ("t5", {**T5_CONFIG, "vocab_size": 10**12}, "T5Config.vocab_size must be an integer"),
    "json-nesting-bomb": ("t5", '{"a": ' + "[" * 500000 + "]" * 500000 + "}", "JSON nested deeper than 32 levels"),
}

CLI = """
import sys
from starflow_mlx.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kind, config, expected", list(BOMBS.values()), ids=list(BOMBS))
def test_bomb_fails_fast_in_bounded_memory(kind, config, expected, tmp_path):
    argv = _source(kind, tmp_path, config)
    out = tmp_path / "out"
    result = run_bounded(CLI, "convert", kind, *argv, out, cpu=30, timeout=60,
                         imports=("starflow_mlx.cli", "starflow_mlx.config"))
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"error: {tmp_path / 'src'}") and expected in lines[0], lines[0]
    assert result.peak_rss_kib < 256 << 10  # peak RSS in KiB (about 40 MiB here): imports, nothing expanded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
