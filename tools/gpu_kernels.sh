#!/usr/bin/env bash
# The one script a GPU device call runs for the decode-path kernels (issue 3):
#   1. the -m gpu tests of hamming_topk / sparse_decode_attention / decode_step and the index-view
#      tests (EXTRA_TESTS: more files), at most TEST_TIMEOUT seconds (default 240)
#   2. `kvcomp bench decode --json $OUT/decode.json` (extra arguments are passed on, e.g.
#      --lengths 131072 --batches 1,8 --budgets 2048,10% --reps 50); it times the previous
#      kernels (module flags) beside the defaults in the same process
#   3. with CENTERED="ARGS", also `kvcomp bench decode --token-score centered_norm ARGS
#      --json $OUT/decode_cn.json` (the k_scale selection), at most CENTERED_TIMEOUT seconds
# The packages come from tools/gpu_env.sh (PYTHONPATH, no install: torch and triton are the
# machine's). Logs go to $OUT (default .out/); the benchmark's table is printed last.
#   SKIP_TESTS=1 tools/gpu_kernels.sh --quick      benchmark only, small subset
#   SWEEP=1 tools/gpu_kernels.sh                     also time the kernels' launch knobs
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
OUT="${OUT:-.out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
test_rc=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    # one pytest per file, all at once: Triton's compiles (most of the tests' time on a fresh
    # machine) run on several cores; the GPU is idle enough for correctness tests, and the
    # benchmark below runs alone
    pids=()
    tlogs="$(mktemp -d)"
    # the hamming_topk file compiles the most kernels (its 35 GPU tests took ~320 s in one
    # process on a fresh H200, session 10): two processes, the tensor-core scan's tests apart
    # TESTS="file[:expr] ...": these instead of the default list (expr: pytest -k, "+" for spaces)
    default="tests/core/test_hamming_topk_kernel.py:mma_scan tests/core/test_hamming_topk_kernel.py:not+mma_scan
             tests/core/test_sparse_decode_attention_kernel.py tests/core/test_decode_step.py
             tests/core/test_broadcast_index_args.py"
    for spec in ${TESTS:-$default} ${EXTRA_TESTS:-}; do
        f="${spec%%:*}"
        sel=()
        expr="${spec#*:}"
        [ "$spec" != "$f" ] && sel=(-k "${expr//+/ }")
        log="$tlogs/$(basename "$f" .py)${sel:+_${expr//+/_}}.log"
        timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider --durations=3 \
            "${sel[@]}" "$f" >"$log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || test_rc=1
    done
    for log in "$tlogs"/*.log; do  # one file in $OUT (the device tool returns few files)
        echo "== $(basename "$log")"; cat "$log"
    done >"$OUT/pytest.log"
    grep -E "^== |passed|failed|skipped|rror|FAILED" "$OUT/pytest.log" | tail -40
fi
python3 -m kvcomp.cli bench decode --json "$OUT/decode.json" "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
cn_rc=0
if [ -n "${CENTERED:-}" ]; then
    # shellcheck disable=SC2086
    timeout "${CENTERED_TIMEOUT:-90}" python3 -m kvcomp.cli bench decode --token-score centered_norm \
        ${CENTERED} --json "$OUT/decode_cn.json" 2>&1 | tee "$OUT/bench_cn.log" | tail -8
    cn_rc=${PIPESTATUS[0]}
fi
if [ "${SWEEP:-0}" = "1" ]; then
    python3 -m kvcomp.cli bench decode --sweep --reps 50 --json "$OUT/sweep.json" 2>&1 \
        | tee "$OUT/sweep.log" | tail -80
fi
tail -n 16 "$OUT/bench.log"
echo "gpu tests rc=$test_rc  bench rc=$bench_rc  centered_norm bench rc=$cn_rc"
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$cn_rc" = 0 ]
