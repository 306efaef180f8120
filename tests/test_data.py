import fcntl
import threading

import grain
import jax
import numpy as np
import pytest

from jaxlm.config import DataConfig
from jaxlm.data import device_prefetch, eval_pipeline, open_split, train_pipeline
from jaxlm.datasets.corpus import PythonStdlib, _FileCorpus
from jaxlm.errors import UserError
from jaxlm.objectives import clm_example, mlm_example_fn
from jaxlm.tokenizer import BOS_ID, EOS_ID, MASK_ID, ByteTokenizer, load_tokenizer, padding_id


def _cfg(corpus, cache_dir, **kw):
    return DataConfig(
        dataset="text_files", paths=(str(corpus / "*.py"),), validation_percent=20.0,
        cache_dir=str(cache_dir), **kw,
    )


def _texts(source):
    return sorted(source[i] for i in range(len(source)))


def test_text_files_builder_splits_every_document_once(corpus, cache_dir):
    cfg = _cfg(corpus, cache_dir)
    train, validation = open_split(cfg, "train"), open_split(cfg, "validation")
    originals = sorted(p.read_bytes() for p in corpus.glob("*.py"))
    assert sorted(_texts(train) + _texts(validation)) == originals
    assert len(validation) >= 1 and len(train) > len(validation)
    # Deterministic: a second open (cached build) gives the same split.
    assert _texts(open_split(cfg, "validation")) == _texts(validation)


def test_text_files_paragraph_mode_and_rebuild_on_change(tmp_path, cache_dir):
    corpus = tmp_path / "notes"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first para\n\nsecond para\n  \nthird\n")
    (corpus / "b.txt").write_text("only one")
    cfg = DataConfig(dataset="text_files", paths=(str(corpus / "*.txt"),), split_paragraphs=True,
                     validation_percent=30.0, cache_dir=str(cache_dir))
    docs = _texts(open_split(cfg, "train")) + _texts(open_split(cfg, "validation"))
    assert sorted(docs) == [b"first para", b"only one", b"second para", b"third"]
    (corpus / "b.txt").write_text("changed text")
    docs = _texts(open_split(cfg, "train")) + _texts(open_split(cfg, "validation"))
    assert b"changed text" in docs and b"only one" not in docs


def test_python_stdlib_builder_excludes_tests_and_site_packages(tmp_path):
    root = tmp_path / "lib"
    for rel in ["os.py", "json/decoder.py", "test/test_os.py", "site-packages/pkg/x.py",
                "unittest/tests/t.py", "encodings/cp1.py", "notes.txt", ".hidden/h.py",
                "json/.swap.py"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")
    cfg = PythonStdlib.make_config(root, ("**/*.py",), validation_percent=5.0)
    names = [str(p.relative_to(root)) for p in PythonStdlib.files(cfg)]
    assert names == ["json/decoder.py", "os.py"]
    assert PythonStdlib.default_root().joinpath("os.py").exists()


def test_python_stdlib_lists_what_the_glob_lists_so_built_corpora_stay_valid():
    cfg = PythonStdlib.make_config(PythonStdlib.default_root(), ("**/*.py",))
    assert PythonStdlib.files(cfg) == _FileCorpus.files.__func__(PythonStdlib, cfg)


def test_missing_path_and_empty_corpus_are_user_errors(tmp_path, cache_dir):
    with pytest.raises(UserError, match="no file matches"):
        open_split(DataConfig(dataset="text_files", paths=(str(tmp_path / "nope/*.txt"),),
                              cache_dir=str(cache_dir)), "train")
    with pytest.raises(UserError, match="data.paths is empty"):
        open_split(DataConfig(dataset="text_files", cache_dir=str(cache_dir)), "train")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(UserError, match="is empty"):
        open_split(DataConfig(dataset="text_files", paths=(str(tmp_path / "empty/*.txt"),),
                              validation_percent=0.0, cache_dir=str(cache_dir)), "train")
    with pytest.raises(UserError, match="not available offline"):
        open_split(DataConfig(dataset="no_such_dataset_xyz", cache_dir=str(cache_dir)), "train")


def _pipeline(source, train=True, example=clm_example, **kw):
    if train:
        args = dict(seq_len=32, global_batch=4, seed=0) | kw
        return train_pipeline(source, ByteTokenizer(), example, **args)
    args = dict(seq_len=32, local_batch=4, seed=0) | kw
    return eval_pipeline(source, ByteTokenizer(), example, **args)


def test_packed_batches_have_segments_positions_and_clm_targets(corpus, cache_dir):
    source = open_split(_cfg(corpus, cache_dir), "train")
    batch = next(iter(_pipeline(source)))
    assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}
    assert all(v.shape == (4, 32) for v in batch.values())
    row = {k: v[0] for k, v in batch.items()}
    assert row["positions"][0] == 0  # positions restart per row (it may begin inside a document)
    same = (row["segment_ids"][1:] == row["segment_ids"][:-1]) & (row["segment_ids"][1:] > 0)
    np.testing.assert_array_equal(row["weights"][:-1], same)
    np.testing.assert_array_equal(row["targets"][:-1][same], row["inputs"][1:][same])
    starts = np.flatnonzero(row["positions"] == 0)
    assert np.all(row["inputs"][starts[1:]] == BOS_ID)
    it = iter(_pipeline(source))
    inputs = np.concatenate([next(it)["inputs"] for _ in range(60)])
    assert (inputs == EOS_ID).sum() >= len(source) // 2


