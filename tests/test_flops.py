import jax
import pytest
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.flops import flops_per_token, matmul_params, peak_flops, table_peak
from jaxlm.model import Transformer

TINY = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, d_ff=64)


def test_flops_per_token_of_a_tiny_model_by_hand():
    per_layer = 4 * 32 * 32 + 3 * 32 * 64  # q, k, v, o + SwiGLU up, gate, down
    assert matmul_params(TINY) == 2 * per_layer + 128 * 32  # + the (tied) output head
    attention = 2 * 2 * 16 * 32  # QK^T and AV, full 16 x 16 scores, per layer
    assert flops_per_token(TINY, seq_len=16) == 6 * (2 * per_layer + 128 * 32) + 3 * 2 * attention
    gelu = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, d_ff=64, mlp="gelu")
    assert matmul_params(TINY) - matmul_params(gelu) == 2 * 32 * 64


def test_encoder_decoder_flops_per_input_token_by_hand():
    per_layer = 4 * 32 * 32 + 3 * 32 * 64
    cross_q_o, cross_k_v = 2 * 32 * 32, 2 * 32 * 32
    encoder = 16 * (6 * 2 * per_layer + 12 * 2 * 16 * 32)  # 16 input tokens, 2 layers
    decoder = 8 * (6 * (2 * (per_layer + cross_q_o) + 128 * 32) + 12 * 2 * (8 + 16) * 32)
    cross_keys = 16 * 6 * 2 * cross_k_v  # every decoder layer's k, v of the 16 encoder outputs
    assert flops_per_token(TINY, 16, target_len=8) == (encoder + decoder + cross_keys) / 16


@pytest.mark.parametrize("mlp, tied, heads", [
    ("swiglu", True, {}), ("gelu", False, {}), ("swiglu", True, {"n_kv_heads": 1, "head_dim": 8}),
])
def test_matmul_params_are_the_models_weights_less_norms(mlp, tied, heads):
    cfg = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, d_ff=64, mlp=mlp,
                      tie_embeddings=tied, **heads)
    model = nnx.eval_shape(lambda: Transformer(cfg, causal=True, rngs=nnx.Rngs(0)))
    weights = {jax.tree_util.keystr(path): leaf.size
               for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}
    norms = sum(size for name, size in weights.items() if "norm" in name)
    embed_lookup = 0 if tied else 128 * 32  # an untied embedding table is a lookup, no matmul
    assert matmul_params(cfg) == sum(weights.values()) - norms - embed_lookup


def test_peak_table_and_measured_fallback():
    assert table_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert table_peak("NVIDIA H100 80GB HBM3", "float32") == 494.5e12
    assert table_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert table_peak("TPU v5 lite", "bfloat16") == 197e12
    assert table_peak("TPU v5", "bfloat16") == 459e12
    assert table_peak("cpu", "float32") is None
    peak, source = peak_flops("float32")  # CPU: measured once per process, not per device
    assert 1e8 < peak < 1e14 and source.startswith("measured")
