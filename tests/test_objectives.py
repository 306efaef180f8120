import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import UserError
from jaxlm.objectives import clm_example, example_fn, mean_loss, weighted_sums


def test_clm_targets_never_cross_documents_or_padding():
    packed = {
        "tokens": np.array([1, 10, 11, 2, 1, 12, 2, 0], np.int32),
        "tokens_segment_ids": np.array([1, 1, 1, 1, 2, 2, 2, 0], np.int32),
        "tokens_positions": np.array([0, 1, 2, 3, 0, 1, 2, 0], np.int32),
    }
    ex = clm_example(packed)
    np.testing.assert_array_equal(ex["targets"][:7], [10, 11, 2, 1, 12, 2, 0])
    np.testing.assert_array_equal(ex["weights"], [1, 1, 1, 0, 1, 1, 0, 0])


def test_weighted_sums_match_a_direct_computation():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    batch = {"targets": jnp.array([[1, 2, 3], [4, 0, 1]]),
             "weights": jnp.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])}
    sums = weighted_sums(logits, batch)
    logp = jax.nn.log_softmax(logits)
    picked = np.take_along_axis(np.asarray(logp), np.asarray(batch["targets"])[..., None], -1)[..., 0]
    expected = -(picked * np.asarray(batch["weights"])).sum()
    np.testing.assert_allclose(sums["loss_sum"], expected, rtol=1e-6)
    assert sums["weight_sum"] == 4
    np.testing.assert_allclose(mean_loss(sums), expected / 4, rtol=1e-6)


def test_unknown_objective():
    with pytest.raises(UserError, match="unknown objective 'mlm'"):
        example_fn("mlm")
