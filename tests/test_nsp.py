"""Next-sentence prediction: pair layout, a fair coin keyed like the MLM masks, and a run whose
NSP loss and accuracy are logged, that resumes bitwise and whose step does not depend on how
its rows are split over devices or microbatches."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxlm.config import DataConfig
from jaxlm.data import open_split
from jaxlm.dryrun import dry_run
from jaxlm.metrics import read_metrics
from jaxlm.nsp import nsp_example_fn, pair_row
from jaxlm.run import load_run, resolve
from jaxlm.state import init_state, make_setup, make_train_step
from jaxlm.tokenizer import ByteTokenizer
from jaxlm.train import train

TOK = ByteTokenizer()


def _source(corpus, cache_dir):
    return open_split(DataConfig(dataset="text_files", paths=(str(corpus / "*.py"),),
                                 validation_percent=20.0, cache_dir=str(cache_dir)), "train")


def _row(source, length=48):
    tokens = np.concatenate([[TOK.bos_id], TOK.encode(source[0]), [TOK.eos_id]])[:length].astype(np.int32)
    return tokens, np.ones(length, np.int32)


def test_a_true_pair_is_cls_first_half_sep_second_half_sep(corpus, cache_dir):
    source = _source(corpus, cache_dir)
    tokens, segments = _row(source)
    for seed in range(20):
        row, is_next = pair_row(tokens, segments, np.random.default_rng(seed), source, TOK)
        if is_next:
            break
    pair = row["tokens"][row["tokens_segment_ids"] > 0]
    seps = np.flatnonzero(pair == TOK.sep_id)
    assert pair[0] == TOK.cls_id and len(seps) == 2 and seps[1] == len(pair) - 1
    content = tokens[tokens >= 7][: len(tokens) - 3]
    np.testing.assert_array_equal(np.concatenate([pair[1:seps[0]], pair[seps[0] + 1:-1]]), content)


def test_pairs_are_true_next_half_the_time_keyed_by_seed_stream_and_index(corpus, cache_dir):
    source = _source(corpus, cache_dir)
    tokens, segments = _row(source)
    nsp = nsp_example_fn(seed=3, mask_rate=0.15, source=source, tokenizer=TOK)
    packed = {"tokens": tokens, "tokens_segment_ids": segments,
              "tokens_positions": np.arange(len(tokens), dtype=np.int32)}
    labels = [int(nsp(packed, (0, i))["nsp_targets"][0]) for i in range(400)]
    assert abs(np.mean(labels) - 0.5) < 0.07  # 400 fair coins: sd 0.025
    again = nsp(packed, (0, 17))
    np.testing.assert_array_equal(again["inputs"], nsp(packed, (0, 17))["inputs"])
    assert again["nsp_weights"].tolist() == [1.0] + [0.0] * (len(tokens) - 1)


def _metrics(run_dir):
    timing = ("tokens_per_s", "mfu", "time")
    return [{k: v for k, v in r.items() if k not in timing}
            for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_nsp_run_logs_its_accuracy_and_resumes_bitwise(tiny_cfg, tmp_path):
    def run(name):
        return dataclasses.replace(tiny_cfg, objective="mlm",
                                   data=dataclasses.replace(tiny_cfg.data, nsp=True),
                                   train=dataclasses.replace(tiny_cfg.train, run_dir=str(tmp_path / name),
                                                             eval_every=6))
    whole, split = run("whole"), run("split")
    result = train(whole, show_progress=False)
    assert 0 <= result["nsp_accuracy"] <= 1 and result["nsp_loss"] > 0
    train(split, show_progress=False, stop_at=3)
    train(split, show_progress=False)
    assert _metrics(split.run_dir) == _metrics(whole.run_dir)
    assert all(0 <= r["nsp_accuracy"] <= 1 for r in _metrics(whole.run_dir))
    (_, _, params_a, _), (_, _, params_b, _) = load_run(whole.run_dir), load_run(split.run_dir)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dry_run_compiles_the_nsp_step(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, objective="mlm", data=dataclasses.replace(tiny_cfg.data, nsp=True))
    report = dry_run(resolve(cfg, TOK))
    assert report["params"] > 0 and report["batch_bytes_per_device"] > 0


def _nsp_batch(rows=16, length=32):
    """Random pairs whose MLM and NSP weights differ per row: every slice of the rows has its own
    masked-tokens-per-pair ratio, which a per-slice NSP scale would pick up."""
    rng = np.random.default_rng(0)
    nsp_weights = np.zeros((rows, length), np.float32)
    nsp_weights[:, 0] = rng.random(rows) < 0.6
    return {"inputs": rng.integers(7, 256, (rows, length), dtype=np.int32),
            "targets": rng.integers(7, 256, (rows, length), dtype=np.int32),
            "weights": (rng.random((rows, length)) < rng.uniform(0.05, 0.5, (rows, 1))).astype(
                np.float32),
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
            "token_types": np.tile((np.arange(length) >= length // 2).astype(np.int32), (rows, 1)),
            "nsp_targets": rng.integers(0, 2, (rows, length), dtype=np.int32),
            "nsp_weights": nsp_weights}


def _nsp_step_metrics(tiny_cfg, devices, accum):
    cfg = dataclasses.replace(
        tiny_cfg, objective="mlm", data=dataclasses.replace(tiny_cfg.data, nsp=True),
        train=dataclasses.replace(tiny_cfg.train, batch_size=16, grad_accum_steps=accum))
    setup = make_setup(resolve(cfg, TOK), jax.devices()[:devices])
    batch = jax.device_put(_nsp_batch(), setup.batch_sharding)
    _, metrics = make_train_step(setup)(init_state(setup), batch)
    return jax.device_get(metrics)


@pytest.mark.parametrize("devices, accum", [(8, 1), (1, 4), (2, 4)])
def test_nsp_step_is_the_same_on_any_split_of_its_rows(tiny_cfg, devices, accum):
    one = _nsp_step_metrics(tiny_cfg, 1, 1)
    split = _nsp_step_metrics(tiny_cfg, devices, accum)
    for key in ("loss_sum", "nsp_loss_sum", "grad_norm"):
        np.testing.assert_allclose(split[key], one[key], rtol=1e-5)