def test_processes_read_disjoint_shards_that_cover_the_data(corpus, cache_dir):
    source = open_split(_cfg(corpus, cache_dir), "train")
    whole = np.concatenate([b["inputs"] for b in _pipeline(source, train=False, local_batch=1)])
    shards = [np.concatenate([b["inputs"] for b in _pipeline(source, train=False, local_batch=1,
                                                             process_index=i, process_count=2)])
              for i in range(2)]
    count = lambda a, t: int((a == t).sum())
    assert count(shards[0], BOS_ID) + count(shards[1], BOS_ID) == count(whole, BOS_ID) == len(source)


def test_eval_pass_is_deterministic_finite_and_padded(corpus, cache_dir):
    source = open_split(_cfg(corpus, cache_dir), "train")
    first = [b["inputs"] for b in _pipeline(source, train=False, local_batch=3)]
    second = [b["inputs"] for b in _pipeline(source, train=False, local_batch=3)]
    assert len(first) == len(second) and all(np.array_equal(a, b) for a, b in zip(first, second))
    assert first[-1].shape == (3, 32)


def test_iterator_state_round_trip_continues_exactly(corpus, cache_dir):
    source = open_split(_cfg(corpus, cache_dir), "train")
    it = iter(_pipeline(source))
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(8)]  # crosses an epoch boundary
    fresh = iter(_pipeline(source))
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["inputs"], want)


def test_mlm_masks_after_resume_equal_the_uninterrupted_run(corpus, cache_dir):
    source = open_split(_cfg(corpus, cache_dir), "train")
    mlm = mlm_example_fn(seed=5, mask_rate=0.15, tokenizer_vocab=ByteTokenizer.vocab_size,
                         mask_id=MASK_ID, special_ids=ByteTokenizer.special_ids)
    it = iter(_pipeline(source, example=mlm))
    first = [next(it) for _ in range(5)]
    state = it.get_state()
    expected = [next(it) for _ in range(8)]  # crosses an epoch boundary: same docs, new masks
    fresh = iter(_pipeline(source, example=mlm))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in ("inputs", "weights"):
            np.testing.assert_array_equal(got[key], want[key])
    batches = first + expected
    masked = sum(b["weights"].sum() for b in batches)
    assert 0.1 < masked / sum((b["segment_ids"] > 0).sum() for b in batches) < 0.16
    restarted = iter(_pipeline(source, example=mlm))
    np.testing.assert_array_equal(next(restarted)["inputs"], first[0]["inputs"])


def test_epochs_are_reshuffled(corpus, cache_dir):
    source = open_split(_cfg(corpus, cache_dir), "train")
    order = list(grain.MapDataset.source(source).seed(0).shuffle().repeat()[: 2 * len(source)])
    assert order[: len(source)] != order[len(source) :]
    assert sorted(order[: len(source)]) == sorted(order[len(source) :])


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_global_batch_is_the_same_for_any_number_of_processes(corpus, cache_dir, objective):
    source = open_split(_cfg(corpus, cache_dir), "train")
    example = clm_example if objective == "clm" else mlm_example_fn(
        0, 0.15, ByteTokenizer.vocab_size, mask_id=MASK_ID, special_ids=ByteTokenizer.special_ids)
    one = iter(_pipeline(source, global_batch=8, example=example))
    two = [iter(_pipeline(source, global_batch=8, process_index=i, process_count=2, example=example))
           for i in range(2)]
    for _ in range(6):
        whole = next(one)
        halves = [next(it) for it in two]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))


