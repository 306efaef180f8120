"""Encoder-decoder Transformer (T5/BART shape): a bidirectional encoder reads the input, a causal
decoder writes the target, attending to the encoder's output in every block (cross-attention).

Both stacks are the blocks of `jaxlm.model` with the same switches (norms, biases, positions, GQA)
and logical axes, scanned over their own stacked layers; the decoder block adds a cross-attention
sublayer between self-attention and the MLP. One token embedding serves both sides and (with
`tie_embeddings`) the output. Packed rows hold several (input, target) pairs: the encoder segment
ids and the decoder segment ids number the pairs alike, so a decoder token sees only its own
pair's encoder tokens. Self-attention runs on the `model.attention` kernel; cross-attention
(queries and keys of different lengths) on the XLA reference.
Shape legend: B batch, L encoder sequence, T decoder sequence, D d_model, G kv heads, K head dim,
N decoder layers, V vocab.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx

from jaxlm.attention import cross_attention_mask
from jaxlm.config import ModelConfig, decoder_layers, encoder_layers, scans_layers
from jaxlm.layers import Attention, Block, Dropout, KVCache, make_norm
from jaxlm.model import (CACHE_AXES, LanguageModel, embedding_dropout, empty_cache, scan_blocks,
                         scan_cached, stacked_blocks)
from jaxlm.sharding import constrain

Array = jax.Array
# Salts that give the encoder and the decoder their own dropout keys.
ENCODER_DROP, DECODER_DROP = 1, 2


class Seq2SeqCache(NamedTuple):
    """Generation state: the decoder's self-attention cache, every decoder layer's cross-attention
    keys/values of the encoded input (computed once), and which input positions are real."""

    self_attn: KVCache
    cross_k_NxBxLxGxK: Array
    cross_v_NxBxLxGxK: Array
    valid_BxL: Array


class DecoderBlock(Block):
    """Self-attention (causal), cross-attention over the encoder output, MLP."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.cross_norm = make_norm(cfg, rngs)
        self.cross = Attention(cfg, rngs=rngs, rope=False)

    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array,
                 encoded_BxLxD: Array, mask_Bx1xTxL: Array, drop: Dropout | None = None) -> Array:
        attend = lambda h_BxTxD: (
            self.attn(h_BxTxD, positions_BxT, segment_ids_BxT, True, drop), None)
        cross = lambda h_BxTxD: self.cross.cross(
            h_BxTxD, self.cross.keys_values(encoded_BxLxD), mask_Bx1xTxL, drop)
        return self._residuals(x_BxTxD, attend, drop, cross)[0]

    def cached(self, x_BxTxD: Array, positions_BxT: Array, cache: KVCache, layer: Array,
               kv: tuple[Array, Array], mask_Bx1xTxL: Array) -> tuple[Array, KVCache]:
        """The block for generation: self-attention reads and updates `layer` of the cache;
        cross-attention reads the precomputed keys/values `kv` of this layer."""
        return self._residuals(
            x_BxTxD, lambda h_BxTxD: self.attn.cached(h_BxTxD, positions_BxT, cache, layer),
            cross=lambda h_BxTxD: self.cross.cross(h_BxTxD, kv, mask_Bx1xTxL))


