"""model.dropout: off (bitwise today's model) at rate 0 or without a step key; on in training,
different at every step, and the same again when a run resumes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.metrics import read_metrics
from jaxlm.model import Transformer
from jaxlm.run import load_run
from jaxlm.train import train

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32)
TOKENS = jax.random.randint(jax.random.key(0), (2, 16), 7, 64)
SEGMENTS = jnp.concatenate([jnp.ones((2, 10), jnp.int32), 2 * jnp.ones((2, 6), jnp.int32)], axis=1)
POSITIONS = jnp.concatenate([jnp.arange(10), jnp.arange(6)])[None].repeat(2, 0)


def _logits(rate, key, causal=True):
    model = Transformer(dataclasses.replace(CFG, dropout=rate), causal=causal, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, k: nnx.merge(graphdef, s)(TOKENS, SEGMENTS, POSITIONS, dropout_key=k))
    return np.asarray(run(state, key))


@pytest.mark.parametrize("causal", [True, False])
def test_rate_zero_with_a_step_key_is_bitwise_the_model_without_dropout(causal):
    np.testing.assert_array_equal(_logits(0.0, jax.random.key(1), causal), _logits(0.0, None, causal))


def test_without_a_key_dropout_is_off_whatever_the_rate():
    np.testing.assert_array_equal(_logits(0.3, None), _logits(0.0, None))


def test_dropout_differs_between_step_keys_and_repeats_for_the_same_key():
    a, b = _logits(0.3, jax.random.key(1)), _logits(0.3, jax.random.key(2))
    assert not np.allclose(a, b) and not np.allclose(a, _logits(0.0, None))
    np.testing.assert_array_equal(a, _logits(0.3, jax.random.key(1)))


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_dropout_run_resumes_bitwise_and_changes_the_steps(tiny_cfg, tmp_path):
    def run(name, rate):
        return dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, dropout=rate),
                                   train=dataclasses.replace(tiny_cfg.train, run_dir=str(tmp_path / name)))
    whole, split, plain = run("whole", 0.1), run("split", 0.1), run("plain", 0.0)
    train(whole, show_progress=False)
    train(split, show_progress=False, stop_at=3)
    train(split, show_progress=False)
    assert _losses(split.run_dir) == _losses(whole.run_dir)
    (_, _, params_a, _), (_, _, params_b, _) = load_run(whole.run_dir), load_run(split.run_dir)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    train(plain, show_progress=False, stop_at=2)
    assert _losses(plain.run_dir)[2] != _losses(whole.run_dir)[2]
