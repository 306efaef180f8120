"""Transformer backbone in Flax NNX: one block whose switches (ModelConfig) give jaxlm's own
LLaMA-like decoder, GPT-2 or BERT; stacked layers run by scan.

Shape legend: B batch, L sequence, D d_model, H heads (G kv heads), K head dim, F mlp hidden,
V vocab, N layers.
Logical axis names used on params: embed, mlp, heads, kv, vocab, layers (mapped to the mesh in
config). Variables are created without eager sharding: `jaxlm.sharding` turns the names into
NamedShardings and `jit(init, out_shardings=...)` places them, so nothing is materialised unsharded.
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
from jaxlm.config import ModelConfig, head_dim, kv_heads, scans_layers
from jaxlm.sharding import constrain

Array = jax.Array
# Activations between blocks: rows split like the batch, features replicated.
ACTIVATION_AXES = ("batch", None, None)
# The KV cache (layers, rows, slots, heads, head dim): rows like the batch, heads like the params.
CACHE_AXES = ("layers", "batch", None, "heads", "kv")
# train.remat -> what each layer keeps for the backward pass (the rest is recomputed);
# dots_saveable: the projections' outputs (attention's batched dots are recomputed).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.save_only_these_names(projection.CHECKPOINT_NAME),
}


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


def _dense_init(std: float, names: tuple[str, ...]) -> dict:
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
        qkv = _dense_init(0.02, ("embed", "heads", "kv"))
        self.q = nnx.Einsum("BLD,DHK->BLHK", (d, h, k), **_bias(cfg, (h, k), ("heads", "kv")),
                            **qkv, **common)
        self.k = nnx.Einsum("BLD,DGK->BLGK", (d, g, k), **_bias(cfg, (g, k), ("heads", "kv")),
                            **qkv, **common)
        self.v = nnx.Einsum("BLD,DGK->BLGK", (d, g, k), **_bias(cfg, (g, k), ("heads", "kv")),
                            **qkv, **common)
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        self.o = nnx.Einsum(
            "BLHK,HKD->BLD", (h, k, d), **_bias(cfg, (d,), ("embed",)),
            **_dense_init(out_std, ("heads", "kv", "embed")), **common
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
        wi = _dense_init(0.02, ("embed", "mlp")) | {"bias_metadata": {"out_sharding": ("mlp",)}}
        self.up = nnx.Linear(d, f, **wi, **common)
        self.gate = nnx.Linear(d, f, **wi, **common) if cfg.mlp == "swiglu" else None
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        wo = _dense_init(out_std, ("mlp", "embed"))
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


class LanguageModel(nnx.Module):
    """What every architecture shares: the token (and position/type) embeddings before the first
    block, and the head after the last."""

    def _init_embeddings(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata={"out_sharding": ("vocab", "embed")},
            rngs=rngs,
        )
        learned = cfg.position_embedding == "learned"
        self.pos_embed = _table(cfg.max_seq_len, cfg, rngs) if learned else None
        types = cfg.type_vocab_size
        self.type_embed = _table(types, cfg, rngs) if types else None
        self.embed_norm = make_norm(cfg, rngs) if cfg.embed_norm else None

    def _init_head(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
        self.final_norm = make_norm(cfg, rngs) if cfg.final_norm else None
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else nnx.Linear(
                cfg.d_model,
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.param_dtype,
                **_dense_init(0.02, ("embed", "vocab")),
                rngs=rngs,
            )
        )

    def _add_embeddings(
        self, x_BxLxD: Array, positions_BxL: Array, token_types_BxL: Array | None
    ) -> Array:
        """Token embeddings plus learned positions and token types, then the embedding norm
        (each where the model has one)."""
        if self.pos_embed is not None:
            x_BxLxD = x_BxLxD + self.pos_embed(positions_BxL)
        if self.type_embed is not None:
            if token_types_BxL is None:
                token_types_BxL = jnp.zeros_like(positions_BxL)
            x_BxLxD = x_BxLxD + self.type_embed(token_types_BxL)
        return x_BxLxD if self.embed_norm is None else self.embed_norm(x_BxLxD)

    def head(self, x_BxLxD: Array) -> Array:
        """Last block's output -> fp32 logits."""
        if self.final_norm is not None:
            x_BxLxD = self.final_norm(x_BxLxD)
        if self.mlm_head is not None:
            x_BxLxD = self.mlm_head(x_BxLxD)
        decoder_VxD = self.embed.embedding[...] if self.lm_head is None else self.lm_head.kernel[...].T
        # bf16 inputs, fp32 accumulation and output: logits keep fp32 precision for the loss.
        logits_BxLxV = jnp.einsum("...D,VD->...V", x_BxLxD, decoder_VxD.astype(x_BxLxD.dtype),
                                  preferred_element_type=jnp.float32)
        if self.mlm_head is not None:
            logits_BxLxV = logits_BxLxV + self.mlm_head.bias[...]
        return logits_BxLxV


