"""Task heads on the Transformer backbone, and the one forward pass every step calls.

An objective's head is an attribute of the model: `lm_head`/`mlm_head` (token logits, in
model.py) or `task_head` here. A classifier replaces the token heads, so the backbone's params keep
their names whatever the objective and `init_from` can match them across objectives.
Shape legend: B batch, L sequence, D d_model, C classes.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxlm.config import Config, ModelConfig, architecture
from jaxlm.encdec import EncoderDecoder
from jaxlm.layers import dense_init
from jaxlm.model import Transformer
from jaxlm.objectives import weighted_sums

Array = jax.Array
# Params of the heads (top-level attribute names): what `init_heads: reinit` creates or drops.
HEAD_NAMES = ("lm_head", "mlm_head", "task_head")
HEAD_DROP = 1 << 16  # salt of the classifier's dropout key (apart from the backbone's)


class Pooler(nnx.Module):
    """BERT's pooler: dense + tanh over the `[cls]` position's hidden state."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(cfg.d_model, cfg.d_model, dtype=cfg.compute_dtype,
                                param_dtype=cfg.param_dtype, **dense_init(0.02, ("embed", None)),
                                bias_metadata={"out_sharding": (None,)}, rngs=rngs)

    def __call__(self, x_BxLxD: Array) -> Array:
        return jax.numpy.tanh(self.dense(x_BxLxD))


class ClassifierHead(nnx.Module):
    """Encoder: pooler -> dropout -> linear; decoder: linear on the hidden state. Applied at every
    position (the loss weights pick `[cls]` or the last token), so packed rows need no gather."""

    def __init__(self, cfg: ModelConfig, *, causal: bool, rngs: nnx.Rngs):
        self.pooler = None if causal else Pooler(cfg, rngs=rngs)
        self.dropout = cfg.dropout
        self.out = nnx.Linear(cfg.d_model, cfg.num_labels, dtype=cfg.compute_dtype,
                              param_dtype=cfg.param_dtype, **dense_init(0.02, ("embed", None)),
                              bias_metadata={"out_sharding": (None,)}, rngs=rngs)

    def __call__(self, x_BxLxD: Array, dropout_key: Array | None = None) -> Array:
        if self.pooler is not None:
            x_BxLxD = self.pooler(x_BxLxD)
            if dropout_key is not None and self.dropout > 0:
                keep_BxLxD = jax.random.bernoulli(dropout_key, 1 - self.dropout, x_BxLxD.shape)
                x_BxLxD = jax.numpy.where(keep_BxLxD, x_BxLxD / (1 - self.dropout), 0)
        return self.out(x_BxLxD).astype(jax.numpy.float32)


def build_model(cfg: Config, causal: bool, rngs: nnx.Rngs) -> Transformer | EncoderDecoder:
    """The backbone with the head of `cfg.objective`."""
    if architecture(cfg) == "encoder_decoder":
        return EncoderDecoder(cfg.model, rngs=rngs, remat=cfg.train.remat)
    model = Transformer(cfg.model, causal=causal, rngs=rngs, remat=cfg.train.remat)
    if cfg.objective == "classify":
        if cfg.model.num_labels is None:
            raise ValueError("ModelConfig.num_labels must be resolved from the data first")
        model.lm_head = model.mlm_head = None  # no token predictions: the classifier replaces them
        with nnx.use_eager_sharding(False):
            model.task_head = ClassifierHead(cfg.model, causal=causal, rngs=rngs)
    if cfg.objective == "mlm" and cfg.data.nsp:  # is-next / not-next from the pooled [cls]
        with nnx.use_eager_sharding(False):
            model.task_head = ClassifierHead(dataclasses.replace(cfg.model, num_labels=2),
                                             causal=False, rngs=rngs)
    return model


def forward(model: Transformer, batch: dict[str, Array], objective: str,
            dropout_key: Array | None = None) -> Array:
    """Logits at every position: over the vocabulary, or over the classes for classify.
    `dropout_key` (training steps only) turns model.dropout on."""
    if isinstance(model, EncoderDecoder):  # logits of the decoder positions
        return model(batch["inputs"], batch["segment_ids"], batch["positions"],
                     batch["decoder_inputs"], batch["decoder_segment_ids"],
                     batch["decoder_positions"], dropout_key)
    if objective == "classify":
        hidden_BxLxD = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"],
                                    batch.get("token_types"), dropout_key)
        head_key = None if dropout_key is None else jax.random.fold_in(dropout_key, HEAD_DROP)
        return model.task_head(hidden_BxLxD, head_key)
    return model(batch["inputs"], batch["segment_ids"], batch["positions"], batch.get("token_types"),
                 dropout_key)


def nsp_loss_scale(batch: dict[str, Array], cfg: Config) -> Array | None:
    """With NSP, the next-sentence loss's factor in the step's objective: masked tokens per scored
    pair of the *whole* batch, so that after the step divides by the MLM weight it is the mean over
    pairs (BERT's sum of the two means), whatever microbatches or devices the rows are summed on."""
    if not (cfg.objective == "mlm" and cfg.data.nsp):
        return None
    pairs = jax.numpy.maximum(jax.numpy.sum(batch["nsp_weights"]), 1.0)
    return jax.numpy.sum(batch["weights"]) / pairs


def objective_sums(model: Transformer, batch: dict[str, Array], cfg: Config,
                   dropout_key: Array | None = None,
                   nsp_scale: Array | None = None) -> tuple[Array, dict[str, Array], Array]:
    """(what the step minimizes, summed over examples; the weighted sums; the logits).

    Every objective but NSP minimizes its one weighted cross-entropy. With NSP the pooled `[cls]`
    adds the next-sentence loss times `nsp_scale` (`nsp_loss_scale` of the step's batch; by
    default, of these rows)."""
    if not (cfg.objective == "mlm" and cfg.data.nsp):
        logits_BxLxV = forward(model, batch, cfg.objective, dropout_key)
        sums = weighted_sums(logits_BxLxV, batch)
        return sums["loss_sum"], sums, logits_BxLxV
    x_BxLxD = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"],
                           batch["token_types"], dropout_key, normed=False)
    logits_BxLxV = model.head(x_BxLxD)
    head_key = None if dropout_key is None else jax.random.fold_in(dropout_key, HEAD_DROP)
    normed_BxLxD = x_BxLxD if model.final_norm is None else model.final_norm(x_BxLxD)
    nsp_logits_BxLx2 = model.task_head(normed_BxLxD, head_key)
    sums = weighted_sums(logits_BxLxV, batch)
    nsp = weighted_sums(nsp_logits_BxLx2, {"targets": batch["nsp_targets"],
                                           "weights": batch["nsp_weights"]})
    sums.update({f"nsp_{k}": v for k, v in nsp.items()})
    if nsp_scale is None:
        nsp_scale = nsp_loss_scale(batch, cfg)
    return sums["loss_sum"] + nsp_scale * nsp["loss_sum"], sums, logits_BxLxV
