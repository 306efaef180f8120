"""Model FLOPs per token and the peak FLOP/s of the devices: MFU = FLOPs/token * tokens/s / peak.

Training FLOPs per token (forward + backward = 3x forward, PaLM appendix B):

    6 * N_matmul + 12 * n_layers * seq_len * n_heads * head_dim

N_matmul counts the weights each token meets in a matmul: per layer 2 D H K (q, o) plus 2 D G K
(k, v; G kv heads), 3 D F (SwiGLU) or 2 D F (GELU), and the V x D output head (tied or not; the
embedding lookup is no matmul). The second term is attention: QK^T and AV cost 2 * L * H K FLOPs
each per token forward (H K = D unless head_dim is set).
The full L x L score matrix is counted, the causally masked half included, because the XLA
attention computes it (the PaLM convention; a kernel that skips masked blocks does half). Norms,
RoPE, softmax and the loss are not counted, nor is recomputation under `train.remat` (model FLOPs,
not hardware FLOPs).

An encoder-decoder's step of L input and T target tokens per row counts the encoder's layers on
L tokens, the decoder's (self-attention, cross-attention q/o, MLP) and the head on T, the
cross-attention k/v on L, and attention over L (encoder, cross) and T (decoder) keys; per token
is per input token, the tokens/s jaxlm reports.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig, decoder_layers, encoder_layers, head_dim, kv_heads

# Dense peak FLOP/s per device, matched by substring of `jax.devices()[0].device_kind` (first
# match wins): (device kind, bf16/fp16, fp32 at jax's default matmul precision). On NVIDIA GPUs
# the default precision runs fp32 matmuls as TF32 on the tensor cores (half the bf16 rate); on
# TPUs it runs them as one bf16 pass (the bf16 rate).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.5e12),  # SXM
    ("H200", 989e12, 494.5e12),
    ("A100", 312e12, 156e12),
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),  # v5e
    ("TPU v5e", 197e12, 197e12),
    ("TPU v5", 459e12, 459e12),  # v5p
    ("TPU v6", 918e12, 918e12),  # v6e ("TPU v6 lite")
)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights used in a matmul per token: block kernels and the output head."""
    q_and_o, k_and_v, mlp = _layer_weights(cfg)
    return cfg.n_layers * (q_and_o + k_and_v + mlp) + cfg.vocab_size * cfg.d_model


def _layer_weights(cfg: ModelConfig) -> tuple[int, int, int]:
    """A block's matmul weights: (q and o, k and v, MLP)."""
    d, f = cfg.d_model, cfg.d_ff
    q_and_o, k_and_v = 2 * d * cfg.n_heads * head_dim(cfg), 2 * d * kv_heads(cfg) * head_dim(cfg)
    return q_and_o, k_and_v, (3 if cfg.mlp == "swiglu" else 2) * d * f


def flops_per_token(cfg: ModelConfig, seq_len: int, target_len: int = 0) -> float:
    """Training (forward + backward) model FLOPs per token; see the module docstring.
    `target_len` > 0: an encoder-decoder's, with decoder rows of that length."""
    attention_width = cfg.n_heads * head_dim(cfg)
    if not target_len:
        return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * seq_len * attention_width
    n_enc, n_dec = encoder_layers(cfg), decoder_layers(cfg)
    q_and_o, k_and_v, mlp = _layer_weights(cfg)
    encoder = seq_len * (6.0 * n_enc * (q_and_o + k_and_v + mlp)
                         + 12.0 * n_enc * seq_len * attention_width)
    decoder_weights = n_dec * (2 * q_and_o + k_and_v + mlp) + cfg.vocab_size * cfg.d_model
    decoder = target_len * (6.0 * decoder_weights
                            + 12.0 * n_dec * (target_len + seq_len) * attention_width)
    cross_keys = seq_len * 6.0 * n_dec * k_and_v
    return (encoder + decoder + cross_keys) / seq_len


def table_peak(device_kind: str, dtype: str) -> float | None:
    """Per-device peak of a known accelerator for `dtype` compute, or None."""
    for kind, half, single in PEAK_FLOPS:
        if kind.lower() in device_kind.lower():
            return single if dtype == "float32" else half
    return None


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(dtype: str, size: int = 1024, repeats: int = 10) -> float:
    """Best FLOP/s of a size^3 matmul on the first device (cached: measured once per process).

    On CPU one device's matmul already uses every core, so this is the host's peak."""
    a_NxN = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a_NxN, a_NxN).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a_NxN, a_NxN).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops(dtype: str, devices: int | None = None) -> tuple[float, str]:
    """Peak FLOP/s of `devices` accelerators (default: all) for `dtype` compute, and where the
    number comes from.

    Known accelerators: the table times the device count. Anything else (CPU): a measured matmul
    per process, since a host's simulated devices share its cores.
    """
    kind = jax.devices()[0].device_kind
    per_device = table_peak(kind, dtype)
    if per_device is not None:
        return per_device * (devices or jax.device_count()), f"{kind} table, {dtype}"
    measured = measured_matmul_flops(dtype)
    return measured * jax.process_count(), f"measured {dtype} 1024^3 matmul on {kind}"


def mfu(flops_per_tok: float, tokens_per_s: float, peak: float) -> float:
    return flops_per_tok * tokens_per_s / peak
