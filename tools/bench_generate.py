"""KV-cache generation speed: prefill time and per-token decode latency at several context
lengths, one JSON line per context.

    python tools/bench_generate.py [--config FILE] [--set k=v ...] [--contexts 64 256 1024]
                                   [--batch 1] [--new-tokens 64] [--repeats 3]

Random-init params of the config's model on one device (speed does not depend on the weights).
model.max_seq_len is raised to the largest context + --new-tokens if it is smaller: the cache has
that many slots at every context. Prefill: the jitted prefill of --batch prompts of the context
length (compile excluded, best of --repeats). Decode: --new-tokens jitted steps after that prefill,
each waited for as `jaxlm generate`'s host loop does (best of --repeats); sampling as the CLI's
defaults (temperature 0.8, top-k 40).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxlm.cli import DEFAULT_CONFIG
from jaxlm.config import load_config
from jaxlm.generate import Sampler, banned_tokens, bucket, make_sampler
from jaxlm.state import init_state, make_setup
from jaxlm.tokenizer import load_tokenizer
from jaxlm.run import resolve


def time_context(sampler: Sampler, params, context: int, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(context)
    tokens_BxP = np.zeros((args.batch, bucket(context, sampler.window)), np.int32)
    tokens_BxP[:, :context] = rng.integers(4, 200, (args.batch, context))
    lengths_B = np.full(args.batch, context, np.int32)
    key = jax.random.key(0)
    jax.block_until_ready(sampler.prefill(params, tokens_BxP, lengths_B, key))  # compile
    prefill_s, decode_s = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        tokens_B, cache = jax.block_until_ready(sampler.prefill(params, tokens_BxP, lengths_B, key))
        prefill_s.append(time.perf_counter() - start)
        positions_B = lengths_B.copy()
        start = time.perf_counter()
        for step in range(args.new_tokens):
            tokens_B, cache = sampler.decode(params, cache, tokens_B, positions_B, key, step)
            np.asarray(tokens_B)  # the host loop reads each step's tokens
            positions_B = positions_B + 1
        decode_s.append((time.perf_counter() - start) / args.new_tokens)
    return {
        "context": context,
        "batch": args.batch,
        "cache_slots": sampler.window,
        "prefill_ms": round(1e3 * min(prefill_s), 3),
        "prefill_tokens_per_s": round(args.batch * context / min(prefill_s), 1),
        "decode_ms_per_token": round(1e3 * min(decode_s), 3),
        "decode_tokens_per_s": round(args.batch / min(decode_s), 1),
        "device": jax.devices()[0].device_kind,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (model)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="k=v")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=3, help="timings per context (best kept)")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = resolve(cfg, tokenizer)
    window = max(cfg.model.max_seq_len, max(args.contexts) + args.new_tokens)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=window))
    setup = make_setup(cfg, jax.devices()[:1])
    params = init_state(setup)["params"]
    banned_V = banned_tokens(cfg.model.vocab_size, tokenizer)
    sampler = make_sampler(setup, banned_V, temperature=0.8, top_k=40, top_p=1.0)
    for context in args.contexts:
        print(json.dumps(time_context(sampler, params, context, args)), flush=True)


if __name__ == "__main__":
    main()