def test_worker_process_and_device_prefetch_resume_exactly(corpus, cache_dir):
    """A grain worker process and a device prefetch thread running ahead: the checkpoint state is
    still that of the last batch handed out, so a restored iterator continues with the next one."""
    source = open_split(_cfg(corpus, cache_dir), "train")

    def batches(workers):
        return iter(device_prefetch(_pipeline(source, worker_count=workers), jax.device_put, 3))

    in_process = [next(it)["inputs"] for it in [iter(_pipeline(source))] for _ in range(10)]
    it = batches(workers=1)
    first = [next(it) for _ in range(4)]
    assert isinstance(first[0]["inputs"], jax.Array)
    state = it.get_state()
    rest = [next(it) for _ in range(6)]
    it.close()
    # One worker reads the whole (unsliced) data set: the same batches as in the process.
    for got, want in zip(first + rest, in_process):
        np.testing.assert_array_equal(got["inputs"], want)
    fresh = batches(workers=1)
    fresh.set_state(state)
    for want in rest:
        np.testing.assert_array_equal(next(fresh)["inputs"], want["inputs"])
    fresh.close()


def test_mlm_masks_with_workers_are_keyed_by_row_and_batch_index(corpus, cache_dir):
    """Workers each count their own examples; the masks are drawn after them, so batch i row r
    always gets the mask of key (r, i) and no two workers repeat one."""
    source = open_split(_cfg(corpus, cache_dir), "train")
    mlm = mlm_example_fn(seed=5, mask_rate=0.15, tokenizer_vocab=ByteTokenizer.vocab_size,
                         mask_id=MASK_ID, special_ids=ByteTokenizer.special_ids)
    it = iter(_pipeline(source, example=mlm, worker_count=2))
    for index in range(4):
        batch = next(it)
        for row in range(4):
            packed = {"tokens": batch["targets"][row], "tokens_segment_ids": batch["segment_ids"][row],
                      "tokens_positions": batch["positions"][row]}
            np.testing.assert_array_equal(batch["weights"][row], mlm(packed, (row, index))["weights"])
            np.testing.assert_array_equal(batch["inputs"][row], mlm(packed, (row, index))["inputs"])
    it.close()


def test_a_killed_build_leaves_nothing_behind_after_the_next_start(tmp_path, corpus):
    cfg = _cfg(corpus, tmp_path / "cache")
    expected = _texts(open_split(cfg, "train"))
    (built,) = (tmp_path / "cache" / "text_files").glob("src_*/1.0.0")
    # What a build killed before its final rename leaves: the data in an incomplete.* dir.
    stale = built.rename(built.with_name(f"incomplete.KILLED_{built.name}"))
    assert _texts(open_split(cfg, "train")) == expected
    assert not stale.exists() and built.is_dir()


def test_a_build_under_way_elsewhere_is_waited_for_not_removed(tmp_path, corpus):
    cfg = _cfg(corpus, tmp_path / "cache")
    open_split(cfg, "train")
    (built,) = (tmp_path / "cache" / "text_files").glob("src_*/1.0.0")
    (lock_path,) = (tmp_path / "cache").glob(".text_files-src_*.lock")
    live = built.rename(built.with_name(f"incomplete.LIVE_{built.name}"))
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the process writing `live` holds it
        opener = threading.Thread(target=open_split, args=(cfg, "train"))
        opener.start()
        opener.join(timeout=1.0)
        assert opener.is_alive() and live.exists()
    opener.join(timeout=60)
    assert not opener.is_alive() and built.is_dir()


@pytest.mark.parametrize("style", ["gpt2", "bert"])
def test_packing_uses_the_tokenizers_bos_eos_and_padding(corpus, cache_dir, style, request):
    tokenizer = load_tokenizer(f"hf:{request.getfixturevalue(f'hf_{style}')}")
    source = open_split(_cfg(corpus, cache_dir), "train")
    batches = iter(train_pipeline(source, tokenizer, clm_example, seq_len=32, global_batch=4, seed=0))
    inputs, positions = zip(*((b["inputs"], b["positions"]) for b in (next(batches) for _ in range(30))))
    inputs, positions = np.concatenate(inputs), np.concatenate(positions)
    starts = positions == 0
    starts[:, 0] = False  # a row may begin inside a document
    assert starts.any() and (inputs[starts] == tokenizer.bos_id).all()
    assert (inputs == tokenizer.eos_id).sum() >= len(source) // 2
    last = list(eval_pipeline(source, tokenizer, clm_example, seq_len=32, local_batch=3, seed=0))[-1]
    padding = last["segment_ids"] == 0  # the end of the last packed row, and padding rows
    assert padding.any() and (last["inputs"][padding] == padding_id(tokenizer)).all()
