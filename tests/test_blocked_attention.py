import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import attention
from jaxlm.blocked_attention import blocked_attention


def _segments(length):
    """Two rows of packed documents ending in padding (segment 0), boundaries off the blocks."""
    cuts = [length // 3, length // 2, length - length // 3 - length // 2 - 5, 5]
    return jnp.asarray(np.stack([np.repeat([1, 2, 3, 0], cuts),
                                 np.repeat([1, 2, 0], [cuts[0] + cuts[1], cuts[2], 5])]))


def _qkv(length, heads, kv_heads, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(length + heads + kv_heads), 3)
    q = jax.random.normal(kq, (2, length, heads, 16), dtype)
    k, v = (jax.random.normal(key, (2, length, kv_heads, 16), dtype) for key in (kk, kv))
    return q, k, v


def _loss(fn, q, k, v):
    """A loss that weighs every output element differently, so each gradient entry matters."""
    out = fn(q, k, v).astype(jnp.float32)
    return (out * jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)).sum()


CASES = [(causal, length, heads, kv_heads) for causal in (True, False)
         for length in (100, 256, 600) for heads, kv_heads in ((4, 4), (4, 2))]


@pytest.mark.parametrize("causal,length,heads,kv_heads", CASES)
def test_blocked_attention_and_its_gradients_equal_the_reference(causal, length, heads,
                                                                  kv_heads):
    """Lengths: a ragged last block (100), whole blocks (256), more rows than 8 x 64 (600)."""
    q, k, v = _qkv(length, heads, kv_heads)
    mask = attention.attention_mask(_segments(length), causal)
    blocked = lambda q, k, v: blocked_attention(q, k, v, mask, causal)
    reference = lambda q, k, v: attention.reference_attention(q, k, v, mask)
    np.testing.assert_allclose(jax.jit(blocked)(q, k, v), reference(q, k, v), rtol=1e-5,
                               atol=1e-5)
    grads = jax.jit(jax.grad(lambda *a: _loss(blocked, *a), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(lambda *a: _loss(reference, *a), argnums=(0, 1, 2))(q, k, v)
    for grad, want in zip(grads, expected):
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-4)


def test_blocked_attention_in_bfloat16_stays_near_the_fp32_reference():
    q, k, v = _qkv(256, 4, 2, jnp.bfloat16)
    mask = attention.attention_mask(_segments(256), causal=True)
    out = jax.jit(lambda *a: blocked_attention(*a, mask, True))(q, k, v)
    assert out.dtype == jnp.bfloat16
    fp32 = [x.astype(jnp.float32) for x in (q, k, v)]
    np.testing.assert_allclose(out.astype(jnp.float32),
                               attention.reference_attention(*fp32, mask), atol=3e-2)


@pytest.mark.parametrize("causal,length,blocked", [(True, 128, True), (True, 64, False),
                                                    (False, 128, False)])
def test_xla_attention_on_cpu_runs_causal_rows_longer_than_a_block_in_blocks(causal, length,
                                                                             blocked):
    q, k, v = _qkv(length, 4, 4)
    jaxpr = jax.make_jaxpr(lambda q, k, v: attention.dot_product_attention(
        q, k, v, _segments(length), causal=causal, implementation="xla"))(q, k, v)
    assert ("custom_vjp_call" in str(jaxpr)) == blocked
