"""Next-sentence prediction (`objective: mlm` with `data.nsp: true`), BERT's second pretraining task.

Each packed row of text becomes a pair `[cls] A [sep] B [sep]`: A is the first half of the row's
text, B its true continuation half of the time, else a span of a random document. The pair is
then masked like any MLM row; `token_types` mark A (0) and B (1) for a model with
`model.type_vocab_size: 2`. The coin and the random document are drawn from the same kind of
seed as the masks (run seed, stream, example index), so a resumed run sees the same pairs. The
label (1: B follows A) sits at `[cls]` in `nsp_targets`/`nsp_weights`, read by the pooled head.
Shape legend: L sequence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.objectives import Example, ExampleFn, mlm_example_fn
from jaxlm.tokenizer import Tokenizer, padding_id

NSP_SALT = 0x4E5350  # keeps the pair draws apart from the mask draws of the same example


def _random_span(source: Any, tokenizer: Tokenizer, rng: np.random.Generator, length: int) -> np.ndarray:
    """`length` consecutive tokens (fewer if the document is shorter) of a random document."""
    ids = tokenizer.encode(source[int(rng.integers(len(source)))])
    start = int(rng.integers(max(len(ids) - length, 0) + 1))
    return ids[start : start + length]


def pair_row(tokens_L: np.ndarray, segment_ids_L: np.ndarray, rng: np.random.Generator, source: Any,
             tokenizer: Tokenizer) -> tuple[Example, bool]:
    """A packed row -> the packed row of its pair (one segment) and whether B is the true next."""
    length = len(tokens_L)
    content = tokens_L[(segment_ids_L != 0) & ~np.isin(tokens_L, tokenizer.special_ids)][: length - 3]
    cut = max(1, len(content) // 2)
    first, second = content[:cut], content[cut:]
    is_next = bool(rng.random() < 0.5)
    if not is_next:
        second = _random_span(source, tokenizer, rng, max(len(second), 1))
    pair = np.concatenate([[tokenizer.cls_id], first, [tokenizer.sep_id], second, [tokenizer.sep_id]])
    real = len(pair)
    token_types_L = (np.arange(length) >= len(first) + 2) & (np.arange(length) < real)
    row = {
        "token_types": token_types_L.astype(np.int32),  # A (with [cls] and its [sep]) 0, B 1
        "tokens": np.pad(pair, (0, length - real), constant_values=padding_id(tokenizer)).astype(np.int32),
        "tokens_segment_ids": (np.arange(length) < real).astype(np.int32),
        "tokens_positions": np.where(np.arange(length) < real, np.arange(length), 0).astype(np.int32),
    }
    return row, is_next


def nsp_example_fn(seed: int, mask_rate: float, source: Any, tokenizer: Tokenizer,
                   word_starts_V: np.ndarray | None = None) -> ExampleFn:
    """MLM on sentence pairs plus the next-sentence label at `[cls]`."""
    mlm = mlm_example_fn(seed, mask_rate, tokenizer.vocab_size, word_starts_V,
                         mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids)

    def nsp_example(packed: Example, key: tuple[int, int]) -> Example:
        rng = np.random.default_rng([seed, *key, NSP_SALT])
        row, is_next = pair_row(packed["tokens"], packed["tokens_segment_ids"], rng, source, tokenizer)
        example = mlm(row, key)
        nsp_targets_L = np.zeros(len(row["tokens"]), np.int32)
        nsp_weights_L = np.zeros(len(row["tokens"]), np.float32)
        nsp_targets_L[0], nsp_weights_L[0] = int(is_next), 1.0
        return {**example, "token_types": row["token_types"], "nsp_targets": nsp_targets_L,
                "nsp_weights": nsp_weights_L}

    return nsp_example
