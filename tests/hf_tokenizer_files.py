"""Tiny Hugging Face `tokenizer.json` files built offline with the `tokenizers` library, in the
styles jaxlm must read: byte-level BPE (GPT-2, LLaMA-3, RoBERTa names) and WordPiece (BERT)."""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

TEXTS = [
    "def f(x):\n    return x + 1\n", "class Model:\n    pass\n",
    "héllo wörld, 日本語のテキスト 🙂",
    "import numpy as np\nfrom jax import jit\n", "while True: yield self.value",
] * 20
GPT2 = ("<|endoftext|>",)
LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>")
SENTENCEPIECE_STYLE = ("<unk>", "<s>", "</s>", "<pad>")
ROBERTA = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BERT = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def byte_level_bpe(directory: Path, specials: tuple[str, ...] = GPT2, vocab_size: int = 320) -> Path:
    """A GPT-2-style tokenizer.json; the specials come after the learned pieces (GPT-2's
    <|endoftext|> is its last id), so none of them is id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS, trainer)
    tokenizer.add_special_tokens(list(specials))
    return _save(tokenizer, directory)


def wordpiece_bert(directory: Path) -> Path:
    """A BERT-style tokenizer.json whose post-processor adds [CLS] ... [SEP] (jaxlm must not)."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=list(BERT), show_progress=False)
    tokenizer.train_from_iterator(TEXTS, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return _save(tokenizer, directory)


def write_config(directory: Path, name: str, **tokens) -> None:
    """A tokenizer_config.json / special_tokens_map.json beside a tokenizer.json."""
    (directory / name).write_text(json.dumps(tokens))


def _save(tokenizer: Tokenizer, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return path
