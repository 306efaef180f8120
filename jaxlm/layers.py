"""The Transformer's layers in Flax NNX: attention, MLP, norms and the block whose switches
(ModelConfig) give jaxlm's own LLaMA-like decoder, GPT-2 or BERT; `jaxlm.model` stacks them.

Shape legend: B batch, L sequence, D d_model, H heads (G kv heads), K head dim, F mlp hidden,
V vocab, N layers, T new tokens, S cache slots, M context length.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import projection
from jaxlm.attention import attention_mask, dot_product_attention, reference_attention
from jaxlm.config import ModelConfig, head_dim, kv_heads

Array = jax.Array


class Dropout(NamedTuple):
    """Training-time dropout: `rate` and the key of this step (and layer). Each site folds in
    its own salt, so the masks are a function of (seed, step, layer, site) and resume exactly."""

    key: jax.Array
    rate: float

    def __call__(self, x: Array, salt: int) -> Array:
        if self.rate <= 0:
            return x
        keep = jax.random.bernoulli(jax.random.fold_in(self.key, salt), 1 - self.rate, x.shape)
        return jnp.where(keep, x / (1 - self.rate), 0).astype(x.dtype)


# Dropout salts: token embeddings, attention probabilities, the two residual branches, the
# split into per-layer keys, and (encoder-decoder) cross-attention probabilities and branch.
EMBED_DROP, ATTN_DROP, ATTN_OUT_DROP, MLP_OUT_DROP, LAYER_KEYS, CROSS_DROP, CROSS_OUT_DROP = range(7)


class KVCache(NamedTuple):
    """Keys and values of every layer at every slot, stacked like the scanned block params
    (only the G kv heads are cached: H is G here)."""

    k_NxBxSxHxK: jax.Array
    v_NxBxSxHxK: jax.Array


def dense_init(std: float, names: tuple[str, ...]) -> dict:
    return {
        "kernel_init": nnx.initializers.normal(std),
        "kernel_metadata": {"out_sharding": names},
    }


def rope_frequencies(cfg: ModelConfig) -> tuple[float, ...]:
    """Per rotated pair: theta^(-i/half), with Llama 3.1's long-context rescaling if asked
    (low frequencies divided by the factor, a smooth ramp between low and high)."""
    dim = head_dim(cfg)
    freqs_h = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    if cfg.rope_scaling == "llama3":
        wavelen_h = 2 * math.pi / freqs_h
        old = cfg.rope_original_max_seq_len
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        scaled_h = np.where(wavelen_h > old / low, freqs_h / cfg.rope_scaling_factor, freqs_h)
        smooth_h = (old / wavelen_h - low) / (high - low)
        smoothed_h = (1 - smooth_h) * scaled_h / cfg.rope_scaling_factor + smooth_h * scaled_h
        medium_h = (wavelen_h >= old / high) & (wavelen_h <= old / low)
        freqs_h = np.where(medium_h, smoothed_h, scaled_h)
    return tuple(float(f) for f in np.asarray(freqs_h, np.float32))


def rope(x_BxLxHxK: Array, positions_BxL: Array, freqs: tuple[float, ...]) -> Array:
    """Rotary position embedding; positions restart per packed document."""
    freqs_h = jnp.asarray(freqs, jnp.float32)
    angles_BxLxh = positions_BxL[..., None].astype(jnp.float32) * freqs_h
    sin, cos = jnp.sin(angles_BxLxh)[:, :, None, :], jnp.cos(angles_BxLxh)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


def gelu_exact(x: Array) -> Array:
    # jax.nn.gelu(approximate=False) is far slower on XLA:CPU than this identical formula.
    return 0.5 * x * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


def activation(cfg: ModelConfig) -> Callable[[Array], Array]:
    """The GELU of the MLP (and of BERT's MLM transform): exact, or GPT-2's tanh form."""
    return partial(jax.nn.gelu, approximate=True) if cfg.mlp == "gelu_tanh" else gelu_exact


def _bias(cfg: ModelConfig, shape: tuple[int, ...], names: tuple[str, ...]) -> dict:
    """Einsum arguments for an optional bias (`model.bias`)."""
    return {"bias_shape": shape if cfg.bias else None, "bias_metadata": {"out_sharding": names}}


class Attention(nnx.Module):
    """Multi-head attention; `rope` False (cross-attention) rotates nothing."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rope: bool = True):
        d, h, g, k = cfg.d_model, cfg.n_heads, kv_heads(cfg), head_dim(cfg)
        common = {"dtype": cfg.compute_dtype, "param_dtype": cfg.param_dtype, "rngs": rngs,
                  "einsum_op": projection.einsum_op}
        qkv = dense_init(0.02, ("embed", "heads", "kv"))
        self.q = nnx.Einsum("BLD,DHK->BLHK", (d, h, k), **_bias(cfg, (h, k), ("heads", "kv")),
                            **qkv, **common)
        self.k = nnx.Einsum("BLD,DGK->BLGK", (d, g, k), **_bias(cfg, (g, k), ("heads", "kv")),
                            **qkv, **common)
        self.v = nnx.Einsum("BLD,DGK->BLGK", (d, g, k), **_bias(cfg, (g, k), ("heads", "kv")),
                            **qkv, **common)
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        self.o = nnx.Einsum(
            "BLHK,HKD->BLD", (h, k, d), **_bias(cfg, (d,), ("embed",)),
            **dense_init(out_std, ("heads", "kv", "embed")), **common
        )
        rotates = rope and cfg.position_embedding == "rope"
        self.rope_freqs = rope_frequencies(cfg) if rotates else None
        self.implementation = cfg.attention

    def _qkv(self, x_BxLxD: Array, positions_BxL: Array) -> tuple[Array, Array, Array]:
        q_BxLxHxK, k_BxLxGxK = self.q(x_BxLxD), self.k(x_BxLxD)
        if self.rope_freqs is not None:
            q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, self.rope_freqs)
            k_BxLxGxK = rope(k_BxLxGxK, positions_BxL, self.rope_freqs)
        return q_BxLxHxK, k_BxLxGxK, self.v(x_BxLxD)

    def __call__(
        self, x_BxLxD: Array, positions_BxL: Array, segment_ids_BxL: Array, causal: bool,
        drop: Dropout | None = None,
    ) -> Array:
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = self._qkv(x_BxLxD, positions_BxL)
        if drop is not None:  # training with dropout: the XLA reference with dropped probabilities
            mask_Bx1xLxL = attention_mask(segment_ids_BxL, causal)
            out_BxLxHxK = reference_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL,
                                              lambda p: drop(p, ATTN_DROP))
            return self.o(out_BxLxHxK)
        out_BxLxHxK = dot_product_attention(
            q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL,
            causal=causal, implementation=self.implementation,
        )
        return self.o(out_BxLxHxK)

    def cached(
        self, x_BxTxD: Array, positions_BxT: Array, cache: KVCache, layer: Array
    ) -> tuple[Array, KVCache]:
        """Causal attention for generation: writes this call's keys/values into `layer` of the
        cache at slot `positions` (per row; out-of-range slots are dropped), then attends over
        that layer's slots <= position."""
        q_BxTxHxK, new_k_BxTxHxK, new_v_BxTxHxK = self._qkv(x_BxTxD, positions_BxT)
        rows_Bx1 = jnp.arange(x_BxTxD.shape[0])[:, None]
        cache = KVCache(
            cache.k_NxBxSxHxK.at[layer, rows_Bx1, positions_BxT].set(new_k_BxTxHxK, mode="drop"),
            cache.v_NxBxSxHxK.at[layer, rows_Bx1, positions_BxT].set(new_v_BxTxHxK, mode="drop"),
        )
        k_BxSxHxK, v_BxSxHxK = cache.k_NxBxSxHxK[layer], cache.v_NxBxSxHxK[layer]
        slots_S = jnp.arange(k_BxSxHxK.shape[1])
        mask_Bx1xTxS = (slots_S <= positions_BxT[:, :, None])[:, None]
        # Sequence-first (jax.nn): reads the cache as stored, where the heads-first reference
        # would transpose every layer's whole cache for each generated token.
        out_BxTxHxK = jax.nn.dot_product_attention(
            q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_Bx1xTxS, implementation="xla"
        )
        return self.o(out_BxTxHxK), cache

    def keys_values(self, context_BxMxD: Array) -> tuple[Array, Array]:
        """Cross-attention keys and values of the encoder output (computed once to generate)."""
        return self.k(context_BxMxD), self.v(context_BxMxD)

    def cross(self, x_BxLxD: Array, kv: tuple[Array, Array], mask_Bx1xLxM: Array,
              drop: Dropout | None = None) -> Array:
        """Attention of `x` over the keys/values `kv` of another sequence where the mask allows."""
        q_BxLxHxK, (k_BxMxGxK, v_BxMxGxK) = self.q(x_BxLxD), kv
        drop_probs = None if drop is None else (lambda p: drop(p, CROSS_DROP))
        out_BxLxHxK = reference_attention(q_BxLxHxK, k_BxMxGxK, v_BxMxGxK, mask_Bx1xLxM,
                                          drop_probs)
        return self.o(out_BxLxHxK)


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        common = {"dtype": cfg.compute_dtype, "param_dtype": cfg.param_dtype, "rngs": rngs,
                  "use_bias": cfg.bias, "dot_general": projection.dot_general}
        wi = dense_init(0.02, ("embed", "mlp")) | {"bias_metadata": {"out_sharding": ("mlp",)}}
        self.up = nnx.Linear(d, f, **wi, **common)
        self.gate = nnx.Linear(d, f, **wi, **common) if cfg.mlp == "swiglu" else None
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        wo = dense_init(out_std, ("mlp", "embed"))
        wo["bias_metadata"] = {"out_sharding": ("embed",)}
        self.down = nnx.Linear(f, d, **wo, **common)
        self.activation = activation(cfg)

    def __call__(self, x_BxLxD: Array) -> Array:
        if self.gate is None:
            h_BxLxF = self.activation(self.up(x_BxLxD))
        else:
            h_BxLxF = jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD)
        return self.down(h_BxLxF)


