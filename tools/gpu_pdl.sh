#!/usr/bin/env bash
# One device call (session 6): programmatic dependent launch of the decode-path kernels
# (kvcomp.ops._pdl) and the GPU tests of sessions 5-6 that have not run on a GPU yet.
#   1. -m gpu tests, one pytest per file in parallel (TEST_TIMEOUT s each, default 200): PDL
#      bit-identity, the decode-step kernels, multi-query / verify steps, the "lse" scan, the
#      fused decoder's kernels (all launched with PDL now), static cache, graphs, integration
#   2. kvcomp bench decode (arguments passed on): 'step before' = the same step without PDL
#   3. with VERIFY=1: kvcomp bench verify; with LSE=1: tools/experiments/lse_select_speed.py
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
OUT="${OUT:-.out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
test_rc=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    pids=()
    tlogs="$(mktemp -d)"
    for f in ${TESTS:-tests/core/test_pdl.py tests/core/test_hamming_topk_kernel.py \
             tests/core/test_sparse_decode_attention_kernel.py tests/core/test_decode_step.py \
             tests/core/test_broadcast_index_args.py tests/core/test_block_lse.py \
             tests/core/test_verify_step.py tests/core/test_append_kv.py tests/core/test_gemv.py \
             tests/core/test_norm_act.py tests/core/test_fusion.py tests/core/test_graphs_gpu.py \
             tests/core/test_static_cache.py tests/core/test_integration_gpu.py}; do
        log="$tlogs/$(basename "$f" .py).log"
        timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider "$f" >"$log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || test_rc=1; done
    for log in "$tlogs"/*.log; do echo "== $(basename "$log")"; cat "$log"; done >"$OUT/pytest.log"
    grep -E "^== |passed|failed|error|FAILED|Timeout" "$OUT/pytest.log" | tail -60
fi
bench_rc=0
if [ "${SKIP_BENCH:-0}" != "1" ]; then
    timeout "${BENCH_TIMEOUT:-240}" python3 -m kvcomp.cli bench decode --json "$OUT/decode.json" "$@" \
        > "$OUT/bench.log" 2>&1
    bench_rc=$?
fi
verify_rc=0
if [ "${VERIFY:-0}" = "1" ]; then
    timeout "${VERIFY_TIMEOUT:-120}" python3 -m kvcomp.cli bench verify --json "$OUT/verify.json" \
        ${VERIFY_ARGS:-} > "$OUT/verify.log" 2>&1
    verify_rc=$?
    tail -n 25 "$OUT/verify.log"
fi
lse_rc=0
if [ "${LSE:-0}" = "1" ]; then
    timeout "${LSE_TIMEOUT:-90}" python3 tools/experiments/lse_select_speed.py > "$OUT/lse.log" 2>&1
    lse_rc=$?
    tail -n 8 "$OUT/lse.log"
fi
[ "${SKIP_BENCH:-0}" != "1" ] && tail -n 14 "$OUT/bench.log"
echo "gpu tests rc=$test_rc  decode bench rc=$bench_rc  verify bench rc=$verify_rc  lse rc=$lse_rc"
