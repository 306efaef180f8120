import dataclasses
import functools
import os

import jax
import numpy as np
import pytest
from conftest import config_file, jaxlm_cli
from flax import nnx
from jax.sharding import PartitionSpec

from jaxlm.config import MeshConfig
from jaxlm.data import open_split, train_pipeline
from jaxlm.errors import UserError
from jaxlm.objectives import example_fn, row_length
from jaxlm.sharding import (auto_cpu_devices, axis_rules, batch_shards, batch_sharding,
                            global_batch, make_mesh, summed_over_batch_shards, use_cpu_devices)
from jaxlm.state import init_state, make_setup, make_train_step
from jaxlm.tokenizer import ByteTokenizer
from jaxlm.run import resolve


def test_minus_one_takes_the_remaining_devices():
    mesh = make_mesh(MeshConfig(axes={"data": -1, "fsdp": 2, "tensor": 1}))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert batch_shards(batch_sharding(mesh, axis_rules(MeshConfig(), mesh))) == 8


def test_explicit_devices_build_a_smaller_mesh():
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    assert mesh.size == 1


@pytest.mark.parametrize(
    "axes, message",
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, "multiple of 3 devices"),
        ({"data": 2, "fsdp": 2, "tensor": 1}, "use 4 devices but 8"),
        ({"data": -1, "fsdp": -1, "tensor": 1}, "only one axis may be -1"),
        ({"data": 0, "fsdp": 1, "tensor": 1}, "mesh.axes.data must be positive"),
    ],
)
def test_mesh_that_does_not_fit_is_a_user_error(axes, message):
    with pytest.raises(UserError, match=message):
        make_mesh(MeshConfig(axes=axes))


@pytest.mark.parametrize("cores, batch_size, microbatches, axes, devices", [
    (2, 8, 1, {}, 2),  # one per core
    (1, 8, 1, {}, 1),
    (2, 3, 1, {}, 1),  # the batch must split evenly
    (16, 12, 1, {}, 6),  # at most 8, the largest count that divides the batch
    (64, 256, 1, {}, 8),
    (4, 8, 4, {}, 2),  # every microbatch splits too
    (8, 8, 1, {"tensor": 2}, 8),  # 4 batch shards x 2 tensor
    (3, 8, 1, {"tensor": 2}, 2),  # 3 devices cannot hold tensor 2
    (6, 12, 1, {"data": 1, "fsdp": -1}, 1),  # more devices would shard the params: not asked
    (6, 12, 1, {"data": 1, "tensor": -1}, 1),
])
def test_auto_cpu_devices_is_one_per_core_that_the_mesh_and_batch_divide(
        cores, batch_size, microbatches, axes, devices):
    cfg = MeshConfig(axes={"data": -1, "fsdp": 1, "tensor": 1, **axes})
    assert auto_cpu_devices(cfg, batch_size, microbatches, cores) == devices


def _train_dry_run_mesh(tmp_path, corpus, cache_dir, xla_flags: str, *sets: str) -> str:
    """The mesh line `jaxlm train --dry-run` prints with this XLA_FLAGS and these --set values."""
    args = [arg for value in sets for arg in ("--set", value)]
    proc = jaxlm_cli("train", "--dry-run", "--config", config_file(tmp_path, corpus, cache_dir),
                     *args, env={"XLA_FLAGS": xla_flags})
    assert proc.returncode == 0, proc.stderr
    return next(line for line in proc.stdout.splitlines() if line.startswith("mesh: "))


@pytest.mark.parametrize("xla_flags, mesh", [
    ("--xla_backend_optimization_level=0", "{'data': 3, 'fsdp': 1, 'tensor': 1}"),
    ("--xla_force_host_platform_device_count=1", "{'data': 1, 'fsdp': 1, 'tensor': 1}"),
])
def test_train_makes_mesh_cpu_devices_unless_xla_flags_count_them(xla_flags, mesh, tmp_path,
                                                                  corpus, cache_dir):
    line = _train_dry_run_mesh(tmp_path, corpus, cache_dir, xla_flags, "mesh.cpu_devices=3",
                               "train.batch_size=3")
    assert line == f"mesh: {mesh}"


def test_train_makes_one_device_per_core_by_default(tmp_path, corpus, cache_dir):
    expected = auto_cpu_devices(MeshConfig(), 8, 1, len(os.sched_getaffinity(0)))
    line = _train_dry_run_mesh(tmp_path, corpus, cache_dir, "--xla_backend_optimization_level=0")
    assert line == f"mesh: {{'data': {expected}, 'fsdp': 1, 'tensor': 1}}"


