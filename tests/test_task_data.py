"""Task records (jsonl/csv) -> TFDS array_record -> grain: splits, labels, bad input, packing."""

import itertools
import json

import numpy as np
import pytest

from jaxlm.config import DataConfig
from jaxlm.data import eval_pipeline, open_split, stack_rows, train_pipeline
from jaxlm.errors import UserError
from jaxlm.tasks import classify_encoder, pair_encoder, pair_example, seq2seq_encoder, task_example
from jaxlm.tokenizer import ByteTokenizer, padding_id

TOK = ByteTokenizer()


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reviews(n=40):
    return [{"review": f"text number {i} {'good' if i % 3 else 'bad'}",
             "sentiment": "pos" if i % 3 else "neg"} for i in range(n)]


def _cfg(tmp_path, cache_dir, paths, **kw):
    return DataConfig(dataset=kw.pop("dataset", "jsonl"), paths=tuple(map(str, paths)),
                      validation_percent=kw.pop("validation_percent", 25.0), cache_dir=str(cache_dir),
                      fields=kw.pop("fields", {"text": "review", "label": "sentiment"}), **kw)


def _records(source):
    return [source[i] for i in range(len(source))]


def test_jsonl_records_split_by_hash_with_string_labels_as_sorted_ids(tmp_path, cache_dir):
    cfg = _cfg(tmp_path, cache_dir, [write_jsonl(tmp_path / "d.jsonl", reviews())])
    train, val = (_records(open_split(cfg, s, "classify")) for s in ("train", "validation"))
    assert len(train) + len(val) == 40 and 0 < len(val) < len(train)
    for record in train + val:
        assert record["label"] == (1 if b"good" in record["text"] else 0)  # neg=0, pos=1
    keys = {r["key"] for r in train} | {r["key"] for r in val}
    assert len(keys) == 40


def test_csv_with_explicit_validation_file_and_int_labels(tmp_path, cache_dir):
    (tmp_path / "train.csv").write_text("q,a,extra\n" + "".join(f"what is {i},{i % 5},x\n" for i in range(20)))
    (tmp_path / "val.csv").write_text("q,a,extra\n\"two, quoted\",2,y\n")
    cfg = _cfg(tmp_path, cache_dir, [tmp_path / "train.csv"], dataset="csv",
               validation_paths=(str(tmp_path / "val.csv"),), fields={"text": "q", "label": "a"})
    train, val = (_records(open_split(cfg, s, "classify")) for s in ("train", "validation"))
    assert len(train) == 20 and [r["text"] for r in val] == [b"two, quoted"]
    assert sorted(r["label"] for r in train) == sorted(i % 5 for i in range(20))


@pytest.mark.parametrize("content, message", [
    ('{"review": "a", "sentiment": "pos"}\nnot json\n', "d.jsonl line 2: not JSON"),
    ('{"review": "a", "sentiment": "pos"}\n{"review": "b"}\n', "d.jsonl line 2: no field 'sentiment'"),
    ('{"review": "a", "sentiment": "pos"}\n[1, 2]\n', "d.jsonl line 2: expected a JSON object"),
    ('{"review": 3, "sentiment": "pos"}\n', "d.jsonl line 1: field 'review' must be a string"),
    ('{"review": "a", "sentiment": "pos"}\n{"review": "b", "sentiment": "pos"}\n',
     "at least two labels"),
    ("\n\n", "no records"),
])
def test_bad_records_are_one_line_errors_and_nothing_is_built(tmp_path, cache_dir, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=message) as err:
        open_split(_cfg(tmp_path, cache, [path], validation_percent=0.0), "train", "classify")
    assert "\n" not in str(err.value)
    assert not cache.exists() or not any(p.is_file() and not p.name.startswith(".")
                                         for p in cache.rglob("*"))


def test_a_label_seen_only_in_validation_names_its_file_and_line(tmp_path, cache_dir):
    train = write_jsonl(tmp_path / "t.jsonl", reviews(10))
    val = write_jsonl(tmp_path / "v.jsonl", [reviews(1)[0], {"review": "x", "sentiment": "meh"}])
    cfg = _cfg(tmp_path, cache_dir, [train], validation_paths=(str(val),))
    with pytest.raises(UserError, match=r"v.jsonl line 2: label 'meh' does not occur in the training"):
        open_split(cfg, "validation", "classify")


def test_seq2seq_example_weights_only_the_target_and_eos():
    ex = seq2seq_encoder(TOK, 32, "Q: {input}\n")({"input": b"ab", "target": b"xyz"})
    text = TOK.decode(ex["tokens"])
    assert text == "Q: ab\nxyz" and ex["tokens"][0] == TOK.bos_id and ex["tokens"][-1] == TOK.eos_id
    sep = int(np.flatnonzero(ex["tokens"] == TOK.sep_id)[0])
    predicted = ex["targets"][ex["weights"] > 0]
    np.testing.assert_array_equal(predicted, ex["tokens"][sep + 1:])  # x y z eos
    assert ex["weights"][:sep].sum() == 0


@pytest.mark.parametrize("causal, pair, expected_at", [(False, b"", 0), (False, b"b", 0),
                                                        (True, b"", -1), (True, b"b", -1)])
