"""T5 tokenizer (against Hugging Face tokenizers built from the same tiny SentencePiece model) and prompt templates."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")

import mlx.core as mx  # noqa: E402

from starflow_mlx import prompts  # noqa: E402
from starflow_mlx.tokenizer import T5Tokenizer  # noqa: E402

EXTRA_IDS = 5
TXT_SIZE = 16

# Strings where the fast and slow pipelines can part ways: newlines, runs of blanks, leading/trailing whitespace,
# NFKC-changed characters, characters outside the tiny vocabulary, literal special tokens, over-long text.
PROMPTS = [
    "",
    "\n",
    "   ",
    "a cat on a mat",
    "a cat on a mat\n",
    "  leading and trailing  \t",
    "multiple    spaces\tand\ttabs\r\nand windows newlines",
    "line one\n\nline two\n\n\n",
    "café naïve über Ｆｕｌｌｗｉｄｔｈ ﬁ ① ½ e\u0301 東京 \U0001F600 {braces} ~tilde",
    "non\u00a0breaking\u3000ideographic\u2009thin\u200bzero-width",
    "a </s> b <pad> c <unk> d <extra_id_0> e <extra_id_4>",
    "\u2581already\u2581marked",
    "ka lo mi ne " * 20,  # far longer than TXT_SIZE: truncated
    prompts.t2v_prompt("A red car drives through a city at night."),
    prompts.unconditional_prompt(fps=16, noise_std=0.5, aspect_ratio="16:9"),
    prompts.format_prompt("An owl.", fps=0),
]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    rng = np.random.default_rng(0)
    syllables = "ka lo mi ne ru sa to vi be da fe gu ho ji ku la mo ni pe qu ri se tu vo we xi yo zu".split()
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]
    words += "a video with fps image noise level in aspect ratio cat mat red car city night café naïve".split()
    lines = [
        " ".join(rng.choice(words, size=rng.integers(3, 12)))
        + rng.choice([".", ",", ":", "!"])
        + f" {rng.integers(0, 99)}"
        for _ in range(400)
    ]
    model = io.BytesIO()
    # T5 conventions: <pad>=0, </s>=1, <unk>=2, no <s>; default nmt_nfkc normalization like the T5 vocabulary.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("spiece")
    (folder / "spiece.model").write_bytes(model.getvalue())
    tokenizer_config = {"extra_ids": EXTRA_IDS, "tokenizer_class": "T5Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def _hub_fast_tokenizer(folder):
    """transformers' fast T5 tokenizer with the pipeline of the flan-T5 hub tokenizer.json.

    That file (written by the SentencePiece converter of transformers >= 4.3) is: Precompiled charsmap, then
    Replace(" {2,}" -> " "), then Metaspace(▁, add_prefix_space) without a whitespace split, Unigram, "$A </s>".
    transformers 4.x loads it verbatim, which is what STARFlow ran.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    data = (folder / "spiece.model").read_bytes()
    proto = model_pb2.ModelProto.FromString(data)
    vocab = [(p.piece, p.score) for p in proto.pieces]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(EXTRA_IDS - 1, -1, -1)]
    tok = Tokenizer(Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    specials = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    fast = transformers.T5TokenizerFast(tokenizer_object=tok, extra_ids=EXTRA_IDS)
    assert "WhitespaceSplit" not in str(fast.backend_tokenizer.pre_tokenizer)  # the pipeline was kept as built
    return fast


def _hf_batch(tok, texts):
    enc = tok(texts, padding="max_length", truncation=True, max_length=TXT_SIZE)
    return np.array(enc["input_ids"]), np.array(enc["attention_mask"])


def test_official_mode_matches_fast_tokenizer(spiece):
    fast = _hub_fast_tokenizer(spiece)
    ours = T5Tokenizer.from_folder(spiece)
    ids, mask = ours(PROMPTS, TXT_SIZE)
    assert ids.dtype == mx.int32 and mask.dtype == mx.int32 and ids.shape == (len(PROMPTS), TXT_SIZE)
    ref_ids, ref_mask = _hf_batch(fast, PROMPTS)
    for row, text in enumerate(PROMPTS):
        assert np.array(ids[row]).tolist() == ref_ids[row].tolist(), repr(text)
    np.testing.assert_array_equal(np.array(mask), ref_mask)
    # Without truncation too (the T2V prompts are longer than TXT_SIZE here).
    for text in PROMPTS:
        assert ours.encode(text) + [1] == fast(text)["input_ids"], repr(text)


def test_sentencepiece_mode_matches_slow_tokenizer(spiece):
    """transformers' ``T5Tokenizer`` from spiece.model alone: the SentencePiece-backed slow class in 4.x, in 5.x a
    tokenizers pipeline with a whitespace split; both tokenize like SentencePiece itself."""
    slow = transformers.T5Tokenizer.from_pretrained(spiece)
    ours = T5Tokenizer.from_folder(spiece, mode="sentencepiece")
    ids, mask = ours(PROMPTS, TXT_SIZE)
    ref_ids, ref_mask = _hf_batch(slow, PROMPTS)
    np.testing.assert_array_equal(np.array(ids), ref_ids)
    np.testing.assert_array_equal(np.array(mask), ref_mask)
    sp = spm.SentencePieceProcessor(model_file=str(spiece / "spiece.model"))
    assert ours.encode("multiple    spaces\n") == sp.encode("multiple    spaces\n")


def test_random_strings_match(spiece):
    fast, slow = _hub_fast_tokenizer(spiece), transformers.T5Tokenizer.from_pretrained(spiece)
    official, plain = T5Tokenizer.from_folder(spiece), T5Tokenizer.from_folder(spiece, mode="sentencepiece")
    pool = list("abcdeklmno ") + [
        "ka", "lo", "cat", " ", "  ", "\n", "\n\n", "\t", "\r", "\u3000", "\u00a0", "\u200b", "\x00",
        "café", "e\u0301", "ﬁ", "①", "½", "東京", "\U0001F600", "!", ".", ":", "16:9", "{", "\u2581",
        "</s>", "<pad>", "<unk>", "<extra_id_2>",
    ]
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 14)))
        assert official.encode(text) + [1] == fast(text)["input_ids"], repr(text)
        assert plain.encode(text) + [1] == slow(text)["input_ids"], repr(text)


