"""Self-attention in blocks of queries, with its backward written out: the XLA:CPU kernel.

Why: the reference (attention.reference_attention) builds each layer's B x H x L x L scores and
probabilities whole, and autodiff keeps the probabilities for the backward pass; on a CPU those
passes over memory, not the dots, take most of attention's time. Here each block of queries is
scored against the keys it can see (with `causal`, those up to the block's end: the blocks above
the diagonal are never computed), only the output and each row's log-sum-exp are kept, and the
backward recomputes each block's probabilities (as flash attention does). Same mask rule as
attention.attention_mask, built per block from the segment ids, and the same fp32 softmax as the
reference, so values and gradients agree with it to rounding.

Shape legend: B batch, L sequence, M keys, G kv heads, R query heads per kv head, K head dim,
C queries in a block.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# Queries per block: at least MIN_BLOCK, at most MAX_BLOCKS blocks (fewer ops to compile). Measured
# fwd + bwd, fp32, causal, 8 heads of 64: L 256, 64 rows 1.33x the reference (128: 1.05x); L 1024,
# 128 rows 2.7x (64: 2.5x, 256: 2.4x).
MIN_BLOCK, MAX_BLOCKS = 64, 8
MASKED = -1e30  # the reference's score for a masked key; every query sees at least itself


def blocked_attention(q_BxLxHxK: Array, k_BxLxGxK: Array, v_BxLxGxK: Array,
                      segment_ids_BxL: Array, causal: bool) -> Array:
    """Softmax attention of each query over the keys of its own packed document (padding, 0,
    sees padding), and with `causal` only over earlier ones: later keys' blocks are skipped."""
    return _attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, causal)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BxLxHxK: Array, k_BxLxGxK: Array, v_BxLxGxK: Array, segment_ids_BxL: Array,
               causal: bool) -> Array:
    return _forward(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, causal)[0]


