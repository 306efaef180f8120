"""Task objectives' data transforms: a labelled record -> one example with its own targets and
loss weights, packed whole (first fit) so examples never share a row position or attend to
each other.

seq2seq_lm: `[bos] input [sep] target [eos]` on the causal LM; only the target and eos are
predicted (weight 1), the input is context. classify: an encoder reads `[cls] text [sep]
(text_pair [sep])` and predicts the label at `[cls]`; a decoder reads `[bos] text [sep]
(text_pair) [eos]` and predicts it at the last token. Token types mark the pair's second text
(1) as BERT's do; a model without token types ignores them. The label sits in `targets` at that one
position, so the loss is the same weighted cross-entropy as every other objective's.
seq2seq (encoder-decoder): the encoder reads `input [eos]`, the decoder reads `[bos] target` and
predicts `target [eos]`; pairs are packed on both sides at once, so their segment ids agree.
Shape legend: L sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from jaxlm.tokenizer import Tokenizer

Example = dict[str, np.ndarray]
TASK_OBJECTIVES = ("seq2seq_lm", "classify", "seq2seq")
PACKED_KEYS = ("tokens", "targets", "weights", "token_types")
PAIR_KEYS = {"inputs": "encoder", "decoder_inputs": "decoder", "targets": "decoder",
             "weights": "decoder"}


@dataclass(frozen=True)
class Encoder:
    """A record -> example function, and the row length each feature is packed into."""

    encode: Callable[[dict[str, Any]], Example]
    lengths: dict[str, int]

    def __call__(self, record: dict[str, Any]) -> Example:
        return self.encode(record)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def formatted(record: dict[str, Any], role: str, template: str) -> str:
    """The record's `role` text, through `data.template` when one is set."""
    if not template:
        return _text(record[role])
    return template.format_map({k: _text(v) for k, v in record.items() if k != "label"})


def prompt_ids(tokenizer: Tokenizer, text: str, seq_len: int) -> list[int]:
    """`[bos] input [sep]`: what a seq2seq model continues (the input keeps its start)."""
    ids = tokenizer.encode(text).tolist()[: seq_len - 3]
    return [tokenizer.bos_id, *ids, tokenizer.sep_id]


def seq2seq_encoder(tokenizer: Tokenizer, seq_len: int, template: str) -> Encoder:
    def encode(record: dict[str, Any]) -> Example:
        input_ids = tokenizer.encode(formatted(record, "input", template)).tolist()
        target_ids = tokenizer.encode(_text(record["target"])).tolist()
        # Room for the input first (at least half the row), the target takes what is left.
        input_ids = input_ids[: max(seq_len - 3 - len(target_ids), seq_len // 2 - 2)]
        target_ids = target_ids[: seq_len - 3 - len(input_ids)]
        tokens_L = np.asarray([tokenizer.bos_id, *input_ids, tokenizer.sep_id, *target_ids,
                               tokenizer.eos_id], np.int32)
        targets_L = np.zeros_like(tokens_L)
        targets_L[:-1] = tokens_L[1:]
        weights_L = np.zeros(len(tokens_L), np.float32)
        weights_L[len(input_ids) + 1 : -1] = 1.0  # from [sep] on: predicts target tokens and eos
        return {"tokens": tokens_L, "targets": targets_L, "weights": weights_L,
                "token_types": np.zeros_like(tokens_L)}

    return Encoder(encode, {k: seq_len for k in PACKED_KEYS})


def encoder_input_ids(tokenizer: Tokenizer, text: str, seq_len: int) -> list[int]:
    """`input [eos]`: what an encoder-decoder reads (the input keeps its start)."""
    return [*tokenizer.encode(text).tolist()[: seq_len - 1], tokenizer.eos_id]


def pair_encoder(tokenizer: Tokenizer, seq_len: int, target_len: int, template: str) -> Encoder:
    def encode(record: dict[str, Any]) -> Example:
        input_ids = encoder_input_ids(tokenizer, formatted(record, "input", template), seq_len)
        target_ids = tokenizer.encode(_text(record["target"]))[: target_len - 1]
        return {"inputs": np.asarray(input_ids, np.int32),
                "decoder_inputs": np.concatenate([[tokenizer.bos_id], target_ids]).astype(np.int32),
                "targets": np.append(target_ids, tokenizer.eos_id).astype(np.int32),
                "weights": np.ones(len(target_ids) + 1, np.float32)}

    lengths = {"encoder": seq_len, "decoder": target_len}
    return Encoder(encode, {key: lengths[side] for key, side in PAIR_KEYS.items()})


def pair_example(packed: Example, key: tuple[int, int] = (0, 0)) -> Example:
    """A packed row of (input, target) pairs -> the encoder-decoder example every step reads."""
    return {
        "inputs": packed["inputs"],
        "segment_ids": packed["inputs_segment_ids"],
        "positions": packed["inputs_positions"],
        "decoder_inputs": packed["decoder_inputs"],
        "decoder_segment_ids": packed["decoder_inputs_segment_ids"],
        "decoder_positions": packed["decoder_inputs_positions"],
        "targets": packed["targets"],
        "weights": packed["weights"],
    }


def classify_encoder(tokenizer: Tokenizer, seq_len: int, template: str, causal: bool) -> Encoder:
    def encode(record: dict[str, Any]) -> Example:
        text_ids = tokenizer.encode(formatted(record, "text", template)).tolist()
        pair = _text(record.get("text_pair", b""))
        pair_ids = tokenizer.encode(pair).tolist() if pair else []
        room = seq_len - (3 if pair else 2)
        pair_ids = pair_ids[: max(room - len(text_ids), room // 2)]
        text_ids = text_ids[: room - len(pair_ids)]
        if causal:
            body = [tokenizer.bos_id, *text_ids, tokenizer.sep_id, *pair_ids] if pair else [
                tokenizer.bos_id, *text_ids]
            tokens_L, at = np.asarray([*body, tokenizer.eos_id], np.int32), len(body)
        else:
            tail = [*pair_ids, tokenizer.sep_id] if pair else []
            tokens_L = np.asarray([tokenizer.cls_id, *text_ids, tokenizer.sep_id, *tail], np.int32)
            at = 0
        first_L = np.arange(len(tokens_L)) < len(text_ids) + 2  # [bos]/[cls] text [sep]
        targets_L = np.zeros_like(tokens_L)
        weights_L = np.zeros(len(tokens_L), np.float32)
        targets_L[at], weights_L[at] = int(record["label"]), 1.0
        return {"tokens": tokens_L, "targets": targets_L, "weights": weights_L,
                "token_types": np.where(first_L, 0, 1).astype(np.int32)}

    return Encoder(encode, {k: seq_len for k in PACKED_KEYS})


def task_example(packed: Example, key: tuple[int, int] = (0, 0)) -> Example:
    """A first-fit packed row of encoded records -> the model example every step reads."""
    return {
        "inputs": packed["tokens"],
        "targets": packed["targets"],
        "weights": packed["weights"],
        "segment_ids": packed["tokens_segment_ids"],
        "positions": packed["tokens_positions"],
        "token_types": packed["token_types"],
    }


def task_encoder(objective: str, tokenizer: Tokenizer, seq_len: int, template: str,
                 causal: bool, target_len: int = 0) -> Encoder | None:
    """The record encoder of a task objective (None for the plain-text objectives)."""
    if objective == "seq2seq":
        return pair_encoder(tokenizer, seq_len, target_len, template)
    if objective == "seq2seq_lm":
        return seq2seq_encoder(tokenizer, seq_len, template)
    if objective == "classify":
        return classify_encoder(tokenizer, seq_len, template, causal)
    return None
