"""Tokenizers behind one small interface: raw bytes (no training), SentencePiece (trained here) and
Hugging Face `tokenizer.json` files (jaxlm.tokenizers_hf).

Every tokenizer carries its special ids (`bos_id`, `eos_id`, ...) and the rest of jaxlm asks it for
them. jaxlm's own tokenizers reserve ids 0..6 for the specials in SPECIAL_TOKENS' order. No user
text ever encodes to a special id (SentencePiece's specials are control symbols).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Iterator, Literal, Protocol

import numpy as np
import sentencepiece as spm

from jaxlm.errors import UserError
from jaxlm.tokenizers_hf import CONFIG_FILES, HFTokenizer, tokenizer_json

PAD_ID, BOS_ID, EOS_ID, MASK_ID, CLS_ID, SEP_ID, UNK_ID = range(7)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>", "<cls>", "<sep>", "<unk>")
SENTENCEPIECE_PREFIX = "sentencepiece:"
HF_PREFIX = "hf:"
WORD_BOUNDARY = "\u2581"  # SentencePiece's marker for a piece that starts with a space
MAX_SENTENCE_CHARS = 16_384  # training input pieces: at most 64 KiB of UTF-8


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int  # starts every document
    eos_id: int  # ends every document; generation stops at it
    pad_id: int | None  # None: the tokenizer has none (see padding_id)
    mask_id: int | None  # None: no masked-LM training or fill-mask
    cls_id: int | None
    sep_id: int | None
    unk_id: int | None
    special_ids: tuple[int, ...]  # never selected for MLM, never sampled (but eos), 0 bytes

    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids (int32) of `text`, without BOS/EOS."""

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of `ids`; special ids are dropped."""

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for specials): turns nats/token into bits/byte."""

    def word_starts(self) -> np.ndarray | None:
        """Per id: does it begin a word (for whole-word masking)? None: no notion of words."""

    def token_text(self, token_id: int) -> str:
        """A readable form of one id (fill-mask output)."""


class _ReservedSpecials:
    """jaxlm's own specials: ids 0..6 in SPECIAL_TOKENS' order."""

    pad_id, bos_id, eos_id, mask_id = PAD_ID, BOS_ID, EOS_ID, MASK_ID
    cls_id, sep_id, unk_id = CLS_ID, SEP_ID, UNK_ID
    special_ids = tuple(range(len(SPECIAL_TOKENS)))


class ByteTokenizer(_ReservedSpecials):
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

    def word_starts(self) -> None:
        return None

    def token_text(self, token_id: int) -> str:
        if token_id < self.offset:
            return SPECIAL_TOKENS[token_id]
        byte = token_id - self.offset
        return chr(byte) if 32 <= byte < 127 else f"<0x{byte:02X}>"


class SentencePieceTokenizer(_ReservedSpecials):
    """A trained SentencePiece model (byte fallback, no normalisation: lossless on any text)."""

    def __init__(self, path: Path):
        try:
            proto = Path(path).read_bytes()
        except OSError as err:
            raise UserError(
                f"tokenizer file {path} cannot be read ({err.strerror}); train one with "
                "`jaxlm tokenizer train --config FILE --vocab-size N`"
            ) from None
        self.path = Path(path)
        self.model = spm.SentencePieceProcessor()
        try:
            self.model.LoadFromSerializedProto(proto)
        except RuntimeError:
            raise UserError(f"{path} is not a SentencePiece model file") from None
        pieces = [self.model.id_to_piece(i) for i in range(len(SPECIAL_TOKENS))]
        if pieces != list(SPECIAL_TOKENS):
            raise UserError(
                f"{path} reserves {pieces} as its first ids, not jaxlm's {list(SPECIAL_TOKENS)}; "
                "train it with `jaxlm tokenizer train`"
            )
        self.vocab_size = self.model.vocab_size()
        # SentencePiece reads a literal U+2581 in text as a space; spell it as its bytes instead.
        self._boundary_ids = [self.model.piece_to_id(f"<0x{b:02X}>") for b in WORD_BOUNDARY.encode()]

    def encode(self, text: str | bytes) -> np.ndarray:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        parts = [self.model.encode(part) for part in text.split(WORD_BOUNDARY)]
        ids = parts[0]
        for part in parts[1:]:
            ids = ids + self._boundary_ids + part
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        kept = [int(i) for i in ids if int(i) >= len(SPECIAL_TOKENS) and int(i) < self.vocab_size]
        return self.model.decode(kept)

    def _pieces(self) -> list[str]:
        return [self.model.id_to_piece(i) for i in range(self.vocab_size)]

    def byte_lengths(self) -> np.ndarray:
        lengths = [
            0 if i < len(SPECIAL_TOKENS) else 1 if self.model.is_byte(i)
            else len(piece.replace(WORD_BOUNDARY, " ").encode("utf-8"))
            for i, piece in enumerate(self._pieces())
        ]
        return np.asarray(lengths, dtype=np.int32)

    def word_starts(self) -> np.ndarray:
        return np.asarray([p.startswith(WORD_BOUNDARY) for p in self._pieces()], dtype=bool)

    def token_text(self, token_id: int) -> str:
        return self.model.id_to_piece(int(token_id)).replace(WORD_BOUNDARY, " ")


