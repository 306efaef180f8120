"""LLaMA (`LlamaForCausalLM`, Llama 2/3): RoPE (half-split layout, as jaxlm's: no q/k permutation),
RMSNorm, SwiGLU, grouped-query attention, optional Llama 3 RoPE rescaling."""

from __future__ import annotations

from typing import Any

from jaxlm.config import ModelConfig, head_dim, kv_heads
from jaxlm.hf.convert import (LINEAR, SAME, Family, Rule, head_bias, heads_in, heads_out,
                              hf_required, hf_value, rule)
from jaxlm.errors import UserError


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from transformers 5's `rope_parameters`, or older rope_theta/rope_scaling."""
    if hf.get("rope_parameters"):
        rope, key = dict(hf["rope_parameters"]), "rope_parameters"
    else:
        rope = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1e4)}
        key = "rope_scaling"
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise UserError(f"HF config key '{key}' has rope_type {kind!r}; jaxlm supports "
                        "default and llama3")
    out = {"rope_theta": float(rope["rope_theta"])}
    if kind == "llama3":
        out |= dict(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                    rope_low_freq_factor=float(rope["low_freq_factor"]),
                    rope_high_freq_factor=float(rope["high_freq_factor"]),
                    rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    return out


def config_from_hf(hf: dict[str, Any], objective: str) -> dict[str, Any]:
    vocab, d, layers, heads, d_ff = hf_required(
        hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size")
    hf_value(hf, "hidden_act", ("silu",), "silu")
    bias = hf_value(hf, "attention_bias", (False, True), False)
    hf_value(hf, "mlp_bias", (bias,), False)  # jaxlm has one switch for both
    kv, k = hf.get("num_key_value_heads"), hf.get("head_dim")
    return dict(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, d_ff=d_ff,
                n_kv_heads=None if kv in (None, heads) else kv,  # null: jaxlm's own defaults
                head_dim=None if k is None or k * heads == d else k,
                max_seq_len=hf.get("max_position_embeddings", 2048), mlp="swiglu",
                tie_embeddings=hf.get("tie_word_embeddings", False),
                norm_eps=hf.get("rms_norm_eps", 1e-6), bias=bias, **_rope(hf))


def config_to_hf(m: ModelConfig, objective: str) -> dict[str, Any]:
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "llama3":
        rope |= {"rope_type": "llama3", "factor": m.rope_scaling_factor,
                 "low_freq_factor": m.rope_low_freq_factor,
                 "high_freq_factor": m.rope_high_freq_factor,
                 "original_max_position_embeddings": m.rope_original_max_seq_len}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
            "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
            "num_key_value_heads": kv_heads(m), "head_dim": head_dim(m),
            "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
            "hidden_act": "silu", "attention_bias": m.bias, "mlp_bias": m.bias,
            "tie_word_embeddings": m.tie_embeddings, "rope_parameters": rope}


def requirements(m: ModelConfig) -> dict[str, tuple]:
    return {"position_embedding": ("rope",), "norm": ("rmsnorm",), "norm_position": ("pre",),
            "final_norm": (True,), "embed_norm": (False,), "mlp": ("swiglu",),
            "type_vocab_size": (0,)}


def table(m: ModelConfig, objective: str) -> list[Rule]:
    h, g, k = m.n_heads, kv_heads(m), head_dim(m)
    layer = "model.layers.{i}."
    rules = [
        rule("embed.embedding", "model.embed_tokens.weight", SAME),
        rule("blocks.attn_norm.scale", layer + "input_layernorm.weight", SAME),
        rule("blocks.attn.q.kernel", layer + "self_attn.q_proj.weight", heads_in(h, k)),
        rule("blocks.attn.k.kernel", layer + "self_attn.k_proj.weight", heads_in(g, k)),
        rule("blocks.attn.v.kernel", layer + "self_attn.v_proj.weight", heads_in(g, k)),
        rule("blocks.attn.o.kernel", layer + "self_attn.o_proj.weight", heads_out(h, k)),
        rule("blocks.mlp_norm.scale", layer + "post_attention_layernorm.weight", SAME),
        rule("blocks.mlp.gate.kernel", layer + "mlp.gate_proj.weight", LINEAR),
        rule("blocks.mlp.up.kernel", layer + "mlp.up_proj.weight", LINEAR),
        rule("blocks.mlp.down.kernel", layer + "mlp.down_proj.weight", LINEAR),
        rule("final_norm.scale", "model.norm.weight", SAME),
    ]
    if m.bias:
        rules += [
            rule("blocks.attn.q.bias", layer + "self_attn.q_proj.bias", head_bias(h, k)),
            rule("blocks.attn.k.bias", layer + "self_attn.k_proj.bias", head_bias(g, k)),
            rule("blocks.attn.v.bias", layer + "self_attn.v_proj.bias", head_bias(g, k)),
            rule("blocks.attn.o.bias", layer + "self_attn.o_proj.bias", SAME),
        ] + [rule(f"blocks.mlp.{p}.bias", layer + f"mlp.{p}_proj.bias", SAME)
             for p in ("gate", "up", "down")]
    if not m.tie_embeddings:
        rules.append(rule("lm_head.kernel", "lm_head.weight", LINEAR))
    return rules


FAMILY = Family(
    model_type="llama", base_prefix="model.", config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, table=table, requirements=requirements,
    ignored=(r"\.rotary_emb\.inv_freq$", r"^lm_head\.weight$"),  # a buffer; a tied head's copy
)
