"""T5 tokenizer for STARFlow prompts, from ``spiece.model`` with the ``sentencepiece`` package (spec §6).

The official code calls ``AutoTokenizer.from_pretrained("google/flan-t5-xl")(texts, padding="max_length",
truncation=True, max_length=txt_size)``. With the transformers 4.x releases STARFlow was trained with, that is the
*fast* tokenizer built verbatim from the hub's ``tokenizer.json``, whose pipeline is: the SentencePiece character
map (NFKC plus mapping ``\\n``, ``\\t``, ``\\r`` and other blanks to a space), then runs of spaces collapsed to one,
then ``Metaspace`` (each space becomes ``▁``, a ``▁`` is prepended, the text is split before every ``▁``), then
Unigram, then ``</s>`` appended. It agrees with plain SentencePiece (the *slow* ``T5Tokenizer``) except in one
place: **trailing whitespace**. SentencePiece strips it; the fast pipeline keeps one space, which becomes a lone
``▁`` token (id 3 in flan-T5) just before ``</s>``. Every STARFlow-V prompt ends with ``"\\n"`` (spec §6 template),
so the official T2V token sequences end ``..., 3, 1``.

``mode="official"`` (the default) reproduces that fast tokenizer; ``mode="sentencepiece"`` reproduces the slow one,
which is also what transformers 5.x produces (its ``T5Tokenizer`` rebuilds the pipeline with a whitespace split and
drops the trailing ``▁``). Both modes split out the special tokens ``<pad>``, ``</s>``, ``<unk>`` and
``<extra_id_N>`` written literally in a prompt, as the Hugging Face tokenizers do.

Padding and truncation follow the Hugging Face rules: at most ``max_length - 1`` text tokens, then ``</s>``, then
``<pad>`` (0) up to ``max_length``; the attention mask is 1 on text tokens and ``</s>``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from .config import MAX_TOKENIZER_BYTES, check_value, read_file_bytes, read_json_object

SPACE_PIECE = "\u2581"  # ▁, SentencePiece's whitespace marker
MODES = ("official", "sentencepiece")


class T5Tokenizer:
    """SentencePiece T5 tokenizer; ``tok(texts, max_length)`` returns ``(input_ids, attention_mask)`` mx arrays."""

    def __init__(self, spiece: str | os.PathLike | bytes, extra_ids: int = 100, mode: str = "official"):
        import sentencepiece as spm

        if mode not in MODES:
            raise ValueError(f"unknown tokenizer mode {mode!r}; choose one of {', '.join(MODES)}")
        proto = spiece if isinstance(spiece, bytes) else read_file_bytes(spiece, MAX_TOKENIZER_BYTES)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:
            source = "spiece bytes" if isinstance(spiece, bytes) else spiece
            raise ValueError(f"{source}: not a SentencePiece model: {e}") from None
        self.mode = mode
        if mode == "official":
            if not hasattr(spm, "SentencePieceNormalizer"):
                raise ImportError("mode='official' needs sentencepiece >= 0.2.0 (SentencePieceNormalizer)")
            # The model's own character map without SentencePiece's whitespace clean-up: used only to see whether
            # a text ends in whitespace once normalized (all flags passed explicitly: older releases default them).
            self._normalizer = spm.SentencePieceNormalizer(
                model_proto=proto, add_dummy_prefix=False, escape_whitespaces=False, remove_extra_whitespaces=False
            )
        pieces = self.sp.get_piece_size()
        self.unk_id = self.sp.unk_id()
        self.pad_id = self._special_id("<pad>", self.sp.pad_id())
        self.eos_id = self._special_id("</s>", self.sp.eos_id())
        space = self.sp.piece_to_id(SPACE_PIECE)
        self.space_id = space if space < pieces else self.unk_id
        # Hugging Face numbers the T5 sentinels after the SentencePiece pieces, in reverse: <extra_id_0> is last.
        self.special = {"<pad>": self.pad_id, "</s>": self.eos_id, self.sp.id_to_piece(self.unk_id): self.unk_id}
        self.special.update({f"<extra_id_{i}>": pieces + extra_ids - 1 - i for i in range(extra_ids)})
        alternatives = sorted(self.special, key=len, reverse=True)  # longest first = leftmost-longest matching
        self._special_re = re.compile("|".join(re.escape(s) for s in alternatives))
        self.vocab_size = pieces + extra_ids

    def _special_id(self, piece: str, declared: int) -> int:
        if declared >= 0:
            return declared
        found = self.sp.piece_to_id(piece)
        if found == self.sp.unk_id() and piece != self.sp.id_to_piece(self.sp.unk_id()):
            raise ValueError(f"the SentencePiece model has no {piece!r} piece; is it a T5 tokenizer?")
        return found

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, mode: str = "official") -> "T5Tokenizer":
        """From a converted T5 folder (or a Hugging Face one): ``spiece.model`` and the extra-id count."""
        folder = Path(folder)
        spiece = folder / "spiece.model"
        if not spiece.is_file():
            raise ValueError(f"{folder}: no spiece.model (the SentencePiece model of the T5 tokenizer)")
        extra_ids, where = 100, None
        config = folder / "config.json"
        hf_config = folder / "tokenizer_config.json"
        if config.is_file() and isinstance(block := read_json_object(config).get("tokenizer"), dict):
            extra_ids, where = block.get("extra_ids", extra_ids), config
        elif hf_config.is_file():
            extra_ids, where = read_json_object(hf_config).get("extra_ids", extra_ids), hf_config
        check_value(extra_ids, int, f"{where}: extra_ids", {"min": 0, "max": 1 << 16})
        return cls(read_file_bytes(spiece, MAX_TOKENIZER_BYTES), extra_ids=extra_ids, mode=mode)

    def _encode_plain(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        # The fast tokenizer keeps one trailing space (runs are collapsed first) as a lone "▁" word.
        if self.mode == "official" and self._normalizer.normalize(text).endswith(" "):
            ids.append(self.space_id)
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``</s>`` and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"expected a string prompt, got {type(text).__name__}")
        ids, start = [], 0
        for match in self._special_re.finditer(text):
            if match.start() > start:
                ids += self._encode_plain(text[start : match.start()])
            ids.append(self.special[match.group()])
            start = match.end()
        if start < len(text):
            ids += self._encode_plain(text[start:])
        return ids

    def encode_batch(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` as int32 numpy arrays [len(texts), max_length]."""
        if isinstance(texts, str):
            texts = [texts]
        if int(max_length) < 1:
            raise ValueError(f"max_length must be >= 1 (room for </s>), got {max_length}")
        max_length = int(max_length)
        ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(texts), max_length), dtype=np.int32)
        for row, text in enumerate(texts):
            tokens = self.encode(text)[: max_length - 1] + [self.eos_id]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask

    def __call__(self, texts: str | Sequence[str], max_length: int) -> tuple[mx.array, mx.array]:
        """``(input_ids, attention_mask)`` mx.int32 arrays [batch, max_length], padded and truncated like HF."""
        ids, mask = self.encode_batch(texts, max_length)
        return mx.array(ids), mx.array(mask)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens and padding dropped (for inspection only)."""
        pieces = self.sp.get_piece_size()
        return self.sp.decode([int(i) for i in ids if int(i) < pieces and int(i) not in (self.pad_id, self.eos_id)])