def unusable_ids(model_vocab: int, tokenizer: Tokenizer) -> np.ndarray:
    """Per id of the model's (padded) vocabulary: a special, or past the tokenizer's ids."""
    unusable_V = np.arange(model_vocab) >= tokenizer.vocab_size
    unusable_V[list(tokenizer.special_ids)] = True
    return unusable_V


def padding_id(tokenizer: Tokenizer) -> int:
    """The id padding positions hold: pad, else eos (as Hugging Face pads GPT-2). Padding weighs 0
    and is masked out of attention, so the value is never a target; a special keeps it readable."""
    return tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id


def load_tokenizer(spec: str) -> Tokenizer:
    """Builds the tokenizer a config's `data.tokenizer` names: bytes | sentencepiece:PATH | hf:PATH."""
    if spec == "bytes":
        return ByteTokenizer()
    found = _spec_path(spec)
    if found is not None and found[0] == SENTENCEPIECE_PREFIX:
        return SentencePieceTokenizer(found[1])
    if found is not None:
        return HFTokenizer(found[1])
    raise UserError(f"unknown data.tokenizer '{spec}' (use bytes, sentencepiece:PATH or hf:PATH)")


def _spec_path(spec: str) -> tuple[str, Path] | None:
    """(prefix, expanded path) of a file-backed spec; None for bytes and unknown specs."""
    for prefix in (SENTENCEPIECE_PREFIX, HF_PREFIX):
        if spec.startswith(prefix) and spec[len(prefix):]:
            return prefix, Path(spec[len(prefix):]).expanduser()
    return None


def tokenizer_file(spec: str) -> Path | None:
    """The file that defines a tokenizer: the .model of sentencepiece:, the tokenizer.json of hf:
    (PATH or PATH/tokenizer.json), None for bytes. An hf: tokenizer may also read the configs in
    that file's directory (tokenizer_files)."""
    found = _spec_path(spec)
    if found is None:
        return None
    prefix, path = found
    return tokenizer_json(path) if prefix == HF_PREFIX else path


def tokenizer_files(spec: str) -> list[Path]:
    """Every file a tokenizer is read from: `tokenizer_file`, and for hf: the tokenizer_config.json
    / special_tokens_map.json beside it (they set its special ids). Copy all of them together."""
    path = tokenizer_file(spec)
    if path is None:
        return []
    if not spec.startswith(HF_PREFIX):
        return [path]
    return [path, *(c for c in (path.parent / n for n in CONFIG_FILES) if c.is_file())]


def spec_for_copy(spec: str, path: Path) -> str:
    """The `data.tokenizer` value of the same tokenizer read from `path`, a copy of
    tokenizer_file(spec) (with the rest of tokenizer_files(spec) copied beside it for hf:)."""
    found = _spec_path(spec)
    return spec if found is None else f"{found[0]}{path}"


def sentencepiece_path(spec: str) -> Path | None:
    """The model file a `data.tokenizer` value points at (None for bytes)."""
    if spec.startswith(SENTENCEPIECE_PREFIX):
        return Path(spec[len(SENTENCEPIECE_PREFIX):]).expanduser()
    return None


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Texts cut at line ends into pieces SentencePiece accepts (it skips longer ones silently)."""
    for text in texts:
        piece: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            for start in range(0, len(line), MAX_SENTENCE_CHARS):
                part = line[start : start + MAX_SENTENCE_CHARS]
                if size + len(part) > MAX_SENTENCE_CHARS:
                    yield "".join(piece)
                    piece, size = [], 0
                piece.append(part)
                size += len(part)
        if piece:
            yield "".join(piece)


def train_sentencepiece(
    texts: Iterable[str],
    output: Path,
    *,
    vocab_size: int,
    model_type: Literal["unigram", "bpe"] = "unigram",
    max_sentences: int = 1_000_000,
) -> SentencePieceTokenizer:
    """Trains a model on `texts` (one sentence per line) with jaxlm's specials and byte fallback.

    No normalisation and no dummy prefix, so decode(encode(text)) == text for any Unicode text.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256 + 1:
        raise UserError(f"--vocab-size must exceed {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes)")
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts),
            model_writer=proto,
            vocab_size=vocab_size,
            model_type=model_type,
            hard_vocab_limit=False,  # a small corpus may not support the full size: take fewer
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            pad_piece="<pad>", bos_piece="<bos>", eos_piece="<eos>", unk_piece="<unk>",
            control_symbols=list(SPECIAL_TOKENS[MASK_ID:UNK_ID]),
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=4 * MAX_SENTENCE_CHARS,  # bytes
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise UserError(f"SentencePiece training failed: {str(err).splitlines()[-1]}") from None
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(proto.getvalue())
    tmp.replace(output)  # never leave a half-written model where configs point
    return SentencePieceTokenizer(output)
