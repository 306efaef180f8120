import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_tokenizer_files import ROBERTA, TEXTS, byte_level_bpe

from jaxlm.config import Config, DataConfig
from jaxlm.errors import UserError
from jaxlm.objectives import (
    clm_example,
    example_fn,
    mean_loss,
    mlm_example_fn,
    mlm_select,
    weighted_sums,
)
from jaxlm.tokenizer import MASK_ID, SPECIAL_TOKENS, ByteTokenizer, load_tokenizer, padding_id

VOCAB = 300
BYTE_IDS = dict(mask_id=MASK_ID, special_ids=ByteTokenizer.special_ids)


def test_clm_targets_never_cross_documents_or_padding():
    packed = {
        "tokens": np.array([1, 10, 11, 2, 1, 12, 2, 0], np.int32),
        "tokens_segment_ids": np.array([1, 1, 1, 1, 2, 2, 2, 0], np.int32),
        "tokens_positions": np.array([0, 1, 2, 3, 0, 1, 2, 0], np.int32),
    }
    ex = clm_example(packed)
    np.testing.assert_array_equal(ex["targets"][:7], [10, 11, 2, 1, 12, 2, 0])
    np.testing.assert_array_equal(ex["weights"], [1, 1, 1, 0, 1, 1, 0, 0])


def test_weighted_sums_match_a_direct_computation():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    batch = {"targets": jnp.array([[1, 2, 3], [4, 0, 1]]),
             "weights": jnp.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])}
    sums = weighted_sums(logits, batch)
    logp = jax.nn.log_softmax(logits)
    picked = np.take_along_axis(np.asarray(logp), np.asarray(batch["targets"])[..., None], -1)[..., 0]
    expected = -(picked * np.asarray(batch["weights"])).sum()
    np.testing.assert_allclose(sums["loss_sum"], expected, rtol=1e-6)
    assert sums["weight_sum"] == 4
    np.testing.assert_allclose(mean_loss(sums), expected / 4, rtol=1e-6)


