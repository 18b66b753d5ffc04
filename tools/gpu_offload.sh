#!/usr/bin/env bash
# The one GPU device call for the KV offload tier (issue 9):
#   1. the -m gpu tests of tests/core/test_offload.py (kernels, pinned host memory read in
#      place, side stream, no host sync in a decode step)
#   2. `kvcomp bench offload --layers 36 --lengths 131072 --batches 1` (the full Qwen3-8B depth
#      at the target row, $OUT/offload_full.json; FULL_ROW=0 skips it)
#   3. `kvcomp bench offload --json $OUT/offload.json` (8 layers of the real shape at 128K / 256K,
#      B 1 / 2; extra arguments are passed on); rows print as they are measured
# Packages come from tools/gpu_env.sh (PYTHONPATH + entry points, no install). Logs go to $OUT
# (default .out/). On a CPU machine it runs the same steps (GPU tests skipped, a tiny bench):
#   CPU_SMOKE=1 tools/gpu_offload.sh
#   TOTAL_BUDGET=190 (seconds, default none): each stage's timeout is cut to what is left
set -uo pipefail
cd "$(dirname "$0")/.."
left() {  # left DEFAULT: the stage timeout, at most what TOTAL_BUDGET leaves (>= 5 s)
    local t="$1"
    if [ -n "${TOTAL_BUDGET:-}" ]; then
        local rest=$((TOTAL_BUDGET - SECONDS - 3))
        [ "$rest" -lt "$t" ] && t="$rest"
        [ "$t" -lt 5 ] && t=5
    fi
    echo "$t"
}
source tools/gpu_env.sh
OUT="${OUT:-.out}"
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,memory.total --format=csv | tee "$OUT/gpu.txt"
fi
grep -E "MemTotal|MemAvailable" /proc/meminfo | tee -a "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
test_rc=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    timeout "$(left "${TEST_TIMEOUT:-80}")" python3 -m pytest -q -m gpu tests/core/test_offload.py -p no:cacheprovider \
        --durations=5 2>&1 | tee "$OUT/pytest.log" | tail -30
    test_rc=${PIPESTATUS[0]}
fi
extra=()
full=(--layers 36 --lengths 131072 --batches 1)
if [ "${CPU_SMOKE:-0}" = "1" ]; then
    extra=(--device cpu --tiny --layers 4 --lengths 2304 --batches 1,2 --steps 3 --warmup 1)
    full=(--device cpu --tiny --layers 6 --lengths 2304 --batches 1 --steps 3 --warmup 1)
fi
full_rc=0
if [ "${FULL_ROW:-1}" = "1" ]; then
    timeout "$(left "${FULL_TIMEOUT:-60}")" python3 -m kvcomp.cli bench offload --json "$OUT/offload_full.json" "${full[@]}" \
        2>&1 | tee "$OUT/bench_full.log"
    full_rc=${PIPESTATUS[0]}
fi
timeout "$(left "${BENCH_TIMEOUT:-150}")" python3 -m kvcomp.cli bench offload --json "$OUT/offload.json" "${extra[@]}" "$@" \
    2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$test_rc  full-depth bench rc=$full_rc  bench rc=$bench_rc"
[ "$test_rc" = 0 ] && [ "$full_rc" = 0 ] && [ "$bench_rc" = 0 ]
