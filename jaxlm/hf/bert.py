"""BERT (`BertForMaskedLM`): learned positions and token types, post-LayerNorm (eps 1e-12) after the
embeddings and every residual, GELU MLP with biases, the MLM transform and a tied decoder."""

from __future__ import annotations

from typing import Any

from jaxlm.config import ModelConfig
from jaxlm.hf.convert import (LINEAR, SAME, Family, Rule, head_bias, heads_in, heads_out,
                              hf_required, hf_value, rule)

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def config_from_hf(hf: dict[str, Any], objective: str) -> dict[str, Any]:
    vocab, d, layers, heads, d_ff = hf_required(
        hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size")
    hf_value(hf, "position_embedding_type", ("absolute",), "absolute")
    hf_value(hf, "is_decoder", (False,), False)
    hf_value(hf, "add_cross_attention", (False,), False)
    hf_value(hf, "tie_word_embeddings", (True,), True)
    act = hf_value(hf, "hidden_act", tuple(ACTIVATIONS), "gelu")
    return dict(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, d_ff=d_ff,
                max_seq_len=hf.get("max_position_embeddings", 512), mlp=ACTIVATIONS[act],
                tie_embeddings=True, norm_eps=hf.get("layer_norm_eps", 1e-12),
                position_embedding="learned", norm="layernorm", norm_position="post",
                final_norm=False, embed_norm=True, bias=True,
                type_vocab_size=hf.get("type_vocab_size", 2))


def config_to_hf(m: ModelConfig, objective: str) -> dict[str, Any]:
    return {"architectures": ["BertForMaskedLM"], "model_type": "bert",
            "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads, "intermediate_size": m.d_ff,
            "hidden_act": "gelu_new" if m.mlp == "gelu_tanh" else "gelu",
            "max_position_embeddings": m.max_seq_len, "type_vocab_size": m.type_vocab_size,
            "layer_norm_eps": m.norm_eps, "position_embedding_type": "absolute",
            "tie_word_embeddings": True}


def requirements(m: ModelConfig) -> dict[str, tuple]:
    return {"position_embedding": ("learned",), "norm": ("layernorm",), "norm_position": ("post",),
            "final_norm": (False,), "embed_norm": (True,), "bias": (True,),
            "mlp": ("gelu", "gelu_tanh"), "n_kv_heads": (None, m.n_heads),
            "head_dim": (None, m.d_model // m.n_heads), "tie_embeddings": (True,),
            "type_vocab_size": (m.type_vocab_size,) if m.type_vocab_size else (1, 2)}


def table(m: ModelConfig, objective: str) -> list[Rule]:
    h, k = m.n_heads, m.d_model // m.n_heads
    emb, layer = "bert.embeddings.", "bert.encoder.layer.{i}."
    rules = [
        rule("embed.embedding", emb + "word_embeddings.weight", SAME),
        rule("pos_embed.embedding", emb + "position_embeddings.weight", SAME),
        rule("type_embed.embedding", emb + "token_type_embeddings.weight", SAME),
        rule("embed_norm.scale", emb + "LayerNorm.weight", SAME),
        rule("embed_norm.bias", emb + "LayerNorm.bias", SAME),
        rule("blocks.attn.o.kernel", layer + "attention.output.dense.weight", heads_out(h, k)),
        rule("blocks.attn.o.bias", layer + "attention.output.dense.bias", SAME),
        rule("blocks.attn_norm.scale", layer + "attention.output.LayerNorm.weight", SAME),
        rule("blocks.attn_norm.bias", layer + "attention.output.LayerNorm.bias", SAME),
        rule("blocks.mlp.up.kernel", layer + "intermediate.dense.weight", LINEAR),
        rule("blocks.mlp.up.bias", layer + "intermediate.dense.bias", SAME),
        rule("blocks.mlp.down.kernel", layer + "output.dense.weight", LINEAR),
        rule("blocks.mlp.down.bias", layer + "output.dense.bias", SAME),
        rule("blocks.mlp_norm.scale", layer + "output.LayerNorm.weight", SAME),
        rule("blocks.mlp_norm.bias", layer + "output.LayerNorm.bias", SAME),
    ]
    for p, name in (("q", "query"), ("k", "key"), ("v", "value")):
        hf = f"{layer}attention.self.{name}"
        rules += [rule(f"blocks.attn.{p}.kernel", f"{hf}.weight", heads_in(h, k)),
                  rule(f"blocks.attn.{p}.bias", f"{hf}.bias", head_bias(h, k))]
    if objective == "mlm":
        head = "cls.predictions."
        rules += [
            rule("mlm_head.dense.kernel", head + "transform.dense.weight", LINEAR),
            rule("mlm_head.dense.bias", head + "transform.dense.bias", SAME),
            rule("mlm_head.norm.scale", head + "transform.LayerNorm.weight", SAME),
            rule("mlm_head.norm.bias", head + "transform.LayerNorm.bias", SAME),
            rule("mlm_head.bias", head + "bias", SAME),
        ]
    return rules


FAMILY = Family(
    model_type="bert", base_prefix="bert.", config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, table=table, requirements=requirements,
    # buffers, the tied decoder's copies, and pretraining heads jaxlm has no use for (NSP, pooler)
    ignored=(r"\.position_ids$", r"\.token_type_ids$", r"^cls\.predictions\.decoder\.",
             r"^bert\.pooler\.", r"^cls\.seq_relationship\."),
    objectives=("mlm",),
)
