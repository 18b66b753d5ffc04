#!/usr/bin/env bash
# One device call for issue 6 with the fused decoder (kvcomp.fusion.FusedDecode):
#   1. GPU tests of the fused ops, the static cache and CUDA graphs
#   2. GPU tests of the decode-step kernels (selection, attention); if they fail and GOOD_OPS
#      names a commit, that commit's hamming_topk / sparse_decode_attention are checked out in
#      this copy of the tree and tested again (the bench then runs on them; the log says so)
#   3. kvcomp bench e2e --fuse all (extra arguments passed on), JSON to $OUT/e2e.json
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
OUT="${OUT:-.out}"
mkdir -p "$OUT"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu ${FUSE_TESTS:-tests/core/test_gemv.py tests/core/test_norm_act.py \
    tests/core/test_fusion.py tests/core/test_graphs_gpu.py tests/core/test_append_kv.py tests/core/test_static_cache.py} \
    2>&1 | tee "$OUT/pytest_fuse.log" | tail -8
fuse_rc=${PIPESTATUS[0]}
attn_tests="tests/core/test_sparse_decode_attention_kernel.py tests/core/test_decode_step.py tests/core/test_hamming_topk_kernel.py"
if [ "${FORCE_GOOD:-0}" = 1 ] && [ -n "${GOOD_OPS:-}" ]; then  # known-good decode-step kernels, not re-tested
    git checkout "$GOOD_OPS" -- packages/kvcomp-core/src/kvcomp/ops/hamming_topk packages/kvcomp-core/src/kvcomp/ops/sparse_decode_attention
    attn_tests=""
    echo "decode-step kernels of $GOOD_OPS (verified on the GPU before), tests skipped"
fi
attn_rc=0
if [ -n "$attn_tests" ]; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu $attn_tests 2>&1 | tee "$OUT/pytest_attn.log" | tail -8
    attn_rc=${PIPESTATUS[0]}
fi
if [ "$attn_rc" != 0 ] && [ -n "${GOOD_OPS:-}" ]; then
    echo "decode-step kernel tests failed: using hamming_topk / sparse_decode_attention of $GOOD_OPS"
    git checkout "$GOOD_OPS" -- packages/kvcomp-core/src/kvcomp/ops/hamming_topk packages/kvcomp-core/src/kvcomp/ops/sparse_decode_attention
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu $attn_tests 2>&1 | tee "$OUT/pytest_attn_good.log" | tail -4
fi
echo "fused-op tests rc=$fuse_rc  decode-step kernel tests rc=$attn_rc"
timeout "${BENCH_TIMEOUT:-330}" python3 -m kvcomp.cli bench e2e --fuse all --json "$OUT/e2e.json" "$@" 2>&1 | tee "$OUT/bench.log"
echo "bench rc=${PIPESTATUS[0]}"
