"""Transformer backbone in Flax NNX: pre-norm blocks, RoPE attention, stacked layers run by scan.

Shape legend: B batch, L sequence, D d_model, H heads, K head dim, F mlp hidden, V vocab, N layers.
Logical axis names used on params: embed, mlp, heads, kv, vocab, layers (mapped to the mesh in
config). Variables are created without eager sharding: `jaxlm.sharding` turns the names into
NamedShardings and `jit(init, out_shardings=...)` places them, so nothing is materialised unsharded.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.attention import dot_product_attention
from jaxlm.config import ModelConfig
from jaxlm.sharding import constrain

Array = jax.Array
# Activations between blocks: rows split like the batch, features replicated.
ACTIVATION_AXES = ("batch", None, None)
# The KV cache (layers, rows, slots, heads, head dim): rows like the batch, heads like the params.
CACHE_AXES = ("layers", "batch", None, "heads", "kv")
# train.remat -> what each scanned layer keeps for the backward pass (the rest is recomputed).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
    """Keys and values of every layer at every slot, stacked like the scanned block params."""

    k_NxBxSxHxK: jax.Array
    v_NxBxSxHxK: jax.Array


def _dense_init(std: float, names: tuple[str, ...]) -> dict:
    return {
        "kernel_init": nnx.initializers.normal(std),
        "kernel_metadata": {"out_sharding": names},
    }


def rope(x_BxLxHxK: Array, positions_BxL: Array, theta: float) -> Array:
    """Rotary position embedding; positions restart per packed document."""
    half = x_BxLxHxK.shape[-1] // 2
    freqs_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxLxh = positions_BxL[..., None].astype(jnp.float32) * freqs_h
    sin, cos = jnp.sin(angles_BxLxh)[:, :, None, :], jnp.cos(angles_BxLxh)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


def gelu_exact(x: Array) -> Array:
    # jax.nn.gelu(approximate=False) is far slower on XLA:CPU than this identical formula.
    return 0.5 * x * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k = cfg.d_model, cfg.n_heads, cfg.d_model // cfg.n_heads
        common = {"dtype": cfg.compute_dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        qkv = _dense_init(0.02, ("embed", "heads", "kv"))
        self.q = nnx.Einsum("BLD,DHK->BLHK", (d, h, k), **qkv, **common)
        self.k = nnx.Einsum("BLD,DHK->BLHK", (d, h, k), **qkv, **common)
        self.v = nnx.Einsum("BLD,DHK->BLHK", (d, h, k), **qkv, **common)
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        self.o = nnx.Einsum(
            "BLHK,HKD->BLD", (h, k, d), **_dense_init(out_std, ("heads", "kv", "embed")), **common
        )
        self.rope_theta = cfg.rope_theta
        self.implementation = cfg.attention

    def _qkv(self, x_BxLxD: Array, positions_BxL: Array) -> tuple[Array, Array, Array]:
        q_BxLxHxK = rope(self.q(x_BxLxD), positions_BxL, self.rope_theta)
        k_BxLxHxK = rope(self.k(x_BxLxD), positions_BxL, self.rope_theta)
        return q_BxLxHxK, k_BxLxHxK, self.v(x_BxLxD)

    def __call__(
        self, x_BxLxD: Array, positions_BxL: Array, segment_ids_BxL: Array, causal: bool
    ) -> Array:
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = self._qkv(x_BxLxD, positions_BxL)
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
        out_BxTxHxK = jax.nn.dot_product_attention(
            q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_Bx1xTxS, implementation="xla"
        )
        return self.o(out_BxTxHxK), cache


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        common = {"dtype": cfg.compute_dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        wi = _dense_init(0.02, ("embed", "mlp"))
        self.up = nnx.Linear(d, f, use_bias=False, **wi, **common)
        self.gate = nnx.Linear(d, f, use_bias=False, **wi, **common) if cfg.mlp == "swiglu" else None
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        self.down = nnx.Linear(f, d, use_bias=False, **_dense_init(out_std, ("mlp", "embed")), **common)

    def __call__(self, x_BxLxD: Array) -> Array:
        if self.gate is None:
            h_BxLxF = gelu_exact(self.up(x_BxLxD))
        else:
            h_BxLxF = jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD)
        return self.down(h_BxLxF)


def _rms_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(
        cfg.d_model,
        epsilon=cfg.norm_eps,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.param_dtype,
        scale_metadata={"out_sharding": ("embed",)},
        rngs=rngs,
    )


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = _rms_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = _rms_norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(
        self, x_BxLxD: Array, positions_BxL: Array, segment_ids_BxL: Array, causal: bool
    ) -> Array:
        attn_BxLxD = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL, causal)
        return self._mlp_residual(x_BxLxD + attn_BxLxD)

    def cached(
        self, x_BxTxD: Array, positions_BxT: Array, cache: KVCache, layer: Array
    ) -> tuple[Array, KVCache]:
        """The block for generation: attention reads and updates `layer` of the KV cache."""
        attn_BxTxD, cache = self.attn.cached(self.attn_norm(x_BxTxD), positions_BxT, cache, layer)
        return self._mlp_residual(x_BxTxD + attn_BxTxD), cache

    def _mlp_residual(self, x_BxLxD: Array) -> Array:
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))


class Transformer(nnx.Module):
    """Token ids -> fp32 logits; `causal` picks decoder (CLM) or bidirectional encoder attention;
    `remat` (train.remat) what each layer recomputes in the backward pass instead of storing."""

    def __init__(self, cfg: ModelConfig, *, causal: bool, rngs: nnx.Rngs, remat: str = "none"):
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved from the tokenizer first")
        self.causal = causal
        self.remat = remat
        with nnx.use_eager_sharding(False):
            self.embed = nnx.Embed(
                cfg.vocab_size,
                cfg.d_model,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.param_dtype,
                embedding_init=nnx.initializers.normal(0.02),
                embedding_metadata={"out_sharding": ("vocab", "embed")},
                rngs=rngs,
            )
            self.blocks = _stacked_blocks(cfg, rngs)
            self.final_norm = _rms_norm(cfg, rngs)
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
            self.mlm_head = None if causal else MlmHead(cfg, rngs=rngs)

    def __call__(self, tokens_BxL: Array, segment_ids_BxL: Array, positions_BxL: Array) -> Array:
        return self.from_embeddings(self.embed(tokens_BxL), segment_ids_BxL, positions_BxL)

    def from_embeddings(
        self, x_BxLxD: Array, segment_ids_BxL: Array, positions_BxL: Array
    ) -> Array:
        """The network after the token lookup (a seam for gradients w.r.t. input positions)."""
        x_BxLxD = constrain(x_BxLxD, ACTIVATION_AXES)
        block_def, block_state = nnx.split(self.blocks)

        def layer(x_BxLxD: Array, layer_state: nnx.State) -> tuple[Array, None]:
            block = nnx.merge(block_def, layer_state)
            x_BxLxD = block(x_BxLxD, positions_BxL, segment_ids_BxL, self.causal)
            return constrain(x_BxLxD, ACTIVATION_AXES), None

        if self.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        x_BxLxD, _ = jax.lax.scan(layer, x_BxLxD, block_state)
        return self.head(x_BxLxD)

    def cached(
        self, tokens_BxT: Array, positions_BxT: Array, cache: KVCache
    ) -> tuple[Array, KVCache]:
        """Causal forward for generation, up to `head` (apply it to the rows that need logits):
        the same blocks as `__call__`, but each layer writes the keys/values of `tokens` at cache
        slot `positions` (per row) and attends over its cache slots <= position."""
        block_def, block_state = nnx.split(self.blocks)

        # The whole cache rides in the carry, so XLA updates it in place (as scanned-over
        # inputs and stacked outputs, every layer's slice would be copied each step).
        def layer(carry: tuple[Array, KVCache], xs: tuple) -> tuple[tuple[Array, KVCache], None]:
            x_BxTxD, cache = carry
            layer_state, index = xs
            block = nnx.merge(block_def, layer_state)
            return block.cached(x_BxTxD, positions_BxT, cache, index), None

        n_layers = cache.k_NxBxSxHxK.shape[0]
        (x_BxTxD, cache), _ = jax.lax.scan(
            layer, (self.embed(tokens_BxT), cache), (block_state, jnp.arange(n_layers))
        )
        return x_BxTxD, cache

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache of `length` slots per row, in the compute dtype."""
        n_layers, _, heads, head_dim = self.blocks.attn.k.kernel.shape
        zeros = jnp.zeros((n_layers, batch, length, heads, head_dim), self.blocks.attn.k.dtype)
        zeros = constrain(zeros, CACHE_AXES)
        return KVCache(zeros, zeros)

    def head(self, x_BxLxD: Array) -> Array:
        """Last block's output -> fp32 logits."""
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
        self.norm = _rms_norm(cfg, rngs)
        self.bias = nnx.Param(
            jnp.zeros((cfg.vocab_size,), cfg.param_dtype), out_sharding=("vocab",)
        )

    def __call__(self, x_BxLxD: Array) -> Array:
        return self.norm(gelu_exact(self.dense(x_BxLxD)))


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """N blocks whose params are stacked on a leading 'layers' axis, for lax.scan."""

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

    return make(rngs)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
