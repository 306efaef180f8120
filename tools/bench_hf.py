"""Time and peak host memory of `jaxlm import` and `jaxlm export` on a GPT-2 124M checkpoint.

    python tools/bench_hf.py [--out docs/benchmarks.md] [--work DIR]

A randomly initialised GPT2LMHeadModel (GPT-2 small shapes, fp32, 498 MB of safetensors) is saved
with transformers, then each command runs in a fresh process on one CPU device, as a user runs it.
Peak memory is that process's ru_maxrss; the baseline is its RSS after importing jax and jaxlm,
before any work, so "peak - baseline" is what the conversion itself costs. Results are printed
as JSON lines and written as the "## Hugging Face import / export" section of --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SECTION = "\n## Hugging Face import / export"
CHILD = """
import json, resource, sys, time
from jaxlm import cli
from jaxlm.hf import exporter, importer  # noqa: F401 - counted in the baseline
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "baseline_kb": baseline,
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
SAVE_GPT2 = """
import sys, transformers
transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(sys.argv[1])
"""


def run_child(argv: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"code"')]
    if done.returncode or not lines or json.loads(lines[-1])["code"]:
        sys.exit(f"{' '.join(argv)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1])


def measure(work: Path) -> list[dict]:
    hf, run = work / "gpt2_hf", work / "gpt2_run"
    subprocess.run([sys.executable, "-c", SAVE_GPT2, str(hf)], check=True, capture_output=True)
    checkpoint_mb = (hf / "model.safetensors").stat().st_size / 2**20
    cases = [("import", ["import", "--hf", str(hf), "--out", str(run)], None)]
    for dtype in ("float32", "bfloat16"):
        out = work / f"gpt2_export_{dtype}"
        cases.append((f"export {dtype}", ["export", "--run", str(run), "--out", str(out),
                                          "--dtype", dtype], out))
    rows = []
    for name, argv, _ in cases:
        result = run_child(argv)
        peak, base = result["peak_kb"] / 1024, result["baseline_kb"] / 1024
        rows.append({"command": name, "seconds": round(result["seconds"], 2),
                     "checkpoint_mb": round(checkpoint_mb, 1), "peak_rss_mb": round(peak, 1),
                     "baseline_rss_mb": round(base, 1),
                     "work_over_checkpoint": round((peak - base) / checkpoint_mb, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def section(rows: list[dict]) -> str:
    lines = [SECTION.strip(), "",
             "`python tools/bench_hf.py`: GPT-2 124M (fp32 safetensors), one process per command "
             "on one CPU device of this 2-core host. work = peak RSS - RSS after imports.", "",
             "| command | seconds | checkpoint MB | peak RSS MB | baseline RSS MB | work / checkpoint |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['command']} | {r['seconds']} | {r['checkpoint_mb']} | {r['peak_rss_mb']} | "
              f"{r['baseline_rss_mb']} | {r['work_over_checkpoint']} |" for r in rows]
    return "\n".join(lines) + "\n" + NOTES


NOTES = """
Where the memory goes (phases measured with VmHWM, reset per phase, on the same model): import
places each param on the device as soon as its table row is converted and waits for the copy, so
the host copy is freed at once (params placed: +1.04x the checkpoint); Orbax then encodes at most
the largest param's bytes before writing (`Checkpointer(params_write_bytes=...)`, Orbax's
`save_concurrent_gb`; by default it encodes the whole tree first, +0.5-0.9x of the model). Export
restores straight to numpy and streams each param into the file. What was left was glibc's per-
thread heap arenas under TensorStore's writer threads (import 1.60-1.88x over repeated runs):
`jaxlm import` and `export` now limit glibc to one arena (`mallopt(M_ARENA_MAX, 1)`, in
jaxlm/cli_tools.py): import 1.39-1.40x over five runs (and no slower), export 1.46-1.51x (one
bfloat16 run 1.68x). (`malloc_trim` after each param did not help: the peak is fragmentation across
arenas, not freed heap.) The floor of this design is params + the largest param (GPT-2's 154 MB
embedding: 1.33x). On an accelerator the device copy is not host memory (not measured: no
accelerator on this host).
Timings vary +-50 % with other jobs on the two cores.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        rows = measure(args.work or Path(scratch))
    text = args.out.read_text() if args.out.exists() else ""
    head, _, rest = text.partition(SECTION)
    after = rest[rest.find("\n## "):] if "\n## " in rest else ""
    args.out.write_text(head.rstrip("\n") + "\n" + "\n" + section(rows) + after)


if __name__ == "__main__":
    main()
