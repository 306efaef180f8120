"""T5's span corruption: the pretraining objective of encoder-decoders on raw text.

A row of the token stream loses `noise_density` of its tokens in spans of mean length
`mean_span_length`; the encoder reads the rest with one sentinel id in place of each span, and the
decoder writes each sentinel followed by the span it replaced, then EOS. Counts are T5's: noise
tokens round(n x density) (at least 1, at most n - 1), spans round(noise / mean length); which
tokens fall in which span is drawn from (seed, stream, index), like the MLM masks, so a resumed
run corrupts exactly as the uninterrupted one. The row length is the longest whose encoder input
(rest + sentinels + EOS) fits data.seq_len, so inputs waste no padding.

Sentinel i is id V - 1 - i of the model's vocabulary V (T5's extra ids): ids past the
tokenizer's, reserved when the vocab size is resolved (`reserved_ids`), never produced as text.
Shape legend: L tokens of the row, N spans.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # config imports this module: no import back at run time
    from jaxlm.config import DataConfig

Example = dict[str, np.ndarray]
# Ids every encoder-decoder's unset vocab size keeps past the tokenizer's (T5 keeps 100), so a
# span-corruption run and the seq2seq run fine-tuned from it get the same vocabulary.
EXTRA_IDS = 100


def noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of `length` tokens (length >= 2)."""
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(1, min(round(noise / mean_span_length), noise, length - noise))
    return noise, spans


def row_lengths(cfg: DataConfig) -> tuple[int, int]:
    """(raw tokens per row, decoder tokens per row) for encoder inputs of data.seq_len."""

    def input_length(raw: int) -> int:
        noise, spans = noise_counts(raw, cfg.noise_density, cfg.mean_span_length)
        return raw - noise + spans + 1

    raw = max(cfg.seq_len - 1, 2)
    while input_length(raw + 1) <= cfg.seq_len:
        raw += 1
    noise, spans = noise_counts(raw, cfg.noise_density, cfg.mean_span_length)
    return raw, noise + spans + 1


def sentinel_count(cfg: DataConfig) -> int:
    """Sentinel ids a row needs at most (one per span)."""
    raw, _ = row_lengths(cfg)
    return noise_counts(raw, cfg.noise_density, cfg.mean_span_length)[1]


def reserved_ids(cfg: DataConfig, objective: str, architecture: str) -> int:
    """Ids past the tokenizer's an unset vocab size leaves room for."""
    if architecture != "encoder_decoder":
        return 0
    return max(EXTRA_IDS, sentinel_count(cfg) if objective == "span_corruption" else 0)


def _segments(items: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` positive lengths summing to `items`, uniformly at random."""
    cuts_N = np.sort(rng.choice(np.arange(1, items), count - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts_N, [items]]))


def noise_mask(length: int, noise_density: float, mean_span_length: float,
               rng: np.random.Generator) -> np.ndarray:
    """Boolean L: kept span, noise span, kept span, ... ending with a noise span (T5's layout)."""
    noise, spans = noise_counts(length, noise_density, mean_span_length)
    kept_N, noisy_N = _segments(length - noise, spans, rng), _segments(noise, spans, rng)
    lengths_2N = np.stack([kept_N, noisy_N], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), lengths_2N)


def corrupt(tokens_L: np.ndarray, noise_L: np.ndarray, sentinel_ids: np.ndarray,
            eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input, decoder targets): each noise span becomes the next sentinel in the input;
    the targets are each sentinel and the span it stands for; both end with EOS."""
    starts_L = noise_L & ~np.concatenate([[False], noise_L[:-1]])
    span_of_L = np.cumsum(starts_L) - 1
    sentinel_L = sentinel_ids[np.maximum(span_of_L, 0)]
    inputs = np.where(starts_L, sentinel_L, tokens_L)[starts_L | ~noise_L]
    with_sentinels = np.stack([np.where(starts_L, sentinel_L, -1), tokens_L], axis=1)
    keep_Lx2 = np.stack([starts_L, noise_L], axis=1)
    targets = with_sentinels[keep_Lx2]
    return (np.append(inputs, eos_id).astype(np.int32), np.append(targets, eos_id).astype(np.int32))


def span_corruption_fn(seed: int, cfg: DataConfig, model_vocab: int, target_len: int, *,
                       bos_id: int, eos_id: int, pad_id: int) -> Callable:
    """The example transform: a packed row of the token stream -> an encoder-decoder example
    (inputs padded to data.seq_len, targets to `target_len`; padding weighs 0)."""
    sentinel_ids = model_vocab - 1 - np.arange(sentinel_count(cfg), dtype=np.int32)

    def span_corruption_example(packed: Example, key: tuple[int, int]) -> Example:
        real_L = packed["tokens_segment_ids"] != 0
        tokens_L = packed["tokens"][real_L]
        if len(tokens_L) < 2:
            inputs, targets = tokens_L.astype(np.int32), np.zeros(0, np.int32)
        else:
            rng = np.random.default_rng([seed, *key])
            noise_L = noise_mask(len(tokens_L), cfg.noise_density, cfg.mean_span_length, rng)
            inputs, targets = corrupt(tokens_L, noise_L, sentinel_ids, eos_id)
        return padded_pair(inputs, np.concatenate([[bos_id], targets[:-1]]).astype(np.int32),
                            targets, cfg.seq_len, target_len, pad_id)

    return span_corruption_example


def padded_pair(inputs: np.ndarray, decoder_inputs: np.ndarray, targets: np.ndarray,
                 seq_len: int, target_len: int, pad_id: int) -> Example:
    """One (input, target) pair in a row of its own, right-padded (segment 0, weight 0)."""
    def padded(x: np.ndarray, length: int, fill: int = 0) -> np.ndarray:
        return np.pad(x, (0, length - len(x)), constant_values=fill).astype(x.dtype)

    n, t = len(inputs), len(targets)
    return {
        "inputs": padded(inputs, seq_len, pad_id),
        "segment_ids": padded(np.ones(n, np.int32), seq_len),
        "positions": padded(np.arange(n, dtype=np.int32), seq_len),
        "decoder_inputs": padded(decoder_inputs[:t], target_len, pad_id),
        "decoder_segment_ids": padded(np.ones(t, np.int32), target_len),
        "decoder_positions": padded(np.arange(t, dtype=np.int32), target_len),
        "targets": padded(targets, target_len),
        "weights": padded(np.ones(t, np.float32), target_len),
    }
