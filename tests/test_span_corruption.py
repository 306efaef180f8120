"""Span corruption: T5's lengths and counts, exact reconstruction, noise statistics, determinism,
and the sentinel ids' room in the vocabulary."""

import dataclasses
import types

import numpy as np
import pytest

from jaxlm.config import Config, DataConfig, target_length
from jaxlm.errors import UserError
from jaxlm.run import resolve
from jaxlm.span_corruption import row_lengths, sentinel_count, span_corruption_fn
from jaxlm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
VOCAB = 384


def _example_fn(data: DataConfig, seed: int = 0):
    return span_corruption_fn(seed, data, VOCAB, row_lengths(data)[1], bos_id=TOK.bos_id,
                              eos_id=TOK.eos_id, pad_id=0)


def _row(length: int, seed: int = 0) -> dict:
    tokens = np.random.default_rng(seed).integers(10, TOK.vocab_size, length).astype(np.int32)
    return {"tokens": tokens, "tokens_segment_ids": np.ones(length, np.int32),
            "tokens_positions": np.arange(length, dtype=np.int32)}


def _reconstruct(example: dict) -> np.ndarray:
    """The original row from the corrupted input and the targets."""
    inputs = example["inputs"][example["segment_ids"] != 0][:-1]  # without eos
    targets = example["targets"][example["weights"] > 0][:-1]
    spans, current = {}, None
    for token in targets:
        if token >= TOK.vocab_size:
            current = spans.setdefault(int(token), [])
        else:
            current.append(int(token))
    return np.array([t for token in inputs
                     for t in (spans[int(token)] if token >= TOK.vocab_size else [int(token)])])


def test_lengths_are_t5s_for_512_input_tokens():
    assert row_lengths(DataConfig(seq_len=512)) == (568, 114)


@pytest.mark.parametrize("seq_len, density, mean", [(64, 0.15, 3.0), (128, 0.3, 5.0), (32, 0.5, 1.0)])
def test_inputs_and_targets_reconstruct_the_row_exactly(seq_len, density, mean):
    data = DataConfig(seq_len=seq_len, noise_density=density, mean_span_length=mean)
    raw, target_len = row_lengths(data)
    row = _row(raw)
    example = _example_fn(data)(row, (0, 7))
    assert len(example["inputs"]) == seq_len and len(example["targets"]) == target_len
    np.testing.assert_array_equal(_reconstruct(example), row["tokens"])


@pytest.mark.parametrize("density, mean", [(0.15, 3.0), (0.3, 8.0)])
def test_noise_density_and_mean_span_length_match_the_config(density, mean):
    data = DataConfig(seq_len=256, noise_density=density, mean_span_length=mean)
    raw, _ = row_lengths(data)
    example_fn, noise, spans = _example_fn(data), 0, 0
    for index in range(50):
        example = example_fn(_row(raw, index), (0, index))
        targets = example["targets"][example["weights"] > 0][:-1]
        spans += int((targets >= TOK.vocab_size).sum())
        noise += int((targets < TOK.vocab_size).sum())
    assert abs(noise / (50 * raw) - density) < 0.01
    assert abs(noise / spans - mean) < 0.05 * mean


def test_the_corruption_is_a_function_of_seed_stream_and_index():
    data = DataConfig(seq_len=64)
    row = _row(row_lengths(data)[0])
    first, again = _example_fn(data)(row, (3, 5)), _example_fn(data)(row, (3, 5))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    for other in (_example_fn(data)(row, (3, 6)), _example_fn(data, seed=1)(row, (3, 5))):
        assert not np.array_equal(other["inputs"], first["inputs"])


@pytest.mark.parametrize("real", [0, 1, 2, 5, 40])
def test_a_row_with_padding_corrupts_only_its_real_tokens(real):
    data = DataConfig(seq_len=64)
    raw, _ = row_lengths(data)
    row = _row(raw)
    row["tokens_segment_ids"][real:] = 0
    example = _example_fn(data)(row, (0, 0))
    if real >= 2:
        np.testing.assert_array_equal(_reconstruct(example), row["tokens"][:real])
    else:  # too short to hide a span: nothing to predict
        assert example["weights"].sum() == 0


def test_sentinels_are_the_top_ids_of_the_model_vocabulary():
    data = DataConfig(seq_len=64)
    example = _example_fn(data)(_row(row_lengths(data)[0]), (0, 0))
    sentinels = example["targets"][example["targets"] >= TOK.vocab_size]
    np.testing.assert_array_equal(sentinels, VOCAB - 1 - np.arange(len(sentinels)))


def _span_config(**data) -> Config:
    return Config(objective="span_corruption", data=DataConfig(**data))


def test_the_resolved_vocabulary_has_room_for_every_sentinel():
    cfg = resolve(_span_config(seq_len=1024), TOK)
    assert cfg.model.vocab_size % 128 == 0
    assert cfg.model.vocab_size >= TOK.vocab_size + sentinel_count(cfg.data)


def test_pretraining_and_fine_tuning_get_one_vocabulary_size():
    tokenizer = types.SimpleNamespace(vocab_size=32000)  # a multiple of 128: no spare ids
    pretrain = resolve(_span_config(seq_len=512), tokenizer)
    fine_tune = resolve(Config(objective="seq2seq", data=DataConfig(dataset="jsonl", paths=("x",))),
                        tokenizer)
    assert pretrain.model.vocab_size == fine_tune.model.vocab_size > 32000 + sentinel_count(
        pretrain.data)


def test_a_vocab_size_without_room_for_the_sentinels_is_a_user_error():
    cfg = dataclasses.replace(_span_config(seq_len=1024), model=dataclasses.replace(
        Config().model, vocab_size=TOK.vocab_size + 1))
    with pytest.raises(UserError, match="sentinel ids for span_corruption; raise it or leave it null"):
        resolve(cfg, TOK)


def test_the_decoder_length_is_what_the_targets_need_unless_set():
    assert target_length(_span_config(seq_len=64)) == row_lengths(DataConfig(seq_len=64))[1]
    assert target_length(_span_config(seq_len=64, target_len=30)) == 30
