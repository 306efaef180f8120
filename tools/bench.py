"""Times the jitted train step of a config: one JSON line (tokens/s, step time, MFU, compile time).

    python tools/bench.py [--config FILE] [--set k=v ...] [--steps N] [--peak-flops F]
    python tools/bench.py --compile-only --set model.n_layers=32     # compile time alone
    python tools/bench.py --matrix [--sizes tiny 25m] [--seq-lens 256] [--dtypes float32]
                          [--remats none full] [--attentions xla] [--out docs/benchmarks.md]

MFU = model FLOPs per token (jaxlm.flops: 6 N_matmul + full L x L attention) * tokens/s / peak,
the peak being --peak-flops per device, the accelerator table of jaxlm.flops, or on CPU a
size^3 matmul of the compute dtype measured in the same process.

--matrix runs every combination of model size x seq_len x compute dtype x remat x attention in a
fresh subprocess each (a failing cell records its error and the matrix goes on), then compile-only
cells for --compile-layers, and writes a markdown table with the machine described. On CPU each
cell gets --host-devices devices (data parallelism over the cores: ~15 % faster on 2 cores than
one device). With JAXLM_MALLOC=keep the cells keep the C heap's freed blocks as `jaxlm train`
then does (jaxlm.host_memory).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np

from jaxlm.cli import DEFAULT_CONFIG
from jaxlm.config import load_config, target_length
from jaxlm.flops import flops_per_token, matmul_params, measured_matmul_flops, table_peak
from jaxlm.host_memory import SWITCH, keep_freed_memory
from jaxlm.state import Setup, init_state, make_setup, make_train_step
from jaxlm.tokenizer import load_tokenizer
from jaxlm.run import resolve

# Model shapes by name (byte vocabulary): --set overrides for each.
SIZES = {
    "tiny": {"model.d_model": 128, "model.n_layers": 4, "model.n_heads": 4, "model.d_ff": 512},
    "25m": {"model.d_model": 512, "model.n_layers": 8, "model.n_heads": 8, "model.d_ff": 1408},
    "124m": {"model.d_model": 768, "model.n_layers": 12, "model.n_heads": 12, "model.d_ff": 2048},
}
REPO = Path(__file__).resolve().parent.parent
NOTES = "\n## Notes"


def synthetic_batch(rows: int, length: int, vocab: int,
                    target_len: int = 0) -> dict[str, np.ndarray]:
    """Random full rows (`target_len` > 0: an encoder-decoder's, decoder rows that long)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, vocab, (rows, length + 1), dtype=np.int32)
    positions = lambda n: np.broadcast_to(np.arange(n, dtype=np.int32), (rows, n)).copy()
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((rows, length), np.float32),
        "segment_ids": np.ones((rows, length), np.int32),
        "positions": positions(length),
    }
    if target_len:
        decoder = rng.integers(4, vocab, (rows, target_len + 1), dtype=np.int32)
        batch.update(decoder_inputs=decoder[:, :-1], targets=decoder[:, 1:],
                     weights=np.ones((rows, target_len), np.float32),
                     decoder_segment_ids=np.ones((rows, target_len), np.int32),
                     decoder_positions=positions(target_len))
    return batch


def prepare(config: Path, overrides: list[str]) -> tuple[Setup, dict, dict]:
    """A config's setup, initialised state and a synthetic batch on the devices."""
    cfg = load_config(config, overrides)
    cfg = resolve(cfg, load_tokenizer(cfg.data.tokenizer))
    setup = make_setup(cfg)
    # Wait for the (async) init: still running, it would slow and inflate the compile timing.
    state = jax.block_until_ready(init_state(setup))
    host_batch = synthetic_batch(cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size,
                                 target_length(cfg))
    return setup, state, jax.device_put(host_batch, setup.batch_sharding)


