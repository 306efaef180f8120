import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import attention, sharding
from jaxlm.config import MeshConfig, ModelConfig
from jaxlm.model import Transformer

# Three packed documents and trailing padding (segment 0) in each row, at different offsets.
SEGMENTS_BxL = np.stack(
    [np.repeat([1, 2, 3, 0], [40, 50, 30, 8]), np.repeat([1, 2, 0], [70, 50, 8])]
)


def _qkv(heads=4, head_dim=16):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (2, 128, heads, head_dim)) for k in keys]


def _reference(q, k, v, causal):
    return attention.dot_product_attention(
        q, k, v, jnp.asarray(SEGMENTS_BxL), causal=causal, implementation="xla"
    )


@pytest.mark.parametrize("causal", [True, False])
def test_splash_kernel_equals_the_reference_on_packed_rows(causal):
    """Run in Pallas interpret mode: the TPU kernel's own code, on CPU."""
    q, k, v = _qkv()
    splash = jax.jit(lambda *a: attention.splash_attention(*a, causal=causal, interpret=True))
    out = splash(q, k, v, jnp.asarray(SEGMENTS_BxL))
    np.testing.assert_allclose(out, _reference(q, k, v, causal), atol=2e-5)


def test_splash_gradients_and_shard_map_on_an_8_device_mesh():
    """Rows split over data and heads over tensor, each shard calls the kernel on its own."""
    mesh_cfg = MeshConfig(axes={"data": 2, "fsdp": 1, "tensor": 4})
    mesh = sharding.make_mesh(mesh_cfg)
    rules = sharding.axis_rules(mesh_cfg, mesh)
    q, k, v = _qkv()
    segments = jnp.asarray(SEGMENTS_BxL)

    def loss(fn, q, k, v):
        return (fn(q, k, v) * jnp.arange(16.0)).sum()

    def splash_loss(q, k, v):
        with sharding.activation_sharding(mesh, rules):
            kernel = functools.partial(attention.splash_attention, causal=True, interpret=True)
            return loss(lambda *a: kernel(*a, segments), q, k, v)

    reference = lambda q, k, v: loss(lambda *a: _reference(*a, causal=True), q, k, v)
    assert "shard_map" in str(jax.make_jaxpr(splash_loss)(q, k, v))
    grads = jax.jit(jax.grad(splash_loss, argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(reference, argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_unavailable_kernels_warn_once_and_fall_back_to_exactly_xla(causal, monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=128)
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, 64, SEGMENTS_BxL.shape))
    positions = jnp.broadcast_to(jnp.arange(128), SEGMENTS_BxL.shape)

    def build(implementation):
        return Transformer(
            dataclasses.replace(cfg, attention=implementation), causal=causal, rngs=nnx.Rngs(0)
        )

    params = nnx.state(build("xla"))

    def logits(implementation):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(implementation)))
        segments = jnp.asarray(SEGMENTS_BxL)
        forward = lambda params: nnx.merge(graphdef, params)(tokens, segments, positions)
        return jax.jit(forward)(params)

    reference = logits("xla")
    q, k, v = _qkv(heads=2, head_dim=8)
    for implementation in ("cudnn", "splash"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            np.testing.assert_array_equal(logits(implementation), reference)
            again = attention.dot_product_attention(
                q, k, v, jnp.asarray(SEGMENTS_BxL), causal=causal, implementation=implementation
            )
        np.testing.assert_array_equal(again, _reference(q, k, v, causal))
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and messages[0].startswith(f"model.attention={implementation} ")


def test_a_kernel_jax_refuses_while_tracing_also_falls_back(monkeypatch):
    """Past our own checks, jax's cuDNN checks may still refuse (here: no cuDNN on CPU)."""
    monkeypatch.setattr(attention, "_warned", set())
    monkeypatch.setattr(attention, "_unsupported", lambda implementation, q: "")
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(heads=2, head_dim=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attention.dot_product_attention(
            q, k, v, jnp.asarray(SEGMENTS_BxL), causal=True, implementation="cudnn"
        )
    np.testing.assert_array_equal(out, _reference(q, k, v, causal=True))
    assert [str(w.message).split(":")[0] for w in caught] == ["model.attention=cudnn was refused"]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_reference_attention_equals_jax_nn_values_and_gradients(causal, kv_heads):
    """The heads-first reference is jax.nn's XLA attention, with grouped-query kv heads too."""
    q, _, _ = _qkv()
    k, v = (x[:, :, :kv_heads] for x in _qkv(heads=4)[1:])
    mask = attention.attention_mask(jnp.asarray(SEGMENTS_BxL), causal)
    ours = lambda q, k, v: attention.reference_attention(q, k, v, mask)
    theirs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    loss = lambda fn: lambda q, k, v: (fn(q, k, v) * jnp.arange(16.0)).sum()
    np.testing.assert_allclose(ours(q, k, v), theirs(q, k, v), atol=1e-6)
    for got, want in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v),
                         jax.grad(loss(theirs), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reference_attention_over_another_sequence_length():
    """Cross-attention: 128 queries over 40 keys, each query row seeing a different prefix."""
    q, _, _ = _qkv()
    k, v = (x[:, :40] for x in _qkv()[1:])
    mask = (jnp.arange(40)[None, None, None, :] <= jnp.arange(128)[None, None, :, None] % 40)
    mask = jnp.broadcast_to(mask, (2, 1, 128, 40))
    np.testing.assert_allclose(
        attention.reference_attention(q, k, v, mask),
        jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla"), atol=1e-6)
