"""Training objectives: a per-example data transform plus one weighted cross-entropy.

The transform turns a packed row into (inputs, targets, weights, segment_ids, positions); the loss
only reads `weights`, so every objective shares the same jitted step.
Shape legend: B batch, L sequence, V vocab.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.errors import UserError

Example = dict[str, np.ndarray]
OBJECTIVES = ("clm",)


def clm_example(packed: Example) -> Example:
    """Next-token targets; a target in another document (or padding) weighs 0."""
    tokens_L = packed["tokens"]
    segment_ids_L = packed["tokens_segment_ids"]
    targets_L = np.zeros_like(tokens_L)
    targets_L[:-1] = tokens_L[1:]
    weights_L = np.zeros(tokens_L.shape, np.float32)
    weights_L[:-1] = (segment_ids_L[1:] == segment_ids_L[:-1]) & (segment_ids_L[1:] != 0)
    return {
        "inputs": tokens_L,
        "targets": targets_L,
        "weights": weights_L,
        "segment_ids": segment_ids_L,
        "positions": packed["tokens_positions"],
    }


def example_fn(objective: str) -> Callable[[Example], Example]:
    if objective == "clm":
        return clm_example
    raise UserError(f"unknown objective '{objective}' (supported: {', '.join(OBJECTIVES)})")


def is_causal(objective: str) -> bool:
    return objective == "clm"


def weighted_sums(logits_BxLxV: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Summed loss/correct/weight over the batch: sums add up across microbatches and eval batches."""
    weights_BxL = batch["weights"]
    loss_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
    correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == batch["targets"]
    return {
        "loss_sum": jnp.sum(loss_BxL * weights_BxL),
        "correct_sum": jnp.sum(correct_BxL * weights_BxL),
        "weight_sum": jnp.sum(weights_BxL),
    }


def mean_loss(sums: dict[str, jax.Array]) -> jax.Array:
    return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0)
