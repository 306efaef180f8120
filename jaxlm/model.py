"""Transformer backbone in Flax NNX: embeddings, the stacked blocks of `jaxlm.layers` (scanned or
unrolled, remat, the KV cache of generation) and the output heads.

Shape legend: B batch, L sequence, D d_model, H heads (G kv heads), K head dim, F mlp hidden,
V vocab, N layers.
Logical axis names used on params: embed, mlp, heads, kv, vocab, layers (mapped to the mesh in
config). Variables are created without eager sharding: `jaxlm.sharding` turns the names into
NamedShardings and `jit(init, out_shardings=...)` places them, so nothing is materialised unsharded.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import projection
from jaxlm.config import ModelConfig, scans_layers
from jaxlm.layers import (EMBED_DROP, LAYER_KEYS, Block, Dropout, KVCache, activation,
                          dense_init, make_norm)
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
                **dense_init(0.02, ("embed", "vocab")),
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
            **dense_init(0.02, ("embed", None)),
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
