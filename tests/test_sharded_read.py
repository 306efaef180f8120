"""Offline eval and generation of a model bigger than one device: a checkpoint is restored in its
shards on the run's own mesh fitted to the devices present, and gives what one device gives."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jaxlm.data import open_split
from jaxlm.evaluate import Evaluator
from jaxlm.generate import banned_tokens, generate, make_sampler
from jaxlm.run import load_run
from jaxlm.sharding import fit_axes
from jaxlm.tokenizer import ByteTokenizer
from jaxlm.train import train

MESHES = {"fsdp8": {"data": 1, "fsdp": 8, "tensor": 1}, "tensor2_fsdp4": {"data": 1, "fsdp": 4, "tensor": 2}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, cache_dir):
    """A 3-step run trained on each mesh of MESHES."""
    root = tmp_path_factory.mktemp("sharded")
    for name, axes in MESHES.items():
        cfg = tiny_config(corpus, cache_dir, root / name, steps=3)
        train(dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, axes=axes)), show_progress=False)
    return root


def _largest_shard_fraction(params) -> float:
    """Of the biggest param, the fraction of it one device holds."""
    leaf = max(jax.tree.leaves(params), key=lambda x: x.size)
    return leaf.addressable_shards[0].data.size / leaf.size


@pytest.mark.parametrize("mesh", MESHES)
def test_a_run_is_read_back_on_its_own_mesh_in_shards(mesh, runs):
    cfg, setup, params, _ = load_run(runs / mesh)
    assert dict(setup.mesh.shape) == MESHES[mesh]
    assert _largest_shard_fraction(params) <= 1 / 4


def test_eval_on_fsdp8_equals_one_device(runs):
    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
        cfg, setup, params, _ = load_run(runs / "fsdp8", devices=devices)
        results.append(Evaluator(setup, open_split(cfg.data, "validation"), ByteTokenizer())(params))
    assert results[0]["tokens"] == results[1]["tokens"]
    np.testing.assert_allclose(results[0]["loss"], results[1]["loss"], rtol=1e-5)


def test_greedy_generation_on_tensor2_fsdp4_equals_one_device(runs):
    prompts = ["def ", "class A:", "return"]  # 3 rows on 4 batch shards: padded, then dropped
    texts = []
    for devices in (jax.devices(), jax.devices()[:1]):
        cfg, setup, params, _ = load_run(runs / "tensor2_fsdp4", devices=devices)
        texts.append(generate(setup, params, ByteTokenizer(), prompts, max_new_tokens=12,
                              temperature=0.0, top_k=0, seed=0))
    assert len(texts[0]) == 3 and texts[0] == texts[1]


def test_mesh_overrides_apply_after_fitting(runs):
    _, setup, _, _ = load_run(runs / "tensor2_fsdp4", overrides=["mesh.axes.fsdp=2", "mesh.axes.data=-1"])
    assert dict(setup.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("axes, devices, fitted", [
    ({"data": -1, "fsdp": 1, "tensor": 1}, 8, {"data": 8, "fsdp": 1, "tensor": 1}),
    ({"data": 1, "fsdp": 4, "tensor": 2}, 2, {"data": 1, "fsdp": 2, "tensor": 1}),
    ({"data": 1, "fsdp": 4, "tensor": 2}, 1, {"data": 1, "fsdp": 1, "tensor": 1}),
    ({"data": 4, "fsdp": 1, "tensor": 1}, 8, {"data": 8, "fsdp": 1, "tensor": 1}),
    ({"data": 1, "fsdp": -1, "tensor": 2}, 8, {"data": 1, "fsdp": 4, "tensor": 2}),
])
def test_fit_axes_keeps_model_parallel_axes_where_they_fit(axes, devices, fitted):
    assert fit_axes(axes, devices) == fitted


def test_the_kv_cache_is_split_like_the_batch_and_the_heads(runs):
    cfg, setup, params, _ = load_run(runs / "tensor2_fsdp4")
    sampler = make_sampler(setup, banned_tokens(cfg.model.vocab_size, ByteTokenizer()), temperature=0.0,
                           top_k=0, top_p=1.0)
    tokens_BxP = np.ones((sampler.rows, 16), np.int32)
    _, cache = sampler.prefill(params, tokens_BxP, np.full(sampler.rows, 3, np.int32), jax.random.key(0))
    spec = cache.k_NxBxSxHxK.sharding.spec
    assert sampler.rows == 4 and spec[1] in ("fsdp", ("fsdp",), ("data", "fsdp")) and spec[3] == "tensor"
