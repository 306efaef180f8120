#!/usr/bin/env bash
# One prepared GPU benchmark (under 8 minutes on one H100/H200): the train step of GPT-2 124M and of
# the Llama-3.2-1B shape in bfloat16, with the XLA and cuDNN attention kernels, each in a fresh
# process; tokens/s, MFU (against jaxlm.flops' table peak) and device memory into a markdown table.
#
#   tools/gpu_bench.sh [OUT.md]          # default docs/benchmarks_gpu.md
#   tools/gpu_bench.sh --tiny [OUT.md]   # the same script on CPU at a tiny size: checks it runs
#
# Wheels of packages the machine lacks (grain, tensorflow-datasets, ...) may lie in .whl/: they are
# installed into /tmp/site first. The repository is imported from its root (no install needed).
set -euo pipefail
cd "$(dirname "$0")/.."

tiny=0
if [[ "${1:-}" == "--tiny" ]]; then tiny=1; shift; fi
out="${1:-docs/benchmarks_gpu.md}"
results="$(mktemp)"

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

# config | batch | seq_len | extra overrides
cases=(
  "configs/gpt2_124m.yaml|16|1024|"
  "configs/llama_1b.yaml|8|2048|train.remat=dots_saveable"
)
steps=20
dtype=bfloat16
if (( tiny )); then
  shrink="model.d_model=64 model.n_layers=2 model.n_heads=2 model.n_kv_heads=null model.d_ff=128"
  cases=("configs/gpt2_124m.yaml|2|64|$shrink" "configs/llama_1b.yaml|2|64|$shrink")
  steps=2
  dtype=float32
  export JAX_PLATFORMS=cpu  # libtpu, where installed, would probe for a TPU first
fi

for case in "${cases[@]}"; do
  IFS="|" read -r config batch seq extra <<< "$case"
  for attention in xla cudnn; do
    sets=(--set "model.compute_dtype=$dtype" --set "model.attention=$attention"
          --set "train.batch_size=$batch" --set "data.seq_len=$seq")
    for assignment in $extra; do sets+=(--set "$assignment"); done
    echo "== $config attention=$attention batch=$batch seq_len=$seq $extra" >&2
    if ! timeout 300 python3 tools/bench.py --config "$config" --steps "$steps" "${sets[@]}" \
        | grep '^{' | sed "s|^{|{\"config\": \"$config\", |" >> "$results"; then
      echo "{\"config\": \"$config\", \"attention\": \"$attention\", \"error\": \"failed\"}" >> "$results"
    fi
  done
done

python3 - "$results" "$out" <<'EOF'
import json, sys
from pathlib import Path

rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
mib = lambda b: f"{b / 2**20:,.0f}" if b else "-"
lines = [
    "# GPU benchmarks", "",
    "`tools/gpu_bench.sh`: one train step per process, synthetic batch, 20 timed steps after "
    "compilation; MFU against the device's table peak for the compute dtype (jaxlm.flops).", "",
    "| config | device | attention | dtype | batch x seq | remat | step s | tokens/s | MFU | "
    "peak device MiB | compile s | warnings |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for r in rows:
    if "error" in r:
        lines.append(f"| {r['config']} | - | {r['attention']} | | | | error | | | | | |")
        continue
    lines.append(
        f"| {r['config']} | {r['device']} | {r['attention']} | {r['compute_dtype']} | "
        f"{r['batch']} x {r['seq_len']} | {r['remat']} | {r['step_time_s']} | "
        f"{r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {mib(r.get('peak_device_bytes'))} | "
        f"{r['compile_s']} | {'; '.join(r['warnings'])} |")
Path(sys.argv[2]).write_text("\n".join(lines) + "\n")
print(f"wrote {sys.argv[2]}", file=sys.stderr)
EOF
rm -f "$results"
