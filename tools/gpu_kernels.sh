#!/usr/bin/env bash
# The one script a GPU device call runs for the decode-path kernels (issue 3):
#   1. the -m gpu tests of hash_encode / hamming_topk / sparse_decode_attention / decode_step
#   2. `kvcomp bench decode --json $OUT/decode.json` (extra arguments are passed on, e.g. --quick)
# The packages are put on PYTHONPATH (no install needed: torch and triton come from the machine).
# Logs go to $OUT (default .out/); the benchmark's table is printed last.
#   SKIP_TESTS=1 tools/gpu_kernels.sh --quick      benchmark only, small subset
#   SWEEP=1 tools/gpu_kernels.sh                     also time the kernels' launch knobs
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/packages/kvcomp-core/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-.out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
test_rc=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    python3 -m pytest -q -m gpu tests/core -k "kernel or decode_step" -p no:cacheprovider \
        --durations=5 2>&1 | tee "$OUT/pytest.log" | tail -40
    test_rc=${PIPESTATUS[0]}
fi
python3 -m kvcomp.cli bench decode --json "$OUT/decode.json" "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
if [ "${SWEEP:-0}" = "1" ]; then
    python3 -m kvcomp.cli bench decode --sweep --reps 50 --json "$OUT/sweep.json" 2>&1 \
        | tee "$OUT/sweep.log" | tail -80
fi
tail -n 60 "$OUT/bench.log"
echo "gpu tests rc=$test_rc  bench rc=$bench_rc"
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
