"""Training objectives: a per-example data transform plus one weighted cross-entropy.

The transform turns a packed row into (inputs, targets, weights, segment_ids, positions; an
encoder-decoder's also decoder_inputs, decoder_segment_ids, decoder_positions, with targets and
weights on the decoder side); the loss only reads `weights`, so every objective shares the same
jitted step. MLM masks and span-corruption noise are drawn here, in the data pipeline, from a seed
derived from (run seed, stream, example index): the index counts on across epochs and is part of
the checkpointed iterator state, so a resumed run masks exactly as the uninterrupted one.
Shape legend: B batch, L sequence, V vocab, N count.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.config import Config, architecture, target_length
from jaxlm.errors import UserError
from jaxlm.span_corruption import row_lengths, span_corruption_fn
from jaxlm.tasks import Encoder, pair_example, task_encoder, task_example
from jaxlm.tokenizer import Tokenizer, padding_id

Example = dict[str, np.ndarray]
# (packed row, (stream id, example index in that stream)) -> model example
ExampleFn = Callable[[Example, tuple[int, int]], Example]
OBJECTIVES = ("clm", "mlm", "seq2seq_lm", "classify", "span_corruption", "seq2seq")
# Of the selected MLM positions: this share becomes MASK, this share a random token, the rest stay.
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1


def clm_example(packed: Example, key: tuple[int, int] = (0, 0)) -> Example:
    """Next-token targets; a target in another document (or padding) weighs 0."""
    tokens_L = packed["tokens"]
    segment_ids_L = packed["tokens_segment_ids"]
    targets_L = np.zeros_like(tokens_L)
    targets_L[:-1] = tokens_L[1:]
    weights_L = np.zeros(tokens_L.shape, np.float32)
    weights_L[:-1] = (segment_ids_L[1:] == segment_ids_L[:-1]) & (segment_ids_L[1:] != 0)
    return {
        "inputs": tokens_L,
        "targets": targets_L,
        "weights": weights_L,
        "segment_ids": segment_ids_L,
        "positions": packed["tokens_positions"],
    }


def _word_ids(tokens_L: np.ndarray, candidates_L: np.ndarray, word_starts_V: np.ndarray | None):
    """Index of the word each candidate belongs to (a piece without the boundary marker continues
    the word before it); without word boundaries every candidate is its own word."""
    if word_starts_V is None:
        return np.cumsum(candidates_L) - 1
    previous_L = np.concatenate([[False], candidates_L[:-1]])
    starts_L = candidates_L & (word_starts_V[tokens_L] | ~previous_L)
    return np.cumsum(starts_L) - 1


def mlm_select(
    tokens_L: np.ndarray,
    candidates_L: np.ndarray,
    rng: np.random.Generator,
    mask_rate: float,
    word_starts_V: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean positions to predict: round(rate x candidates) tokens (at least one), as whole words
    when `word_starts_V` is given."""
    count = int(candidates_L.sum())
    if count == 0:
        return np.zeros_like(candidates_L)
    target = max(1, round(mask_rate * count))
    word_of_L = _word_ids(tokens_L, candidates_L, word_starts_V)
    sizes_N = np.bincount(word_of_L[candidates_L])
    order_N = rng.permutation(len(sizes_N))
    # Whole words in random order until the target count is reached.
    chosen_N = order_N[: int(np.searchsorted(np.cumsum(sizes_N[order_N]), target)) + 1]
    selected_words = np.zeros(len(sizes_N), bool)
    selected_words[chosen_N] = True
    return candidates_L & selected_words[np.where(candidates_L, word_of_L, 0)]


def mlm_example_fn(
    seed: int,
    mask_rate: float,
    tokenizer_vocab: int,
    word_starts_V: np.ndarray | None = None,
    *,
    mask_id: int,
    special_ids: Sequence[int],
) -> ExampleFn:
    """BERT masking: of the selected tokens 80 % become `mask_id`, 10 % a random regular token,
    10 % stay; `special_ids` and padding are never selected nor inserted, and only selected
    positions carry loss weight."""
    special_V = np.zeros(tokenizer_vocab, bool)
    special_V[list(special_ids)] = True
    regular_N = np.flatnonzero(~special_V).astype(np.int32)

    def mlm_example(packed: Example, key: tuple[int, int]) -> Example:
        rng = np.random.default_rng([seed, *key])
        tokens_L = packed["tokens"]
        segment_ids_L = packed["tokens_segment_ids"]
        candidates_L = (segment_ids_L != 0) & ~special_V[tokens_L]
        selected_L = mlm_select(tokens_L, candidates_L, rng, mask_rate, word_starts_V)
        roll_L = rng.random(tokens_L.shape)
        random_L = regular_N[rng.integers(0, len(regular_N), tokens_L.shape, dtype=np.int32)]
        inputs_L = np.where(selected_L & (roll_L < MASK_SHARE), mask_id, tokens_L)
        replace_L = selected_L & (roll_L >= MASK_SHARE) & (roll_L < MASK_SHARE + RANDOM_SHARE)
        inputs_L = np.where(replace_L, random_L, inputs_L).astype(np.int32)
        return {
            "inputs": inputs_L,
            "targets": tokens_L,
            "weights": selected_L.astype(np.float32),
            "segment_ids": segment_ids_L,
            "positions": packed["tokens_positions"],
        }

    return mlm_example