class EncoderDecoder(LanguageModel):
    """(input ids, decoder input ids) -> fp32 logits of the targets; `remat` as for Transformer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: str = "none"):
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved from the tokenizer first")
        self.remat, self.dropout = remat, cfg.dropout
        n_encoder, n_decoder = encoder_layers(cfg), decoder_layers(cfg)
        self.scan_encoder = scans_layers(cfg, n_encoder)
        self.scan_decoder = scans_layers(cfg, n_decoder)
        with nnx.use_eager_sharding(False):
            self._init_embeddings(cfg, rngs)
            self.encoder = stacked_blocks(cfg, rngs, n_encoder, Block)
            self.encoder_norm = make_norm(cfg, rngs) if cfg.final_norm else None
            self.decoder = stacked_blocks(cfg, rngs, n_decoder, DecoderBlock)
            self._init_head(cfg, rngs)
            self.mlm_head = None

    def __call__(self, inputs_BxL: Array, segment_ids_BxL: Array, positions_BxL: Array,
                 decoder_inputs_BxT: Array, decoder_segment_ids_BxT: Array,
                 decoder_positions_BxT: Array, dropout_key: Array | None = None) -> Array:
        """Logits at every decoder position; `dropout_key` (training only) turns dropout on."""
        encoded_BxLxD = self.encode(inputs_BxL, segment_ids_BxL, positions_BxL, dropout_key)
        x_BxTxD = self.decode(decoder_inputs_BxT, decoder_segment_ids_BxT, decoder_positions_BxT,
                              encoded_BxLxD, segment_ids_BxL, dropout_key)
        return self.head(x_BxTxD)

    def encode(self, tokens_BxL: Array, segment_ids_BxL: Array, positions_BxL: Array,
               dropout_key: Array | None = None) -> Array:
        """The encoder's output (after its final norm): what every decoder block attends to."""
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, ENCODER_DROP)
        x_BxLxD = self._add_embeddings(self.embed(tokens_BxL), positions_BxL, None)
        x_BxLxD, keys = embedding_dropout(x_BxLxD, key, self.dropout, self.encoder)

        def layer(block: Block, x_BxLxD: Array, drop: Dropout | None) -> Array:
            return block(x_BxLxD, positions_BxL, segment_ids_BxL, False, drop)

        x_BxLxD = scan_blocks(self.encoder, x_BxLxD, layer, keys, self.dropout, self.scan_encoder,
                              self.remat)
        return x_BxLxD if self.encoder_norm is None else self.encoder_norm(x_BxLxD)

    def decode(self, tokens_BxT: Array, segment_ids_BxT: Array, positions_BxT: Array,
               encoded_BxLxD: Array, encoded_segment_ids_BxL: Array,
               dropout_key: Array | None = None) -> Array:
        """The decoder's last block output (`head` makes logits of it)."""
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, DECODER_DROP)
        x_BxTxD = self._add_embeddings(self.embed(tokens_BxT), positions_BxT, None)
        x_BxTxD, keys = embedding_dropout(x_BxTxD, key, self.dropout, self.decoder)
        mask_Bx1xTxL = cross_attention_mask(segment_ids_BxT, encoded_segment_ids_BxL)

        def layer(block: DecoderBlock, x_BxTxD: Array, drop: Dropout | None) -> Array:
            return block(x_BxTxD, positions_BxT, segment_ids_BxT, encoded_BxLxD, mask_Bx1xTxL, drop)

        return scan_blocks(self.decoder, x_BxTxD, layer, keys, self.dropout, self.scan_decoder,
                           self.remat)

    def init_cache(self, encoded_BxLxD: Array, valid_BxL: Array, slots: int) -> Seq2SeqCache:
        """Generation state for a batch of encoded inputs (one per row, `valid` where real) and
        `slots` decoder positions."""

        def cross_kv(_: None, layer_state: Any) -> tuple[None, tuple[Array, Array]]:
            block = nnx.merge(block_def, layer_state)
            return None, block.cross.keys_values(encoded_BxLxD)

        block_def, block_state = nnx.split(self.decoder)
        _, (k_NxBxLxGxK, v_NxBxLxGxK) = jax.lax.scan(cross_kv, None, block_state)
        k_NxBxLxGxK, v_NxBxLxGxK = (constrain(x, CACHE_AXES) for x in (k_NxBxLxGxK, v_NxBxLxGxK))
        self_attn = empty_cache(self.decoder, encoded_BxLxD.shape[0], slots)
        return Seq2SeqCache(self_attn, k_NxBxLxGxK, v_NxBxLxGxK, valid_BxL)

    def cached(self, tokens_BxT: Array, positions_BxT: Array,
               cache: Seq2SeqCache) -> tuple[Array, Seq2SeqCache]:
        """The decoder for generation, up to `head`: like Transformer.cached, each layer also
        attends over the encoded input through its precomputed keys/values."""
        mask_Bx1x1xL = cache.valid_BxL[:, None, None, :]

        def layer(block: DecoderBlock, carry: tuple, index: Array, kv: tuple) -> tuple:
            x_BxTxD, self_attn = carry
            return block.cached(x_BxTxD, positions_BxT, self_attn, index, kv, mask_Bx1x1xL)

        x_BxTxD = self._add_embeddings(self.embed(tokens_BxT), positions_BxT, None)
        kv = (cache.cross_k_NxBxLxGxK, cache.cross_v_NxBxLxGxK)
        x_BxTxD, self_attn = scan_cached(self.decoder, (x_BxTxD, cache.self_attn), layer, kv,
                                         self.scan_decoder)
        return x_BxTxD, cache._replace(self_attn=self_attn)
