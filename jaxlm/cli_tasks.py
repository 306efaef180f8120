"""The task commands behind the CLI: `generate --input-file` (seq2seq_lm runs) and `predict`
(classify runs). Imported only when one runs, like the rest of the CLI's work."""

from __future__ import annotations

import argparse
import json
from typing import Any

import jax
import numpy as np

from jaxlm.config import Config
from jaxlm.datasets.tasks import label_ids, read_inference_file
from jaxlm.errors import UserError
from jaxlm.objectives import record_encoder
from jaxlm.run import RunDir, load_run
from jaxlm.state import Setup
from jaxlm.task_eval import classify_probs, complete
from jaxlm.tasks import formatted
from jaxlm.tokenizer import load_tokenizer


def generate_file(args: argparse.Namespace, cfg: Config, setup: Setup, params: Any) -> None:
    """`generate --input-file`: one completion per record of a seq2seq run."""
    if cfg.objective not in ("seq2seq_lm", "seq2seq"):
        raise UserError(f"--input-file needs a seq2seq or seq2seq_lm run; {args.run} was trained "
                        f"with {cfg.objective} (use --prompt)")
    records = [r for _, r in read_inference_file(args.input_file, cfg.objective, cfg.data.fields)]
    inputs = [formatted(r, "input", cfg.data.template) for r in records]
    texts = complete(setup, params, load_tokenizer(cfg.data.tokenizer), inputs,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for record, text in zip(records, texts):
        print(json.dumps({"input": record["input"], "text": text}))


def predict(args: argparse.Namespace) -> None:
    """`predict`: the label (and its probability) of each record, by a classify run."""
    if args.input_file is None:
        raise UserError("predict needs --input-file FILE (JSONL or CSV records)")
    cfg, setup, params, _ = load_run(args.run, args.step, args.overrides, jax.devices()[:1])
    if cfg.objective != "classify":
        raise UserError(f"predict needs a classify run; {args.run} was trained with {cfg.objective}")
    names = RunDir(args.run).read_labels(cfg.model.num_labels)
    lines = read_inference_file(args.input_file, "classify", cfg.data.fields)
    records = [r for _, r in lines]
    labelled = all("label" in r for r in records)
    truth = label_ids(lines, names, args.input_file) if labelled else None
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    probs_NxC = classify_probs(setup, params, tokenizer, record_encoder(cfg, tokenizer), records)
    for n, probs_C in enumerate(probs_NxC):
        best = int(np.argmax(probs_C))
        row = {"label": names[best], "probability": round(float(probs_C[best]), 6)}
        if truth is not None:
            row["true_label"] = names[truth[n]]
        print(json.dumps(row))