def example_fn(cfg: Config, tokenizer: Tokenizer, source: Any = None) -> ExampleFn:
    """The data transform of `cfg.objective` (`source`: the split's documents, which NSP draws
    its random second segments from)."""
    if cfg.objective == "clm":
        return clm_example
    if cfg.objective == "mlm":
        word_starts_V = tokenizer.word_starts() if cfg.data.whole_word_mask else None
        if cfg.data.whole_word_mask and word_starts_V is None:
            raise UserError(
                "data.whole_word_mask needs a tokenizer with word pieces; set "
                "data.tokenizer=sentencepiece:PATH or data.whole_word_mask=false"
            )
        if tokenizer.mask_id is None:
            raise UserError(
                f"objective mlm needs a mask token; tokenizer {cfg.data.tokenizer} has none: add "
                "one (mask_token in its tokenizer_config.json) or set objective=clm"
            )
        if cfg.data.nsp:
            from jaxlm.nsp import nsp_example_fn  # nsp builds on this module's MLM transform

            require_specials(tokenizer, cfg, "data.nsp", ("cls_id", "sep_id"))
            return nsp_example_fn(cfg.seed, cfg.data.mask_rate, source, tokenizer, word_starts_V)
        return mlm_example_fn(cfg.seed, cfg.data.mask_rate, tokenizer.vocab_size, word_starts_V,
                              mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids)
    if cfg.objective in ("seq2seq_lm", "classify"):
        return task_example
    if cfg.objective == "seq2seq":
        return pair_example
    if cfg.objective == "span_corruption":
        return span_corruption_fn(cfg.seed, cfg.data, cfg.model.vocab_size, target_length(cfg),
                                  bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                  pad_id=padding_id(tokenizer))
    raise UserError(f"unknown objective '{cfg.objective}' (supported: {', '.join(OBJECTIVES)})")


def is_causal(cfg: Config) -> bool:
    """Is the model a decoder-only stack? (see config.architecture)"""
    return architecture(cfg) == "decoder"


def row_length(cfg: Config) -> int:
    """Tokens of text per row the data pipeline cuts (span corruption drops some of them)."""
    if cfg.objective == "span_corruption":
        return row_lengths(cfg.data)[0]
    return cfg.data.seq_len


def require_specials(tokenizer: Tokenizer, cfg: Config, what: str, names: tuple[str, ...]) -> None:
    """A UserError unless the tokenizer has the special ids `what` writes into its examples."""
    missing = [name[: -len("_id")] for name in names if getattr(tokenizer, name) is None]
    if missing:
        raise UserError(f"{what} needs the tokenizer's {' and '.join(missing)} token; "
                        f"{cfg.data.tokenizer} has none: use bytes or sentencepiece, or add it")


def record_encoder(cfg: Config, tokenizer: Tokenizer) -> Encoder | None:
    """The record -> example encoder of a task objective (None: the objective reads text)."""
    causal = is_causal(cfg)
    if cfg.objective == "seq2seq_lm":
        require_specials(tokenizer, cfg, "objective seq2seq_lm", ("sep_id",))
    if cfg.objective == "classify":
        require_specials(tokenizer, cfg, "objective classify", ("sep_id",) if causal else ("cls_id", "sep_id"))
    return task_encoder(cfg.objective, tokenizer, cfg.data.seq_len, cfg.data.template, causal,
                        target_length(cfg))


def weighted_sums(logits_BxLxV: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Summed loss/correct/weight over the batch: sums add up across microbatches and eval batches."""
    weights_BxL = batch["weights"]
    loss_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
    correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == batch["targets"]
    return {
        "loss_sum": jnp.sum(loss_BxL * weights_BxL),
        "correct_sum": jnp.sum(correct_BxL * weights_BxL),
        "weight_sum": jnp.sum(weights_BxL),
    }


def mean_loss(sums: dict[str, jax.Array]) -> jax.Array:
    return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0)
