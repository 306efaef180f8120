"""Attention kernels behind one function: XLA reference (in query blocks for causal attention on
a CPU: blocked_attention.py), cuDNN flash (GPU), Pallas splash (TPU).

`model.attention` names the kernel; it is resolved when the step is traced. A request that this
backend, dtype or shape cannot serve falls back to the XLA reference with one warning per process,
so a config written for an accelerator still runs anywhere. Every kernel applies the same rule:
a query sees only keys of its own packed document (padding, id 0, only sees padding), and with
`causal` only keys at or before it. Keys and values may have fewer heads than queries (grouped-query
attention: each kv head serves n_heads / n_kv_heads query heads).

Shape legend: B batch, L sequence, H heads, K head dim.
"""

from __future__ import annotations

import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from jaxlm.blocked_attention import (MIN_BLOCK, blocked_attention, heads_first, kv_first,
                                     masked_scores, sequence_first)
from jaxlm.sharding import compute_device, shard_map_by_logical

Array = jax.Array
# Splash is mapped over batch rows and heads; its shard_map splits them like the activations.
SPLASH_AXES = ("batch", None, "heads", None)
_warned: set[str] = set()


def attention_mask(segment_ids_BxL: Array, causal: bool) -> Array:
    """Bx1xLxL boolean: same packed document (padding only sees padding), and causal if asked."""
    same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    if causal:
        length = segment_ids_BxL.shape[1]
        same_doc_BxLxL &= jnp.tril(jnp.ones((length, length), dtype=bool))
    return same_doc_BxLxL[:, None]


def dot_product_attention(
    q_BxLxHxK: Array,
    k_BxLxHxK: Array,
    v_BxLxHxK: Array,
    segment_ids_BxL: Array,
    *,
    causal: bool,
    implementation: str,
) -> Array:
    """Self-attention over packed rows by the kernel `implementation` names, if it runs here."""
    unsupported = _unsupported(implementation, q_BxLxHxK)
    if implementation == "splash" and not unsupported:
        groups = q_BxLxHxK.shape[2] // k_BxLxHxK.shape[2]  # grouped-query: share each kv head
        k_BxLxHxK, v_BxLxHxK = (jnp.repeat(x, groups, axis=2) for x in (k_BxLxHxK, v_BxLxHxK))
        return splash_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, causal=causal)
    if implementation == "cudnn" and not unsupported:
        # cuDNN skips the blocks above the diagonal itself; the document mask becomes its bias.
        same_doc_Bx1xLxL = attention_mask(segment_ids_BxL, causal=False)
        try:
            return jax.nn.dot_product_attention(
                q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=same_doc_Bx1xLxL, is_causal=causal,
                implementation="cudnn",
            )
        except (RuntimeError, NotImplementedError) as err:  # jax's own checks, while tracing
            unsupported = f"was refused: {err}"
    if unsupported:
        _warn_once(implementation, unsupported)
    if causal and compute_device().platform == "cpu" and q_BxLxHxK.shape[1] > MIN_BLOCK:
        return blocked_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, causal)
    return reference_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK,
                               attention_mask(segment_ids_BxL, causal))


def reference_attention(q_BxLxHxK: Array, k_BxMxGxK: Array, v_BxMxGxK: Array,
                        mask_Bx1xLxM: Array, drop: Callable[[Array], Array] | None = None) -> Array:
    """Softmax attention written out (fp32 scores and softmax, like jax.nn's XLA reference),
    `drop` applied to the probabilities if given (the fused kernels have no dropout).

    Heads first: XLA:CPU runs the two batched dots and their gradients on B x heads contiguous
    L x K blocks, ~2x faster forward and ~1.3x forward + backward than jax.nn's sequence-first
    einsums (docs/benchmarks.md). Each of the G kv heads serves its R = H / G query heads
    without k and v being repeated."""
    q_BxGxRxLxK = heads_first(q_BxLxHxK, k_BxMxGxK.shape[2])
    k_BxGxMxK, v_BxGxMxK = kv_first(k_BxMxGxK, v_BxMxGxK)
    scores_BxGxRxLxM = masked_scores(q_BxGxRxLxK, k_BxGxMxK, mask_Bx1xLxM)
    probs_BxGxRxLxM = jax.nn.softmax(scores_BxGxRxLxM, axis=-1)
    if drop is not None:
        probs_BxGxRxLxM = drop(probs_BxGxRxLxM)
    out_BxGxRxLxK = jnp.einsum("BGRLM,BGMK->BGRLK", probs_BxGxRxLxM.astype(v_BxMxGxK.dtype),
                               v_BxGxMxK)
    return sequence_first(out_BxGxRxLxK)


