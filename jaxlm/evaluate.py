"""Validation metrics over a split: loss, perplexity, bits per byte, token accuracy."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.data import empty_batch, eval_pipeline
from jaxlm.objectives import example_fn
from jaxlm.sharding import batch_shards, global_batch
from jaxlm.state import Setup, make_eval_step
from jaxlm.tokenizer import Tokenizer


class Evaluator:
    """Compiles the eval step once and runs ordered passes over one split's data source."""

    def __init__(self, setup: Setup, source: Any, tokenizer: Tokenizer):
        self.setup, self.source, self.tokenizer = setup, source, tokenizer
        self.step = make_eval_step(setup)
        self.byte_lengths_V = jnp.asarray(_padded(tokenizer.byte_lengths(), setup.cfg.model.vocab_size))
        shards = batch_shards(setup.batch_sharding)
        self.global_rows = -(-setup.cfg.train.batch_size // shards) * shards

    def __call__(self, params: Any, max_batches: int | None = None) -> dict[str, float]:
        cfg = self.setup.cfg
        local_rows = self.global_rows // jax.process_count()
        batches = iter(
            eval_pipeline(
                self.source,
                self.tokenizer,
                example_fn(cfg.objective),
                seq_len=cfg.data.seq_len,
                local_batch=local_rows,
                seed=cfg.seed,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
        )
        totals, count = None, 0
        while max_batches is None or count < max_batches:
            local = next(batches, None)
            if not _any_process_has_data(local is not None):
                break
            if local is None:  # this process is done, others are not: join with padding
                local = empty_batch(local_rows, cfg.data.seq_len)
            batch = global_batch(local, self.setup.batch_sharding)
            sums = self.step(params, batch, self.byte_lengths_V)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            count += 1
        return summarize(jax.device_get(totals))


def _any_process_has_data(has_data: bool) -> bool:
    """Processes hold different amounts of eval data; every one must run the same steps."""
    if jax.process_count() == 1:
        return has_data
    return bool(multihost_utils.process_allgather(np.array(has_data)).any())


def _padded(byte_lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    return np.pad(byte_lengths, (0, vocab_size - len(byte_lengths)))


def summarize(totals: dict[str, Any]) -> dict[str, float]:
    weight = max(float(totals["weight_sum"]), 1.0)
    loss = float(totals["loss_sum"]) / weight
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": float(totals["loss_sum"]) / math.log(2) / max(float(totals["byte_sum"]), 1.0),
        "accuracy": float(totals["correct_sum"]) / weight,
        "tokens": int(totals["weight_sum"]),
    }
