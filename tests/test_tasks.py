"""Task objectives on the model: seq2seq loss on the target only, packed examples isolated, the
classification head's shape and placement."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import Config, ModelConfig
from jaxlm.heads import build_model, forward
from jaxlm.objectives import weighted_sums
from jaxlm.tasks import classify_encoder, seq2seq_encoder
from jaxlm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
MODEL = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64)
LENGTH = 40


def _packed_row(records):
    """Encoded seq2seq records packed into one row by hand (segment ids 1, 2, ...)."""
    encoded = [seq2seq_encoder(TOK, LENGTH, "")(r) for r in records]
    row = {k: np.zeros(LENGTH, np.float32 if k == "weights" else np.int32)
           for k in ("inputs", "targets", "weights", "segment_ids", "positions")}
    start = 0
    for segment, ex in enumerate(encoded, 1):
        span = slice(start, start + len(ex["tokens"]))
        row["inputs"][span], row["targets"][span], row["weights"][span] = (
            ex["tokens"], ex["targets"], ex["weights"])
        row["segment_ids"][span], row["positions"][span] = segment, np.arange(len(ex["tokens"]))
        start += len(ex["tokens"])
    return {k: jnp.asarray(v[None]) for k, v in row.items()}


@functools.cache
def _decoder():
    return build_model(Config(objective="seq2seq_lm", model=MODEL), True, nnx.Rngs(0))


ROW = _packed_row([{"input": b"hello", "target": b"olleh"}, {"input": b"abc", "target": b"cba"}])


def _loss_of_embeddings(model, batch):
    def loss(x_1xLxD):
        logits = model.from_embeddings(x_1xLxD, batch["segment_ids"], batch["positions"])
        return weighted_sums(logits, batch)["loss_sum"]

    return jax.jit(jax.grad(loss))


def test_changing_the_label_of_any_input_position_changes_nothing():
    model = _decoder()
    loss = jax.jit(lambda b: weighted_sums(forward(model, b, "seq2seq_lm"), b)["loss_sum"])
    noise = jax.random.randint(jax.random.key(3), ROW["targets"].shape, 7, 263)
    changed = {**ROW, "targets": jnp.where(ROW["weights"] > 0, ROW["targets"], noise)}
    assert (changed["targets"] != ROW["targets"]).any()
    assert loss(changed) == loss(ROW)


def test_input_positions_get_gradient_only_through_attention():
    model = _decoder()
    logits = forward(model, ROW, "seq2seq_lm")
    d_logits = jax.grad(lambda l: weighted_sums(l, ROW)["loss_sum"])(logits)[0]
    context = np.asarray(ROW["weights"][0] == 0)
    assert not np.asarray(d_logits)[context].any()  # no loss on any input position's own output
    d_x = _loss_of_embeddings(model, ROW)(model.embed(ROW["inputs"]))[0]
    inputs = context & (np.asarray(ROW["segment_ids"][0]) > 0) & (np.asarray(ROW["inputs"][0]) != TOK.eos_id)
    assert (np.abs(np.asarray(d_x)[inputs]).sum(-1) > 0).all()  # yet the inputs matter, via attention


def test_packed_examples_never_see_each_other():
    model = _decoder()
    first_only = {**ROW, "weights": ROW["weights"] * (ROW["segment_ids"] == 1)}
    d_x = np.asarray(_loss_of_embeddings(model, first_only)(model.embed(ROW["inputs"]))[0])
    assert not d_x[np.asarray(ROW["segment_ids"][0]) != 1].any()
    alone = _packed_row([{"input": b"hello", "target": b"olleh"}])
    loss = jax.jit(lambda b: weighted_sums(forward(model, b, "seq2seq_lm"), b)["loss_sum"])
    np.testing.assert_allclose(loss(first_only), loss(alone), rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_classifier_replaces_the_token_heads(causal):
    cfg = Config(objective="classify", model=dataclasses.replace(MODEL, num_labels=3, tie_embeddings=False))
    model = build_model(cfg, causal, nnx.Rngs(0))
    names = {str(path[0]) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert names == {"embed", "blocks", "final_norm", "task_head"}
    assert (model.task_head.pooler is None) == causal
    assert forward(model, ROW, "classify").shape == (1, LENGTH, 3)


@pytest.mark.parametrize("causal, expected", [
    (False, [0] * 5 + [1] * 3),  # [cls] a b c [sep] | d e [sep]
    (True, [0] * 5 + [1] * 3),   # [bos] a b c [sep] | d e [eos]
])
def test_a_text_pair_marks_its_second_text_with_token_type_1(causal, expected):
    example = classify_encoder(TOK, LENGTH, "", causal)({"text": b"abc", "text_pair": b"de", "label": 1})
    assert example["token_types"].tolist() == expected


def test_a_single_text_has_token_type_0_everywhere():
    example = classify_encoder(TOK, LENGTH, "", False)({"text": b"abc", "label": 1})
    assert example["token_types"].tolist() == [0] * 5
