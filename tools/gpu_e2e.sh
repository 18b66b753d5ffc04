#!/usr/bin/env bash
# The one script a GPU device call runs for issue 6 (end-to-end decode speed):
#   1. the -m gpu tests of the CUDA-graph decode path (tests/core/test_graphs_gpu.py)
#   2. `kvcomp bench e2e --json $OUT/e2e.json` (extra arguments are passed on, e.g. --steps 128)
# Packages come from tools/gpu_env.sh (PYTHONPATH + entry points, no install). Logs go to $OUT
# (default .out/); the benchmark prints its rows as it goes and its table last.
#   SKIP_TESTS=1 tools/gpu_e2e.sh --steps 64 --time-limit 200
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
OUT="${OUT:-.out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
test_rc=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu tests/core/test_graphs_gpu.py -p no:cacheprovider \
        --durations=5 2>&1 | tee "$OUT/pytest.log" | tail -40
    test_rc=${PIPESTATUS[0]}
fi
timeout "${BENCH_TIMEOUT:-330}" python3 -m kvcomp.cli bench e2e --json "$OUT/e2e.json" "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$test_rc  bench rc=$bench_rc"
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
