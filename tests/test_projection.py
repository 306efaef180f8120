import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import projection

KEY_X, KEY_W, KEY_G = jax.random.split(jax.random.key(0), 3)
# (equation, x shape, kernel shape): the model's attention and MLP projections.
CASES = [
    ("BLD,DHK->BLHK", (2, 5, 8), (8, 3, 4)),
    ("BLHK,HKD->BLD", (2, 5, 3, 4), (3, 4, 8)),
    ("BLD,DF->BLF", (2, 5, 8), (8, 6)),
]


@pytest.mark.parametrize("equation,x_shape,kernel_shape", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_equal_einsum(equation, x_shape, kernel_shape, dtype):
    x = jax.random.normal(KEY_X, x_shape, dtype)
    kernel = jax.random.normal(KEY_W, kernel_shape, dtype)
    out_shape = jax.eval_shape(lambda: jnp.einsum(equation, x, kernel)).shape
    weights = jax.random.normal(KEY_G, out_shape, dtype)
    ours = lambda x, w: (projection.einsum_op(equation, x, w) * weights).astype(jnp.float32).sum()
    theirs = lambda x, w: (jnp.einsum(equation, x, w) * weights).astype(jnp.float32).sum()
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(ours(x, kernel), theirs(x, kernel), rtol=tolerance)
    for got, want in zip(jax.grad(ours, (0, 1))(x, kernel), jax.grad(theirs, (0, 1))(x, kernel)):
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=tolerance, atol=tolerance)


def test_linear_dot_general_equals_a_matmul_and_its_gradient():
    x, kernel = jax.random.normal(KEY_X, (2, 5, 8)), jax.random.normal(KEY_W, (8, 6))
    dims = (((2,), (0,)), ((), ()))
    ours = lambda x, w: (projection.dot_general(x, w, dims) ** 2).sum()
    theirs = lambda x, w: ((x @ w) ** 2).sum()
    for got, want in zip(jax.grad(ours, (0, 1))(x, kernel), jax.grad(theirs, (0, 1))(x, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("equation", ["BLD,VD->BLV", "BLD,BLF->DF", "BLD,DF->BFL"])
def test_other_contractions_are_refused(equation):
    x = jnp.ones((2, 5, 8))
    with pytest.raises(ValueError, match="PC,CO->PO"):
        projection.einsum_op(equation, x, jnp.ones((8, 8)))


def test_a_linear_contraction_over_another_dim_is_refused():
    with pytest.raises(ValueError, match="Linear's contraction"):
        projection.dot_general(jnp.ones((2, 8)), jnp.ones((2, 6)), (((0,), (0,)), ((), ())))