def cross_attention_mask(q_segment_ids_BxL: Array, kv_segment_ids_BxM: Array) -> Array:
    """Bx1xLxM boolean: a decoder token sees the encoder tokens of its own packed pair."""
    return (q_segment_ids_BxL[:, :, None] == kv_segment_ids_BxM[:, None, :])[:, None]


def _unsupported(implementation: str, q_BxLxHxK: Array) -> str:
    """Why `implementation` cannot run on the devices traced for with these inputs ('' if it
    can)."""
    _, length, _, head_dim = q_BxLxHxK.shape
    device = compute_device()
    backend = device.platform
    if implementation == "cudnn":
        if backend != "gpu":
            return f"needs a GPU, the backend is {backend}"
        capability = getattr(device, "compute_capability", "0")
        if float(capability) < 8.0:
            return f"needs compute capability >= 8.0, the GPU has {capability}"
        if q_BxLxHxK.dtype not in (jnp.bfloat16, jnp.float16):
            return f"needs model.compute_dtype bfloat16 or float16, got {q_BxLxHxK.dtype}"
        if head_dim > 128 or head_dim % 8 or length % 2:
            return f"needs head dim <= 128 and 8 | head dim and 2 | length: {head_dim}, {length}"
    if implementation == "splash":
        if backend != "tpu":
            return f"needs a TPU, the backend is {backend}"
        if length % splash.splash_attention_kernel.NUM_LANES:
            return f"needs a sequence length that is a multiple of 128, got {length}"
    return ""


def _warn_once(implementation: str, reason: str) -> None:
    if implementation not in _warned:
        _warned.add(implementation)
        warnings.warn(f"model.attention={implementation} {reason}; using xla", stacklevel=3)


def splash_attention(
    q_BxLxHxK: Array,
    k_BxLxHxK: Array,
    v_BxLxHxK: Array,
    segment_ids_BxL: Array,
    *,
    causal: bool,
    interpret: bool = False,
) -> Array:
    """The Pallas splash kernel, one call per row and device shard (`interpret` runs it on CPU)."""

    def per_shard(q_BxLxHxK: Array, k_BxLxHxK: Array, v_BxLxHxK: Array, seg_BxL: Array) -> Array:
        _, length, heads, head_dim = q_BxLxHxK.shape
        kernel = _splash_kernel(length, heads, causal, interpret)
        q_BxHxLxK = jnp.swapaxes(q_BxLxHxK, 1, 2) / np.sqrt(head_dim).astype(q_BxLxHxK.dtype)
        k_BxHxLxK, v_BxHxLxK = jnp.swapaxes(k_BxLxHxK, 1, 2), jnp.swapaxes(v_BxLxHxK, 1, 2)

        def one_row(q_HxLxK: Array, k_HxLxK: Array, v_HxLxK: Array, seg_L: Array) -> Array:
            segment_ids = splash.SegmentIds(q=seg_L, kv=seg_L)
            return kernel(q_HxLxK, k_HxLxK, v_HxLxK, segment_ids=segment_ids)

        out_BxHxLxK = jax.vmap(one_row)(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, seg_BxL)
        return jnp.swapaxes(out_BxHxLxK, 1, 2)

    sharded = shard_map_by_logical(
        per_shard, in_axes=(SPLASH_AXES,) * 3 + (("batch", None),), out_axes=SPLASH_AXES
    )
    return sharded(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL)


def _splash_kernel(length: int, heads: int, causal: bool, interpret: bool):
    """Built while tracing (its mask tables become constants of this trace, so never cached)."""
    block = 512 if length % 512 == 0 else 128
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )
    mask = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    return splash.make_splash_mha_single_device(
        splash.MultiHeadMask([mask] * heads), block_sizes=sizes, interpret=interpret
    )