def bench(args: argparse.Namespace) -> dict:
    """Compiles the step (timed apart), runs --steps of it and reports one JSON-ready dict."""
    setup, state, batch = prepare(args.config, args.overrides)
    cfg = setup.cfg
    rows, length = cfg.train.batch_size, cfg.data.seq_len
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        lowered = make_train_step(setup).lower(state, batch)
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start - lower_s
    result = {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "devices": setup.mesh.size,
        "params": sum(x.size for x in jax.tree.leaves(state["params"])),
        "matmul_params": matmul_params(cfg.model),
        "batch": rows,
        "seq_len": length,
        "compute_dtype": cfg.model.compute_dtype,
        "remat": cfg.train.remat,
        "attention": cfg.model.attention,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "n_layers": cfg.model.n_layers,
        "lower_s": round(lower_s, 3),
        "compile_s": round(compile_s, 3),
        "warnings": sorted({str(w.message).splitlines()[0] for w in caught}),
    }
    memory = compiled.memory_analysis()
    if memory is not None:
        result["compiled_temp_bytes"] = memory.temp_size_in_bytes
    result["hlo_lines"] = len(compiled.as_text().splitlines())
    if args.compile_only:
        return result

    per_device = args.peak_flops or table_peak(result["device"], cfg.model.compute_dtype)
    measure_peak = functools.partial(measured_matmul_flops.__wrapped__, cfg.model.compute_dtype,
                                     args.matmul_size)
    # CPU (no table entry): the best of a matmul timed before and after the steps, since other
    # processes on the host may slow either; the host's cores are shared by its devices.
    peaks = [] if per_device else [measure_peak()]

    # On CPU each step is waited for: per-step times (other load shows up as slow steps), and
    # XLA:CPU can deadlock with several multi-device steps in flight.
    wait_each = jax.default_backend() == "cpu"
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
        if wait_each:
            jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / args.steps
    best_s = float(np.diff([0.0, *times]).min()) if wait_each else step_s

    if per_device:
        peak, source = per_device * setup.mesh.size, "given" if args.peak_flops else "table"
    else:
        peak = max(peaks + [measure_peak()])
        source = f"measured {cfg.model.compute_dtype} {args.matmul_size}^3 matmul"
    tokens = rows * length
    fpt = flops_per_token(cfg.model, length, target_length(cfg))
    stats = jax.devices()[0].memory_stats() or {}
    result.update(
        step_time_s=round(step_s, 5),
        best_step_s=round(best_s, 5),
        tokens_per_s=round(tokens / step_s, 1),
        model_flops_per_token=fpt,
        peak_flops=peak,
        peak_source=source,
        mfu=round(fpt * tokens / step_s / peak, 4),
        mfu_best_step=round(fpt * tokens / best_s / peak, 4),
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    if "peak_bytes_in_use" in stats:
        result["peak_device_bytes"] = stats["peak_bytes_in_use"]
    return result


# ---------------------------------------------------------------- matrix


def cell_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.host_devices:
        flag = f"--xla_force_host_platform_device_count={args.host_devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    return env


def run_cell(args: argparse.Namespace, overrides: list[str], compile_only: bool) -> dict:
    """One benchmark in a fresh process; a failure becomes an 'error' field."""
    command = [sys.executable, __file__, "--config", str(args.config), "--steps", str(args.steps),
               "--matmul-size", str(args.matmul_size)]
    if args.peak_flops:
        command += ["--peak-flops", str(args.peak_flops)]
    command += ["--compile-only"] * compile_only
    for assignment in [*args.overrides, *overrides]:
        command += ["--set", assignment]
    cell = {"overrides": overrides}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=cell_env(args),
                              cwd=REPO, timeout=args.cell_timeout)
    except subprocess.TimeoutExpired:
        return {**cell, "error": f"timed out after {args.cell_timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**cell, "error": f"exit {done.returncode}: {tail[:200]}"}
    return {**cell, **json.loads(lines[-1])}


def matrix(args: argparse.Namespace) -> None:
    cells = []
    for size, seq_len, dtype, remat, attention in itertools.product(
        args.sizes, args.seq_lens, args.dtypes, args.remats, args.attentions
    ):
        overrides = [f"{k}={v}" for k, v in SIZES[size].items()] + [
            f"data.seq_len={seq_len}", f"model.max_seq_len={max(seq_len, 1024)}",
            f"model.compute_dtype={dtype}", f"train.remat={remat}", f"model.attention={attention}",
        ]
        cell = {"size": size, **run_cell(args, overrides, compile_only=False)}
        print(json.dumps(cell), flush=True)
        cells.append(cell)
    compiles = []
    for size, layers in itertools.product(args.compile_sizes, args.compile_layers):
        overrides = [f"{k}={v}" for k, v in SIZES[size].items()]
        overrides.append(f"data.seq_len={args.seq_lens[0]}")
        cell = {"size": size,
                **run_cell(args, [*overrides, f"model.n_layers={layers}"], compile_only=True)}
        print(json.dumps(cell), flush=True)
        compiles.append(cell)
    pipeline = data_cells(args, max((c.get("tokens_per_s", 0) for c in cells), default=0))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # A hand-written "## Notes" section at the end of the file survives a rerun.
        old = args.out.read_text() if args.out.exists() else ""
        notes = old[old.index(NOTES):] if NOTES in old else ""
        args.out.write_text(report(args, cells, compiles, pipeline) + notes)
        print(f"wrote {args.out}", file=sys.stderr)


def data_cells(args: argparse.Namespace, train_tokens_per_s: float) -> list[dict]:
    """tools/bench_data.py for --data-workers, against the fastest step measured above."""
    if not args.data_workers:
        return []
    command = [sys.executable, str(REPO / "tools" / "bench_data.py"), "--config", str(args.config),
               "--workers", *map(str, args.data_workers)]
    if train_tokens_per_s:
        command += ["--train-tokens-per-s", str(train_tokens_per_s)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          timeout=args.cell_timeout)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for line in lines:
        print(json.dumps(line), flush=True)
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"error": f"exit {done.returncode}: {tail[:200]}"}]
    return lines


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mib(value: int | None) -> str:
    return f"{value / 2**20:,.0f}" if value else "-"


