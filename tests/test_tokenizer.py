import numpy as np

from jaxlm.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, ByteTokenizer, load_tokenizer

SAMPLES = ["", "plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🙂🚀", "tab\tnew\nline\x00nul"]


def test_round_trip_arbitrary_unicode():
    tok = ByteTokenizer()
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_specials_are_distinct_and_never_produced_by_text():
    tok = load_tokenizer("bytes")
    assert len({PAD_ID, BOS_ID, EOS_ID, MASK_ID}) == 4
    ids = tok.encode(bytes(range(256)))
    assert ids.min() >= 4 and ids.max() == tok.vocab_size - 1
    assert tok.decode([BOS_ID, *tok.encode("x"), EOS_ID, PAD_ID]) == "x"


def test_byte_lengths_count_bytes_not_specials():
    tok = ByteTokenizer()
    lengths = tok.byte_lengths()
    assert lengths[:4].sum() == 0
    assert lengths[tok.encode("日本")].sum() == len("日本".encode())
