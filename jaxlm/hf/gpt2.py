"""GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LayerNorm with biases, tanh-GELU MLP.

Its Conv1D layers store weights as (in, out), and q|k|v are fused in one `c_attn` tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.config import ModelConfig, head_dim
from jaxlm.hf.convert import LINEAR, SAME, Family, Rule, Transform, hf_required, hf_value, rule

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def config_from_hf(hf: dict[str, Any], objective: str) -> dict[str, Any]:
    vocab, d, layers, heads, positions = hf_required(
        hf, "vocab_size", "n_embd", "n_layer", "n_head", "n_positions")
    for key, allowed in (("add_cross_attention", (False,)), ("scale_attn_weights", (True,)),
                         ("scale_attn_by_inverse_layer_idx", (False,))):
        hf_value(hf, key, allowed, allowed[0])
    act = hf_value(hf, "activation_function", tuple(ACTIVATIONS), "gelu_new")
    return dict(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                d_ff=hf.get("n_inner") or 4 * d, max_seq_len=positions, mlp=ACTIVATIONS[act],
                tie_embeddings=hf.get("tie_word_embeddings", True),
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), position_embedding="learned",
                norm="layernorm", bias=True)


def config_to_hf(m: ModelConfig, objective: str) -> dict[str, Any]:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": m.vocab_size, "n_positions": m.max_seq_len, "n_embd": m.d_model,
            "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": m.d_ff,
            "activation_function": "gelu_new" if m.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": m.norm_eps, "tie_word_embeddings": m.tie_embeddings}


def requirements(m: ModelConfig) -> dict[str, tuple]:
    return {"position_embedding": ("learned",), "norm": ("layernorm",), "norm_position": ("pre",),
            "final_norm": (True,), "embed_norm": (False,), "bias": (True,),
            "mlp": ("gelu_tanh", "gelu"), "n_kv_heads": (None, m.n_heads),
            "head_dim": (None, m.d_model // m.n_heads), "type_vocab_size": (0,)}


def _fused_qkv(d: int, heads: int, k: int, bias: bool) -> Transform:
    """c_attn (D, 3D) or its bias (3D,) <-> q, k, v as (D, H, K) or (H, K)."""
    lead = () if bias else (d,)
    return Transform(
        lambda w: tuple(part.reshape(*lead, heads, k) for part in np.split(w, 3, axis=-1)),
        lambda *qkv: (np.concatenate([x.reshape(*lead, heads * k) for x in qkv], axis=-1),),
    )


def table(m: ModelConfig, objective: str) -> list[Rule]:
    d, h, k = m.d_model, m.n_heads, head_dim(m)
    layer = "transformer.h.{i}."
    qkv = lambda name: tuple(f"blocks.attn.{p}.{name}" for p in "qkv")
    out = Transform(lambda w: (w.reshape(h, k, d),), lambda o: (o.reshape(h * k, d),))
    rules = [
        rule("embed.embedding", "transformer.wte.weight", SAME),
        rule("pos_embed.embedding", "transformer.wpe.weight", SAME),
        rule("blocks.attn_norm.scale", layer + "ln_1.weight", SAME),
        rule("blocks.attn_norm.bias", layer + "ln_1.bias", SAME),
        rule(qkv("kernel"), layer + "attn.c_attn.weight", _fused_qkv(d, h, k, bias=False)),
        rule(qkv("bias"), layer + "attn.c_attn.bias", _fused_qkv(d, h, k, bias=True)),
        rule("blocks.attn.o.kernel", layer + "attn.c_proj.weight", out),
        rule("blocks.attn.o.bias", layer + "attn.c_proj.bias", SAME),
        rule("blocks.mlp_norm.scale", layer + "ln_2.weight", SAME),
        rule("blocks.mlp_norm.bias", layer + "ln_2.bias", SAME),
        rule("blocks.mlp.up.kernel", layer + "mlp.c_fc.weight", SAME),
        rule("blocks.mlp.up.bias", layer + "mlp.c_fc.bias", SAME),
        rule("blocks.mlp.down.kernel", layer + "mlp.c_proj.weight", SAME),
        rule("blocks.mlp.down.bias", layer + "mlp.c_proj.bias", SAME),
        rule("final_norm.scale", "transformer.ln_f.weight", SAME),
        rule("final_norm.bias", "transformer.ln_f.bias", SAME),
    ]
    if not m.tie_embeddings:
        rules.append(rule("lm_head.kernel", "lm_head.weight", LINEAR))
    return rules


FAMILY = Family(
    model_type="gpt2", base_prefix="transformer.", config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, table=table, requirements=requirements,
    # causal-mask buffers of older checkpoints; the tied head's copy of the embedding
    ignored=(r"\.attn\.(masked_)?bias$", r"^lm_head\.weight$"),
)
