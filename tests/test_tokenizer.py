import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from hf_tokenizer_files import (
    BERT, GPT2, LLAMA3, ROBERTA, SENTENCEPIECE_STYLE, byte_level_bpe, wordpiece_bert, write_config,
)

from jaxlm.errors import UserError
from jaxlm.tokenizer import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    padding_id,
    spec_for_copy,
    tokenizer_file,
    tokenizer_files,
    train_sentencepiece,
    unusable_ids,
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


@pytest.fixture(params=["bytes", "sentencepiece", "hf-byte-level"])
def tokenizer(request, sentencepiece, hf_gpt2):
    if request.param == "hf-byte-level":
        return load_tokenizer(f"hf:{hf_gpt2}")
    return ByteTokenizer() if request.param == "bytes" else sentencepiece


def test_round_trip_arbitrary_unicode(tokenizer):
    rng = random.Random(1)
    for text in SAMPLES + [random_unicode(rng, rng.randint(1, 60)) for _ in range(200)]:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32
        assert tokenizer.decode(ids) == text


def test_text_never_encodes_to_a_special_id(tokenizer):
    ids = tokenizer.encode("".join(SPECIAL_TOKENS + GPT2) + bytes(range(128)).decode() + "[MASK]")
    marks = [tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.pad_id]  # not [UNK]:
    assert not np.isin(ids, marks).any()  # characters outside the WordPiece vocabulary become it and ids.max() < tokenizer.vocab_size
    ends = tokenizer.bos_id, tokenizer.eos_id, padding_id(tokenizer)
    assert tokenizer.decode([ends[0], *tokenizer.encode("x"), *ends[1:]]) == "x"


def test_a_pickled_tokenizer_encodes_the_same(tokenizer):  # grain workers get pickled copies
    text = "".join(SPECIAL_TOKENS + GPT2) + " héllo [MASK]"
    copy = pickle.loads(pickle.dumps(tokenizer))
    np.testing.assert_array_equal(copy.encode(text), tokenizer.encode(text))


def test_byte_lengths_count_bytes_not_specials(tokenizer):
    lengths = tokenizer.byte_lengths()
    assert lengths.shape == (tokenizer.vocab_size,)
    assert lengths[list(tokenizer.special_ids)].sum() == 0
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


def test_unusable_ids_are_the_specials_and_ids_past_the_tokenizer(tokenizer):
    unusable_V = unusable_ids(tokenizer.vocab_size + 5, tokenizer)
    expected = set(tokenizer.special_ids) | set(range(tokenizer.vocab_size, tokenizer.vocab_size + 5))
    assert set(np.flatnonzero(unusable_V).tolist()) == expected


ROLES = ("bos", "eos", "pad", "mask", "cls", "sep", "unk")


