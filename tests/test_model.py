import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm.config import ModelConfig, scans_layers
from jaxlm.model import Transformer, count_params
from jaxlm.objectives import weighted_sums

CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)


def _model(causal=True, **overrides):
    import dataclasses

    return Transformer(dataclasses.replace(CFG, **overrides), causal=causal, rngs=nnx.Rngs(0))


def _position_grad(model, x_1xLxD, t):
    """Gradient of position t's loss w.r.t. every input embedding (jitted: eager is slow)."""
    graphdef, state = nnx.split(model)
    loss = lambda x, t: _per_position_loss(nnx.merge(graphdef, state), x, t)
    return jax.jit(jax.grad(loss))(x_1xLxD, t)[0]


def _per_position_loss(model, x_1xLxD, t):
    length = x_1xLxD.shape[1]
    segments = jnp.ones((1, length), jnp.int32)
    positions = jnp.arange(length)[None]
    logits = model.from_embeddings(x_1xLxD, segments, positions)
    return -jax.nn.log_softmax(logits[0, t])[7]


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_causal_gradient_is_exactly_zero_after_t(mlp):
    model = _model(mlp=mlp)
    x = jax.random.normal(jax.random.key(1), (1, 16, CFG.d_model))
    for t in (0, 5, 15):
        grad_LxD = _position_grad(model, x, t)
        assert np.all(np.asarray(grad_LxD[t + 1 :]) == 0.0)
        assert np.all(np.abs(np.asarray(grad_LxD[: t + 1])).sum(-1) > 0)


def test_bidirectional_model_sees_the_future():
    model = _model(causal=False)
    x = jax.random.normal(jax.random.key(1), (1, 16, CFG.d_model))
    grad_LxD = _position_grad(model, x, 3)
    assert np.all(np.abs(np.asarray(grad_LxD)).sum(-1) > 0)


def _clm_batch(docs, length):
    """Packs token lists into one row; targets/weights as the CLM transform makes them."""
    tokens, segments, positions = np.zeros(length, np.int32), np.zeros(length, np.int32), np.zeros(length, np.int32)
    offset = 0
    for i, doc in enumerate(docs):
        tokens[offset : offset + len(doc)] = doc
        segments[offset : offset + len(doc)] = i + 1
        positions[offset : offset + len(doc)] = np.arange(len(doc))
        offset += len(doc)
    from jaxlm.objectives import clm_example

    ex = clm_example({"tokens": tokens, "tokens_segment_ids": segments, "tokens_positions": positions})
    return {k: jnp.asarray(v)[None] for k, v in ex.items()}


def _loss_sum(model, batch):
    logits = model(batch["inputs"], batch["segment_ids"], batch["positions"])
    return weighted_sums(logits, batch)


def test_packed_documents_do_not_see_each_other():
    model = _model()
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 50, n) for n in (9, 14, 5)]
    packed = _loss_sum(model, _clm_batch(docs, 32))
    alone = [_loss_sum(model, _clm_batch([d], 32)) for d in docs]
    np.testing.assert_allclose(packed["loss_sum"], sum(a["loss_sum"] for a in alone), rtol=1e-5)
    assert packed["weight_sum"] == sum(len(d) - 1 for d in docs)


def test_params_carry_logical_axes_and_are_stacked():
    model = _model(tie_embeddings=False)
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert specs["embed"]["embedding"].get_value() == P("vocab", "embed")
    assert specs["lm_head"]["kernel"].get_value() == P("embed", "vocab")
    assert specs["blocks"]["attn"]["q"]["kernel"].get_value() == P("layers", "embed", "heads", "kv")
    assert specs["blocks"]["mlp"]["down"]["kernel"].get_value() == P("layers", "mlp", "embed")
    assert nnx.state(model)["blocks"]["attn"]["q"]["kernel"].shape == (2, 32, 4, 8)
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert {name for spec in leaves for name in spec} <= {"embed", "mlp", "heads", "kv", "vocab", "layers"}


def test_tied_head_has_fewer_params_and_fp32_logits_in_bf16():
    tied, untied = _model(), _model(tie_embeddings=False)
    assert count_params(untied) - count_params(tied) == CFG.vocab_size * CFG.d_model
    model = _model(compute_dtype="bfloat16")
    tokens = jnp.ones((2, 8), jnp.int32)
    logits = model(tokens, tokens, jnp.broadcast_to(jnp.arange(8), (2, 8)))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 8, CFG.vocab_size)


