"""Hugging Face tokenizers (`data.tokenizer: hf:PATH`): a `tokenizer.json` read with the
`tokenizers` library, its special ids found by name or from the configs saved beside it.

Special ids, and the fallbacks where a tokenizer lacks one (the choices Hugging Face makes):
- bos: the bos token, else [CLS] (BERT starts a text with it), else eos (GPT-2's one
  `<|endoftext|>` both starts and ends documents).
- eos: the eos token, else [SEP] (BERT ends a text with it), else bos. A tokenizer with none of
  bos, eos, [CLS], [SEP] cannot mark documents apart: a UserError.
- pad, mask, cls, sep, unk: the token if there is one, else None (GPT-2 has no pad or mask).
  Packing pads with `padding_id` (jaxlm.tokenizer): pad, else eos; padding carries weight 0, so
  its value is never a target.
User text never encodes to a special token (as with jaxlm's own tokenizers), and encoding adds no
specials: packing adds bos/eos itself.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as _HFTokenizerFile

from jaxlm.errors import UserError

TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # later files win, as in HF
ROLES = ("bos", "eos", "pad", "mask", "cls", "sep", "unk")
# Usual names of each role's token, first match wins (GPT-2, LLaMA-3, SentencePiece-style, BERT).
ROLE_NAMES = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]"),
    "eos": ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "mask": ("<mask>", "[MASK]"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "unk": ("<unk>", "[UNK]"),
}
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
METASPACE = "\u2581"  # SentencePiece-style word-boundary marker


def tokenizer_json(path: Path) -> Path:
    """The tokenizer.json that `hf:PATH` names: PATH itself or the one inside directory PATH."""
    return path / TOKENIZER_JSON if path.is_dir() else path


class HFTokenizer:
    """A `tokenizer.json` behind jaxlm's Tokenizer interface (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = tokenizer_json(path)
        if not self.path.exists():
            fix = "point data.tokenizer=hf:PATH at a tokenizer.json or a directory holding one"
            raise UserError(f"{path} has no {TOKENIZER_JSON}; {fix}" if path.is_dir()
                            else f"tokenizer {path} does not exist; {fix}")
        self.model, self._spec = _read(self.path)
        self.model.encode_special_tokens = True  # text spelling a special token stays text
        self.vocab_size = self.model.get_vocab_size(with_added_tokens=True)
        added = self.model.get_added_tokens_decoder()
        ids = _role_ids(self.path, self.model, added)
        self.pad_id, self.mask_id, self.unk_id = ids["pad"], ids["mask"], ids["unk"]
        self.cls_id, self.sep_id = ids["cls"], ids["sep"]
        bos = next((i for i in (ids["bos"], ids["cls"], ids["eos"]) if i is not None), None)
        eos = next((i for i in (ids["eos"], ids["sep"], bos) if i is not None), None)
        if bos is None or eos is None:
            raise UserError(
                f"tokenizer {self.path} has no bos/eos/[CLS]/[SEP] token to mark documents; name "
                f"one as eos_token in {CONFIG_FILES[0]} beside it"
            )
        self.bos_id, self.eos_id = bos, eos
        named = {i for i in ids.values() if i is not None}
        self.special_ids = tuple(sorted(named | {i for i, t in added.items() if t.special}))

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (grain workers): the tokenizers library's pickle drops this flag."""
        self.__dict__.update(state)
        self.model.encode_special_tokens = True

    def encode(self, text: str | bytes) -> np.ndarray:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return np.asarray(self.model.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.model.decode(kept, skip_special_tokens=True)

    def byte_lengths(self) -> np.ndarray:
        return np.asarray([len(piece) for piece in self._piece_bytes], dtype=np.int32)

    def word_starts(self) -> np.ndarray | None:
        """WordPiece: pieces without the continuation prefix; byte-level and SentencePiece-style
        pieces: those that carry a leading space. Other models: no notion of words."""
        if self._spec["wordpiece_prefix"] is not None:
            prefix = self._spec["wordpiece_prefix"]
            return np.asarray([not (t or "").startswith(prefix) for t in self._tokens], dtype=bool)
        if self._spec["byte_level"] or any(METASPACE in (t or "") for t in self._tokens):
            return np.asarray([p.startswith(b" ") for p in self._piece_bytes], dtype=bool)
        return None

    def token_text(self, token_id: int) -> str:
        token = self._tokens[int(token_id)] or ""
        if int(token_id) in self.special_ids or self._spec["wordpiece_prefix"] is not None:
            return token
        return self._piece_bytes[int(token_id)].decode("utf-8", errors="replace")

    @functools.cached_property
    def _tokens(self) -> list[str | None]:
        return [self.model.id_to_token(i) for i in range(self.vocab_size)]

    @functools.cached_property
    def _piece_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each id decodes to inside a text (specials: none)."""
        added = {i: t for i, t in self.model.get_added_tokens_decoder().items() if not t.special}
        specials = set(self.special_ids)
        return [
            b"" if i in specials or token is None
            else added[i].content.encode("utf-8") if i in added
            else _piece_bytes(token, self._spec)
            for i, token in enumerate(self._tokens)
        ]


def _piece_bytes(token: str, spec: dict[str, Any]) -> bytes:
    """Bytes of one vocabulary piece: byte-level pieces spell one byte per character, byte-fallback
    pieces are one byte, WordPiece continuations lose their prefix, the metaspace is a space."""
    if spec["byte_level"]:
        table = _byte_level_table()
        if all(char in table for char in token):
            return bytes(table[char] for char in token)
    if spec["byte_fallback"] and _BYTE_FALLBACK.fullmatch(token):
        return bytes([int(token[3:5], 16)])
    prefix = spec["wordpiece_prefix"]
    if prefix is not None and token.startswith(prefix):
        token = token[len(prefix):]
    return token.replace(METASPACE, " ").encode("utf-8")


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


def _read(path: Path) -> tuple[_HFTokenizerFile, dict[str, Any]]:
    """The tokenizer and what its pieces mean in bytes (byte-level? byte fallback? WordPiece?)."""
    try:
        text = path.read_text(encoding="utf-8")
        model = _HFTokenizerFile.from_str(text)
    except OSError as err:
        raise UserError(f"tokenizer {path} cannot be read ({err.strerror}); fix its permissions "
                        "or point data.tokenizer=hf:PATH elsewhere") from None
    except Exception as err:  # the tokenizers library raises plain Exception for a bad file
        first_line = (str(err).splitlines() or ["unreadable"])[0]
        raise UserError(f"{path} is not a Hugging Face tokenizer.json ({first_line}); point "
                        "data.tokenizer=hf:PATH at one") from None
    raw = json.loads(text)
    kinds = json.dumps([raw.get("pre_tokenizer"), raw.get("decoder")])
    wordpiece = raw["model"].get("type") == "WordPiece"
    return model, {
        "byte_level": '"ByteLevel"' in kinds,
        "byte_fallback": bool(raw["model"].get("byte_fallback")),
        "wordpiece_prefix": raw["model"].get("continuing_subword_prefix", "##") if wordpiece else None,
    }


def _role_ids(path: Path, model: _HFTokenizerFile, added: dict[int, Any]) -> dict[str, int | None]:
    """Each role's id: named in the configs beside the file, else an added token's usual name."""
    by_content = {token.content: i for i, token in added.items()}
    ids = {role: next((by_content[n] for n in ROLE_NAMES[role] if n in by_content), None)
           for role in ROLES}
    for config in (path.parent / name for name in CONFIG_FILES):
        for role, content in _configured_tokens(config).items():
            ids[role] = model.token_to_id(content)
            if ids[role] is None:
                raise UserError(f"{config} names {role}_token '{content}', which {path} does not "
                                "have; add that token to the tokenizer or remove the entry")
    return ids


def _configured_tokens(config: Path) -> dict[str, str]:
    """role -> token text set in a tokenizer_config.json / special_tokens_map.json (if present);
    values are strings or {"content": ...} dicts, and null means unset."""
    if not config.is_file():
        return {}
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{config} cannot be read as JSON ({err}); fix or remove it") from None
    found = {}
    for role in ROLES:
        value = raw.get(f"{role}_token") if isinstance(raw, dict) else None
        content = value.get("content") if isinstance(value, dict) else value
        if isinstance(content, str):
            found[role] = content
    return found
