"""Sampling from a causal LM: a plain loop over a fixed-size window (one compile, no KV cache).

Shape legend: L window length, V vocab.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.state import Setup
from jaxlm.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, Tokenizer


def sample_logits(logits_V: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Greedy at temperature 0; otherwise samples from the top_k (0 = all) tokens."""
    if temperature <= 0:
        return jnp.argmax(logits_V)
    logits_V = logits_V / temperature
    if 0 < top_k < logits_V.shape[-1]:
        kth = jax.lax.top_k(logits_V, top_k)[0][-1]
        logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
    return jax.random.categorical(key, logits_V)


def generate(
    setup: Setup,
    params: Any,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
) -> str:
    """Continues `prompt`; once the window is full the oldest tokens slide out of view."""
    window = setup.cfg.model.max_seq_len
    # Never sample specials other than EOS, nor ids past the tokenizer's vocabulary.
    banned_V = np.arange(setup.cfg.model.vocab_size) >= tokenizer.vocab_size
    banned_V[: len(SPECIAL_TOKENS)] = True
    banned_V[EOS_ID] = False

    @jax.jit
    def next_token(params: Any, tokens_1xL: jax.Array, length: jax.Array, key: jax.Array) -> jax.Array:
        model = nnx.merge(setup.model_def, params)
        positions_1xL = jnp.arange(window)[None]
        segment_ids_1xL = (positions_1xL < length).astype(jnp.int32)
        logits_V = model(tokens_1xL, segment_ids_1xL, positions_1xL)[0, length - 1]
        logits_V = jnp.where(banned_V, -jnp.inf, logits_V)
        return sample_logits(logits_V, key, temperature, top_k)

    context = [BOS_ID, *tokenizer.encode(prompt).tolist()]
    generated: list[int] = []
    key = jax.random.key(seed)
    for _ in range(max_new_tokens):
        visible = context[-window:]
        tokens_1xL = np.zeros((1, window), np.int32)
        tokens_1xL[0, : len(visible)] = visible
        key, sub = jax.random.split(key)
        token = int(next_token(params, jnp.asarray(tokens_1xL), jnp.int32(len(visible)), sub))
        if token == EOS_ID:
            break
        context.append(token)
        generated.append(token)
    return tokenizer.decode(generated)