def test_mlm_gradient_sees_later_tokens_but_never_another_document():
    model = _model(causal=False)
    assert model.mlm_head is not None and _model().mlm_head is None
    graphdef, state = nnx.split(model)
    segments_1xL = jnp.asarray([[1] * 10 + [2] * 6])
    positions_1xL = jnp.asarray([list(range(10)) + list(range(6))])

    def loss(x_1xLxD, t):
        logits = nnx.merge(graphdef, state).from_embeddings(x_1xLxD, segments_1xL, positions_1xL)
        return -jax.nn.log_softmax(logits[0, t])[7]

    x = jax.random.normal(jax.random.key(1), (1, 16, CFG.d_model))
    grad = jax.jit(jax.grad(loss))
    for t, own, other in ((3, slice(0, 10), slice(10, 16)), (12, slice(10, 16), slice(0, 10))):
        grad_LxD = np.asarray(grad(x, t)[0])
        assert np.all(np.abs(grad_LxD[own]).sum(-1) > 0)  # before and after t in its document
        assert np.all(grad_LxD[other] == 0.0)


@pytest.mark.parametrize("config, published", [("bert_base.yaml", 110e6), ("gpt2_124m.yaml", 124e6)])
def test_standard_configs_match_published_parameter_counts(config, published):
    from conftest import REPO

    from jaxlm.config import load_config
    from jaxlm.objectives import is_causal

    cfg = load_config(REPO / "configs" / config)
    model = nnx.eval_shape(
        lambda: Transformer(cfg.model, causal=is_causal(cfg), rngs=nnx.Rngs(0))
    )
    assert abs(count_params(model) - published) / published < 0.01


def test_remat_policies_recompute_but_give_the_same_gradients():
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 4, CFG.vocab_size)
    segments = jnp.asarray(np.repeat([[1, 2]], 2, 0).repeat(8, 1))
    positions = jnp.tile(jnp.arange(8), (2, 2))

    params = nnx.state(_model())

    def grads_and_jaxpr(remat):
        build = lambda: Transformer(CFG, causal=True, rngs=nnx.Rngs(0), remat=remat)
        graphdef = nnx.graphdef(nnx.eval_shape(build))
        loss = lambda p: jax.nn.logsumexp(nnx.merge(graphdef, p)(tokens, segments, positions)).sum()
        return jax.jit(jax.grad(loss))(params), str(jax.make_jaxpr(loss)(params))

    reference, jaxpr = grads_and_jaxpr("none")
    assert "remat" not in jaxpr
    for remat in ("full", "dots_saveable"):
        grads, jaxpr = grads_and_jaxpr(remat)
        assert "remat" in jaxpr  # the jax.checkpoint primitive
        same = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        jax.tree.map(same, grads, reference)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_unrolled_layers_give_the_scanned_loss_and_gradients(dropout):
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 4, CFG.vocab_size)
    segments, positions = jnp.ones((2, 16), jnp.int32), jnp.tile(jnp.arange(16), (2, 1))
    params = nnx.state(_model())

    def loss_and_grads(scan_layers):
        cfg = dataclasses.replace(CFG, scan_layers=scan_layers, dropout=dropout)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, causal=True, rngs=nnx.Rngs(0))))
        loss = lambda p: jax.nn.logsumexp(nnx.merge(graphdef, p)(
            tokens, segments, positions, dropout_key=jax.random.key(5))).sum()
        step = jax.jit(jax.value_and_grad(loss))
        return step(params), step.lower(params).as_text()

    (loss, grads), program = loss_and_grads(False)
    (scanned_loss, scanned_grads), scanned_program = loss_and_grads(True)
    # The layer loop (forward and backward) is gone; dropout's key derivation may keep its own.
    assert program.count("stablehlo.while") == scanned_program.count("stablehlo.while") - 2
    np.testing.assert_allclose(loss, scanned_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), grads, scanned_grads)


def _hf_param_count(name):
    """Unique parameters of a full-size transformers model, built on the meta device."""
    import torch
    import transformers

    configs = {
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config()),
        "bert_mlm": lambda: transformers.BertForMaskedLM(transformers.BertConfig()),
        "bert_backbone": lambda: transformers.BertModel(transformers.BertConfig(),
                                                        add_pooling_layer=False),
        "llama_1b": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)),
    }
    with torch.device("meta"):
        return sum(p.numel() for p in configs[name]().parameters())


