"""T5 encoder: converter + MLX model against transformers on tiny random models (CPU, float32)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from starflow_mlx.convert.t5 import convert_t5  # noqa: E402
from starflow_mlx import cli  # noqa: E402
from starflow_mlx.t5 import T5Config, load_t5, relative_position_buckets  # noqa: E402
from starflow_mlx.checkpoint import CheckpointError  # noqa: E402
from starflow_mlx.weights import read_config, sha256_file  # noqa: E402

VOCAB = 203  # 200 SentencePiece pieces + 3 extra ids
EXTRA_IDS = 3
LENGTH = 24  # > max_distance (12) and > 2 * max_exact, so exact, log and capped buckets all occur


def _hf_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=16, relative_attention_max_distance=12, num_decoder_layers=1,
        decoder_start_token_id=0,
    )
    kwargs.update(overrides)
    return transformers.T5Config(**kwargs)


def _perturb_norms(model):
    # Random init leaves every norm weight at 1; move them so a norm that ignores its weight would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _write_tokenizer(folder: Path, spiece: bytes):
    (folder / "spiece.model").write_bytes(spiece)
    (folder / "tokenizer_config.json").write_text(json.dumps({"extra_ids": EXTRA_IDS}))


def train_spiece() -> bytes:
    """A 200-piece SentencePiece model (unigram) trained on random syllables: the tokenizer of the tiny T5s."""
    rng = np.random.default_rng(0)
    syllables = "ka lo mi ne ru sa to vi be da fe gu ho ji ku la mo ni pe qu ri se tu vo we xi yo zu".split()
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))) + f" {rng.integers(0, 999)}." for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def spiece() -> bytes:
    return train_spiece()


@pytest.fixture(scope="module")
def encoder_model():
    torch.manual_seed(0)
    return _perturb_norms(transformers.T5EncoderModel(_hf_config())).eval()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(3, VOCAB, size=(3, LENGTH)).astype(np.int64)
    mask = np.ones((3, LENGTH), dtype=np.int64)
    mask[1, 17:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _reference(hf_encoder, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = hf_encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    return (out * torch.from_numpy(mask)[..., None]).numpy()


def _ours(folder, ids, mask, dtype=None) -> np.ndarray:
    model = load_t5(folder, dtype=dtype)
    out = model.encode(mx.array(ids.astype(np.int32)), mx.array(mask.astype(np.int32)))
    return np.array(out.astype(mx.float32))


def _rel_err(out, ref) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _no_leftovers(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ---------------------------------------------------------------------------------------------------------------


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for buckets, distance in [(32, 128), (16, 12), (8, 20)]:
        relative = torch.arange(-400, 401)[None, :]
        ref = T5Attention._relative_position_bucket(
            relative, bidirectional=True, num_buckets=buckets, max_distance=distance
        )[0].numpy()
        # Query 400 of 401 against keys 0..800 sees key - query = -400..400.
        ours = relative_position_buckets(401, 801, buckets, distance)[400]
        np.testing.assert_array_equal(ours, ref)
    # flan-T5: 16 exact-or-log buckets per direction, later keys offset by 16, everything past 128 in the last one.
    row = relative_position_buckets(1, 300, 32, 128)[0]
    assert row[0] == 0 and row[7] == 16 + 7 and row[8] == 16 + 8 and row[299] == 31


@pytest.mark.parametrize(
    "layout", ["safetensors", "sharded-safetensors", "bin-conditional-generation", "bin-bare-stack"]
)
def test_parity_with_transformers(layout, tmp_path, spiece, encoder_model, batch):
    ids, mask = batch
    src = tmp_path / "hf"
    if layout == "safetensors":
        encoder_model.save_pretrained(src)
        hf_encoder = encoder_model
    elif layout == "sharded-safetensors":
        encoder_model.save_pretrained(src, max_shard_size="40KB")
        assert (src / "model.safetensors.index.json").is_file()
        hf_encoder = encoder_model
    else:
        torch.manual_seed(1)
        full = _perturb_norms(transformers.T5ForConditionalGeneration(_hf_config())).eval()
        src.mkdir()
        full.config.to_json_file(src / "config.json")
        state = full.state_dict() if layout == "bin-conditional-generation" else full.encoder.state_dict()
        if layout == "bin-conditional-generation":
            assert any(k.startswith("decoder.") for k in state) and "shared.weight" in state
        else:
            assert "embed_tokens.weight" in state and not any(k.startswith("encoder.") for k in state)
        torch.save(state, src / "pytorch_model.bin")
        hf_encoder = full.encoder
    _write_tokenizer(src, spiece)

    out = convert_t5(src, tmp_path / "mlx")
    config = read_config(out)
    assert config["model_type"] == "t5" and config["converter_version"] == "1"
    assert config["d_model"] == 64 and config["feed_forward_proj"] == "gated-gelu" and config["num_layers"] == 2
    for name, digest in config["source"]["files"].items():
        assert digest == sha256_file(src / name)
    assert (out / "spiece.model").read_bytes() == spiece

    ref = _reference(hf_encoder, ids, mask)
    got = _ours(out, ids, mask)
    assert got.shape == ref.shape == (3, LENGTH, 64)
    print(f"\nT5 parity [{layout}]: max abs err {np.abs(got - ref).max():.2e}, rel {_rel_err(got, ref):.2e}")
    assert _rel_err(got, ref) <= 1e-4, f"max abs err {np.abs(got - ref).max():.3g} vs scale {np.abs(ref).max():.3g}"
    assert np.all(got[1, 17:] == 0) and np.all(got[2, 5:] == 0)
    assert np.all(np.abs(got[2, :5]).sum(-1) > 0)


def test_padding_does_not_leak(tmp_path, spiece, encoder_model, batch):
    """A short prompt gives the same vectors alone and inside a padded batch (padded keys are really masked)."""
    ids, mask = batch
    encoder_model.save_pretrained(tmp_path / "hf")
    _write_tokenizer(tmp_path / "hf", spiece)
    model = load_t5(convert_t5(tmp_path / "hf", tmp_path / "mlx"))
    padded = np.array(model.encode(mx.array(ids[2:3].astype(np.int32)), mx.array(mask[2:3].astype(np.int32))))
    alone = np.array(model.encode(mx.array(ids[2:3, :5].astype(np.int32)), mx.array(mask[2:3, :5].astype(np.int32))))
    np.testing.assert_allclose(padded[:, :5], alone, atol=1e-5 * np.abs(alone).max())


def test_bfloat16_and_8bit(tmp_path, spiece, encoder_model, batch):
    ids, mask = batch
    src = tmp_path / "hf"
    encoder_model.save_pretrained(src)
    _write_tokenizer(src, spiece)
    ref = _reference(encoder_model, ids, mask)

    bf16 = convert_t5(src, tmp_path / "bf16", dtype="bfloat16")
    assert read_config(bf16)["dtype"] == "bfloat16"
    model = load_t5(bf16)
    assert model.layers[0].attention.q.weight.dtype == mx.bfloat16
    out = model.encode(mx.array(ids.astype(np.int32)), mx.array(mask.astype(np.int32)))
    assert out.dtype == mx.float32  # computed in bfloat16, handed on in float32
    bf16_err = _rel_err(np.array(out), ref)
    assert bf16_err < 5e-2
    # it really computes in bfloat16: the float32 model with the same bf16-rounded weights gives other values
    rounded = load_t5(bf16, dtype=mx.float32)
    assert rounded.layers[0].attention.q.weight.dtype == mx.float32
    want = rounded.encode(mx.array(ids.astype(np.int32)), mx.array(mask.astype(np.int32)))
    assert 1e-4 < _rel_err(np.array(out), np.array(want)) < 5e-2

    q8 = convert_t5(src, tmp_path / "q8", q_bits=8, q_group_size=32)
    assert read_config(q8)["quantization"] == {"group_size": 32, "bits": 8}
    model = load_t5(q8)
    assert isinstance(model.layers[1].ffn.wo, nn.QuantizedLinear)
    assert isinstance(model.layers[0].attention.q, nn.QuantizedLinear)
    assert not isinstance(model.embed_tokens, nn.QuantizedEmbedding)
    assert model.relative_attention_bias.weight.dtype == mx.float32
    q8_err = _rel_err(_ours(q8, ids, mask), ref)
    print(f"\nT5 tiny: bf16 rel err {bf16_err:.2e}, 8-bit rel err {q8_err:.2e}")
    assert q8_err < 2e-2
    assert q8_err > 0  # it really is quantized

    # 4-bit on a tiny random model is coarse (max error ~0.2 of the output scale); it must run and be worse than 8-bit.
    q4 = convert_t5(src, tmp_path / "q4", q_bits=4, q_group_size=32)
    q4_err = _rel_err(_ours(q4, ids, mask), ref)
    print(f"T5 tiny: 4-bit rel err {q4_err:.2e}")
    assert q8_err < q4_err < 0.5


def test_cli_convert(tmp_path, spiece, encoder_model):
    src = tmp_path / "hf"
    encoder_model.save_pretrained(src)
    _write_tokenizer(src, spiece)
    (src / "tokenizer.json").write_text("{}")
    out = tmp_path / "mlx"
    assert cli.main(["convert", "t5", str(src), str(out), "--dtype", "float16"]) == 0
    assert read_config(out)["dtype"] == "float16"
    assert (out / "tokenizer.json").read_text() == "{}"
    assert load_t5(out).embed_tokens.weight.dtype == mx.float16
    # An existing output folder is refused without --overwrite (exit code 2) and accepted with it.
    assert cli.main(["convert", "t5", str(src), str(out)]) == 2
    assert cli.main(["convert", "t5", str(src), str(out), "--overwrite"]) == 0
    assert read_config(out)["dtype"] == "float32"


def test_config_from_dict_validates():
    assert T5Config.from_dict({"model_type": "t5", "d_model": 8}).d_model == 8
    with pytest.raises(ValueError, match="unknown t5 config field.*unrelated"):
        T5Config.from_dict({"d_model": 8, "unrelated": 1})
    with pytest.raises(ValueError, match="d_model must be an integer"):
        T5Config.from_dict({"d_model": 8.5})
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="swiglu")


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear error, and no output folder (test_converters.py has the cases every converter shares)


@pytest.fixture
def bin_source(tmp_path, spiece, encoder_model):
    src = tmp_path / "hf"
    src.mkdir()
    encoder_model.config.to_json_file(src / "config.json")
    _write_tokenizer(src, spiece)
    return src


def test_shape_mismatch(bin_source, encoder_model, tmp_path):
    torch.save(encoder_model.state_dict(), bin_source / "pytorch_model.bin")
    config = json.loads((bin_source / "config.json").read_text())
    config["d_ff"] = 128
    (bin_source / "config.json").write_text(json.dumps(config))
    message = r"'encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight' has shape \[96, 64\], expected \[128, 64\]"
    with pytest.raises(CheckpointError, match=message):
        convert_t5(bin_source, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_truncated_safetensors(bin_source, encoder_model, tmp_path):
    # (a truncated pytorch_model.bin is one of the cases of test_converters.py)
    encoder_model.save_pretrained(tmp_path / "full")
    data = (tmp_path / "full" / "model.safetensors").read_bytes()
    path = bin_source / "model.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=path.name):
        convert_t5(bin_source, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_missing_files(bin_source, encoder_model, tmp_path):
    with pytest.raises(CheckpointError, match="no weights found"):
        convert_t5(bin_source, tmp_path / "out")
    torch.save(encoder_model.state_dict(), bin_source / "pytorch_model.bin")
    (bin_source / "spiece.model").unlink()
    with pytest.raises(CheckpointError, match="no spiece.model"):
        convert_t5(bin_source, tmp_path / "out")
    shutil.copy(bin_source / "config.json", tmp_path / "config.bak")
    (bin_source / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_t5(bin_source, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_wrong_config(bin_source, encoder_model, tmp_path):
    torch.save(encoder_model.state_dict(), bin_source / "pytorch_model.bin")
    config = json.loads((bin_source / "config.json").read_text())
    (bin_source / "config.json").write_text(json.dumps({**config, "model_type": "umt5"}))
    with pytest.raises(CheckpointError, match="umt5"):
        convert_t5(bin_source, tmp_path / "out")
    del config["num_heads"]
    (bin_source / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_heads"):
        convert_t5(bin_source, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_load_rejects_other_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "flow"}))
    with pytest.raises(CheckpointError, match="model_type is 'flow', expected 't5'"):
        load_t5(tmp_path)


def test_encode_prompts_end_to_end(tmp_path, spiece, encoder_model):
    """Template -> tokenizer from the converted folder -> encoder, against transformers on the same token ids."""
    from starflow_mlx.prompts import t2v_prompt, unconditional_prompt
    from starflow_mlx.t5 import encode_prompts
    from starflow_mlx.tokenizer import T5Tokenizer

    encoder_model.save_pretrained(tmp_path / "hf")
    _write_tokenizer(tmp_path / "hf", spiece)
    out = convert_t5(tmp_path / "hf", tmp_path / "mlx")
    tokenizer = T5Tokenizer.from_folder(out)
    assert tokenizer.vocab_size == VOCAB
    texts = [t2v_prompt("kalo mi ne"), unconditional_prompt(fps=16, noise_std=0.5, aspect_ratio="16:9")]
    got = np.array(encode_prompts(load_t5(out), tokenizer, texts, 64))
    ids, mask = tokenizer.encode_batch(texts, 64)
    assert mask.sum(1).min() < 64  # a padded row
    ref = _reference(encoder_model, ids.astype(np.int64), mask.astype(np.int64))
    assert _rel_err(got, ref) <= 1e-4