@pytest.mark.parametrize("style, specials, expected", [
    ("gpt2", GPT2, {"bos": "<|endoftext|>", "eos": "<|endoftext|>"}),  # one token starts and ends
    ("llama3", LLAMA3, {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"}),
    ("sentencepiece", SENTENCEPIECE_STYLE,
     {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}),
    ("roberta", ROBERTA,
     {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "mask": "<mask>", "unk": "<unk>"}),
    ("bert", BERT, {"bos": "[CLS]", "eos": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "cls": "[CLS]",
                    "sep": "[SEP]", "unk": "[UNK]"}),  # BERT starts with [CLS] and ends with [SEP]
])
def test_hf_special_ids_are_found_by_their_usual_names(tmp_path, style, specials, expected):
    path = wordpiece_bert(tmp_path) if style == "bert" else byte_level_bpe(tmp_path, specials)
    tokenizer = load_tokenizer(f"hf:{path}")
    found = {role: getattr(tokenizer, f"{role}_id") for role in ROLES}
    assert {role: tokenizer.token_text(i) for role, i in found.items() if i is not None} == expected
    assert tokenizer.special_ids == tuple(sorted(tokenizer.model.token_to_id(t) for t in specials))


def test_hf_configs_beside_the_file_win_and_the_special_map_over_the_config(tmp_path):
    path = byte_level_bpe(tmp_path, ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"))
    write_config(tmp_path, "tokenizer_config.json", bos_token="<|endoftext|>", pad_token=None,
                 eos_token={"content": "<|im_end|>", "special": True})
    write_config(tmp_path, "special_tokens_map.json", bos_token="<|im_start|>",
                 pad_token="<|endoftext|>")
    for spec in (f"hf:{tmp_path}", f"hf:{path}"):
        tokenizer = load_tokenizer(spec)
        named = {role: tokenizer.token_text(getattr(tokenizer, f"{role}_id"))
                 for role in ("bos", "eos", "pad")}
        assert named == {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"}


@pytest.mark.parametrize("text", ["def f(x): return x", "[CLS] [MASK] x [SEP] [PAD]"])
def test_hf_encode_adds_no_specials_and_text_never_becomes_one(hf_bert, text):
    tokenizer = load_tokenizer(f"hf:{hf_bert}")
    with_post_processor = tokenizer.model.encode(text).ids  # the tokenizer's own [CLS] ... [SEP]
    assert with_post_processor[0] == tokenizer.cls_id and with_post_processor[-1] == tokenizer.sep_id
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and len(ids) > 0
    marks = [tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.pad_id]  # not [UNK]:
    assert not np.isin(ids, marks).any()  # characters outside the WordPiece vocabulary become it


@pytest.mark.parametrize("word", ["classes", "return", "numpy", "value"])
def test_hf_wordpiece_byte_lengths_count_continuations_without_their_prefix(hf_bert, word):
    tokenizer = load_tokenizer(f"hf:{hf_bert}")
    ids = tokenizer.encode(word)
    assert tokenizer.byte_lengths()[ids].sum() == len(word)
    starts = tokenizer.word_starts()[ids]
    assert starts[0] and not starts[1:].any()  # one word: its continuations are "##" pieces


def test_a_copy_of_the_tokenizer_files_loads_the_same_tokenizer(tmp_path):
    source = tmp_path / "source"
    byte_level_bpe(source, ("<|endoftext|>", "<|im_end|>"))
    write_config(source, "tokenizer_config.json", eos_token="<|im_end|>")
    spec = f"hf:{source}"
    files = tokenizer_files(spec)
    assert files == [source / "tokenizer.json", source / "tokenizer_config.json"]
    run = tmp_path / "run"
    run.mkdir()
    for path in files:
        shutil.copyfile(path, run / path.name)
    copy = load_tokenizer(spec_for_copy(spec, run / tokenizer_file(spec).name))
    original = load_tokenizer(spec)
    assert copy.path == run / "tokenizer.json"
    assert [getattr(copy, f"{r}_id") for r in ROLES] == [getattr(original, f"{r}_id") for r in ROLES]


@pytest.mark.parametrize("spec, file, copy_spec", [
    ("bytes", None, "bytes"),
    ("sentencepiece:~/t.model", Path.home() / "t.model", "sentencepiece:/run/t"),
    ("hf:/models/gpt2/tokenizer.json", Path("/models/gpt2/tokenizer.json"), "hf:/run/t"),
])
def test_tokenizer_file_and_spec_for_copy(spec, file, copy_spec):
    assert tokenizer_file(spec) == file
    assert spec_for_copy(spec, Path("/run/t")) == copy_spec


def test_tokenizer_file_of_an_hf_directory_is_its_tokenizer_json(hf_gpt2):
    assert tokenizer_file(f"hf:{hf_gpt2.parent}") == hf_gpt2


def _junk_file(tmp_path):
    (tmp_path / "junk.json").write_text("not json at all")
    return tmp_path / "junk.json", "is not a Hugging Face tokenizer.json"


def _binary_file(tmp_path):
    (tmp_path / "t.model").write_bytes(bytes(range(256)))
    return tmp_path / "t.model", "is not a Hugging Face tokenizer.json"


def _empty_dir(tmp_path):
    return tmp_path, "has no tokenizer.json; point data.tokenizer=hf:PATH"


def _bad_config(tmp_path):
    byte_level_bpe(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    return tmp_path, "tokenizer_config.json cannot be read as JSON"


def _config_names_a_missing_token(tmp_path):
    byte_level_bpe(tmp_path)
    write_config(tmp_path, "special_tokens_map.json", eos_token="</s>")
    return tmp_path, "names eos_token '</s>', which"


def _no_document_markers(tmp_path):
    return byte_level_bpe(tmp_path, ("<unk>",)), r"has no bos/eos/\[CLS\]/\[SEP\] token"


@pytest.mark.parametrize("case", [_junk_file, _binary_file, _empty_dir, _bad_config,
                                  _config_names_a_missing_token, _no_document_markers])
def test_bad_hf_tokenizers_are_one_line_user_errors_naming_the_path(tmp_path, case):
    path, message = case(tmp_path)
    with pytest.raises(UserError, match=message) as err:
        load_tokenizer(f"hf:{path}")
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("spec, message", [
    ("hf:/no/such/tokenizer.json", "tokenizer /no/such/tokenizer.json does not exist"),
    ("hf:", "unknown data.tokenizer 'hf:'"),
])
def test_missing_hf_paths(spec, message):
    with pytest.raises(UserError, match=message):
        load_tokenizer(spec)
