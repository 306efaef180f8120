import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, _cli_env, setup_and_batches, step_moves_params_by_gradients

from jaxlm import attention
from jaxlm.blocked_attention import blocked_attention
from jaxlm.state import init_state, make_train_step


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
    segments, mask = _segments(length), attention.attention_mask(_segments(length), causal)
    blocked = lambda q, k, v: blocked_attention(q, k, v, segments, causal)
    reference = lambda q, k, v: attention.reference_attention(q, k, v, mask)
    np.testing.assert_allclose(jax.jit(blocked)(q, k, v), reference(q, k, v), rtol=1e-5,
                               atol=1e-5)
    grads = jax.jit(jax.grad(lambda *a: _loss(blocked, *a), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(lambda *a: _loss(reference, *a), argnums=(0, 1, 2))(q, k, v)
    for grad, want in zip(grads, expected):
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-4)


def _bf16_and_fp32():
    q, k, v = _qkv(256, 4, 2, jnp.bfloat16)
    return (q, k, v), [x.astype(jnp.float32) for x in (q, k, v)]


def test_blocked_attention_in_bfloat16_stays_near_the_fp32_reference():
    bf16, fp32 = _bf16_and_fp32()
    out = jax.jit(lambda *a: blocked_attention(*a, _segments(256), True))(*bf16)
    assert out.dtype == jnp.bfloat16
    mask = attention.attention_mask(_segments(256), causal=True)
    np.testing.assert_allclose(out.astype(jnp.float32),
                               attention.reference_attention(*fp32, mask), atol=3e-2)


def test_blocked_attention_gradients_in_bfloat16_keep_the_dtype_and_stay_near_fp32():
    grad = jax.jit(jax.grad(lambda *a: _loss(lambda *x: blocked_attention(
        *x, _segments(256), True), *a), argnums=(0, 1, 2)))
    bf16, fp32 = _bf16_and_fp32()
    for got, want in zip(grad(*bf16), grad(*fp32)):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2 * scale)


@pytest.mark.parametrize("causal,length,blocked", [(True, 128, True), (True, 64, False),
                                                    (False, 128, False)])
def test_xla_attention_on_cpu_runs_causal_rows_longer_than_a_block_in_blocks(causal, length,
                                                                             blocked):
    q, k, v = _qkv(length, 4, 4)
    jaxpr = jax.make_jaxpr(lambda q, k, v: attention.dot_product_attention(
        q, k, v, _segments(length), causal=causal, implementation="xla"))(q, k, v)
    assert ("custom_vjp_call" in str(jaxpr)) == blocked


# Which kernel the step of a causal L=128 layer traces with its mesh on `sys.argv[1]` devices.
KERNEL_FOR_MESH = """
import sys, jax, jax.numpy as jnp
from jaxlm import attention, sharding, topology
from jaxlm.config import MeshConfig
devices = topology.describe("v5e-4").devices if sys.argv[1] == "tpu" else jax.devices()
mesh_cfg = MeshConfig(axes={"data": len(devices), "fsdp": 1, "tensor": 1})
mesh = sharding.make_mesh(mesh_cfg, devices)
qkv = [jnp.ones((len(devices), 128, 4, 16))] * 3
with sharding.activation_sharding(mesh, sharding.axis_rules(mesh_cfg, mesh)):
    jaxpr = jax.make_jaxpr(lambda q, k, v: attention.dot_product_attention(
        q, k, v, jnp.ones((len(devices), 128), jnp.int32), causal=True, implementation="xla"))(*qkv)
print(devices[0].platform, "blocked" if "custom_vjp_call" in str(jaxpr) else "reference")
"""


@pytest.mark.parametrize("mesh_platform, kernel", [("cpu", "blocked"), ("tpu", "reference")])
def test_the_kernel_is_chosen_for_the_mesh_compiled_for_not_the_host(mesh_platform, kernel):
    """A dry run compiles for a TPU slice on a CPU host: its step must hold the reference's
    whole L x L scores, as the TPU run will, not the CPU-only blocks. (In a subprocess: libtpu
    loaded here would hold its lock file against the other tests' dry runs.)"""
    proc = subprocess.run([sys.executable, "-c", KERNEL_FOR_MESH, mesh_platform],
                          capture_output=True, text=True, env=_cli_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [mesh_platform, kernel]


def _first_update(cfg, devices):
    """Each param's change in one train step on `devices`, and the step's loss sum."""
    setup, (batch,) = setup_and_batches(cfg, devices)
    state = init_state(setup)
    before = jax.device_get(state["params"])
    state, metrics = make_train_step(setup)(state, batch)
    change = jax.tree.map(lambda new, old: new - old, jax.device_get(state["params"]), before)
    return change, jax.device_get(metrics["loss_sum"])


@pytest.mark.parametrize("axes,remat,kv_heads", [((8, 1, 1), "dots_saveable", 8),
                                                 ((1, 2, 4), "none", 4)])
def test_a_train_step_through_blocked_attention_matches_one_device_with_the_reference(
        tiny_cfg, monkeypatch, axes, remat, kv_heads):
    """8 devices summing their own rows (remat, microbatches), and heads split over tensor
    with grouped-query heads, against one device running the reference kernel."""
    replace = dataclasses.replace
    cfg = replace(
        tiny_cfg, model=replace(tiny_cfg.model, max_seq_len=160, n_heads=8, n_kv_heads=kv_heads),
        data=replace(tiny_cfg.data, seq_len=160),
        mesh=replace(tiny_cfg.mesh, axes=dict(zip(("data", "fsdp", "tensor"), axes))),
        train=replace(tiny_cfg.train, batch_size=16, remat=remat, grad_accum_steps=2))
    cfg = step_moves_params_by_gradients(cfg)
    calls = []
    blocked = attention.blocked_attention
    monkeypatch.setattr(attention, "blocked_attention",
                        lambda *args: calls.append(args) or blocked(*args))
    change, loss = _first_update(cfg, jax.devices())
    assert calls  # the step traced the blocked kernel
    monkeypatch.setattr(attention, "MIN_BLOCK", 10**9)  # the reference kernel at any length
    one = replace(cfg, mesh=replace(cfg.mesh, axes={"data": 1, "fsdp": 1, "tensor": 1}),
                  train=replace(cfg.train, remat="none", grad_accum_steps=1))
    want_change, want_loss = _first_update(one, jax.devices()[:1])
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(change), jax.tree.leaves(want_change)):
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
