"""Input pipeline throughput alone: tokens/s of the training batches of a config, no model.

    python tools/bench_data.py [--config FILE] [--set k=v ...] [--batches N] [--workers 0 2 ...]
                               [--fresh-cache]

Builds the same grain pipeline `jaxlm train` reads (token stream or task records, objective,
batch) and times host batches after the first; the first batch's time includes tokenizing the
split into the token cache when it is not there yet (--fresh-cache: a new, empty cache, so it
always is). One JSON line per worker count; `vs_train` compares with --train-tokens-per-s, the
rate a training run consumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from jaxlm.cli import DEFAULT_CONFIG
from jaxlm.config import load_config
from jaxlm.data import open_split, stream_cache_key, train_pipeline
from jaxlm.objectives import example_fn, record_encoder
from jaxlm.tokenizer import load_tokenizer
from jaxlm.run import resolve


def measure(cfg, workers: int, batches: int, token_cache: str) -> dict:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = resolve(cfg, tokenizer)
    source = open_split(cfg.data, cfg.data.train_split, cfg.objective)
    start = time.perf_counter()
    pipeline = train_pipeline(
        source,
        tokenizer,
        example_fn(cfg, tokenizer, source),
        seq_len=cfg.data.seq_len,
        global_batch=cfg.train.batch_size,
        seed=cfg.seed,
        worker_count=workers,
        encoder=record_encoder(cfg, tokenizer),
        cache_dir=token_cache,
        cache_key=stream_cache_key(source, cfg.data.tokenizer),
    )
    iterator = iter(pipeline)
    next(iterator)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()
    return {
        "worker_count": workers,
        "batch": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "first_batch_s": round(first_s, 3),
        "batches_per_s": round(batches / elapsed, 1),
        "tokens_per_s": round(batches * cfg.train.batch_size * cfg.data.seq_len / elapsed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--batches", type=int, default=500, help="timed batches per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="data.worker_count values to measure")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="tokenize into a new token cache (time the first start)")
    parser.add_argument("--train-tokens-per-s", type=float, default=4500.0,
                        help="what training consumes (default: tiny_clm on a 2-core CPU)")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    for workers in args.workers:
        token_cache = tempfile.mkdtemp() if args.fresh_cache else cfg.data.cache_dir
        result = measure(cfg, workers, args.batches, token_cache)
        result["vs_train"] = round(result["tokens_per_s"] / args.train_tokens_per_s, 1)
        print(json.dumps({"config": str(args.config), **result}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