class Transformer(LanguageModel):
    """Token ids -> fp32 logits; `causal` picks decoder (CLM) or bidirectional encoder attention;
    `remat` (train.remat) what each layer recomputes in the backward pass instead of storing."""

    def __init__(self, cfg: ModelConfig, *, causal: bool, rngs: nnx.Rngs, remat: str = "none"):
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved from the tokenizer first")
        self.causal = causal
        self.remat = remat
        self.dropout = cfg.dropout
        self.scan_layers = scans_layers(cfg)
        with nnx.use_eager_sharding(False):
            self._init_embeddings(cfg, rngs)
            self.blocks = stacked_blocks(cfg, rngs, cfg.n_layers, Block)
            self._init_head(cfg, rngs)
            self.mlm_head = None if causal else MlmHead(cfg, rngs=rngs)

    def __call__(
        self,
        tokens_BxL: Array,
        segment_ids_BxL: Array,
        positions_BxL: Array,
        token_types_BxL: Array | None = None,
        dropout_key: Array | None = None,
    ) -> Array:
        """Logits; `token_types` (BERT's segment A/B) default to type 0 where the model has any;
        `dropout_key` (training steps only) turns model.dropout on."""
        return self.from_embeddings(
            self.embed(tokens_BxL), segment_ids_BxL, positions_BxL, token_types_BxL, dropout_key
        )

    def from_embeddings(
        self,
        x_BxLxD: Array,
        segment_ids_BxL: Array,
        positions_BxL: Array,
        token_types_BxL: Array | None = None,
        dropout_key: Array | None = None,
    ) -> Array:
        """The network after the token lookup (a seam for gradients w.r.t. input positions)."""
        return self.head(
            self._layers(x_BxLxD, segment_ids_BxL, positions_BxL, token_types_BxL, dropout_key))

    def hidden(self, tokens_BxL: Array, segment_ids_BxL: Array, positions_BxL: Array,
               token_types_BxL: Array | None = None, dropout_key: Array | None = None,
               normed: bool = True) -> Array:
        """Hidden states of the last block after the final norm (where the model has one): what
        task heads read (`normed` False: before it, for `head` to read too)."""
        x_BxLxD = self._layers(self.embed(tokens_BxL), segment_ids_BxL, positions_BxL,
                               token_types_BxL, dropout_key)
        return self.final_norm(x_BxLxD) if normed and self.final_norm is not None else x_BxLxD

    def _layers(self, x_BxLxD: Array, segment_ids_BxL: Array, positions_BxL: Array,
                token_types_BxL: Array | None, dropout_key: Array | None) -> Array:
        """The blocks over the embeddings (see `scan_blocks`)."""
        x_BxLxD = self._add_embeddings(x_BxLxD, positions_BxL, token_types_BxL)
        x_BxLxD, keys = embedding_dropout(x_BxLxD, dropout_key, self.dropout, self.blocks)

        def layer(block: Block, x_BxLxD: Array, drop: Dropout | None) -> Array:
            return block(x_BxLxD, positions_BxL, segment_ids_BxL, self.causal, drop)

        return scan_blocks(self.blocks, x_BxLxD, layer, keys, self.dropout, self.scan_layers,
                           self.remat)

    def cached(
        self, tokens_BxT: Array, positions_BxT: Array, cache: KVCache
    ) -> tuple[Array, KVCache]:
        """Causal forward for generation, up to `head` (apply it to the rows that need logits):
        the same blocks as `__call__`, but each layer writes the keys/values of `tokens` at cache
        slot `positions` (per row) and attends over its cache slots <= position."""

        def layer(block: Block, carry: tuple[Array, KVCache], index: Array, _: Any) -> tuple:
            x_BxTxD, cache = carry
            return block.cached(x_BxTxD, positions_BxT, cache, index)

        x_BxTxD = self._add_embeddings(self.embed(tokens_BxT), positions_BxT, None)
        return scan_cached(self.blocks, (x_BxTxD, cache), layer, None, self.scan_layers)

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache of `length` slots per row, in the compute dtype."""
        return empty_cache(self.blocks, batch, length)


def empty_cache(blocks: Block, batch: int, length: int) -> KVCache:
    """An empty self-attention cache of `length` slots per row for the stacked `blocks`."""
    n_layers, _, heads, head_dim = blocks.attn.k.kernel.shape
    zeros = jnp.zeros((n_layers, batch, length, heads, head_dim), blocks.attn.k.dtype)
    zeros = constrain(zeros, CACHE_AXES)
    return KVCache(zeros, zeros)


def embedding_dropout(x_BxLxD: Array, dropout_key: Array | None, rate: float,
                      blocks: nnx.Module) -> tuple[Array, Array | None]:
    """Dropout on the embeddings (training with dropout only) and the per-layer keys of `blocks`."""
    if dropout_key is None or rate <= 0:
        return constrain(x_BxLxD, ACTIVATION_AXES), None
    x_BxLxD = Dropout(dropout_key, rate)(x_BxLxD, EMBED_DROP)
    n_layers = jax.tree.leaves(nnx.state(blocks))[0].shape[0]
    keys = jax.random.split(jax.random.fold_in(dropout_key, LAYER_KEYS), n_layers)
    return constrain(x_BxLxD, ACTIVATION_AXES), keys


def scan_blocks(blocks: nnx.Module, x_BxLxD: Array, apply: Callable[..., Array],
                keys: Array | None, rate: float, scan: bool, remat: str) -> Array:
    """`x` through the stacked `blocks` in one `lax.scan` (unrolled when not `scan`, no remat):
    apply(block, x, dropout or None) per layer, with layer i's dropout keyed by keys[i]; `remat`
    what each layer recomputes in the backward pass."""
    block_def, block_state = nnx.split(blocks)
    n_layers = jax.tree.leaves(block_state)[0].shape[0]

    def layer(x_BxLxD: Array, xs: tuple) -> tuple[Array, None]:
        layer_state, layer_key = xs
        drop = None if layer_key is None else Dropout(layer_key, rate)
        x_BxLxD = apply(nnx.merge(block_def, layer_state), x_BxLxD, drop)
        return constrain(x_BxLxD, ACTIVATION_AXES), None

    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)
    # Remat always scans: unrolled, XLA kept the recomputed activations (25M model, 8 layers,
    # remat full: 609 MiB of temp buffers unrolled, 199 MiB scanned; none: 651 MiB).
    unroll = 1 if scan or remat != "none" else n_layers
    x_BxLxD, _ = jax.lax.scan(layer, x_BxLxD, (block_state, keys), unroll=unroll)
    return x_BxLxD


def scan_cached(blocks: nnx.Module, carry: Any, apply: Callable[..., Any], extra: Any,
                scan: bool) -> Any:
    """The stacked `blocks` for generation: carry = apply(block, carry, layer index, extra[i]).
    The whole cache rides in the carry, so XLA updates it in place (as scanned-over inputs and
    stacked outputs, every layer's slice would be copied each step)."""
    block_def, block_state = nnx.split(blocks)
    n_layers = jax.tree.leaves(block_state)[0].shape[0]

    def layer(carry: Any, xs: tuple) -> tuple[Any, None]:
        layer_state, index, layer_extra = xs
        return apply(nnx.merge(block_def, layer_state), carry, index, layer_extra), None

    xs = (block_state, jnp.arange(n_layers), extra)
    carry, _ = jax.lax.scan(layer, carry, xs, unroll=1 if scan else n_layers)
    return carry


class MlmHead(nnx.Module):
    """BERT's masked-LM transform before the (tied) decoder: dense, GELU, norm; plus the
    decoder's per-token output bias. Only encoders (objective mlm) have one."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(
            cfg.d_model,
            cfg.d_model,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
            **_dense_init(0.02, ("embed", None)),
            bias_metadata={"out_sharding": (None,)},
            rngs=rngs,
        )
        self.norm = make_norm(cfg, rngs)
        self.bias = nnx.Param(
            jnp.zeros((cfg.vocab_size,), cfg.param_dtype), out_sharding=("vocab",)
        )
        self.activation = activation(cfg)

    def __call__(self, x_BxLxD: Array) -> Array:
        return self.norm(self.activation(self.dense(x_BxLxD)))


def _table(rows: int, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Embed:
    """Learned positions or token types: `rows` vectors added to the token embeddings."""
    return nnx.Embed(rows, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
                     embedding_init=nnx.initializers.normal(0.02),
                     embedding_metadata={"out_sharding": (None, "embed")}, rngs=rngs)


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, n_layers: int, block: type) -> nnx.Module:
    """`n_layers` blocks of type `block` whose params are stacked on a leading 'layers' axis."""

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> nnx.Module:
        return block(cfg, rngs=rngs)

    return make(rngs)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
