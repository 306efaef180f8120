"""Tiny random Hugging Face models of each family, built with transformers + CPU torch (no downloads),
with every weight perturbed so biases and norm parameters are not at their trivial init."""

from pathlib import Path

import numpy as np

VOCAB = 280  # above the byte tokenizer's 263 ids, so run directories can use it
FAMILIES = ("gpt2", "llama", "bert")
OBJECTIVES = {"gpt2": "clm", "llama": "clm", "bert": "mlm"}


def build(family: str, seed: int = 0, **overrides):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, attn_implementation="eager")
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(
            n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2,
            **common, **overrides))
    elif family == "llama":  # GQA, head_dim * heads != d_model, untied head, rope_theta != 1e4
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rope_theta=5000.0,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, **common, **overrides))
    else:
        model = tf.BertForMaskedLM(tf.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, **common, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def hf_logits(model, ids_BxL: np.ndarray, mask_BxL: np.ndarray | None = None) -> np.ndarray:
    import torch

    mask = None if mask_BxL is None else torch.as_tensor(mask_BxL)
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids_BxL), attention_mask=mask).logits.float().numpy()
