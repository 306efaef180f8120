"""Task models put to use: seq2seq completions and their exact match, corpus BLEU (sacrebleu,
its default 13a tokenization; 0 where outputs are single words, which have no 4-grams) and chrF
(character n-grams, meaningful for words too), class predictions and the classification metrics
(accuracy, macro-F1, per-class counts) from a confusion matrix.

Shape legend: B batch, L sequence, C classes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import target_length
from jaxlm.data import pad_batch, stack_rows
from jaxlm.generate import banned_tokens, make_sampler, sample_ids
from jaxlm.heads import forward
from jaxlm.sharding import activation_sharding
from jaxlm.state import Setup
from jaxlm.tasks import Encoder, encoder_input_ids, formatted, prompt_ids
from jaxlm.tokenizer import Tokenizer, padding_id


def complete(setup: Setup, params: Any, tokenizer: Tokenizer, inputs: list[str], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0) -> list[str]:
    """The target a seq2seq model writes for each input (one batch): a decoder after
    `[bos] input [sep]`, an encoder-decoder for `input [eos]`."""
    sampler = make_sampler(setup, banned_tokens(setup.cfg.model.vocab_size, tokenizer),
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           start_id=tokenizer.bos_id)
    context = prompt_ids if sampler.first_slot is None else encoder_input_ids
    contexts = [context(tokenizer, text, setup.cfg.data.seq_len) for text in inputs]
    new = sample_ids(sampler, params, contexts, max_new_tokens=max_new_tokens, seed=seed,
                     eos_id=tokenizer.eos_id)
    return [tokenizer.decode(ids) for ids in new]


def exact_match(setup: Setup, params: Any, tokenizer: Tokenizer, source: Any, count: int,
                batch: int = 64) -> dict[str, float]:
    """Of the greedy completions of the first `count` records of `source`: the share that equal
    their target, and their corpus BLEU and chrF against the targets."""
    records = [source[i] for i in range(min(count, len(source)))]
    max_new_tokens = target_length(setup.cfg) or setup.cfg.data.seq_len
    outputs: list[str] = []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        inputs = [formatted(r, "input", setup.cfg.data.template) for r in chunk]
        outputs += complete(setup, params, tokenizer, inputs, max_new_tokens=max_new_tokens)
    import sacrebleu  # only here: the train and eval starts need not pay for it

    targets = [formatted(r, "target", "") for r in records]
    hits = sum(out == target for out, target in zip(outputs, targets))
    scores = ({"bleu": sacrebleu.corpus_bleu(outputs, [targets]).score,
               "chrf": sacrebleu.corpus_chrf(outputs, [targets]).score} if records else {})
    return {"exact_match": hits / max(len(records), 1), "exact_match_examples": len(records),
            **scores}


def classify_probs(setup: Setup, params: Any, tokenizer: Tokenizer, encoder: Encoder,
                   records: list[dict[str, Any]], rows: int = 64) -> np.ndarray:
    """Class probabilities of each record, one record per row (no packing needed here)."""
    seq_len, pad_id = setup.cfg.data.seq_len, padding_id(tokenizer)
    predict = jax.jit(lambda p, b: _probs_at_label(setup, p, b))
    probs = []
    for start in range(0, len(records), rows):
        chunk = [_padded_row(encoder({**r, "label": 0}), seq_len, pad_id)
                 for r in records[start : start + rows]]
        batch = pad_batch(stack_rows(chunk), rows, pad_id)
        probs.append(np.asarray(predict(params, batch))[: len(chunk)])
    return np.concatenate(probs)


def _probs_at_label(setup: Setup, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(setup.model_def, params)
    with activation_sharding(setup.mesh, setup.rules):
        logits_BxLxC = forward(model, batch, setup.cfg.objective)
    at_B = jnp.argmax(batch["weights"], axis=-1)  # the one position that carries the label
    logits_BxC = logits_BxLxC[jnp.arange(len(at_B)), at_B]
    return jax.nn.softmax(logits_BxC, axis=-1)


def _padded_row(example: dict[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(example["tokens"])
    pad = lambda x: np.pad(x, (0, seq_len - n))
    return {"inputs": np.pad(example["tokens"], (0, seq_len - n), constant_values=pad_id), "targets": pad(example["targets"]),
            "weights": pad(example["weights"]), "segment_ids": pad(np.ones(n, np.int32)),
            "positions": pad(np.arange(n, dtype=np.int32)), "token_types": pad(example["token_types"])}


def classification_summary(confusion_CxC: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (over classes that occur or are predicted) and per-class counts from a
    confusion matrix (rows: true class, columns: predicted)."""
    true_C, predicted_C = confusion_CxC.sum(1), confusion_CxC.sum(0)
    correct_C = np.diag(confusion_CxC)
    f1_C = 2 * correct_C / np.maximum(true_C + predicted_C, 1)
    present = (true_C + predicted_C) > 0
    return {
        "accuracy": float(correct_C.sum() / max(true_C.sum(), 1)),
        "macro_f1": float(f1_C[present].mean()) if present.any() else 0.0,
        "per_class": {name: {"true": int(true_C[c]), "predicted": int(predicted_C[c]),
                             "correct": int(correct_C[c])} for c, name in enumerate(names)},
    }
