"""Sampling from a causal LM with a KV cache: one jitted prefill over a batch of prompts, then one
jitted decode step per new token for the whole batch.

Rows are right-padded: row b's context (BOS + prompt) fills cache slots [0, n_b) and its j-th new
token is written at slot n_b + j, so every token's RoPE position is its slot. A query at slot p
attends to slots <= p, all of which hold that row's real tokens by then (pad slots are overwritten
before anything can see them). The cache has `model.max_seq_len` slots and does not slide: a row
stops when it is full, at EOS, or after `max_new_tokens`; a longer prompt keeps its last
max_seq_len - 1 tokens. Prompts are padded to a power-of-two bucket, so a (batch, bucket) shape
compiles once.

An encoder-decoder encodes the prompts once (each row's input, [eos]-terminated, in encoder
positions [0, n_b)), computes every decoder layer's cross-attention keys/values of it once, and
decodes from [bos] at decoder slot 0 with the same self-attention cache and steps.

With params sharded over a mesh (`jaxlm generate` on the run's own mesh fitted to the devices), the
steps run under that mesh's rules: the cache is split like the batch and the heads, and a batch of
prompts is padded with empty rows to a multiple of the batch shards.

Shape legend: B batch, P prompt bucket, S cache slots (max_seq_len), D d_model, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import sharding
from jaxlm.config import architecture
from jaxlm.encdec import Seq2SeqCache
from jaxlm.layers import KVCache
from jaxlm.state import Setup
from jaxlm.tasks import encoder_input_ids
from jaxlm.tokenizer import Tokenizer, unusable_ids

MIN_BUCKET = 16


def sample_logits(
    logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """Greedy at temperature 0; otherwise samples among the top_k (0 = all) tokens that are also
    in the smallest set whose probability reaches top_p (1 = all)."""
    if temperature <= 0:
        return jnp.argmax(logits_BxV, axis=-1)
    logits_BxV = logits_BxV / temperature
    if 0 < top_k < logits_BxV.shape[-1]:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p < 1:
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_Bx1 = jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf).min(-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1)


def banned_tokens(model_vocab: int, tokenizer: Tokenizer) -> np.ndarray:
    """Never sampled: specials other than EOS, and ids past the tokenizer's vocabulary."""
    banned_V = unusable_ids(model_vocab, tokenizer)
    banned_V[tokenizer.eos_id] = False
    return banned_V


