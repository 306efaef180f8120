import dataclasses

import jax
import numpy as np
import pytest

from conftest import setup_and_batches, step_moves_params_by_gradients

from jaxlm.run import resolve
from jaxlm.state import init_state, make_setup, make_train_step
from jaxlm.tokenizer import ByteTokenizer


@pytest.mark.parametrize("objective, overrides", [
    ("clm", {}),
    ("mlm", {}),
    ("mlm", {"nsp": True}),
    ("span_corruption", {}),
])
def test_step_on_eight_devices_matches_one_device(tiny_cfg, objective, overrides):
    """Eight devices sum their own rows' gradients (Setup.sums_per_device); one device sums all
    rows: the same step, whatever the objective."""
    cfg = step_moves_params_by_gradients(dataclasses.replace(
        tiny_cfg, objective=objective, data=dataclasses.replace(tiny_cfg.data, **overrides)))
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        setup, (batch,) = setup_and_batches(cfg, devices)
        assert setup.mesh.size == len(devices) and setup.sums_per_device is (len(devices) > 1)
        assert len(batch["inputs"].sharding.device_set) == len(devices)
        state, metrics = make_train_step(setup)(init_state(setup), batch)
        results.append(jax.device_get((state["params"], metrics)))
    (params_1, metrics_1), (params_8, metrics_8) = results
    for key in ("loss_sum", "weight_sum", "grad_norm"):
        np.testing.assert_allclose(metrics_8[key], metrics_1[key], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axes, dropout, expected", [
    ((8, 1, 1), 0.0, True),  # data parallel: gradients summed per device, one all-reduce
    ((1, 1, 1), 0.0, False),  # one device: nothing to reduce
    ((1, 8, 1), 0.0, False),  # sharded params: XLA partitions the step
    ((2, 2, 2), 0.0, False),
    ((8, 1, 1), 0.1, False),  # dropout: XLA draws the masks for the global batch
])
def test_data_parallel_cpu_steps_sum_gradients_per_device(tiny_cfg, axes, dropout, expected):
    mesh = dataclasses.replace(tiny_cfg.mesh, axes=dict(zip(("data", "fsdp", "tensor"), axes)))
    cfg = dataclasses.replace(tiny_cfg, mesh=mesh,
                              model=dataclasses.replace(tiny_cfg.model, dropout=dropout))
    setup = make_setup(resolve(cfg, ByteTokenizer()), jax.devices()[:np.prod(axes)])
    assert setup.sums_per_device is expected


def test_params_and_optimizer_state_follow_the_rules(tiny_cfg):
    cfg = dataclasses.replace(
        tiny_cfg, mesh=dataclasses.replace(tiny_cfg.mesh, axes={"data": 2, "fsdp": 2, "tensor": 2})
    )
    setup, _ = setup_and_batches(cfg)
    state = init_state(setup)
    q = state["params"]["blocks"]["attn"]["q"]["kernel"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    mu = jax.tree.leaves(state["opt"]["opt_state"])
    assert any(getattr(x, "sharding", None) is not None and x.sharding.spec == q.sharding.spec for x in mu)


def test_no_recompilation_after_the_first_step(tiny_cfg):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None
    )
    setup, batches = setup_and_batches(tiny_cfg, n=4)
    step = make_train_step(setup)
    state = init_state(setup)
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    before = len(compiles)
    assert before > 0, "the compile listener saw nothing; the count would prove nothing"
    for batch in batches[1:]:
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    assert len(compiles) == before


def _synthetic_batch(rows, length, seed=0):
    """Random tokens; each row keeps a random 5-100 % of its targets, so microbatches weigh
    differently (a per-microbatch mean would differ from the batch mean)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 256, (rows, length + 1), dtype=np.int32)
    keep_B = rng.uniform(0.05, 1.0, (rows, 1))
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": (rng.random((rows, length)) < keep_B).astype(np.float32),
        "segment_ids": np.ones((rows, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
    }


def _run_steps(cfg, host_batch, steps):
    setup = make_setup(resolve(cfg, ByteTokenizer()))
    batch = jax.device_put(host_batch, setup.batch_sharding)
    step, state = make_train_step(setup), init_state(setup)
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append(metrics)
    return jax.device_get((state["params"], history))


def test_grad_accumulation_equals_the_big_batch_step(tiny_cfg):
    results = []
    for accum in (1, 4):
        cfg = dataclasses.replace(
            tiny_cfg,
            # eps=1 makes Adam's update ~ lr * grad (not ~ lr * sign(grad)), so params compare grads.
            optimizer=dataclasses.replace(tiny_cfg.optimizer, warmup_steps=0, eps=1.0, learning_rate=1.0),
            train=dataclasses.replace(tiny_cfg.train, batch_size=32, grad_accum_steps=accum),
        )
        results.append(_run_steps(cfg, _synthetic_batch(32, 32), steps=2))
    (params_1, history_1), (params_4, history_4) = results
    for m1, m4 in zip(history_1, history_4):
        assert m1["weight_sum"] == m4["weight_sum"]
        for key in ("loss_sum", "correct_sum", "grad_norm"):
            np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_4)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_trains_with_float32_params_and_loss(tiny_cfg):
    cfg = dataclasses.replace(
        tiny_cfg,
        model=dataclasses.replace(tiny_cfg.model, compute_dtype="bfloat16"),
        optimizer=dataclasses.replace(tiny_cfg.optimizer, warmup_steps=0, learning_rate=1e-2),
    )
    params, history = _run_steps(cfg, _synthetic_batch(8, 32), steps=4)
    losses = [m["loss_sum"] / m["weight_sum"] for m in history]
    assert history[0]["loss_sum"].dtype == np.float32
    assert losses[-1] < losses[0] - 0.5, losses
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype("float32")}
