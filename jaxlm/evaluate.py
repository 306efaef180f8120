"""Validation metrics over a split: loss, perplexity, bits per byte, token accuracy."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import make_pipeline
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
        pipeline = make_pipeline(
            self.source,
            self.tokenizer,
            example_fn(cfg.objective),
            seq_len=cfg.data.seq_len,
            local_batch=self.global_rows // jax.process_count(),
            seed=cfg.seed,
            train=False,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        totals = None
        for i, local in enumerate(pipeline):
            if max_batches is not None and i >= max_batches:
                break
            sums = self.step(params, global_batch(local, self.setup.batch_sharding), self.byte_lengths_V)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        return summarize(jax.device_get(totals))


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
