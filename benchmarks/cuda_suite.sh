#!/usr/bin/env bash
# The CUDA checks in one run, for a GPU machine lent for a few minutes: the CUDA tests, then
# `llmcli bench --device cuda` (eager and --compile, bfloat16 and int8, against transformers) on the
# random Qwen2.5-0.5B and DeepSeek-V3 shapes, then one-row product speeds. Each step has its own time
# limit and the steps after a failure still run; the summary table is printed last.
#
#   OUT=results/ bash benchmarks/cuda_suite.sh      (uses python3 and the packages it finds; no install)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cuda-suite}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}  # seconds for the whole suite: a step that cannot finish in what is left is skipped
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export LLMCLI_HOME=${LLMCLI_HOME:-/tmp/llmcli-cuda-home} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/llmcli-cuda-inductor}
LOG=$OUT/suite.log
BEGAN=$(date +%s)
SUMMARY=()

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2 left
    shift 2
    [[ -n ${ONLY:-} && ! $name =~ $ONLY ]] && return  # ONLY: a regex of the steps to run
    left=$((BUDGET - ($(date +%s) - BEGAN)))
    if ((left < limit / 2)); then
        SUMMARY+=("$name: skipped (${left}s left)")
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    local t0 rc
    t0=$(date +%s)
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    SUMMARY+=("$name: rc=$rc in $(($(date +%s) - t0))s")
    echo "--- $name: rc=$rc in $(($(date +%s) - t0))s" | tee -a "$LOG"
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>&1
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
    nproc
} >>"$LOG" 2>&1

step checkpoints 120 python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
import decode_vs_transformers, deepseek_vs_transformers
print(decode_vs_transformers.checkpoint_dir()); print(deepseek_vs_transformers.checkpoint_dir())"
Q=$LLMCLI_HOME/benchmarks/qwen2.5-0.5b-shape-random
DS=$LLMCLI_HOME/benchmarks/deepseek-v3-shape-random
read -r -a WORKLOAD <<<"${WORKLOAD:--p 128 -n 64 -r 3 -w 1}"
BENCH=(python3 -m llmcli bench --device "$DEVICE" --dtype bfloat16 "${WORKLOAD[@]}")

step q-compiled 150 "${BENCH[@]}" "$Q" --compile --compare transformers --json "$OUT/q_compiled.json"
step ds-compiled 150 "${BENCH[@]}" "$DS" --compile --compare transformers --json "$OUT/ds_compiled.json"
step tests 180 python3 -m pytest -q tests/test_cuda.py -p no:cacheprovider
step q-eager 45 "${BENCH[@]}" "$Q" --json "$OUT/q_eager.json"
step ds-eager 45 "${BENCH[@]}" "$DS" --json "$OUT/ds_eager.json"
step q-int8-compiled 100 "${BENCH[@]}" "$Q" --compile --quantize int8 --json "$OUT/q_int8_compiled.json"
step gemv 60 python3 benchmarks/cuda_gemv.py
step q-compiled-cublas 90 env LLMCLI_CUDA_GEMV=linear "${BENCH[@]}" "$Q" --compile --json "$OUT/q_compiled_cublas.json"
step q-compiled-batch 150 "${BENCH[@]}" "$Q" -b 4,8 --compile --json "$OUT/q_compiled_batch.json"

echo "=== summary" | tee -a "$LOG"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"
python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    report = json.loads(path.read_text())
    env = report["env"]
    print(f"{path.stem}: {env['device_name']}, compile={env.get('compile')}, {env.get('quantize') or report['dtype']}, "
          f"bandwidth {env['memory_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s")
    for row in report["results"]:
        ratio = row.get("ratio_vs_transformers") or {}
        print(f"  {row['backend']:<13} b{row['batch']}  prefill {row['prefill_tokens_per_s']['mean']:8.0f} tok/s"
              f"  decode {row['decode_tokens_per_s']['mean']:8.1f} tok/s (sd {row['decode_tokens_per_s']['std']:.1f})"
              f"  bw {100 * (row.get('bandwidth_fraction') or 0):4.1f}%  peak {row['peak_memory_bytes'] / 2**30:.2f} GiB"
              + (f"  x{ratio['prefill']:.2f} prefill, x{ratio['decode']:.2f} decode" if ratio else ""))
EOF
grep -E "^(NVIDIA|[a-z_]+ +[0-9]+ x)|passed|failed|error" "$LOG" | tail -n 40
