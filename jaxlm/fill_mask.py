"""`jaxlm fill-mask`: the likeliest tokens for each [MASK] in a text, from a masked-LM checkpoint.

Shape legend: L sequence, M masks, V vocab, K top-k.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import UserError
from jaxlm.state import Setup
from jaxlm.tokenizer import Tokenizer, unusable_ids

MASK_TEXT = "[MASK]"


def encode_with_masks(text: str, tokenizer: Tokenizer, max_len: int) -> np.ndarray:
    """BOS, the text with each [MASK] as the tokenizer's mask id, EOS. With word pieces the space
    before a mask belongs to the masked word (pieces carry their leading space)."""
    parts = text.split(MASK_TEXT)
    if len(parts) == 1:
        raise UserError(f"fill-mask text has no {MASK_TEXT}; write {MASK_TEXT} where a token is missing")
    if tokenizer.mask_id is None:
        raise UserError("fill-mask needs a tokenizer with a mask token; data.tokenizer has none "
                        "(use the tokenizer the masked LM was trained with)")
    word_pieces = tokenizer.word_starts() is not None
    ids = [tokenizer.bos_id]
    for i, part in enumerate(parts):
        if word_pieces and i < len(parts) - 1 and part.endswith(" "):
            part = part[:-1]
        ids.extend(tokenizer.encode(part).tolist())
        if i < len(parts) - 1:
            ids.append(tokenizer.mask_id)
    ids.append(tokenizer.eos_id)
    if len(ids) > max_len:
        raise UserError(f"fill-mask text is {len(ids)} tokens; the model takes at most {max_len}")
    return np.asarray(ids, np.int32)


def fill_mask(
    setup: Setup, params: Any, tokenizer: Tokenizer, text: str, top_k: int
) -> list[list[tuple[str, float]]]:
    """For each [MASK] in order: the top_k (token text, probability) pairs."""
    length = setup.cfg.data.seq_len
    ids_L = encode_with_masks(text, tokenizer, length)
    tokens_1xL = np.zeros((1, length), np.int32)
    tokens_1xL[0, : len(ids_L)] = ids_L
    segment_ids_1xL = (np.arange(length) < len(ids_L)).astype(np.int32)[None]
    positions_1xL = np.arange(length, dtype=np.int32)[None]
    banned_V = unusable_ids(setup.cfg.model.vocab_size, tokenizer)  # never answers
    k = min(top_k, int((~banned_V).sum()))

    @jax.jit
    def top_tokens(params: Any, tokens_1xL: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(setup.model_def, params)
        logits_LxV = model(tokens_1xL, segment_ids_1xL, positions_1xL)[0]
        probs_LxV = jax.nn.softmax(jnp.where(banned_V, -jnp.inf, logits_LxV), axis=-1)
        return jax.lax.top_k(probs_LxV, k)

    probs_LxK, ids_LxK = jax.device_get(top_tokens(params, tokens_1xL))
    return [
        [(tokenizer.token_text(int(i)), float(p)) for i, p in zip(ids_LxK[pos], probs_LxK[pos])]
        for pos in np.flatnonzero(ids_L == tokenizer.mask_id)
    ]
