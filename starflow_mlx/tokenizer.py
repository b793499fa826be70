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

from . import arguments
from .checkpoint import CheckpointError
from .config import MAX_TOKENIZER_BYTES, check_value, read_file_bytes, read_json_object

SPACE_PIECE = "\u2581"  # ▁, SentencePiece's whitespace marker
MODES = ("official", "sentencepiece")
MAX_EXTRA_IDS = 1 << 16


def sentencepiece_model(proto: bytes, source: str | os.PathLike):
    """The ``SentencePieceProcessor`` of a serialized model, or a one-line ``CheckpointError`` naming ``source``.

    Empty bytes are refused here: sentencepiece accepts them as a model that is not initialised, which then writes
    "Model is not initialized" straight to the process's stderr on every call. Any other bytes that are no model
    fail to parse, silently, with an exception."""
    import sentencepiece as spm

    if not proto:
        raise CheckpointError(f"{source}: not a SentencePiece model: it is empty")
    try:
        return spm.SentencePieceProcessor(model_proto=proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own message
        raise CheckpointError(f"{source}: not a SentencePiece model: {' '.join(str(e).split())[:200]}") from None


def check_vocabulary(sp, extra_ids: int, vocab_size: int, source: str | os.PathLike) -> None:
    """The pieces of ``sp`` plus ``extra_ids`` sentinels must fit the encoder's ``vocab_size``."""
    pieces = sp.get_piece_size()
    if pieces + extra_ids > vocab_size:
        raise CheckpointError(
            f"{source}: {pieces} pieces + {extra_ids} extra ids exceed the model's vocab_size {vocab_size}; is this "
            "the tokenizer of this model?"
        )


class T5Tokenizer:
    """SentencePiece T5 tokenizer; ``tok(texts, max_length)`` returns ``(input_ids, attention_mask)`` mx arrays."""

    def __init__(
        self, spiece: str | os.PathLike | bytes, extra_ids: int = 100, mode: str = "official",
        vocab_size: int | None = None,
    ):
        """``spiece``: the SentencePiece model (a file or its bytes); ``extra_ids``: the ``<extra_id_N>`` sentinels
        numbered after its pieces; ``vocab_size``: the encoder's vocabulary when known, which pieces and sentinels
        must fit (an id beyond it would make the encoder refuse every prompt that uses it)."""
        import sentencepiece as spm

        if mode not in MODES:
            raise ValueError(f"unknown tokenizer mode {mode!r}; choose one of {', '.join(MODES)}")
        source = "the spiece bytes" if isinstance(spiece, bytes) else spiece
        proto = spiece if isinstance(spiece, bytes) else read_file_bytes(spiece, MAX_TOKENIZER_BYTES)
        self.sp = sentencepiece_model(proto, source)
        extra_ids = arguments.integer("extra_ids", extra_ids, minimum=0, maximum=MAX_EXTRA_IDS)
        if vocab_size is not None:
            check_vocabulary(self.sp, extra_ids, vocab_size, source)
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
        extra_ids, where, vocab_size = 100, None, None
        config = folder / "config.json"
        hf_config = folder / "tokenizer_config.json"
        meta = read_json_object(config) if config.is_file() else {}
        if isinstance(block := meta.get("tokenizer"), dict):
            extra_ids, where = block.get("extra_ids", extra_ids), config
        elif hf_config.is_file():
            extra_ids, where = read_json_object(hf_config).get("extra_ids", extra_ids), hf_config
        check_value(extra_ids, int, f"{where}: extra_ids", {"min": 0, "max": MAX_EXTRA_IDS})
        if "vocab_size" in meta:  # ours and Hugging Face's config.json both state the encoder's vocabulary
            vocab_size = check_value(meta["vocab_size"], int, f"{config}: vocab_size", {"min": 1})
        return cls(spiece, extra_ids=extra_ids, mode=mode, vocab_size=vocab_size)

    def _encode_plain(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        # The fast tokenizer keeps one trailing space (runs are collapsed first) as a lone "▁" word.
        if self.mode == "official" and self._normalizer.normalize(text).endswith(" "):
            ids.append(self.space_id)
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``</s>`` and without truncation."""
        arguments.prompt("text", text)
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
        """``(input_ids, attention_mask)`` as int32 numpy arrays [len(texts), max_length]: ``texts`` a prompt or a
        non-empty list of prompts, ``max_length`` an integer in [1, ``arguments.MAX_PROMPT_TOKENS``]."""
        texts, max_length = arguments.prompts(texts), arguments.prompt_length(max_length)
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