def report(
    args: argparse.Namespace, cells: list[dict], compiles: list[dict], pipeline: list[dict]
) -> str:
    """Markdown: the machine, the command, the matrix table and the compile-time cells."""
    ok = next((c for c in cells + compiles if "error" not in c), {})
    command = " ".join(["python tools/bench.py", *sys.argv[1:]])
    lines = [
        "# Train-step benchmarks",
        "",
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores; backend {ok.get('backend', '?')} "
        f"({ok.get('device', '?')} x {ok.get('devices', '?')}); jax {jax.__version__}, "
        f"Python {platform.python_version()}.",
        f"Environment of each cell: JAXLM_MALLOC {os.environ.get(SWITCH) or 'unset'}, "
        f"{args.host_devices or 'default'} host devices. Synthetic full-length rows, batch "
        f"{ok.get('batch', '?')}, {args.steps} timed steps after a warm-up step.",
        "",
        f"Command: `{command}`",
        "",
        "MFU counts model FLOPs (jaxlm/flops.py: 6 x matmul params + full L x L attention, no "
        "remat recomputation) against the peak in the `peak` column; `MFU` uses the mean step "
        "time, `MFU best step` the fastest step (other processes on a shared host slow some).",
        "",
        "| size | params | seq | dtype | remat | attention | tokens/s | step s | MFU | MFU best step"
        " | compile s | temp MiB | RSS MiB | peak | notes |",
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in cells:
        knobs = dict(o.split("=", 1) for o in c["overrides"])
        if "error" in c:
            lines.append(f"| {c['size']} | | {knobs['data.seq_len']} | {knobs['model.compute_dtype']}"
                         f" | {knobs['train.remat']} | {knobs['model.attention']} | | | | | | | | |"
                         f" error: {c['error']} |")
            continue
        lines.append(
            f"| {c['size']} | {c['params'] / 1e6:.1f}M | {c['seq_len']} | {c['compute_dtype']} | "
            f"{c['remat']} | {c['attention']} | {c['tokens_per_s']:,.0f} | {c['step_time_s']:.3f} | "
            f"{c['mfu']:.1%} | {c['mfu_best_step']:.1%} | {c['compile_s']:.1f} | "
            f"{_mib(c.get('compiled_temp_bytes'))} | "
            f"{_mib(c.get('max_rss_bytes'))} | {c['peak_flops'] / 1e9:,.0f} GFLOP/s "
            f"({c['peak_source']}) | {'; '.join(c['warnings'])} |"
        )
    if compiles:
        lines += ["", "Compile time of the train step against depth (layers are scanned; ratio: "
                  "trace + compile against the size's first row; HLO lines: the optimised "
                  "program's length):", "",
                  "| size | layers | params | HLO lines | trace s | compile s | ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        firsts: dict[str, float] = {}
        for c in compiles:
            layers = c["overrides"][-1].split("=")[1]
            if "error" in c:
                lines.append(f"| {c['size']} | {layers} | | | | | error: {c['error']} |")
                continue
            total = c["lower_s"] + c["compile_s"]
            ratio = total / firsts.setdefault(c["size"], total)
            lines.append(f"| {c['size']} | {layers} | {c['params'] / 1e6:.1f}M | {c['hlo_lines']} | "
                         f"{c['lower_s']:.2f} | {c['compile_s']:.2f} | {ratio:.2f} |")
    if pipeline:
        lines += ["", f"Input pipeline alone (`tools/bench_data.py`, {args.config.name}, host "
                  "batches): tokens/s and the multiple of the fastest train step above.", "",
                  "| workers | batch x seq | first batch s | tokens/s | x train step |",
                  "|---:|---|---:|---:|---:|"]
        for c in pipeline:
            if "error" in c:
                lines.append(f"| | | | | error: {c['error']} |")
                continue
            lines.append(f"| {c['worker_count']} | {c['batch']} x {c['seq_len']} | "
                         f"{c['first_batch_s']:.2f} | {c['tokens_per_s']:,} | {c['vs_train']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=10, help="timed steps after compilation")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s per device")
    parser.add_argument("--matmul-size", type=int, default=2048, help="size of the peak matmul")
    parser.add_argument("--compile-only", action="store_true", help="lower and compile, no steps")
    parser.add_argument("--matrix", action="store_true", help="run the benchmark matrix")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "25m"], choices=sorted(SIZES))
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--remats", nargs="+", default=["none", "full"])
    parser.add_argument("--attentions", nargs="+", default=["xla"])
    parser.add_argument("--compile-layers", nargs="*", type=int, default=[4, 32],
                        help="n_layers of the compile-only cells")
    parser.add_argument("--compile-sizes", nargs="*", default=["tiny", "25m"],
                        choices=sorted(SIZES))
    parser.add_argument("--data-workers", nargs="*", type=int, default=[0, 2],
                        help="data.worker_count values for tools/bench_data.py (none: skip)")
    parser.add_argument("--host-devices", type=int, default=2,
                        help="CPU devices per cell (0: as is)")
    parser.add_argument("--cell-timeout", type=int, default=600)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if args.matrix:
        matrix(args)
        return
    keep_freed_memory()
    print(json.dumps({"config": str(args.config), **bench(args)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