def test_classify_label_sits_at_cls_or_the_last_token(causal, pair, expected_at):
    ex = classify_encoder(TOK, 16, "", causal)({"text": b"a" * 40, "text_pair": pair, "label": 3})
    assert len(ex["tokens"]) == 16  # truncated to the row
    assert np.flatnonzero(ex["weights"]).tolist() == [expected_at % 16]
    assert ex["targets"][expected_at] == 3
    assert ex["tokens"][0] == (TOK.bos_id if causal else TOK.cls_id)
    seps = {(False, b""): 1, (False, b"b"): 2, (True, b""): 0, (True, b"b"): 1}[causal, pair]
    assert (ex["tokens"] == TOK.sep_id).sum() == seps


def test_task_examples_are_packed_whole_and_resume_exactly(tmp_path, cache_dir):
    rows = [{"input": "i" * (i % 7 + 1), "target": "t" * (i % 5 + 1)} for i in range(30)]
    cfg = _cfg(tmp_path, cache_dir, [write_jsonl(tmp_path / "s.jsonl", rows)],
               fields={})
    source = open_split(cfg, "train", "seq2seq_lm")
    encoder = seq2seq_encoder(TOK, 32, "")
    make = lambda: iter(train_pipeline(source, TOK, task_example, seq_len=32, global_batch=4, seed=0,
                                       encoder=encoder))
    it = make()
    for _ in range(3):
        batch = next(it)
    for r in range(4):
        seg, tokens = batch["segment_ids"][r], batch["inputs"][r]
        for s in set(seg[seg > 0].tolist()):
            doc = tokens[seg == s]
            assert doc[0] == TOK.bos_id and doc[-1] == TOK.eos_id  # whole: never split
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(5)]
    fresh = make()
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["inputs"], want)
    evaluated = list(eval_pipeline(source, TOK, task_example, seq_len=32, local_batch=4, seed=0,
                                   encoder=encoder))
    assert sum((b["inputs"] == TOK.eos_id).sum() for b in evaluated) == len(source)


def test_packed_pairs_keep_their_token_types(tmp_path, cache_dir):
    rows = [{"q": f"question {i}", "a": f"answer {i}", "y": i % 2} for i in range(20)]
    cfg = _cfg(tmp_path, cache_dir, [write_jsonl(tmp_path / "p.jsonl", rows)],
               fields={"text": "q", "text_pair": "a", "label": "y"})
    source = open_split(cfg, "train", "classify")
    batch = next(iter(train_pipeline(source, TOK, task_example, seq_len=64, global_batch=2, seed=0,
                                     encoder=classify_encoder(TOK, 64, "", False))))
    for r in range(2):
        types, seg, tokens = batch["token_types"][r], batch["segment_ids"][r], batch["inputs"][r]
        for s in set(seg[seg > 0].tolist()):
            first_sep = np.flatnonzero((seg == s) & (tokens == TOK.sep_id))[0]
            assert types[(seg == s) & (np.arange(64) <= first_sep)].max() == 0
            assert types[(seg == s) & (np.arange(64) > first_sep)].min() == 1


def _pair_batch(tmp_path, cache_dir):
    rows = [{"input": "i" * (i % 7 + 1), "target": "t" * (i % 5 + 1)} for i in range(30)]
    cfg = _cfg(tmp_path, cache_dir, [write_jsonl(tmp_path / "pairs.jsonl", rows)], fields={})
    source = open_split(cfg, "train", "seq2seq")
    batches = train_pipeline(source, TOK, pair_example, seq_len=24, global_batch=2, seed=0,
                             encoder=pair_encoder(TOK, 24, 12, ""))
    return stack_rows(list(itertools.islice(iter(batches), 4)))  # (4, 2, ...) arrays


def test_seq2seq_pairs_are_packed_on_both_sides_with_the_same_pair_ids(tmp_path, cache_dir):
    batch = {k: v[0] for k, v in _pair_batch(tmp_path, cache_dir).items()}
    assert batch["inputs"].shape == (2, 24) and batch["targets"].shape == (2, 12)
    for r in range(2):
        enc_seg, dec_seg = batch["segment_ids"][r], batch["decoder_segment_ids"][r]
        pairs = set(enc_seg[enc_seg > 0].tolist())
        assert len(pairs) >= 2 and pairs == set(dec_seg[dec_seg > 0].tolist())
        for s in pairs:
            inputs = batch["inputs"][r][enc_seg == s]
            decoder, targets = batch["decoder_inputs"][r][dec_seg == s], batch["targets"][r][dec_seg == s]
            assert set(inputs[:-1].tolist()) == {ord("i") + TOK.offset} and inputs[-1] == TOK.eos_id
            assert decoder[0] == TOK.bos_id and targets[-1] == TOK.eos_id
            np.testing.assert_array_equal(decoder[1:], targets[:-1])  # teacher forcing
            np.testing.assert_array_equal(batch["positions"][r][enc_seg == s], np.arange(len(inputs)))
            np.testing.assert_array_equal(batch["decoder_positions"][r][dec_seg == s],
                                          np.arange(len(targets)))


def test_seq2seq_padding_weighs_nothing_and_holds_the_padding_id(tmp_path, cache_dir):
    batch = _pair_batch(tmp_path, cache_dir)
    padding = batch["decoder_segment_ids"] == 0
    assert padding.any() and (batch["weights"][padding] == 0).all()
    assert (batch["weights"][~padding] == 1).all()
    assert (batch["decoder_inputs"][padding] == padding_id(TOK)).all()
    assert (batch["inputs"][batch["segment_ids"] == 0] == padding_id(TOK)).all()