def test_cpu_devices_asked_after_jax_started_is_a_user_error(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    jax.devices()  # this process has started jax's backends
    use_cpu_devices(MeshConfig(), 8, 1, single_process=True)  # automatic: keeps what runs
    with pytest.raises(UserError, match="run `jaxlm train` in a new process"):
        use_cpu_devices(MeshConfig(cpu_devices=2), 8, 1, single_process=True)


def test_rule_naming_an_unknown_mesh_axis():
    cfg = MeshConfig(rules={"batch": ("data",), "embed": ("model",)})
    with pytest.raises(UserError, match="mesh.rules.embed names mesh axis 'model'"):
        axis_rules(cfg, make_mesh(cfg))


# Rows split over data only (replicated over tensor), and over data x fsdp.
@pytest.mark.parametrize("axes, batch_rule", [({"data": 4, "fsdp": 1, "tensor": 2}, ("data",)),
                                              ({"data": 2, "fsdp": 4, "tensor": 1}, ("data", "fsdp"))])
def test_summed_over_batch_shards_sums_each_row_once(axes, batch_rule):
    cfg = MeshConfig(axes=axes, rules={"batch": batch_rule})
    batch = batch_sharding(make_mesh(cfg), axis_rules(cfg, make_mesh(cfg)))
    rows_BxD = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    scale = np.float32(2.0)
    summed = jax.jit(summed_over_batch_shards(
        lambda s, rows: {"sum_D": s * rows.sum(0), "count": rows.shape[0] * s}, batch))
    out = summed(scale, jax.device_put(rows_BxD, batch))
    np.testing.assert_array_equal(out["sum_D"], 2 * rows_BxD.sum(0))
    assert out["count"] == 64


def test_summed_over_batch_shards_reduces_one_flat_buffer():
    cfg = MeshConfig()
    batch = batch_sharding(make_mesh(cfg), axis_rules(cfg, make_mesh(cfg)))
    fn = summed_over_batch_shards(lambda w, rows: ({"a": rows @ w, "b": rows.sum()}, rows.max()),
                                  batch)
    rows = jax.device_put(np.ones((16, 4), np.float32), batch)
    hlo = jax.jit(fn).lower(np.ones(4, np.float32), rows).compile().as_text()
    all_reduces = [line for line in hlo.splitlines() if " all-reduce(" in line]
    assert len(all_reduces) == 1 and "all-reduce(%" in all_reduces[0]
    assert all_reduces[0].split("=")[1].strip().startswith("f32[")  # one buffer, not a tuple


# ---------------------------------------------------------------- the step on every mesh shape

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]


def _mesh_cfg(tiny_cfg, axes, objective="clm"):
    return dataclasses.replace(
        tiny_cfg,
        objective=objective,
        model=dataclasses.replace(tiny_cfg.model, d_model=64, n_heads=8, d_ff=128),
        mesh=MeshConfig(axes=dict(zip(("data", "fsdp", "tensor"), axes))),
    )


def _one_step(cfg, devices=None):
    cfg = resolve(cfg, ByteTokenizer())
    setup = make_setup(cfg, devices)
    source = open_split(cfg.data, "train")
    local = next(iter(train_pipeline(source, ByteTokenizer(), example_fn(cfg, ByteTokenizer()),
                                     seq_len=row_length(cfg), global_batch=cfg.train.batch_size,
                                     seed=0)))
    state = init_state(setup)
    state, metrics = make_train_step(setup)(state, global_batch(local, setup.batch_sharding))
    return setup, state, metrics


@pytest.fixture(scope="module")
def single_device_step(corpus, cache_dir, tmp_path_factory):
    """objective -> (params, summed loss) after one step on one device (computed once each)."""
    from conftest import tiny_config

    @functools.cache
    def step(objective):
        cfg = _mesh_cfg(tiny_config(corpus, cache_dir, tmp_path_factory.mktemp("run")), (1, 1, 1),
                        objective)
        _, state, metrics = _one_step(cfg, jax.devices()[:1])
        return jax.device_get((state["params"], metrics["loss_sum"]))

    return step


# The decoder on each axis alone and all three at once; the encoder-decoder (whose extra rules are
# the cross-attention's heads) on the tensor axis alone and on all three.
STEP_CASES = [(axes, "clm") for axes in MESHES] + [
    ((1, 1, 8), "span_corruption"), ((2, 2, 2), "span_corruption")]


@pytest.mark.parametrize("axes, objective", STEP_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_one_step_matches_one_device_and_follows_the_rules(axes, objective, tiny_cfg,
                                                           single_device_step):
    setup, state, metrics = _one_step(_mesh_cfg(tiny_cfg, axes, objective))
    params_1, loss_1 = single_device_step(objective)
    np.testing.assert_allclose(jax.device_get(metrics["loss_sum"]), loss_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(jax.device_get(state["params"]))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    rules = dict(setup.rules)
    for path, variable in nnx.to_flat_state(state["params"]):
        logical = variable.get_metadata()["out_sharding"]
        expected = PartitionSpec(*(rules.get(name) for name in logical))
        assert variable[...].sharding.spec == expected, path


def test_fsdp_puts_an_eighth_of_the_params_on_each_device(tiny_cfg):
    setup, state, _ = _one_step(_mesh_cfg(tiny_cfg, (1, 8, 1)))
    leaves = jax.tree.leaves(state["params"])
    total = sum(x.nbytes for x in leaves)
    per_device = {}
    for leaf in leaves:
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    assert len(per_device) == 8
    # Norm scales have no 'embed'-sized split everywhere; everything else is split 8 ways.
    assert max(per_device.values()) < total / 8 * 1.1


def test_dimension_not_divisible_by_its_axis_names_the_rule(tiny_cfg):
    cfg = resolve(dataclasses.replace(tiny_cfg, mesh=MeshConfig(axes={"data": 1, "fsdp": 1, "tensor": 8})),
                  ByteTokenizer())
    with pytest.raises(UserError, match=r"'heads' dimension of 2, not divisible .* mesh.rules.heads"):
        make_setup(cfg)


def test_kv_heads_the_tensor_axis_does_not_divide_are_a_one_line_error(tiny_cfg):
    model = dataclasses.replace(tiny_cfg.model, n_heads=8, n_kv_heads=2)
    cfg = resolve(dataclasses.replace(tiny_cfg, model=model, mesh=MeshConfig(
        axes={"data": 2, "fsdp": 1, "tensor": 4})), ByteTokenizer())
    with pytest.raises(UserError, match=r"blocks\.attn\.k\.kernel has a 'heads' dimension of 2"):
        make_setup(cfg)
