#!/usr/bin/env bash
# The one script a GPU device call runs for issue 6's DeepSeek-V3-shaped (MLA) end-to-end bench:
#   1. the -m gpu tests of the static MLA cache (tests/deepseek/test_mla_static_cache.py: capture +
#      replay == eager, bit for bit; generate with graphs == eager)
#   2. `python -m kvcomp.bench.e2e_mla --json $OUT/e2e_mla.json` (extra arguments are passed on,
#      e.g. --steps 32 --time-limit 150 --profile)
# Packages come from tools/gpu_env.sh (PYTHONPATH + entry points, no install). Logs go to $OUT
# (default .out/); the benchmark prints its rows as it goes and its table last.
#   SKIP_TESTS=1 tools/gpu_e2e_mla.sh --steps 32 --time-limit 150
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
OUT="${OUT:-.out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
test_rc=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -m gpu tests/deepseek/test_mla_static_cache.py -p no:cacheprovider \
        --durations=5 2>&1 | tee "$OUT/pytest_mla.log" | tail -30
    test_rc=${PIPESTATUS[0]}
fi
timeout "${BENCH_TIMEOUT:-240}" python3 -m kvcomp.bench.e2e_mla --json "$OUT/e2e_mla.json" "$@" 2>&1 | tee "$OUT/bench_mla.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$test_rc  bench rc=$bench_rc"
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
