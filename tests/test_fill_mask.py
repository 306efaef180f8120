"""fill-mask asks the tokenizer for its bos, eos and mask ids and never answers with a special."""

import jax
import numpy as np
import pytest

from jaxlm.config import Config, DataConfig, ModelConfig
from jaxlm.errors import UserError
from jaxlm.fill_mask import encode_with_masks, fill_mask
from jaxlm.state import init_state, make_setup
from jaxlm.tokenizer import ByteTokenizer, load_tokenizer


@pytest.fixture
def bert(hf_bert):
    return load_tokenizer(f"hf:{hf_bert}")


@pytest.mark.parametrize("style", ["bytes", "hf-bert"])
def test_masks_and_ends_are_the_tokenizers_ids(style, request):
    tokenizer = ByteTokenizer() if style == "bytes" else request.getfixturevalue("bert")
    ids = encode_with_masks("def [MASK](x): return [MASK]", tokenizer, 64)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert (ids == tokenizer.mask_id).sum() == 2
    assert not np.isin(ids[1:-1][ids[1:-1] != tokenizer.mask_id], tokenizer.special_ids).any()


def test_a_tokenizer_without_a_mask_token_is_a_user_error(hf_gpt2):
    with pytest.raises(UserError, match="needs a tokenizer with a mask token"):
        encode_with_masks("x [MASK]", load_tokenizer(f"hf:{hf_gpt2}"), 64)


def test_answers_are_never_specials_or_ids_past_the_tokenizer(bert, hf_bert):
    model = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32)
    cfg = Config(objective="mlm", model=model, data=DataConfig(seq_len=32, tokenizer=f"hf:{hf_bert}"))
    setup = make_setup(cfg, jax.devices()[:1])
    usable = bert.vocab_size - len(bert.special_ids)
    answers = fill_mask(setup, init_state(setup)["params"], bert, "[MASK] f(x): [MASK] x", top_k=500)
    assert len(answers) == 2 and all(len(candidates) == usable for candidates in answers)
    specials = {bert.token_text(i) for i in bert.special_ids}
    assert not any(text in specials for candidates in answers for text, _ in candidates)