@pytest.mark.parametrize("config, objective, hf_model, published", [
    ("gpt2_124m.yaml", "clm", "gpt2", 124_439_808),
    ("llama_1b.yaml", "clm", "llama_1b", 1_235_814_400),
    ("bert_base.yaml", "mlm", "bert_mlm", None),
    ("bert_base.yaml", "clm", "bert_backbone", None),  # no MLM head: BertModel without pooler
])
def test_exact_configs_have_the_hf_parameter_count(config, objective, hf_model, published):
    from conftest import REPO

    from jaxlm.config import load_config

    cfg = load_config(REPO / "configs" / config)
    model = nnx.eval_shape(lambda: Transformer(cfg.model, causal=objective == "clm", rngs=nnx.Rngs(0)))
    assert count_params(model) == _hf_param_count(hf_model)
    if published:
        assert count_params(model) == published


VARIANTS = {
    "gpt2": dict(position_embedding="learned", norm="layernorm", bias=True, mlp="gelu_tanh"),
    "llama_gqa": dict(n_kv_heads=2, head_dim=16, rope_scaling="llama3", rope_scaling_factor=4.0,
                      rope_original_max_seq_len=16),
    "bert_post_norm": dict(position_embedding="learned", norm="layernorm", norm_position="post",
                           final_norm=False, embed_norm=True, bias=True, mlp="gelu",
                           type_vocab_size=2),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_architecture_switches_keep_packed_documents_apart(variant):
    model = _model(**VARIANTS[variant])  # learned positions restart per document like RoPE's
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 50, n) for n in (9, 14, 5)]
    packed = _loss_sum(model, _clm_batch(docs, 32))
    alone = [_loss_sum(model, _clm_batch([d], 32)) for d in docs]
    np.testing.assert_allclose(packed["loss_sum"], sum(a["loss_sum"] for a in alone), rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_architecture_switches_keep_the_causal_mask(variant):
    model = _model(**VARIANTS[variant])
    x = jax.random.normal(jax.random.key(1), (1, 16, CFG.d_model))
    grad_LxD = _position_grad(model, x, 5)
    assert np.all(np.asarray(grad_LxD[6:]) == 0.0)
    assert np.all(np.abs(np.asarray(grad_LxD[:6])).sum(-1) > 0)


def test_gqa_shares_kv_heads_and_token_types_change_the_output():
    model = _model(n_kv_heads=2, type_vocab_size=2)
    assert model.blocks.attn.k.kernel.shape == (2, 32, 2, 8)
    assert model.blocks.attn.q.kernel.shape == (2, 32, 4, 8)
    tokens = jnp.arange(8)[None] + 4
    ones, positions = jnp.ones_like(tokens), jnp.arange(8)[None]
    np.testing.assert_array_equal(model(tokens, ones, positions),
                                  model(tokens, ones, positions, jnp.zeros_like(tokens)))
    assert not np.allclose(model(tokens, ones, positions), model(tokens, ones, positions, ones))


@pytest.mark.parametrize("layers, setting, scanned", [(8, None, False), (9, None, True),
                                                      (2, True, True), (12, False, False)])
def test_scan_layers_null_unrolls_shallow_models_only(layers, setting, scanned):
    assert scans_layers(dataclasses.replace(CFG, n_layers=layers, scan_layers=setting)) == scanned


def test_remat_keeps_fewer_activations_than_none():
    """Compiled temp memory of the gradient: full < dots_saveable < none, full under 0.6 of none
    (2 layers, asked to unroll; unrolled, full kept 29 of none's 31 MB)."""
    cfg = dataclasses.replace(CFG, n_layers=2, d_model=64, d_ff=256, scan_layers=False)
    tokens = jnp.ones((8, 128), jnp.int32)

    def temp_bytes(remat):
        model = Transformer(cfg, causal=True, rngs=nnx.Rngs(0), remat=remat)
        graphdef, params = nnx.split(model)
        loss = lambda p: nnx.merge(graphdef, p)(tokens, tokens, tokens).sum()
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, dots, none = (temp_bytes(r) for r in ("full", "dots_saveable", "none"))
    assert full < dots < none and full < 0.6 * none