def test_newline_and_trailing_whitespace(spiece):
    """The documented difference: the fast (official) tokenizer maps "\\n" to a space like SentencePiece, collapses
    runs of blanks, but keeps one trailing space as a lone "▁" token; SentencePiece drops it."""
    official, plain = T5Tokenizer.from_folder(spiece), T5Tokenizer.from_folder(spiece, mode="sentencepiece")
    space = official.sp.piece_to_id("\u2581")
    assert official.space_id == space != official.unk_id
    assert official.encode("a cat\n") == plain.encode("a cat\n") + [space]
    assert official.encode("a cat\n") == official.encode("a cat \n\n\t ")
    assert official.encode("a\ncat") == official.encode("a cat") == official.encode("a \n\t cat")
    assert official.encode("a cat") == plain.encode("a cat")
    assert official.encode("") == plain.encode("") == plain.encode("\n") == []
    assert official.encode("\n") == [space]
    t2v = prompts.t2v_prompt("a cat")
    assert official.encode(t2v)[-1] == space and plain.encode(t2v)[-1] != space


def test_padding_truncation_and_special_ids(spiece):
    tok = T5Tokenizer.from_folder(spiece)
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.vocab_size == 200 + EXTRA_IDS
    assert tok.encode("<extra_id_0>") == [199 + EXTRA_IDS] and tok.encode("<extra_id_4>") == [200]
    ids, mask = tok.encode_batch(["", "ka lo mi ne " * 20], 6)
    assert ids[0].tolist() == [1, 0, 0, 0, 0, 0] and mask[0].tolist() == [1, 0, 0, 0, 0, 0]
    assert ids[1, -1] == 1 and mask[1].tolist() == [1] * 6  # truncated to 5 tokens, then </s>
    assert ids[1, :5].tolist() == tok.encode("ka lo mi ne " * 20)[:5]
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_batch(["a"], 0)
    with pytest.raises(ValueError, match="mode"):
        T5Tokenizer(spiece / "spiece.model", mode="fast")


# ---------------------------------------------------------------------------------------------------------------
# Prompt templates (spec §6)


def test_t2v_templates_exact():
    assert prompts.unconditional_prompt(fps=16, noise_std=0.5, aspect_ratio="16:9") == (
        "Noise Level 500:\nA video with 16 fps:\n\n\n in a 16:9 aspect ratio.\n"
    )
    assert prompts.t2v_prompt("") == prompts.unconditional_prompt(fps=16, noise_std=0.5, aspect_ratio="16:9")
    assert prompts.t2v_prompt("A dog runs.") == (
        "Noise Level 500:\nA video with 16 fps:\nA dog runs.\n\n in a 16:9 aspect ratio.\n"
    )
    assert prompts.t2v_prompt("x", aspect_ratio=None) == "Noise Level 500:\nA video with 16 fps:\nx\n"
    assert prompts.format_prompt("x", fps=0) == "An image:\nx\n"
    assert prompts.format_prompt("x", fps=8, noise_std=0.3) == "Noise Level 300:\nA video with 8 fps:\nx\n"
    assert prompts.format_prompt("x", aspect_ratio="1:1") == "x\n in a 1:1 aspect ratio.\n"
    assert prompts.format_prompt("x", noise_std=0.25, aspect_ratio="9:16") == (
        "Noise Level 250:\nx\n in a 9:16 aspect ratio.\n"
    )


def test_t2i_and_batch_templates():
    assert prompts.t2i_prompt("A photo of an owl.") == "A photo of an owl."
    assert prompts.unconditional_prompt() == ""
    assert prompts.preprocess_text(["a", "b"], fps=[16, 0], noise_std=0.5) == [
        "Noise Level 500:\nA video with 16 fps:\na\n",
        "Noise Level 500:\nAn image:\nb\n",
    ]
    assert prompts.preprocess_text(["a", ""]) == ["a", ""]
    with pytest.raises(ValueError, match="fps"):
        prompts.preprocess_text(["a", "b"], fps=[16])
    with pytest.raises(TypeError):
        prompts.preprocess_text("a")


def test_noise_level_truncates_like_reference():
    assert prompts.noise_level(0.5) == 500 and prompts.noise_level(0.3) == 300
    assert prompts.noise_level(1.001) == 1000  # int() of 1000.9999999999999, as the reference computes it
    assert prompts.noise_level(0.0) == 0


def test_task_prefixes():
    assert prompts.TASK_PREFIXES == {"last": "(last) ", "v2v": "(v2v) ", "extend": "(extend) "}
    assert prompts.add_task_prefix("a dog", "last") == "(last) a dog"
    assert prompts.add_task_prefix("a dog", "v2v") == "(v2v) a dog"
    assert prompts.add_task_prefix("a dog", "last", "extend") == "(extend) (last) a dog"
    templated = prompts.t2v_prompt(prompts.add_task_prefix("c", "extend"))
    assert templated.startswith("Noise Level 500:\nA video with 16 fps:\n(extend) c\n")
    with pytest.raises(ValueError, match="unknown task"):
        prompts.add_task_prefix("a", "i2v")