def bucket(length: int, window: int) -> int:
    """Padded prompt length: a power of two (at least MIN_BUCKET), at most the window."""
    return min(window, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


@dataclass(frozen=True)
class Sampler:
    """The two jitted functions of generation (jit caches one compile per input shape).

    prefill(params, tokens_BxP, lengths_B, key) -> (first new token per row, cache)
    decode(params, cache, tokens_B, positions_B, key, step) -> (next token per row, cache): writes
    `tokens` at slot `positions`, samples with `key` folded with `step`; the cache is donated.
    A batch has a multiple of `rows` rows (the mesh's batch shards). `first_slot`: the cache slot
    of the first new token (None: after the context, in the same cache; an encoder-decoder's 1).
    """

    window: int
    rows: int
    prefill: Callable[..., tuple[jax.Array, Any]]
    decode: Callable[..., tuple[jax.Array, Any]]
    first_slot: int | None = None


def make_sampler(
    setup: Setup, banned_V: np.ndarray, *, temperature: float, top_k: int, top_p: float,
    start_id: int | None = None,
) -> Sampler:
    """The jitted steps; `start_id` is the decoder's first input of an encoder-decoder ([bos])."""
    window = setup.cfg.model.max_seq_len
    encoder_decoder = architecture(setup.cfg) == "encoder_decoder"
    if encoder_decoder and start_id is None:
        raise ValueError("an encoder-decoder's sampler needs the decoder's start_id")

    def next_token(model: Any, x_BxD: jax.Array, key: jax.Array, step: jax.Array) -> jax.Array:
        logits_BxV = jnp.where(banned_V, -jnp.inf, model.head(x_BxD))
        key = jax.random.fold_in(key, step)
        return sample_logits(logits_BxV, key, temperature, top_k, top_p).astype(jnp.int32)

    def prefill(
        params: Any, tokens_BxP: jax.Array, lengths_B: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        model = nnx.merge(setup.model_def, params)
        batch, length = tokens_BxP.shape
        positions_BxP = jnp.broadcast_to(jnp.arange(length), (batch, length))
        with sharding.activation_sharding(setup.mesh, setup.rules):
            x_BxPxD, cache = model.cached(tokens_BxP, positions_BxP, model.init_cache(batch, window))
        last_BxD = x_BxPxD[jnp.arange(batch), lengths_B - 1]
        return next_token(model, last_BxD, key, 0), cache

    def decode(
        params: Any,
        cache: KVCache,
        tokens_B: jax.Array,
        positions_B: jax.Array,
        key: jax.Array,
        step: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        model = nnx.merge(setup.model_def, params)
        with sharding.activation_sharding(setup.mesh, setup.rules):
            x_Bx1xD, cache = model.cached(tokens_B[:, None], positions_B[:, None], cache)
        return next_token(model, x_Bx1xD[:, 0], key, step), cache

    def prefill_encoded(
        params: Any, tokens_BxP: jax.Array, lengths_B: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, Seq2SeqCache]:
        model = nnx.merge(setup.model_def, params)
        batch, length = tokens_BxP.shape
        valid_BxP = jnp.arange(length) < lengths_B[:, None]
        positions_BxP = jnp.broadcast_to(jnp.arange(length), (batch, length))
        start_Bx1 = jnp.full((batch, 1), start_id, jnp.int32)
        with sharding.activation_sharding(setup.mesh, setup.rules):
            encoded_BxPxD = model.encode(tokens_BxP, valid_BxP.astype(jnp.int32), positions_BxP)
            cache = model.init_cache(encoded_BxPxD, valid_BxP, window)
            x_Bx1xD, cache = model.cached(start_Bx1, jnp.zeros_like(start_Bx1), cache)
        return next_token(model, x_Bx1xD[:, 0], key, 0), cache

    rows = sharding.batch_shards(setup.batch_sharding)
    if encoder_decoder:
        return Sampler(window, rows, jax.jit(prefill_encoded), jax.jit(decode, donate_argnums=1),
                       first_slot=1)
    return Sampler(window, rows, jax.jit(prefill), jax.jit(decode, donate_argnums=1))


def sample_ids(
    sampler: Sampler,
    params: Any,
    contexts: list[list[int]],
    *,
    max_new_tokens: int,
    seed: int,
    eos_id: int,
) -> list[list[int]]:
    """New token ids per context (`eos_id`, which ends a row, not included); see the module
    docstring for the limits."""
    asked = len(contexts)
    if sampler.first_slot is None:  # the newest tokens, and room for one new token
        contexts = [c[-(sampler.window - 1) :] for c in contexts]
    else:  # an encoder's input keeps its start, as in training
        contexts = [c[: sampler.window] for c in contexts]
    contexts += [contexts[0][:1]] * (-asked % sampler.rows)  # padding rows, dropped at the end
    lengths_B = np.array([len(c) for c in contexts], np.int32)
    tokens_BxP = np.zeros((len(contexts), bucket(int(lengths_B.max()), sampler.window)), np.int32)
    for row, context in enumerate(contexts):
        tokens_BxP[row, : len(context)] = context
    key = jax.random.key(seed)
    tokens_B, cache = sampler.prefill(params, tokens_BxP, lengths_B, key)
    # The slot each row's newest token goes to.
    positions_B = lengths_B.copy() if sampler.first_slot is None else np.full_like(
        lengths_B, sampler.first_slot)
    new: list[list[int]] = [[] for _ in contexts]
    done_B = np.arange(len(contexts)) >= asked  # padding rows are done from the start
    for step in range(1, max_new_tokens + 1):
        for row, token in enumerate(np.asarray(tokens_B).tolist()):
            if done_B[row]:
                continue
            if token == eos_id:
                done_B[row] = True
                continue
            new[row].append(token)
            done_B[row] = len(new[row]) == max_new_tokens or positions_B[row] + 1 >= sampler.window
        if done_B.all():
            break
        tokens_B, cache = sampler.decode(params, cache, tokens_B, positions_B, key, step)
        positions_B = positions_B + 1  # a new array: the last one may still be in flight
    return new[:asked]


def generate(
    setup: Setup,
    params: Any,
    tokenizer: Tokenizer,
    prompts: str | list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float = 1.0,
    seed: int,
) -> str | list[str]:
    """Continuations of `prompts` (a list gives a list), sampled as one batch with a KV cache."""
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    banned_V = banned_tokens(setup.cfg.model.vocab_size, tokenizer)
    sampler = make_sampler(setup, banned_V, temperature=temperature, top_k=top_k, top_p=top_p,
                           start_id=tokenizer.bos_id)
    if sampler.first_slot is None:
        contexts = [[tokenizer.bos_id, *tokenizer.encode(p).tolist()] for p in batch]
    else:  # an encoder-decoder's input, cut as in training
        contexts = [encoder_input_ids(tokenizer, p, setup.cfg.data.seq_len) for p in batch]
    new = sample_ids(sampler, params, contexts, max_new_tokens=max_new_tokens, seed=seed,
                     eos_id=tokenizer.eos_id)
    texts = [tokenizer.decode(ids) for ids in new]
    return texts[0] if isinstance(prompts, str) else texts