def _blocks(length: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end of queries, end of the keys they can see) of each block."""
    size = max(MIN_BLOCK, -(-length // MAX_BLOCKS))
    ends = [(start, min(start + size, length)) for start in range(0, length, size)]
    return [(start, end, end if causal else length) for start, end in ends]


def heads_first(x_BxLxHxK: Array, kv_heads: int) -> Array:
    """[B, G, R, L, K]: each of the G kv heads' R query heads (kv heads themselves: R = 1), with
    contiguous L x K blocks for XLA:CPU's batched dots."""
    rows, length, heads, dim = x_BxLxHxK.shape
    x_BxLxGxRxK = x_BxLxHxK.reshape(rows, length, kv_heads, heads // kv_heads, dim)
    return x_BxLxGxRxK.transpose(0, 2, 3, 1, 4)


def sequence_first(x_BxGxRxLxK: Array) -> Array:
    """The inverse of `heads_first`: [B, L, G * R, K]."""
    rows, kv_heads, group, length, dim = x_BxGxRxLxK.shape
    return x_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(rows, length, kv_heads * group, dim)


def kv_first(k_BxMxGxK: Array, v_BxMxGxK: Array) -> tuple[Array, Array]:
    """k and v as [B, G, M, K] (a swap of two axes: its own inverse)."""
    return k_BxMxGxK.transpose(0, 2, 1, 3), v_BxMxGxK.transpose(0, 2, 1, 3)


def _block_mask(segment_ids_BxL: Array, start: int, end: int, seen: int,
                causal: bool) -> Array:
    """Bx1xCxM: which of the first `seen` keys each query of the block may see."""
    mask_BxCxM = segment_ids_BxL[:, start:end, None] == segment_ids_BxL[:, None, :seen]
    if causal:
        mask_BxCxM &= np.arange(start, end)[:, None] >= np.arange(seen)
    return mask_BxCxM[:, None]


def masked_scores(q_BxGxRxCxK: Array, k_BxGxMxK: Array, mask_Bx1xCxM: Array) -> Array:
    """fp32 q.k / sqrt(K), MASKED where the mask hides the key."""
    scores_BxGxRxCxM = jnp.einsum("BGRCK,BGMK->BGRCM", q_BxGxRxCxK, k_BxGxMxK,
                                  preferred_element_type=jnp.float32)
    scores_BxGxRxCxM = scores_BxGxRxCxM / np.sqrt(q_BxGxRxCxK.shape[-1])
    return jnp.where(mask_Bx1xCxM[:, :, None], scores_BxGxRxCxM, MASKED)


def _forward(q_BxLxHxK: Array, k_BxLxGxK: Array, v_BxLxGxK: Array, segment_ids_BxL: Array,
             causal: bool) -> tuple[Array, tuple]:
    q_BxGxRxLxK = heads_first(q_BxLxHxK, k_BxLxGxK.shape[2])
    k_BxGxLxK, v_BxGxLxK = kv_first(k_BxLxGxK, v_BxLxGxK)
    outs, logsumexps = [], []
    for start, end, seen in _blocks(q_BxLxHxK.shape[1], causal):
        scores_BxGxRxCxM = masked_scores(q_BxGxRxLxK[:, :, :, start:end], k_BxGxLxK[:, :, :seen],
                                         _block_mask(segment_ids_BxL, start, end, seen, causal))
        max_BxGxRxCx1 = jnp.max(scores_BxGxRxCxM, axis=-1, keepdims=True)
        exp_BxGxRxCxM = jnp.exp(scores_BxGxRxCxM - max_BxGxRxCx1)
        sum_BxGxRxCx1 = jnp.sum(exp_BxGxRxCxM, axis=-1, keepdims=True)
        probs_BxGxRxCxM = (exp_BxGxRxCxM / sum_BxGxRxCx1).astype(v_BxLxGxK.dtype)
        outs.append(jnp.einsum("BGRCM,BGMK->BGRCK", probs_BxGxRxCxM, v_BxGxLxK[:, :, :seen]))
        logsumexps.append(max_BxGxRxCx1 + jnp.log(sum_BxGxRxCx1))
    out_BxGxRxLxK = jnp.concatenate(outs, axis=3)
    residuals = (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, out_BxGxRxLxK,
                 jnp.concatenate(logsumexps, axis=3))
    return sequence_first(out_BxGxRxLxK), residuals


def _backward(causal: bool, residuals: tuple, grad_BxLxHxK: Array) -> tuple:
    q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, out_BxGxRxLxK, logsumexp_BxGxRxLx1 = residuals
    q_BxGxRxLxK, grad_BxGxRxLxK = (heads_first(x, k_BxLxGxK.shape[2])
                                   for x in (q_BxLxHxK, grad_BxLxHxK))
    k_BxGxLxK, v_BxGxLxK = kv_first(k_BxLxGxK, v_BxLxGxK)
    # Each query's sum of dO * O: the softmax backward's row term.
    row_BxGxRxLx1 = jnp.sum(grad_BxGxRxLxK.astype(jnp.float32) * out_BxGxRxLxK, axis=-1,
                            keepdims=True)
    grad_k_BxGxLxK = jnp.zeros(k_BxGxLxK.shape, jnp.float32)
    grad_v_BxGxLxK = jnp.zeros(v_BxGxLxK.shape, jnp.float32)
    grad_qs = []
    for start, end, seen in _blocks(q_BxLxHxK.shape[1], causal):
        q_BxGxRxCxK, grad_BxGxRxCxK = (x[:, :, :, start:end] for x in (q_BxGxRxLxK, grad_BxGxRxLxK))
        k_BxGxMxK, v_BxGxMxK = k_BxGxLxK[:, :, :seen], v_BxGxLxK[:, :, :seen]
        mask_Bx1xCxM = _block_mask(segment_ids_BxL, start, end, seen, causal)
        scores_BxGxRxCxM = masked_scores(q_BxGxRxCxK, k_BxGxMxK, mask_Bx1xCxM)
        probs_BxGxRxCxM = jnp.exp(scores_BxGxRxCxM - logsumexp_BxGxRxLx1[:, :, :, start:end])
        grad_v_BxGxLxK = grad_v_BxGxLxK.at[:, :, :seen].add(jnp.einsum(
            "BGRCM,BGRCK->BGMK", probs_BxGxRxCxM.astype(v_BxLxGxK.dtype), grad_BxGxRxCxK,
            preferred_element_type=jnp.float32))
        grad_probs_BxGxRxCxM = jnp.einsum("BGRCK,BGMK->BGRCM", grad_BxGxRxCxK, v_BxGxMxK,
                                          preferred_element_type=jnp.float32)
        grad_scores_BxGxRxCxM = (probs_BxGxRxCxM * (
            grad_probs_BxGxRxCxM - row_BxGxRxLx1[:, :, :, start:end]) / np.sqrt(
                q_BxLxHxK.shape[-1])).astype(q_BxLxHxK.dtype)
        grad_qs.append(jnp.einsum("BGRCM,BGMK->BGRCK", grad_scores_BxGxRxCxM, k_BxGxMxK,
                                  preferred_element_type=jnp.float32))
        grad_k_BxGxLxK = grad_k_BxGxLxK.at[:, :, :seen].add(jnp.einsum(
            "BGRCM,BGRCK->BGMK", grad_scores_BxGxRxCxM, q_BxGxRxCxK,
            preferred_element_type=jnp.float32))
    grad_q_BxLxHxK = sequence_first(jnp.concatenate(grad_qs, axis=3))
    grad_k_BxLxGxK, grad_v_BxLxGxK = kv_first(grad_k_BxGxLxK, grad_v_BxGxLxK)
    return (grad_q_BxLxHxK.astype(q_BxLxHxK.dtype), grad_k_BxLxGxK.astype(k_BxLxGxK.dtype),
            grad_v_BxLxGxK.astype(v_BxLxGxK.dtype), None)


_attention.defvjp(_forward, _backward)
