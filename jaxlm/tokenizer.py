"""Tokenizers behind one small interface (bytes now; SentencePiece implements the same protocol).

Special ids are the same in every tokenizer so data transforms and objectives can name them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from jaxlm.errors import UserError

PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>")


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids (int32) of `text`, without BOS/EOS."""

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of `ids`; special ids are dropped."""

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for specials): turns nats/token into bits/byte."""


class ByteTokenizer:
    """One id per UTF-8 byte, after the special ids: lossless on any text, no training."""

    offset = len(SPECIAL_TOKENS)
    vocab_size = offset + 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self.offset

    def decode(self, ids: np.ndarray | list[int]) -> str:
        ids_N = np.asarray(ids, dtype=np.int64)
        data = (ids_N[ids_N >= self.offset] - self.offset).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def byte_lengths(self) -> np.ndarray:
        return (np.arange(self.vocab_size) >= self.offset).astype(np.int32)


def load_tokenizer(spec: str) -> Tokenizer:
    """Builds the tokenizer a config's `data.tokenizer` names."""
    if spec == "bytes":
        return ByteTokenizer()
    raise UserError(f"unknown data.tokenizer '{spec}' (supported: bytes)")
