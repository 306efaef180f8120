"""Times the jitted train step of a config and prints one JSON line (tokens/s, step time, MFU).

    python tools/bench.py [--config FILE] [--set k=v ...] [--steps N] [--peak-flops F]

Model FLOPs per token (forward + backward = 3x forward, PaLM appendix B convention):
    6 * (N_matmul) + 6 * n_layers * seq_len * d_model
where N_matmul counts every weight used in a matmul (block kernels + the V x D output head) and the
second term is attention's QK^T and AV over the full (unmasked) sequence: 2 matmuls * 2 FLOPs *
L * D per token forward, times 3. MFU = FLOPs/token * tokens/s / peak, with peak the FLOP/s of all
devices in the mesh: --peak-flops per device, or measured here as a timed large matmul.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.cli import DEFAULT_CONFIG
from jaxlm.config import load_config
from jaxlm.state import init_state, make_setup, make_train_step
from jaxlm.tokenizer import load_tokenizer
from jaxlm.train import resolve

def measured_peak_flops(dtype: str, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of a size^3 matmul on one device of the current backend."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def flops_per_token(cfg, matmul_params: int) -> float:
    m = cfg.model
    return 6 * matmul_params + 6 * m.n_layers * cfg.data.seq_len * m.d_model


def matmul_param_count(state) -> int:
    """Weights that take part in a matmul: block kernels plus the V x D output head."""
    blocks = state["params"]["blocks"]
    kernels = sum(
        leaf.size
        for path, leaf in jax.tree_util.tree_leaves_with_path(blocks)
        if "kernel" in jax.tree_util.keystr(path)
    )
    head = state["params"]["lm_head"] if "lm_head" in state["params"] else state["params"]["embed"]
    return kernels + sum(leaf.size for leaf in jax.tree.leaves(head))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=10, help="timed steps after compilation")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s per device")
    parser.add_argument("--matmul-size", type=int, default=2048, help="size of the peak matmul")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    cfg = resolve(cfg, load_tokenizer(cfg.data.tokenizer))
    setup = make_setup(cfg)
    state = init_state(setup)
    step_fn = make_train_step(setup)
    rows, length = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, cfg.model.vocab_size, (rows, length + 1), dtype=np.int32)
    host_batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((rows, length), np.float32),
        "segment_ids": np.ones((rows, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
    }
    batch = jax.device_put(host_batch, setup.batch_sharding)

    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / args.steps

    n_devices = setup.mesh.size
    per_device_peak = args.peak_flops or measured_peak_flops(cfg.model.compute_dtype, args.matmul_size)
    tokens_per_s = rows * length / step_s
    fpt = flops_per_token(cfg, matmul_param_count(state))
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(
        json.dumps(
            {
                "config": str(args.config),
                "backend": jax.default_backend(),
                "device": jax.devices()[0].device_kind,
                "devices": n_devices,
                "host": platform.processor() or platform.machine(),
                "params": params,
                "batch": rows,
                "seq_len": length,
                "compute_dtype": cfg.model.compute_dtype,
                "first_step_s": round(compile_s, 3),
                "step_time_s": round(step_s, 5),
                "tokens_per_s": round(tokens_per_s, 1),
                "model_flops_per_token": fpt,
                "peak_flops_per_device": per_device_peak,
                "peak_source": "given" if args.peak_flops else f"measured {args.matmul_size}^3 matmul",
                "mfu": round(fpt * tokens_per_s / (per_device_peak * n_devices), 4),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
