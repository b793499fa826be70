"""The shipped model's text encoder: a SentencePiece vocabulary trained on the caption language and a small T5
(the flan-T5 architecture: gated-GELU, relative position buckets) pretrained on the captions by span corruption,
as T5 was; then frozen, as STARFlow keeps flan-T5 frozen. Writes a Hugging Face T5 folder that
``starflow-mlx convert t5`` (and ``convert pipeline --t5``) reads.

    python -m tests.reference.train_text --out runs/text

Only training captions are used; the held-out captions are new combinations of the same words.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from .shapes import COLOURS, DIRECTIONS, SHAPES, TRAIN_CAPTIONS

EXTRA_IDS = 8  # sentinel tokens for span corruption


def train_tokenizer() -> bytes:
    """A unigram SentencePiece model whose vocabulary is the caption words, plus pieces for the rest of Latin text
    (the characters of ``extra``): a prompt outside the caption language still tokenizes, into short pieces."""
    import sentencepiece as spm

    extra = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-"
    lines = list(TRAIN_CAPTIONS) * 4 + [extra]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=len(extra) + 40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        user_defined_symbols=[*COLOURS, *SHAPES, *DIRECTIONS, "moving"], minloglevel=2,
    )
    return model.getvalue()


def t5_config(vocab_size: int):
    import transformers

    return transformers.T5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=1, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=16, relative_attention_max_distance=32,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )


def span_corruption(ids: list[int], rng: np.random.Generator, sentinel0: int):
    """One masked span: input with the span replaced by a sentinel, target the sentinel then the span."""
    n = len(ids)
    length = int(rng.integers(1, 3))
    start = int(rng.integers(0, max(n - length, 0) + 1))
    source = ids[:start] + [sentinel0] + ids[start + length :] + [1]
    target = [sentinel0] + ids[start : start + length] + [1]
    return source, target


def pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])


def main(argv=None):
    import sentencepiece as spm
    import transformers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    proto = train_tokenizer()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    pieces = sp.get_piece_size()
    model = transformers.T5ForConditionalGeneration(t5_config(pieces + EXTRA_IDS))
    sentinel0 = pieces + EXTRA_IDS - 1  # T5's <extra_id_0> is the last id
    encoded = [sp.encode(c) for c in TRAIN_CAPTIONS]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    start = time.time()
    for step in range(1, args.steps + 1):
        pairs = [span_corruption(encoded[i], rng, sentinel0) for i in rng.integers(0, len(encoded), args.batch)]
        source, target = pad([s for s, _ in pairs]), pad([t for _, t in pairs])
        labels = target.masked_fill(target == 0, -100)
        loss = model(input_ids=source, attention_mask=(source != 0).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    model.eval()
    model.save_pretrained(out)
    (out / "spiece.model").write_bytes(proto)
    (out / "tokenizer_config.json").write_text(json.dumps({"extra_ids": EXTRA_IDS, "model_max_length": 64}))
    print(f"wrote {out}: {pieces} pieces + {EXTRA_IDS} extra ids; training time {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
