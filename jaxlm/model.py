"""Transformer backbone in Flax NNX: pre-norm blocks, RoPE attention, stacked layers run by scan.

Shape legend: B batch, L sequence, D d_model, H heads, K head dim, F mlp hidden, V vocab, N layers.
Logical axis names used on params: embed, mlp, heads, kv, vocab, layers (mapped to the mesh in
config). Variables are created without eager sharding: `jaxlm.sharding` turns the names into
NamedShardings and `jit(init, out_shardings=...)` places them, so nothing is materialised unsharded.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.sharding import constrain

Array = jax.Array
# Activations between blocks: rows split like the batch, features replicated.
ACTIVATION_AXES = ("batch", None, None)


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


def attention_mask(segment_ids_BxL: Array, causal: bool) -> Array:
    """Bx1xLxL boolean: same packed document (padding only sees padding), and causal if asked."""
    same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    if causal:
        length = segment_ids_BxL.shape[1]
        same_doc_BxLxL &= jnp.tril(jnp.ones((length, length), dtype=bool))
    return same_doc_BxLxL[:, None]


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

    def __call__(self, x_BxLxD: Array, positions_BxL: Array, mask_Bx1xLxL: Array) -> Array:
        q_BxLxHxK = rope(self.q(x_BxLxD), positions_BxL, self.rope_theta)
        k_BxLxHxK = rope(self.k(x_BxLxD), positions_BxL, self.rope_theta)
        v_BxLxHxK = self.v(x_BxLxD)
        out_BxLxHxK = jax.nn.dot_product_attention(
            q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_Bx1xLxL, implementation="xla"
        )
        return self.o(out_BxLxHxK)


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

    def __call__(self, x_BxLxD: Array, positions_BxL: Array, mask_Bx1xLxL: Array) -> Array:
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask_Bx1xLxL)
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))


class Transformer(nnx.Module):
    """Token ids -> fp32 logits; `causal` picks decoder (CLM) or bidirectional encoder attention."""

    def __init__(self, cfg: ModelConfig, *, causal: bool, rngs: nnx.Rngs):
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved from the tokenizer first")
        self.causal = causal
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

    def __call__(self, tokens_BxL: Array, segment_ids_BxL: Array, positions_BxL: Array) -> Array:
        return self.from_embeddings(self.embed(tokens_BxL), segment_ids_BxL, positions_BxL)

    def from_embeddings(
        self, x_BxLxD: Array, segment_ids_BxL: Array, positions_BxL: Array
    ) -> Array:
        """The network after the token lookup (a seam for gradients w.r.t. input positions)."""
        mask_Bx1xLxL = attention_mask(segment_ids_BxL, self.causal)
        x_BxLxD = constrain(x_BxLxD, ACTIVATION_AXES)
        block_def, block_state = nnx.split(self.blocks)

        def layer(x_BxLxD: Array, layer_state: nnx.State) -> tuple[Array, None]:
            block = nnx.merge(block_def, layer_state)
            x_BxLxD = block(x_BxLxD, positions_BxL, mask_Bx1xLxL)
            return constrain(x_BxLxD, ACTIVATION_AXES), None

        x_BxLxD, _ = jax.lax.scan(layer, x_BxLxD, block_state)
        x_BxLxD = self.final_norm(x_BxLxD)
        if self.lm_head is None:
            return self.embed.attend(x_BxLxD).astype(jnp.float32)
        return self.lm_head(x_BxLxD).astype(jnp.float32)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """N blocks whose params are stacked on a leading 'layers' axis, for lax.scan."""

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

    return make(rngs)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
