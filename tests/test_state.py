import dataclasses

import jax
import numpy as np

from jaxlm.data import open_split, train_pipeline
from jaxlm.objectives import clm_example
from jaxlm.sharding import global_batch
from jaxlm.state import init_state, make_setup, make_train_step
from jaxlm.tokenizer import ByteTokenizer
from jaxlm.train import resolve


def _setup_and_batches(cfg, devices=None, n=1):
    cfg = resolve(cfg, ByteTokenizer())
    setup = make_setup(cfg, devices)
    source = open_split(cfg.data, "train")
    it = iter(train_pipeline(source, ByteTokenizer(), clm_example, seq_len=cfg.data.seq_len,
                             global_batch=cfg.train.batch_size, seed=0))
    return setup, [global_batch(next(it), setup.batch_sharding) for _ in range(n)]


def test_step_on_eight_devices_matches_one_device(tiny_cfg):
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        setup, (batch,) = _setup_and_batches(tiny_cfg, devices)
        assert setup.mesh.size == len(devices)
        assert len(batch["inputs"].sharding.device_set) == len(devices)
        state, metrics = make_train_step(setup)(init_state(setup), batch)
        results.append(jax.device_get((state["params"], metrics["loss_sum"])))
    (params_1, loss_1), (params_8, loss_8) = results
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_params_and_optimizer_state_follow_the_rules(tiny_cfg):
    cfg = dataclasses.replace(
        tiny_cfg, mesh=dataclasses.replace(tiny_cfg.mesh, axes={"data": 2, "fsdp": 2, "tensor": 2})
    )
    setup, _ = _setup_and_batches(cfg)
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
    setup, batches = _setup_and_batches(tiny_cfg, n=4)
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
