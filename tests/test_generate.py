"""KV-cache generation against a full forward pass per token (the definition it must match)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import Config, ModelConfig
from jaxlm.generate import banned_tokens, generate, make_sampler, sample_ids, sample_logits
from jaxlm.state import init_state, make_setup
from jaxlm.tokenizer import BOS_ID, EOS_ID, ByteTokenizer, load_tokenizer

WINDOW = 32
CONTEXTS = [[BOS_ID, 50, 60, 70], [BOS_ID, *range(80, 91)]]  # 4 and 12 tokens


@pytest.fixture(scope="module")
def model_setup():
    model = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                        max_seq_len=WINDOW, tie_embeddings=False)
    setup = make_setup(Config(model=model), jax.devices()[:1])
    banned_V = banned_tokens(model.vocab_size, ByteTokenizer())
    greedy = make_sampler(setup, banned_V, temperature=0.0, top_k=0, top_p=1.0)
    return setup, init_state(setup)["params"], banned_V, greedy


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(graphdef, params, tokens_1xS, length):
    """Uncached: the whole padded window through the model, logits at the last real token."""
    positions_1xS = jnp.arange(WINDOW)[None]
    segment_ids_1xS = (positions_1xS < length).astype(jnp.int32)
    return nnx.merge(graphdef, params)(tokens_1xS, segment_ids_1xS, positions_1xS)[0, length - 1]


def _greedy_reference(setup, params, banned_V, context, max_new_tokens):
    """New ids, and whether EOS ended them."""
    sequence, new = list(context), []
    while len(new) < max_new_tokens and len(sequence) < WINDOW:
        tokens_1xS = np.zeros((1, WINDOW), np.int32)
        tokens_1xS[0, : len(sequence)] = sequence
        logits_V = np.array(_last_logits(setup.model_def, params, tokens_1xS, len(sequence)))
        token = int(np.where(banned_V, -np.inf, logits_V).argmax())
        if token == EOS_ID:
            return new, True
        new.append(token)
        sequence.append(token)
    return new, False


def test_cached_greedy_equals_a_full_forward_per_token_until_the_window_is_full(model_setup):
    setup, params, banned_V, greedy = model_setup
    cached = sample_ids(greedy, params, CONTEXTS, max_new_tokens=100, seed=0, eos_id=EOS_ID)
    for context, ids in zip(CONTEXTS, cached):
        reference, _ = _greedy_reference(setup, params, banned_V, context, 100)
        assert ids == reference
        assert len(ids) == WINDOW - len(context)  # stops when the window is full
        assert not banned_V[ids].any()
    shorter = sample_ids(greedy, params, CONTEXTS, max_new_tokens=5, seed=0, eos_id=EOS_ID)
    assert shorter == [c[:5] for c in cached]


def test_eos_stops_its_row_only(model_setup):
    setup, params, banned_V, greedy = model_setup
    first = sample_ids(greedy, params, CONTEXTS, max_new_tokens=3, seed=0, eos_id=EOS_ID)
    # EOS's output column = twice that of row 0's third token: EOS now wins where that token did.
    params = jax.tree.map(lambda x: x, params)
    kernel_DxV = params["lm_head"]["kernel"][...]
    params["lm_head"]["kernel"][...] = kernel_DxV.at[:, EOS_ID].set(2 * kernel_DxV[:, first[0][2]])
    cached = sample_ids(greedy, params, CONTEXTS, max_new_tokens=20, seed=0, eos_id=EOS_ID)
    stopped = []
    for context, ids in zip(CONTEXTS, cached):
        reference, eos = _greedy_reference(setup, params, banned_V, context, 20)
        assert ids == reference
        stopped.append(eos)
    assert stopped[0] and len(cached[0]) <= 2 and len(cached[1]) > len(cached[0])


def test_tiny_top_p_is_greedy_and_top_p_keeps_the_smallest_set_reaching_p(model_setup):
    setup, params, banned_V, greedy = model_setup
    nucleus = make_sampler(setup, banned_V, temperature=1.0, top_k=0, top_p=1e-6)
    assert sample_ids(nucleus, params, CONTEXTS, max_new_tokens=8, seed=3, eos_id=EOS_ID) == sample_ids(
        greedy, params, CONTEXTS, max_new_tokens=8, seed=0, eos_id=EOS_ID
    )
    logits_1xV = jnp.log(jnp.array([[0.05, 0.5, 0.2, 0.25]]))
    draw = jax.jit(
        jax.vmap(lambda key, p: sample_logits(logits_1xV, key, 1.0, 0, p)[0], in_axes=(0, None)),
        static_argnums=1,
    )
    keys = jax.random.split(jax.random.key(0), 400)
    assert set(np.asarray(draw(keys, 0.5)).tolist()) == {1}
    assert set(np.asarray(draw(keys, 0.7)).tolist()) == {1, 3}
    assert set(np.asarray(draw(keys, 0.9)).tolist()) == {1, 2, 3}


def test_generate_starts_at_the_hf_bos_and_stops_at_the_hf_eos(model_setup, hf_gpt2):
    setup, params, _, _ = model_setup
    tokenizer = load_tokenizer(f"hf:{hf_gpt2}")  # GPT-2 style: <|endoftext|> is bos and eos
    banned_V = banned_tokens(setup.cfg.model.vocab_size, tokenizer)
    assert not banned_V[tokenizer.eos_id] and banned_V[tokenizer.vocab_size:].all()
    hf_greedy = make_sampler(setup, banned_V, temperature=0.0, top_k=0, top_p=1.0)
    context = [tokenizer.bos_id, *tokenizer.encode("def f(x):").tolist()]
    eos = tokenizer.eos_id
    first = sample_ids(hf_greedy, params, [context], max_new_tokens=3, seed=0, eos_id=eos)[0]
    assert len(first) == 3 and eos not in first
    kwargs = dict(temperature=0.0, top_k=0, seed=0)
    three = generate(setup, params, tokenizer, "def f(x):", max_new_tokens=3, **kwargs)
    assert three == tokenizer.decode(first)  # its context began with the hf bos, as above
    # EOS's output column = twice that of the third new token's: EOS now wins where it did.
    params = jax.tree.map(lambda x: x, params)
    kernel_DxV = params["lm_head"]["kernel"][...]
    params["lm_head"]["kernel"][...] = kernel_DxV.at[:, eos].set(2 * kernel_DxV[:, first[2]])
    stopped = sample_ids(hf_greedy, params, [context], max_new_tokens=20, seed=0, eos_id=eos)[0]
    assert len(stopped) <= 2 and stopped == first[: len(stopped)]
    text = generate(setup, params, tokenizer, "def f(x):", max_new_tokens=20, **kwargs)
    assert text == tokenizer.decode(stopped)


@pytest.mark.parametrize("switches", [
    dict(n_kv_heads=1, head_dim=8),  # grouped-query: the cache holds the one kv head
    dict(position_embedding="learned", norm="layernorm", bias=True, mlp="gelu_tanh"),
])
def test_cached_greedy_equals_a_full_forward_for_other_architectures(switches):
    model = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                        max_seq_len=WINDOW, **switches)
    setup = make_setup(Config(model=model), jax.devices()[:1])
    params = init_state(setup)["params"]
    banned_V = banned_tokens(model.vocab_size, ByteTokenizer())
    greedy = make_sampler(setup, banned_V, temperature=0.0, top_k=0, top_p=1.0)
    cached = sample_ids(greedy, params, CONTEXTS, max_new_tokens=12, seed=0,
                        eos_id=ByteTokenizer.eos_id)
    for context, ids in zip(CONTEXTS, cached):
        assert ids == _greedy_reference(setup, params, banned_V, context, 12)[0]


@functools.partial(jax.jit, static_argnums=0)
def _encdec_logits(graphdef, params, inputs_1xL, decoder_1xT):
    """Uncached: the input and a (right-padded, causal) decoder prefix through the model."""
    ones_1xL, ones_1xT = jnp.ones_like(inputs_1xL), jnp.ones_like(decoder_1xT)
    positions_1xL, positions_1xT = (jnp.arange(x.shape[1])[None] for x in (inputs_1xL, decoder_1xT))
    return nnx.merge(graphdef, params)(inputs_1xL, ones_1xL, positions_1xL, decoder_1xT, ones_1xT,
                                       positions_1xT)[0]


def _encdec_greedy_reference(setup, params, banned_V, context, max_new_tokens):
    """New ids of the encoder-decoder without a cache: the whole decoder prefix every token."""
    decoded = [BOS_ID]
    while len(decoded) <= max_new_tokens:
        decoder_1xT = np.zeros((1, max_new_tokens + 1), np.int32)
        decoder_1xT[0, : len(decoded)] = decoded
        logits_TxV = _encdec_logits(setup.model_def, params, np.asarray([context]), decoder_1xT)
        token = int(np.where(banned_V, -np.inf, np.asarray(logits_TxV[len(decoded) - 1])).argmax())
        if token == EOS_ID:
            break
        decoded.append(token)
    return decoded[1:]


def test_encoder_decoder_cached_greedy_equals_a_full_forward_for_inputs_of_two_lengths():
    model = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                        max_seq_len=WINDOW, n_kv_heads=2)
    setup = make_setup(Config(objective="span_corruption", model=model), jax.devices()[:1])
    params = init_state(setup)["params"]
    banned_V = banned_tokens(model.vocab_size, ByteTokenizer())
    greedy = make_sampler(setup, banned_V, temperature=0.0, top_k=0, top_p=1.0, start_id=BOS_ID)
    inputs = [[50, 60, 70, EOS_ID], [*range(80, 91), EOS_ID]]
    cached = sample_ids(greedy, params, inputs, max_new_tokens=10, seed=0, eos_id=EOS_ID)
    for context, ids in zip(inputs, cached):
        assert ids == _encdec_greedy_reference(setup, params, banned_V, context, 10)
    assert max(len(ids) for ids in cached) == 10
