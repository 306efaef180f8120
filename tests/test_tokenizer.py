import random

import numpy as np
import pytest

from jaxlm.errors import UserError
from jaxlm.tokenizer import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)

SAMPLES = ["", "plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🙂🚀", "tab\tnew\nline\x00nul",
           "  leading  and  double  spaces ", "<mask> [MASK] <pad> <bos>", "\r\n\u2581\ufeff"]
WORDS = ["def", "return", "self", "import", "alpha", "beta", "héllo", "世界", "x", "=", "(", ")"]


def random_unicode(rng: random.Random, n: int) -> str:
    """Mixed ASCII, accents, CJK, emoji, controls and lone combining marks."""
    ranges = [(0, 0x7F), (0x80, 0x24F), (0x300, 0x36F), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory) -> SentencePieceTokenizer:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(1500)]
    return train_sentencepiece(lines, tmp_path_factory.mktemp("spm") / "t.model", vocab_size=320)


@pytest.fixture(params=["bytes", "sentencepiece"])
def tokenizer(request, sentencepiece):
    return ByteTokenizer() if request.param == "bytes" else sentencepiece


def test_round_trip_arbitrary_unicode(tokenizer):
    rng = random.Random(1)
    for text in SAMPLES + [random_unicode(rng, rng.randint(1, 60)) for _ in range(200)]:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32
        assert tokenizer.decode(ids) == text


def test_text_never_encodes_to_a_special_id(tokenizer):
    ids = tokenizer.encode("".join(SPECIAL_TOKENS) + bytes(range(128)).decode() + "[MASK]")
    assert ids.min() >= len(SPECIAL_TOKENS) and ids.max() < tokenizer.vocab_size
    assert tokenizer.decode([1, *tokenizer.encode("x"), 2, 0]) == "x"


def test_byte_lengths_count_bytes_not_specials(tokenizer):
    lengths = tokenizer.byte_lengths()
    assert lengths.shape == (tokenizer.vocab_size,)
    assert lengths[: len(SPECIAL_TOKENS)].sum() == 0
    for text in ["日本 x", "  return self", "🙂"]:
        assert lengths[tokenizer.encode(text)].sum() == len(text.encode())


def test_sentencepiece_reserves_the_same_specials_and_learns_words(sentencepiece):
    assert [sentencepiece.token_text(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    assert len(sentencepiece.encode(" return self")) == 2  # frequent words are single pieces
    starts = sentencepiece.word_starts()
    assert starts[sentencepiece.encode(" return")].all()
    assert load_tokenizer(f"sentencepiece:{sentencepiece.path}").vocab_size == sentencepiece.vocab_size


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(UserError, match="cannot be read.*jaxlm tokenizer train"):
        load_tokenizer(f"sentencepiece:{tmp_path}/missing.model")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        load_tokenizer(f"sentencepiece:{tmp_path}/junk.model")
    with pytest.raises(UserError, match="unknown data.tokenizer 'words'"):
        load_tokenizer("words")


def test_long_documents_reach_sentencepiece_in_pieces_it_accepts():
    from jaxlm.tokenizer import MAX_SENTENCE_CHARS, _sentences

    text = ("x = 1\n" * 5000) + "y" * (2 * MAX_SENTENCE_CHARS + 7)
    pieces = list(_sentences([text, "short"]))
    assert "".join(pieces[:-1]) == text and pieces[-1] == "short"
    assert max(map(len, pieces)) <= MAX_SENTENCE_CHARS and all(pieces)
