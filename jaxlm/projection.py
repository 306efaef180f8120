"""Projections (activations contracted with a kernel) with the backward pass written out.

Why: JAX's own transpose of a projection computes the kernel gradient as a dot whose operand
order XLA:CPU then lays out by materialising a transposed copy of the output gradient (one
B*L x F copy per projection and step) and runs on its slower generic dot. Written out here, the
kernel gradient contracts the leading (batch and sequence) dims of both operands in place:
measured on the 25M-parameter decoder's step (docs/benchmarks.md). Values and gradients are the
same contractions, so results agree with `jnp.einsum` to rounding.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
from jax import lax
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
# Every projection's output carries this name, for remat policies (the dots inside a custom_vjp
# are hidden from jax's dot-based policies).
CHECKPOINT_NAME = "projection"


def project(x: Array, kernel: Array, contracted: int, precision: Any = None) -> Array:
    """x's last `contracted` dims against kernel's first: x's other dims + kernel's other dims."""
    return checkpoint_name(_project(x, kernel, contracted, precision), CHECKPOINT_NAME)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _project(x: Array, kernel: Array, contracted: int, precision: Any) -> Array:
    return lax.dot_general(x, kernel, _forward_dims(x, contracted), precision=precision)


def _forward_dims(x: Array, contracted: int) -> tuple:
    return (tuple(range(x.ndim - contracted, x.ndim)), tuple(range(contracted))), ((), ())


def _project_fwd(x: Array, kernel: Array, contracted: int, precision: Any) -> tuple:
    return _project(x, kernel, contracted, precision), (x, kernel)


def _project_bwd(contracted: int, precision: Any, residuals: tuple, grad: Array) -> tuple:
    x, kernel = residuals
    leading = tuple(range(x.ndim - contracted))  # batch and sequence dims, in x and in grad
    outputs = tuple(range(len(leading), grad.ndim))
    kernel_outputs = tuple(range(contracted, kernel.ndim))
    grad_x = lax.dot_general(grad, kernel, ((outputs, kernel_outputs), ((), ())),
                             precision=precision)
    grad_kernel = lax.dot_general(x, grad, ((leading, leading), ((), ())), precision=precision)
    return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def einsum_op(equation: str, x: Array, kernel: Array, *, precision: Any = None,
              out_sharding: Any = None, preferred_element_type: Any = None) -> Array:
    """`nnx.Einsum`'s einsum_op for equations of the form 'PC,CO->PO' (P, C, O strings of dims)."""
    _check_defaults(out_sharding, preferred_element_type)
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    contracted = "".join(dim for dim in lhs if dim in rhs and dim not in out)
    n = len(contracted)
    form = n and lhs[-n:] == contracted == rhs[:n] and lhs[:-n] + rhs[n:] == out
    if not form:
        raise ValueError(f"projection.einsum_op takes 'PC,CO->PO' equations, got {equation!r}")
    return project(x, kernel, n, precision)


def dot_general(x: Array, kernel: Array, dimension_numbers: tuple, *, precision: Any = None,
                out_sharding: Any = None, preferred_element_type: Any = None) -> Array:
    """`nnx.Linear`'s dot_general (x's last dim against the kernel's first)."""
    _check_defaults(out_sharding, preferred_element_type)
    if dimension_numbers != _forward_dims(x, 1):
        raise ValueError(
            f"projection.dot_general takes Linear's contraction, got {dimension_numbers}")
    return project(x, kernel, 1, precision)


def _check_defaults(out_sharding: Any, preferred_element_type: Any) -> None:
    """The model's modules set neither; a module that does needs them in `project` first."""
    if out_sharding is not None or preferred_element_type is not None:
        raise ValueError("projection ops take no out_sharding or preferred_element_type")