def packed_rows(rng: np.random.Generator, n: int, length: int = 64) -> list[dict]:
    """Rows of packed documents: BOS ... EOS per document, padding at the end."""
    rows = []
    for _ in range(n):
        tokens = rng.integers(len(SPECIAL_TOKENS), VOCAB, length).astype(np.int32)
        segments = np.repeat(np.arange(1, 5), length // 4).astype(np.int32)
        starts = np.flatnonzero(np.diff(segments, prepend=0))
        tokens[starts], tokens[np.r_[starts[1:] - 1, length - 9]] = 1, 2
        tokens[length - 8:], segments[length - 8:] = 0, 0
        rows.append({"tokens": tokens, "tokens_segment_ids": segments,
                     "tokens_positions": np.zeros(length, np.int32)})
    return rows


def test_mlm_masking_statistics_and_specials():
    mlm = mlm_example_fn(seed=3, mask_rate=0.15, tokenizer_vocab=VOCAB, **BYTE_IDS)
    selected = candidates = masked = randomized = kept = 0
    for index, row in enumerate(packed_rows(np.random.default_rng(0), 400)):
        ex = mlm(row, (0, index))
        chosen = ex["weights"] > 0
        special = (row["tokens"] < len(SPECIAL_TOKENS)) | (row["tokens_segment_ids"] == 0)
        assert not (chosen & special).any(), "a special or padding token was selected"
        np.testing.assert_array_equal(ex["inputs"][~chosen], row["tokens"][~chosen])
        np.testing.assert_array_equal(ex["targets"], row["tokens"])
        assert ex["inputs"].max() < VOCAB
        candidates += (~special).sum()
        selected += chosen.sum()
        masked += (ex["inputs"][chosen] == MASK_ID).sum()
        same = ex["inputs"][chosen] == row["tokens"][chosen]
        kept += same.sum()
        randomized += (~same & (ex["inputs"][chosen] != MASK_ID)).sum()
    assert abs(selected / candidates - 0.15) < 0.005
    # A random replacement equals the original 1 time in ~293: counted as kept.
    assert abs(masked / selected - 0.8) < 0.02
    assert abs(randomized / selected - 0.1) < 0.015
    assert abs(kept / selected - 0.1) < 0.015


def test_mlm_masks_are_a_function_of_seed_and_index():
    row = packed_rows(np.random.default_rng(1), 1)[0]
    mlm = mlm_example_fn(seed=0, mask_rate=0.3, tokenizer_vocab=VOCAB, **BYTE_IDS)
    a, b = mlm(row, (2, 7)), mlm(row, (2, 7))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert (mlm(row, (2, 8))["weights"] != a["weights"]).any()
    assert (mlm(row, (3, 7))["weights"] != a["weights"]).any()
    other_seed = mlm_example_fn(seed=1, mask_rate=0.3, tokenizer_vocab=VOCAB, **BYTE_IDS)(row, (2, 7))
    assert (other_seed["weights"] != a["weights"]).any()


def test_whole_word_selection_takes_whole_words():
    # Word starts: ids 10 and 11; 20 continues a word.
    word_starts_V = np.zeros(VOCAB, bool)
    word_starts_V[[10, 11]] = True
    tokens_L = np.array([1, 10, 20, 20, 11, 20, 10, 11, 20, 20, 20, 2], np.int32)
    candidates_L = tokens_L >= len(SPECIAL_TOKENS)
    words = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    for seed in range(30):
        chosen = mlm_select(tokens_L, candidates_L, np.random.default_rng(seed), 0.3, word_starts_V)
        for word in words:
            assert chosen[word].all() or not chosen[word].any()
        assert chosen.sum() >= 3 and not chosen[[0, 11]].any()


def test_example_fn_errors():
    with pytest.raises(UserError, match="whole_word_mask needs a tokenizer with word pieces"):
        example_fn(Config(objective="mlm", data=DataConfig(whole_word_mask=True)), ByteTokenizer())


def _packed_documents(tokenizer, length=64):
    """Rows of bos + text + eos documents from the tokenizer, padding at the end."""
    documents = [[tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id] for text in TEXTS[:5]]
    ids = np.concatenate(documents)
    segments = np.concatenate([np.full(len(doc), i + 1) for i, doc in enumerate(documents)])
    rows = []
    for start in range(0, len(ids), length - 8):
        tokens = np.full(length, padding_id(tokenizer), np.int32)
        segment_ids = np.zeros(length, np.int32)
        piece = slice(start, start + length - 8)
        tokens[: len(ids[piece])], segment_ids[: len(ids[piece])] = ids[piece], segments[piece]
        rows.append({"tokens": tokens, "tokens_segment_ids": segment_ids,
                     "tokens_positions": np.zeros(length, np.int32)})
    return rows


@pytest.mark.parametrize("style", ["bert", "roberta"])  # specials first / last in the vocabulary
def test_mlm_masks_with_the_tokenizers_mask_and_never_selects_or_inserts_specials(style, hf_bert,
                                                                                  tmp_path):
    path = hf_bert if style == "bert" else byte_level_bpe(tmp_path, ROBERTA)
    tokenizer = load_tokenizer(f"hf:{path}")
    mlm = example_fn(Config(objective="mlm", data=DataConfig(mask_rate=0.3)), tokenizer)
    specials = list(tokenizer.special_ids)
    masked = randomized = 0
    for index in range(100):
        for row in _packed_documents(tokenizer):
            ex = mlm(row, (0, index))
            chosen = ex["weights"] > 0
            replaced = chosen & (ex["inputs"] != row["tokens"]) & (ex["inputs"] != tokenizer.mask_id)
            assert not np.isin(row["tokens"][chosen], specials).any(), "a special token was selected"
            assert not np.isin(ex["inputs"][replaced], specials).any(), "a special token was inserted"
            np.testing.assert_array_equal(ex["inputs"][~chosen], row["tokens"][~chosen])
            masked += (ex["inputs"][chosen] == tokenizer.mask_id).sum()
            randomized += replaced.sum()
    assert masked > 0 and randomized > 0 and masked > 5 * randomized


def test_mlm_without_a_mask_token_is_a_user_error(hf_gpt2):
    cfg = Config(objective="mlm", data=DataConfig(tokenizer=f"hf:{hf_gpt2}"))
    with pytest.raises(UserError, match="objective mlm needs a mask token"):
        example_fn(cfg, load_tokenizer(cfg.data.tokenizer))
