"""Validation metrics over a split: loss, perplexity, bits per byte, token accuracy (of the
predicted tokens: next tokens for clm, masked ones for mlm, targets for the task and
encoder-decoder objectives), the majority-token baseline, and for mlm the pseudo-perplexity (every
token masked in turn)."""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.data import config_empty_batch, eval_pipeline, pad_batch, stack_rows
from jaxlm.errors import UserError
from jaxlm.objectives import example_fn, record_encoder, row_length
from jaxlm.sharding import batch_shards, global_batch
from jaxlm.state import Setup, make_eval_step
from jaxlm.task_eval import classification_summary
from jaxlm.tokenizer import Tokenizer, padding_id

Batch = dict[str, np.ndarray]


class Evaluator:
    """Compiles the eval step once and runs ordered passes over one split's data source."""

    def __init__(self, setup: Setup, source: Any, tokenizer: Tokenizer,
                 label_names: list[str] | None = None):
        self.setup, self.source, self.tokenizer = setup, source, tokenizer
        self.label_names = label_names or [str(i) for i in range(setup.cfg.model.num_labels or 0)]
        self.step = make_eval_step(setup)
        self.byte_lengths_V = jnp.asarray(_padded(tokenizer.byte_lengths(), setup.cfg.model.vocab_size))
        shards = batch_shards(setup.batch_sharding)
        self.global_rows = -(-setup.cfg.train.batch_size // shards) * shards

    def __call__(self, params: Any, max_batches: int | None = None) -> dict[str, Any]:
        totals = self._totals(params, self._batches(), max_batches)
        summary = summarize(totals)
        if "confusion_CxC" in totals:  # classify: accuracy, macro-F1 and per-class counts
            for per_token in ("perplexity", "bits_per_byte"):  # a label is no text
                del summary[per_token]
            summary.update(classification_summary(totals["confusion_CxC"], self.label_names))
        if "nsp_weight_sum" in totals:  # mlm with data.nsp: the next-sentence head
            pairs = max(float(totals["nsp_weight_sum"]), 1.0)
            summary.update(nsp_loss=float(totals["nsp_loss_sum"]) / pairs,
                           nsp_accuracy=float(totals["nsp_correct_sum"]) / pairs)
        return summary

    def pseudo_perplexity(self, params: Any, rows: int) -> dict[str, float]:
        """exp(mean -log p(token | the row with only that token masked)) over `rows` eval rows
        (split among processes), each masking position scored in one batch row."""
        local_rows = -(-rows // jax.process_count())
        examples = (ex for batch in self._batches() for ex in _rows(batch))
        chosen = [ex for ex, _ in zip(examples, range(local_rows))]
        rows_per_batch = self.global_rows // jax.process_count()
        totals = self._totals(params, _one_mask_per_row(chosen, rows_per_batch, self.tokenizer))
        summary = summarize(totals)
        return {"pseudo_perplexity": summary["perplexity"], "pseudo_perplexity_tokens": summary["tokens"]}

    def _batches(self) -> Iterator[Batch]:
        cfg = self.setup.cfg
        return iter(
            eval_pipeline(
                self.source,
                self.tokenizer,
                example_fn(cfg, self.tokenizer, self.source),
                seq_len=row_length(cfg),
                local_batch=self.global_rows // jax.process_count(),
                seed=cfg.seed,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                encoder=record_encoder(cfg, self.tokenizer),
            )
        )

    def _totals(self, params: Any, batches: Iterator[Batch], max_batches: int | None = None) -> dict:
        """Summed eval-step outputs over local batches; processes keep stepping together."""
        local_rows = self.global_rows // jax.process_count()
        totals, count = None, 0
        while max_batches is None or count < max_batches:
            local = next(batches, None)
            if not _any_process_has_data(local is not None):
                break
            if local is None:  # this process is done, others are not: join with padding
                local = config_empty_batch(self.setup.cfg, local_rows, padding_id(self.tokenizer))
            batch = global_batch(local, self.setup.batch_sharding)
            sums = self.step(params, batch, self.byte_lengths_V)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            count += 1
        if totals is None:
            raise UserError(f"nothing to evaluate in split '{self.setup.cfg.data.eval_split}' "
                            "(no batches, or no rows asked for)")
        return jax.device_get(totals)


def _rows(batch: Batch) -> Iterator[Batch]:
    """The real (not padding) rows of a batch, unmasked: inputs restored to the targets."""
    for i in range(len(batch["inputs"])):
        if batch["segment_ids"][i].any():
            yield {**{k: v[i] for k, v in batch.items()}, "inputs": batch["targets"][i]}


def _one_mask_per_row(
    examples: list[Batch], rows_per_batch: int, tokenizer: Tokenizer
) -> Iterator[Batch]:
    """For every regular token of every example, a copy with just that token masked and weighted."""
    copies = []
    for ex in examples:
        regular = ~np.isin(ex["targets"], tokenizer.special_ids)
        for position in np.flatnonzero((ex["segment_ids"] != 0) & regular):
            inputs, weights = ex["targets"].copy(), np.zeros(len(ex["targets"]), np.float32)
            inputs[position], weights[position] = tokenizer.mask_id, 1.0
            copies.append({**ex, "inputs": inputs, "weights": weights})
            if len(copies) == rows_per_batch:
                yield stack_rows(copies)
                copies = []
    if copies:
        yield pad_batch(stack_rows(copies), rows_per_batch, padding_id(tokenizer))


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
        "majority_accuracy": float(np.max(totals["target_counts_V"])) / weight,
        "tokens": int(totals["weight_sum"]),
    }