def make_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm | nnx.LayerNorm:
    """`model.norm`: RMSNorm (scale only) or LayerNorm (scale and bias, two-pass variance)."""
    common = {"epsilon": cfg.norm_eps, "dtype": cfg.compute_dtype, "param_dtype": cfg.param_dtype,
              "scale_metadata": {"out_sharding": ("embed",)}, "rngs": rngs}
    if cfg.norm == "layernorm":
        return nnx.LayerNorm(cfg.d_model, use_fast_variance=False,
                             bias_metadata={"out_sharding": ("embed",)}, **common)
    return nnx.RMSNorm(cfg.d_model, **common)


class Block(nnx.Module):
    """Attention and MLP sublayers with residuals; each norm normalises its sublayer's input
    (pre-norm) or the residual sum after it (post-norm, BERT)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.post_norm = cfg.norm_position == "post"

    def __call__(
        self, x_BxLxD: Array, positions_BxL: Array, segment_ids_BxL: Array, causal: bool,
        drop: Dropout | None = None,
    ) -> Array:
        attend = lambda h_BxLxD: (
            self.attn(h_BxLxD, positions_BxL, segment_ids_BxL, causal, drop), None)
        return self._residuals(x_BxLxD, attend, drop)[0]

    def cached(
        self, x_BxTxD: Array, positions_BxT: Array, cache: KVCache, layer: Array
    ) -> tuple[Array, KVCache]:
        """The block for generation: attention reads and updates `layer` of the KV cache."""
        return self._residuals(
            x_BxTxD, lambda h_BxTxD: self.attn.cached(h_BxTxD, positions_BxT, cache, layer)
        )

    def _residuals(
        self, x_BxLxD: Array, attend: Callable[[Array], tuple[Array, Any]],
        drop: Dropout | None = None, cross: Callable[[Array], Array] | None = None,
    ) -> tuple[Array, Any]:
        """Self-attention, then `cross`-attention (decoder blocks of an encoder-decoder, whose
        `cross_norm` normalises it), then the MLP, each a residual branch."""
        branch = (lambda y, salt: y) if drop is None else drop  # dropout on each residual branch
        if self.post_norm:
            attn_BxLxD, cache = attend(x_BxLxD)
            x_BxLxD = self.attn_norm(x_BxLxD + branch(attn_BxLxD, ATTN_OUT_DROP))
            if cross is not None:
                x_BxLxD = self.cross_norm(x_BxLxD + branch(cross(x_BxLxD), CROSS_OUT_DROP))
            return self.mlp_norm(x_BxLxD + branch(self.mlp(x_BxLxD), MLP_OUT_DROP)), cache
        attn_BxLxD, cache = attend(self.attn_norm(x_BxLxD))
        x_BxLxD = x_BxLxD + branch(attn_BxLxD, ATTN_OUT_DROP)
        if cross is not None:
            x_BxLxD = x_BxLxD + branch(cross(self.cross_norm(x_BxLxD)), CROSS_OUT_DROP)
        return x_BxLxD + branch(self.mlp(self.mlp_norm(x_BxLxD)), MLP_OUT_DROP), cache
