"""The encoder-decoder: what each position may see (packed pairs, bidirectional encoder, causal
decoder), and the cached decoder against the full forward under every block switch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.encdec import EncoderDecoder

CFG = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
# Two packed pairs per row: encoder tokens 0-2 and decoder tokens 0-1 are pair 1, then pair 2.
ENC_SEG_L = np.array([1, 1, 1, 2, 2, 2, 2, 0])
ENC_POS_L = np.array([0, 1, 2, 0, 1, 2, 3, 0])
DEC_SEG_T = np.array([1, 1, 2, 2, 2, 0])
DEC_POS_T = np.array([0, 1, 0, 1, 2, 0])


@pytest.fixture(scope="module")
def model():
    return EncoderDecoder(CFG, rngs=nnx.Rngs(0))


def _tokens(seed, length):
    return jax.random.randint(jax.random.key(seed), (1, length), 4, CFG.vocab_size)


@nnx.jit
def _forward(model, *arrays):
    return model(*arrays)


@nnx.jit
def _encode(model, *arrays):
    return model.encode(*arrays)


@nnx.jit
def _decode_step(model, tokens_1x1, positions_1x1, cache):
    x_1x1xD, cache = model.cached(tokens_1x1, positions_1x1, cache)
    return model.head(x_1x1xD), cache


def _logits(model, inputs_1xL, decoder_1xT):
    rows = lambda x: jnp.asarray(x)[None]
    return np.asarray(_forward(model, inputs_1xL, rows(ENC_SEG_L), rows(ENC_POS_L), decoder_1xT,
                               rows(DEC_SEG_T), rows(DEC_POS_T)))[0]


def test_a_decoder_token_sees_only_its_own_pairs_encoder_tokens(model):
    inputs, decoder = _tokens(1, 8), _tokens(2, 6)
    before = _logits(model, inputs, decoder)
    other_pair = _logits(model, inputs.at[0, 4].set(5), decoder)  # pair 2's input changes
    np.testing.assert_array_equal(other_pair[:2], before[:2])
    assert np.abs(other_pair[2:5] - before[2:5]).max() > 1e-4


def test_the_encoder_is_bidirectional_within_a_pair(model):
    segs, positions = jnp.asarray(ENC_SEG_L)[None], jnp.asarray(ENC_POS_L)[None]
    inputs = _tokens(3, 8)
    before = np.asarray(_encode(model, inputs, segs, positions))[0]
    after = np.asarray(_encode(model, inputs.at[0, 2].set(5), segs, positions))[0]
    assert np.abs(after[0] - before[0]).max() > 1e-4  # an earlier token sees a later one
    np.testing.assert_array_equal(after[3:7], before[3:7])  # the other pair does not


def test_the_decoder_is_causal(model):
    inputs, decoder = _tokens(4, 8), _tokens(5, 6)
    before = _logits(model, inputs, decoder)
    after = _logits(model, inputs, decoder.at[0, 3].set(5))
    np.testing.assert_array_equal(after[:3], before[:3])
    assert np.abs(after[3:5] - before[3:5]).max() > 1e-4


SWITCHES = [
    {},
    {"n_kv_heads": 2, "n_encoder_layers": 3, "n_decoder_layers": 1},
    {"position_embedding": "learned", "norm": "layernorm", "norm_position": "post",
     "final_norm": False, "embed_norm": True, "bias": True, "mlp": "gelu_tanh",
     "tie_embeddings": False},
]


@pytest.mark.parametrize("switches", SWITCHES, ids=["default", "gqa_uneven", "bart_like"])
def test_cached_decoding_equals_the_full_forward(switches):
    model = EncoderDecoder(dataclasses.replace(CFG, **switches), rngs=nnx.Rngs(1))
    inputs, decoder = _tokens(6, 8), _tokens(7, 6)
    ones_L, ones_T = jnp.ones((1, 8), jnp.int32), jnp.ones((1, 6), jnp.int32)
    positions_L, positions_T = jnp.arange(8)[None], jnp.arange(6)[None]
    full = np.asarray(_forward(model, inputs, ones_L, positions_L, decoder, ones_T, positions_T))
    cache = model.init_cache(_encode(model, inputs, ones_L, positions_L), ones_L > 0, slots=16)
    steps = []
    for t in range(6):
        logits, cache = _decode_step(model, decoder[:, t : t + 1], positions_T[:, t : t + 1], cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5)


def test_the_stacks_have_their_own_layer_counts():
    model = nnx.eval_shape(lambda: EncoderDecoder(
        dataclasses.replace(CFG, n_encoder_layers=3, n_decoder_layers=1), rngs=nnx.Rngs(0)))
    assert model.encoder.attn.q.kernel.shape[0] == 3
    assert model.decoder.cross.q.kernel.shape[0] == 1
