"""The token stream: training rows of a text corpus as slices of its shuffled documents."""

import json

import numpy as np
import pytest

from jaxlm import token_stream
from jaxlm.data import train_pipeline
from jaxlm.errors import UserError
from jaxlm.objectives import clm_example
from jaxlm.token_stream import StreamRows, token_index
from jaxlm.tokenizer import BOS_ID, ByteTokenizer

DOCS = [f"document {i}: ".encode() + bytes(range(97, 97 + i % 26)) * (i + 1) for i in range(9)]


def _rows(docs, seq_len=16, seed=0):
    return StreamRows(token_index(docs, ByteTokenizer(), None, None), seq_len, seed)


def test_an_epoch_of_rows_holds_every_document_once_and_whole():
    rows = _rows(DOCS)
    total = rows.index.total
    flat = rows.rows(np.arange(-(-total // 16)))["tokens"].ravel()[:total]
    starts = np.flatnonzero(flat == BOS_ID)
    pieces = sorted(bytes(flat[a:b].astype(np.uint8)) for a, b in zip(starts, [*starts[1:], total]))
    tokenizer = ByteTokenizer()
    expected = sorted(bytes(np.concatenate([[BOS_ID], tokenizer.encode(d), [tokenizer.eos_id]])
                            .astype(np.uint8)) for d in DOCS)
    assert pieces == expected


def test_positions_and_segments_restart_per_document_and_per_row():
    batch = _rows(DOCS).rows(np.array([3, 4, 9, 2, 5, 6, 7, 40]))
    tokens, segments, positions = (batch[k] for k in ("tokens", "tokens_segment_ids",
                                                      "tokens_positions"))
    starts = tokens == BOS_ID
    starts[:, 0] = True
    np.testing.assert_array_equal(positions == 0, starts)
    np.testing.assert_array_equal(segments, np.cumsum(starts, axis=1))


def test_a_one_document_corpus_fills_a_batch_larger_than_the_corpus():
    long_document = [bytes(np.random.default_rng(0).integers(32, 127, 1900, dtype=np.uint8))]
    it = iter(train_pipeline(long_document, ByteTokenizer(), clm_example, seq_len=16,
                             global_batch=64, seed=0))
    inputs = next(it)["inputs"]
    assert inputs.shape == (64, 16)
    assert len({row.tobytes() for row in inputs}) == 64


@pytest.mark.parametrize("processes", [2, 4])
def test_the_global_batch_is_the_same_for_any_process_count(processes):
    def batches(index, count):
        it = iter(train_pipeline(DOCS, ByteTokenizer(), clm_example, seq_len=16, global_batch=8,
                                 seed=3, process_index=index, process_count=count))
        return [next(it)["inputs"] for _ in range(6)]

    whole = batches(0, 1)
    parts = [batches(i, processes) for i in range(processes)]
    for step, batch in enumerate(whole):
        np.testing.assert_array_equal(batch, np.concatenate([p[step] for p in parts]))


def test_epochs_are_shuffled_apart():
    rows = _rows(DOCS)
    per_epoch = -(-rows.index.total // 16)
    first, second = (rows.rows(np.arange(2) + k * per_epoch)["tokens"] for k in range(2))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("window_tokens", [64, 1024])
def test_training_rows_are_each_window_of_stream_rows_once(window_tokens, monkeypatch):
    monkeypatch.setattr(token_stream, "SHUFFLE_WINDOW_TOKENS", window_tokens)
    rows = _rows(DOCS)
    count = 3 * rows.window_rows
    picked = rows.stream_rows(np.arange(count))
    np.testing.assert_array_equal(np.sort(picked), np.arange(count))
    windows = np.arange(count) // rows.window_rows
    np.testing.assert_array_equal(picked // rows.window_rows, windows)


def test_a_batch_draws_its_rows_from_across_the_window():
    rows = _rows(DOCS * 50)
    picked = rows.stream_rows(np.arange(8))
    assert np.ptp(picked) > rows.window_rows // 2  # not 8 neighbours: one document's slices


def test_the_iterator_state_is_a_batch_index():
    it = iter(train_pipeline(DOCS, ByteTokenizer(), clm_example, seq_len=16, global_batch=1024,
                             seed=0))
    for _ in range(3):
        next(it)
    assert len(json.dumps(it.get_state())) < 1024


def test_a_cached_index_is_built_once_and_keyed_by_its_inputs(tmp_path, monkeypatch):
    built = token_index(DOCS, ByteTokenizer(), "corpus-a", str(tmp_path))
    monkeypatch.setattr(token_stream, "_write_index", lambda *a: pytest.fail("built twice"))
    again = token_index(DOCS, ByteTokenizer(), "corpus-a", str(tmp_path))
    np.testing.assert_array_equal(np.asarray(built.tokens), np.asarray(again.tokens))
    np.testing.assert_array_equal(built.offsets, again.offsets)
    with pytest.raises(pytest.fail.Exception, match="built twice"):
        token_index(DOCS, ByteTokenizer(), "corpus-b", str(tmp_path))


def test_a_truncated_cached_index_is_rebuilt(tmp_path):
    expected = np.array(token_index(DOCS, ByteTokenizer(), "corpus-a", str(tmp_path)).tokens)
    (tokens_file,) = (tmp_path / "tokens").glob("*/tokens.bin")
    tokens_file.write_bytes(tokens_file.read_bytes()[:10])
    again = token_index(DOCS, ByteTokenizer(), "corpus-a", str(tmp_path))
    np.testing.assert_array_equal(expected, np.asarray(again.tokens))


def test_a_failed_cache_write_is_a_one_line_error_and_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(token_stream, "_write_index", full_disk)
    with pytest.raises(UserError, match="No space left on device"):
        token_index(DOCS, ByteTokenizer(), "corpus-a", str(tmp_path))
    assert all(p.name.endswith(".lock") for p in (tmp_path / "tokens").iterdir())
